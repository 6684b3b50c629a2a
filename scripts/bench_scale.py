"""Batch generation on 1 vs N processes (torchrun) on the packaged shapes model: images per second, end to end.

    python scripts/bench_scale.py [--images 32] [--steps 20] [--batch-size 4] [--procs 2] [--device cpu|cuda]

Runs `ldm generate --prompts FILE --outdir DIR` on one job four ways, each in a fresh temporary folder and timed from
the command's start to its exit (interpreter start, imports, model load, text encoder, denoising, decode, PNG
writing and the manifest all included):
    1 process x 1 thread        the single-process rate that the throughput model multiplies
    N processes x 1 thread      torchrun, one shard per rank (on cuda: one GPU per rank)
    1 process x N threads       the same cores used by one process's intra-op threads instead
and a rerun of the finished job (nothing to make) as the fixed cost of starting up. It also checks that the N-process
images are byte-identical to the 1-process x 1-thread images. Ratios are against 1 process x 1 thread, measured in
the same run. On a CPU, N processes need N idle cores to scale (docs/scale.md). Last, in this process on one
thread, where one batch's time goes: text encoder, denoising loop, VAE decode, PNG encoding and writing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a cyan square",
           "a purple triangle", "a red square above a blue circle", "a green circle left of a yellow triangle"]


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def breakdown(images: int, steps: int, device: str) -> dict[str, float]:
    """Seconds per image of each stage of one batch of `images` prompts (median of 3 runs after a warm-up)."""
    import statistics

    import torch

    import ldm
    from ldm.images import save_png, to_numpy, to_pil
    from ldm.train import DEFAULT_MODEL_DIR

    torch.set_num_threads(1)
    pipe = ldm.load_pipeline(str(DEFAULT_MODEL_DIR), device=device)
    pipe.prompt_cache_size = 0
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images)]
    times: dict[str, list[float]] = {"text encoder": [], "denoising": [], "VAE decode": [], "PNG write": []}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for run_ in range(4):
            t0 = time.perf_counter()
            pipe.encode_prompt(prompts + [""] * images)  # what a guided batch encodes
            t1 = time.perf_counter()
            latents = pipe(prompts, num_inference_steps=steps, seed=0, output_type="latent").images
            t2 = time.perf_counter()
            pixels = to_pil(to_numpy(pipe.decode(latents)))
            t3 = time.perf_counter()
            for i, image in enumerate(pixels):
                save_png(image, Path(tmp) / f"{i}.png", parameters="x", overwrite=True)
            t4 = time.perf_counter()
            if run_:
                for name, seconds in zip(times, (t1 - t0, t2 - t1 - (t1 - t0), t3 - t2, t4 - t3)):
                    times[name].append(seconds / images)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    n = args.procs
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("".join(PROMPTS[i % len(PROMPTS)] + "\n" for i in range(args.images)))

        def job(out: str, threads: int) -> list[str]:
            return ["generate", "--prompts", str(prompts), "--outdir", str(Path(tmp) / out), "--seed", "0",
                    "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(threads),
                    "--device", args.device]

        single = [sys.executable, "-m", "ldm"]
        multi = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
                 "ldm"]
        rows = [("1 process x 1 thread", run(single + job("one", 1), 1)),
                (f"{n} processes x 1 thread", run(multi + job("multi", 1), 1)),
                (f"1 process x {n} threads", run(single + job("threads", n), n))]
        startup = run(single + job("one", 1), 1)  # the finished job again: start, check, skip
        same = all((Path(tmp) / "one" / f.name).read_bytes() == f.read_bytes()
                   for f in (Path(tmp) / "multi").glob("*.png"))
    base = rows[0][1]
    print(f"{args.images} images, {args.steps} steps, batch {args.batch_size}, {args.device}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'run':<26} {'seconds':>8} {'images/s':>9} {'vs 1x1':>7}")
    for name, seconds in rows:
        print(f"{name:<26} {seconds:8.1f} {args.images / seconds:9.2f} {base / seconds:6.2f}x")
    print(f"startup (rerun, nothing to make): {startup:.1f} s; {n}-process images byte-identical to 1-process: "
          f"{same}")
    parts = breakdown(args.batch_size, args.steps, args.device)
    total = sum(parts.values())
    print(f"one batch of {args.batch_size}, per image, 1 thread: " + ", ".join(
        f"{name} {1000 * s:.1f} ms ({100 * s / total:.0f}%)" for name, s in parts.items()))


if __name__ == "__main__":
    main()
