"""Benchmark: our UNet forward against diffusers' on the same weights (CPU, fp32 by default).

Speed: both models share the very same weight tensors (ours is built on the meta device and loaded from the
reference's state dict with assign=True); runs are interleaved, alternating which model goes first, after one
warm-up each; the median of each is reported and their ratio ours / diffusers (target <= 1.0), and the median of
the per-run ratios, which a load change on a shared machine between runs does not skew.

Peak memory: each model runs in a fresh subprocess holding only that model. After building it the process resets
its resident-set high-water mark (Linux /proc/self/clear_refs, "5"), runs one forward, and reports
VmHWM - VmRSS-before: the extra resident memory the forward pass needed at its peak (activations, workspaces).

Usage (the full SD 1.5 UNet needs ~3.5 GB; on a shared machine take the heavy-job lock):
    flock /tmp/ldm-heavy.lock python scripts/bench_unet.py --family sd15 --batch 2 --size 32 --runs 5
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldm  # noqa: E402
from ldm.config import FAMILIES, UNetConfig  # noqa: E402
from ldm.unet import UNet2DConditionModel  # noqa: E402
from tests.helpers import trained_like_  # noqa: E402


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    levels = cfg.cross_attention_levels
    return dict(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        attention_head_dim=cfg.num_heads, cross_attention_dim=cfg.cross_attention_dim,
        use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention,
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift, norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
    )


def build(cfg: UNetConfig, dtype: torch.dtype, which: str) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(ours, reference) sharing one set of trained-like weights; `which` = 'both', 'ours' or 'ref'."""
    from diffusers import UNet2DConditionModel as RefUNet

    with torch.device("meta"):
        ref = RefUNet(**diffusers_kwargs(cfg))
        ours = UNet2DConditionModel(cfg)
    ref = trained_like_(ref.to_empty(device="cpu"), seed=0).eval()
    if dtype != torch.float32:
        ref = ref.to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    return (None if which == "ref" else ours), (None if which == "ours" else ref)


def inputs(cfg: UNetConfig, batch: int, size: int, dtype: torch.dtype) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(dtype)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(dtype)
    return x, torch.tensor(981.0), ctx


def forward(model: torch.nn.Module, args: tuple, is_ref: bool) -> torch.Tensor:
    with torch.inference_mode():
        out = model(*args)
    return out.sample if is_ref else out


def timed(model: torch.nn.Module, args: tuple, is_ref: bool) -> float:
    start = time.perf_counter()
    forward(model, args, is_ref)
    return time.perf_counter() - start


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(cfg: UNetConfig, which: str, batch: int, size: int, dtype: torch.dtype) -> None:
    """Subprocess body: print the forward pass's peak extra resident memory in MiB, as JSON."""
    ours, ref = build(cfg, dtype, which)
    model, is_ref = (ref, True) if which == "ref" else (ours, False)
    args = inputs(cfg, batch, size, dtype)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed build-time memory back, so RSS is the weights only
    before = _proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    forward(model, args, is_ref)
    peak = _proc_kib("VmHWM")
    print(json.dumps({"which": which, "rss_before_mib": before / 1024,
                      "forward_peak_extra_mib": (peak - before) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd15", choices=sorted(FAMILIES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="latent side (32 = a 256 px image)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--backend", default="sdpa", choices=["sdpa", "math"], help="our attention backend")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--measure-peak", choices=["ours", "ref"], help=argparse.SUPPRESS)  # subprocess mode
    a = p.parse_args()
    if a.runs < 1:
        raise SystemExit("--runs must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = FAMILIES[a.family].unet
    if a.measure_peak:
        return measure_peak(cfg, a.measure_peak, a.batch, a.size, dtype)

    print(f"{a.family} UNet, batch {a.batch}, latent {a.size}x{a.size}, {a.dtype}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, our backend {a.backend}")
    ours, ref = build(cfg, dtype, "both")
    args = inputs(cfg, a.batch, a.size, dtype)
    with ldm.attention.attention_backend(a.backend):
        out, expected = forward(ours, args, False), forward(ref, args, True)  # warm-up, and a parity check
        err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        t_ours, t_ref = [], []
        for i in range(a.runs):
            order = [(ours, False, t_ours), (ref, True, t_ref)]
            for model, is_ref, times in (order if i % 2 == 0 else order[::-1]):
                times.append(timed(model, args, is_ref))
            print(f"  run {i + 1}: ours {t_ours[-1]:.3f} s, diffusers {t_ref[-1]:.3f} s", flush=True)
    m_ours, m_ref = statistics.median(t_ours), statistics.median(t_ref)
    print(f"relative error vs diffusers: {err:.2e}")
    print(f"median of {a.runs}: ours {m_ours:.3f} s, diffusers {m_ref:.3f} s, ratio ours/diffusers "
          f"{m_ours / m_ref:.3f}")
    # On a shared machine the load drifts between runs; the ratio within each adjacent pair is robust to that.
    paired = statistics.median(o / r for o, r in zip(t_ours, t_ref))
    print(f"median of the {a.runs} per-run ratios ours/diffusers (robust to load drift): {paired:.3f}")
    del ours, ref, out, expected
    gc.collect()
    if a.no_memory:
        return
    for which in ("ours", "ref"):
        cmd = [sys.executable, __file__, "--measure-peak", which, "--family", a.family, "--batch", str(a.batch),
               "--size", str(a.size), "--dtype", a.dtype] + (["--threads", str(a.threads)] if a.threads else [])
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        name = "ours" if which == "ours" else "diffusers"
        print(f"peak extra memory of one forward, {name}: {res['forward_peak_extra_mib']:.0f} MiB "
              f"(weights resident: {res['rss_before_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
