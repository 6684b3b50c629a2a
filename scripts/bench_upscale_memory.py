"""Peak memory of an x4 upscale on the CPU, ours next to diffusers: 256x256 -> 1024x1024 with VAE tiling.

The full official shapes (473M UNet, 340M OpenCLIP-H, 55M f=4 VAE) from a synthetic `x4-upscaler-ema.safetensors`
(tests/synth.py: every key of the official file, trained-like random values) written once to a temporary folder;
ours loads it with `ldm.load_pipeline`, diffusers with `StableDiffusionUpscalePipeline.from_single_file` and the
configs of tests/fixtures/diffusers_configs/x4-upscaler. Each case runs in a fresh subprocess (peaks do not mix),
fp32 on the CPU, one prompt with classifier-free guidance (the UNet sees 2 rows of 256x256 latents), --steps DDIM
steps, noise level 20, then the decode of 256x256 latents to 1024x1024 pixels:

    ours-tiled       pipe.enable_vae_tiling()      (512 px tiles, overlap 0.25: diffusers' arithmetic)
    diffusers-tiled  pipe.vae.enable_tiling()      (the same tiles)
    ours-untiled / diffusers-untiled               (only with --case: the decoder over the whole 1024 px image)

Per case: the process's peak RSS (getrusage ru_maxrss, weights included: what the machine must hold), the RSS
just before the call (weights loaded), the call's extra peak (peak during the call minus that; NaN when the call
never exceeded the loading peak), and seconds. The children run with MALLOC_MMAP_THRESHOLD_=131072 as in
scripts/bench_memory.py, so freed tensors leave the resident set. The ratio line compares ours with diffusers.

    python scripts/bench_upscale_memory.py                      # the two tiled cases (~15-25 min on 2 busy cores)
    python scripts/bench_upscale_memory.py --case ours-untiled --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_memory import peak_mb, rss_mb  # noqa: E402  (the same RSS measure as the other memory figures)

CASES = {"ours-tiled": ("ours", True), "diffusers-tiled": ("diffusers", True),
         "ours-untiled": ("ours", False), "diffusers-untiled": ("diffusers", False)}
PROMPT = "a photo of a lighthouse on a cliff, detailed"


def low_res_picture(size: int):
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    small = g.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def run_case(name: str, checkpoint: str, size: int, steps: int) -> dict:
    """One case in this (fresh) process."""
    import torch

    torch.set_grad_enabled(False)
    impl, tiled = CASES[name]
    if impl == "ours":
        import ldm

        pipe = ldm.load_pipeline(checkpoint)
        if tiled:
            pipe.enable_vae_tiling()
    else:
        import diffusers

        pipe = diffusers.StableDiffusionUpscalePipeline.from_single_file(
            checkpoint, config=str(ROOT / "tests" / "fixtures" / "diffusers_configs" / "x4-upscaler"),
            local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if tiled:
            pipe.vae.enable_tiling()
    image = low_res_picture(size)
    before, loading_peak = rss_mb(), peak_mb()
    start = time.perf_counter()
    kw = dict(num_inference_steps=steps, noise_level=20, guidance_scale=9.0)
    if impl == "ours":
        out = pipe(PROMPT, image, seed=0, **kw).images[0]
    else:
        out = pipe(PROMPT, image=image, generator=torch.Generator().manual_seed(0), **kw).images[0]
    seconds = time.perf_counter() - start
    peak = peak_mb()
    extra = peak - before if peak > loading_peak else float("nan")
    return {"case": name, "output": f"{out.size[0]}x{out.size[1]}", "peak_mb": peak, "before_mb": before,
            "extra_mb": extra, "seconds": seconds}


def spawn(name: str, checkpoint: str, size: int, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, __file__, "--child", name, "--checkpoint", checkpoint, "--size", str(size),
           "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=tuple(CASES), help="default: ours-tiled, diffusers-tiled")
    p.add_argument("--size", type=int, default=256, help="input side in px (output 4x); default 256")
    p.add_argument("--steps", type=int, default=1, help="DDIM steps (memory does not grow with them); default 1")
    p.add_argument("--checkpoint", default=None, help="an x4 single file (default: a synthetic one in a temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.checkpoint, args.size, args.steps)))
        return
    cases = args.case or ["ours-tiled", "diffusers-tiled"]
    with tempfile.TemporaryDirectory(prefix="x4-bench-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from tests.synth import write_synthetic_checkpoint

            checkpoint = str(write_synthetic_checkpoint("x4_upscaler", Path(tmp) / "x4-upscaler-ema.safetensors"))
        results = {}
        for name in cases:
            results[name] = r = spawn(name, checkpoint, args.size, args.steps)
            print(f"{name:18s} {args.size}px -> {r['output']}: peak RSS {r['peak_mb']:,.0f} MB, before the call "
                  f"{r['before_mb']:,.0f} MB, the call's extra peak {r['extra_mb']:,.0f} MB, {r['seconds']:.1f} s",
                  flush=True)
    for kind in ("tiled", "untiled"):
        ours, ref = results.get(f"ours-{kind}"), results.get(f"diffusers-{kind}")
        if ours and ref:
            print(f"{kind}: peak RSS ours / diffusers = {ours['peak_mb'] / ref['peak_mb']:.2f}x, extra peak "
                  f"{ours['extra_mb'] / ref['extra_mb']:.2f}x, time {ours['seconds'] / ref['seconds']:.2f}x")


if __name__ == "__main__":
    main()
