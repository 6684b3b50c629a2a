"""Peak CPU memory of the SD 1.5 VAE decode and of its mid attention, with and without tiling / query chunking.

Each case runs in a fresh subprocess so peaks do not mix. The measure is the process's peak resident set size
(getrusage ru_maxrss) during the measured call minus the resident set just before it (model and inputs already
built): the extra memory the call needed. The children run with MALLOC_MMAP_THRESHOLD_=131072, so glibc serves
every allocation over 128 KiB with mmap and returns it to the system when freed; resident memory then follows live
tensors closely (without it, glibc's adaptive threshold keeps freed blocks under 32 MiB in its heap and a chunked
kernel's many 8 MiB pieces look twice their size). Small-allocation noise is a few MB. These are CPU figures in fp32
with random weights (the SD 1.5 VAE shape, `ldm.SD15.vae`); GPU figures need a GPU run (torch.cuda.max_memory_allocated).

    python scripts/bench_memory.py                  # every case, a table and the ratios (about 2-3 min on 2 cores)
    python scripts/bench_memory.py --case decode-tiled-256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

# name: (what, latent side, tile px or None, backend, chunk or None)
CASES = {
    "decode-untiled": ("decode", 64, None, "sdpa", None),
    "decode-tiled-256": ("decode", 64, 256, "sdpa", None),
    "attn64-math": ("attention", 64, None, "math", None),
    "attn64-math-chunk512": ("attention", 64, None, "math", 512),
    "attn64-sdpa": ("attention", 64, None, "sdpa", None),
    "attn128-math": ("attention", 128, None, "math", None),
    "attn128-math-chunk1024": ("attention", 128, None, "math", 1024),
    "attn128-sdpa": ("attention", 128, None, "sdpa", None),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def run_case(name: str) -> dict:
    import ldm
    from ldm.attention import attention_backend, set_attention_chunk

    what, side, tile, backend, chunk = CASES[name]
    torch.manual_seed(0)
    vae = ldm.AutoencoderKL(ldm.SD15.vae).eval()
    if tile is not None:
        vae.enable_tiling(tile)
    set_attention_chunk(vae, chunk)
    if what == "decode":
        x = torch.randn(1, 4, side, side)  # (1, 4, 64, 64) -> a 512x512 image
        fn = vae.decode
    else:  # the decoder's mid attention alone, at the latent resolution: L = S = side * side, one head of 512
        x = torch.randn(1, 512, side, side)
        fn = vae.decoder.mid_block.attentions[0]
    before, build_peak = rss_mb(), peak_mb()  # if building peaked above the call, the call's peak is hidden
    start = time.perf_counter()
    with attention_backend(backend):
        out = fn(x)
    seconds = time.perf_counter() - start
    extra = peak_mb() - before
    return {"case": name, "extra_peak_mb": round(extra, 1), "seconds": round(seconds, 2),
            "hidden_by_build_peak": peak_mb() <= build_peak, "out_shape": list(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), help="run one case in this process and print JSON")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    results = {}
    for name in CASES:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        line = subprocess.run([sys.executable, __file__, "--case", name, "--threads", str(args.threads)],
                              check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        results[name] = json.loads(line)
        r = results[name]
        flag = "  (hidden by the build peak!)" if r["hidden_by_build_peak"] else ""
        print(f"{name:32s} extra peak {r['extra_peak_mb']:8.1f} MB  {r['seconds']:7.2f} s{flag}", flush=True)
    ratios = [("decode: tiled 256 px / untiled", "decode-tiled-256", "decode-untiled"),
              ("attention 64x64, math: chunk 512 / whole", "attn64-math-chunk512", "attn64-math"),
              ("attention 64x64: sdpa / math", "attn64-sdpa", "attn64-math"),
              ("attention 128x128, math: chunk 1024 / whole", "attn128-math-chunk1024", "attn128-math"),
              ("attention 128x128: sdpa / math", "attn128-sdpa", "attn128-math")]
    print()
    for what, a, b in ratios:
        print(f"{what:45s} memory {results[a]['extra_peak_mb'] / results[b]['extra_peak_mb']:.3f}x  "
              f"time {results[a]['seconds'] / results[b]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
