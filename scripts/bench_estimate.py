"""The memory estimate of ldm/limits.py against the measured peak of one generation (docs/reliability.md).

    python scripts/bench_estimate.py SIZE BATCH sdpa|math [--model PATH]

Loads the model (default: the packaged shapes model), runs one small warm-up call, then one call of BATCH images of
SIZE x SIZE with 2 steps and guidance under the attention backend given, and prints the estimate next to the peak
resident memory above the warm state (VmHWM of /proc/self/status, Linux only). Run each case in a fresh process:
the peak only ever grows. The estimate is meant to stay above the measurement.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ldm
from ldm.attention import attention_backend
from ldm.limits import format_bytes, pipeline_estimate
from ldm.train import DEFAULT_MODEL_DIR


def peak_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("size", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("backend", choices=("sdpa", "math"))
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = ldm.load_pipeline(args.model)
    pipe("warm", num_inference_steps=1, seed=0, height=64, width=64)
    base = peak_bytes()
    with attention_backend(args.backend):
        est = pipeline_estimate(pipe, args.size, args.size, args.batch, True)
        pipe("a red circle", num_inference_steps=2, seed=0, height=args.size, width=args.size,
             num_images_per_prompt=args.batch)
    print(f"{args.size}x{args.size} batch {args.batch} {args.backend}: estimate {format_bytes(est.total)} "
          f"(UNet {format_bytes(est.unet)}, VAE {format_bytes(est.vae)}), measured peak above the loaded model "
          f"{format_bytes(peak_bytes() - base)}")


if __name__ == "__main__":
    main()
