"""The speed levers of ldm/optimize.py one at a time on the UNet forward, against our own eager UNet in the same run.

    python scripts/bench_levers.py [--family sd15] [--batch 2] [--size 32] [--runs 5] [--rounds 2] [--threads 2]
                                   [--device cpu|cuda] [--dtype fp32|bf16|fp16]

Random weights (the timing does not depend on them). Each round times eager, fused projections and channels_last in
turn (median of --runs forwards after one warm-up); the ratios use the median over rounds. It also checks that each
lever leaves the output unchanged (max |difference| relative to max |output|). torch.compile is not here: its
cost and gain are measured end to end by scripts/bench_gpu.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm import optimize as opt
from ldm.config import FAMILIES
from ldm.unet import UNet2DConditionModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sd15", choices=sorted(FAMILIES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="latent side (32 = a 256 px image)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = FAMILIES[args.family].unet
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cfg).eval().to(device, dtype)
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    context = torch.randn(args.batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            out = unet(x, t, context)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def timed() -> tuple[float, torch.Tensor]:
        out = forward()  # warm-up
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    levers = {"eager": (lambda: None, lambda: None),
              "fused projections": (lambda: opt.fuse_projections(unet), lambda: opt.unfuse_projections(unet)),
              "channels_last": (lambda: opt.to_channels_last(unet),
                                lambda: unet.to(memory_format=torch.contiguous_format))}
    seconds: dict[str, list[float]] = {name: [] for name in levers}
    reference = forward().float()
    change: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (on, off) in levers.items():
            on()
            s, out = timed()
            off()
            seconds[name].append(s)
            change[name] = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    eager = statistics.median(seconds["eager"])
    print(f"{args.family} UNet, batch {args.batch}, {args.size}x{args.size} latents, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'lever':<20}{'s/forward':>11}{'vs eager':>10}{'output change':>15}")
    for name, times in seconds.items():
        s = statistics.median(times)
        print(f"{name:<20}{s:>11.3f}{s / eager:>10.3f}{change[name]:>15.1e}")


if __name__ == "__main__":
    main()
