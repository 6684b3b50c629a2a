"""Time our VAE decode and CLIP text encode against diffusers / transformers on the same weights, in one run.

    python scripts/bench_components.py [--latent 32] [--runs 7] [--threads 2]

Full SD 1.5 shapes, CPU fp32, trained-like random weights loaded into both (strict). Runs are interleaved
(alternating which goes first) after one warm-up each; the median of each is reported with the ratio ours/reference
(< 1.0 means we are faster). Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
import transformers  # noqa: E402

import ldm  # noqa: E402
from tests.helpers import diffusers_config, rel_err, trained_like_  # noqa: E402


def interleaved(ours, ref, runs: int) -> tuple[float, float]:
    ours(), ref()  # warm-up
    t_ours, t_ref = [], []
    for i in range(runs):
        pairs = ((ours, t_ours), (ref, t_ref))
        for fn, acc in pairs if i % 2 == 0 else pairs[::-1]:  # alternate who goes first (caches, clocks)
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_ref)


def report(name: str, t_ours: float, t_ref: float, err: float) -> None:
    print(f"{name:<34} ours {t_ours * 1e3:9.1f} ms   reference {t_ref * 1e3:9.1f} ms   "
          f"ratio {t_ours / t_ref:5.3f}   rel err {err:.1e}")


@torch.inference_mode()
def bench_vae(latent: int, runs: int) -> None:
    ref = trained_like_(diffusers.AutoencoderKL(**diffusers_config("sd15", "vae")), seed=0).eval()
    ours = ldm.AutoencoderKL(ldm.SD15.vae).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    err = rel_err(ours.decode(z), ref.decode(z).sample)
    t_ours, t_ref = interleaved(lambda: ours.decode(z), lambda: ref.decode(z).sample, runs)
    report(f"VAE decode (1,4,{latent},{latent})", t_ours, t_ref, err)


@torch.inference_mode()
def bench_clip(family: str, preset: ldm.FamilyPreset, runs: int) -> None:
    cfg = transformers.CLIPTextConfig(**diffusers_config(family, "text_encoder"))
    ref = trained_like_(transformers.CLIPTextModel(cfg), seed=0).eval()
    ours = ldm.CLIPTextModel(preset.text).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 49406, 49407
    err = rel_err(ours(ids).last_hidden_state, ref(ids).last_hidden_state)
    t_ours, t_ref = interleaved(lambda: ours(ids), lambda: ref(ids), runs)
    report(f"CLIP encode {family} (2,77)", t_ours, t_ref, err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side for the VAE decode (64 = 512 px)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, median of {args.runs} interleaved runs")
    bench_vae(args.latent, args.runs)
    bench_clip("sd15", ldm.SD15, args.runs)
    bench_clip("sd21", ldm.SD21_V, args.runs)


if __name__ == "__main__":
    main()
