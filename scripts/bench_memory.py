"""Peak memory with and without VAE tiling / attention chunking: SD 1.5 VAE parts on the CPU, txt2img on a GPU.

Each case runs in a fresh subprocess so peaks do not mix. The measure is the process's peak resident set size
(getrusage ru_maxrss) during the measured call minus the resident set just before it (model and inputs already
built): the extra memory the call needed. The children run with MALLOC_MMAP_THRESHOLD_=131072, so glibc serves
every allocation over 128 KiB with mmap and returns it to the system when freed; resident memory then follows live
tensors closely (without it, glibc's adaptive threshold keeps freed blocks under 32 MiB in its heap and a chunked
kernel's many 8 MiB pieces look twice their size). Small-allocation noise is a few MB. These are CPU figures in fp32
with random weights (the SD 1.5 VAE shape, `ldm.SD15.vae`).

    python scripts/bench_memory.py                  # every case, a table and the ratios (about 2-3 min on 2 cores)
    python scripts/bench_memory.py --case decode-tiled-256

The pipeline cases (`--pipeline`, implied by `--device cuda`) answer issue 8's question: does SD 1.5 txt2img at
1024x1024 fit in 8 GiB of GPU memory? The whole SD 1.5 pipeline (full-shape UNet, VAE and CLIP with trained-like
random weights from tests/helpers.trained_like_, as scripts/bench_gpu.py makes them; the real tokenizer and DDIM)
runs one image with classifier-free guidance (the UNet sees 2 rows) for --steps steps, in fp16 on CUDA, once per
case, each case in a fresh process:

    plain            the pipeline as loaded
    chunking         pipe.enable_attention_chunking(--chunk)
    tiling           pipe.enable_vae_tiling() (512 px tiles, overlap 0.25)
    tiling+chunking  both

Per case: torch.cuda.max_memory_allocated over the whole call (weights included: that is what must fit in the
card), the same for the denoising loop and the VAE decode alone, max_memory_reserved (the caching allocator's
footprint, what nvidia-smi shows minus the CUDA context), seconds, and whether the VAE fell back to fp32 (an fp16
overflow decodes again in fp32, which costs memory; the run says so). "fits 8 GiB" compares max allocated with
8 GiB. The command for the issue (about 3-5 minutes on one H100, most of it building the random weights):

    python scripts/bench_memory.py --device cuda --size 1024 --steps 3

`python scripts/bench_memory.py --pipeline --device cpu --size 128 --steps 1` runs the same cases on the CPU in
fp32: a check that the script runs (~5 GB of RAM per case). Its figure is the extra peak RSS over the whole call
(weights excluded, no loop/decode split), NaN when that stays below the peak of building the weights, as it does
at small sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
BUDGET = 8 * GIB  # issue 8: SD 1.5 at 1024x1024 within 8 GiB of GPU memory

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

# SD 1.5 txt2img, name: (VAE tiling, attention chunking)
PIPELINE_CASES = {
    "plain": (False, False),
    "chunking": (False, True),
    "tiling": (True, False),
    "tiling+chunking": (True, True),
}
PROMPT = "a watercolour painting of a fox in the snow, highly detailed"


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


def build_sd15(device: str, dtype: torch.dtype) -> Any:
    """The SD 1.5 pipeline at full shape with trained-like random weights (built in fp32 on the CPU, then moved)."""
    import ldm
    from tests.helpers import TOKENIZER_DIR, diffusers_config, trained_like_

    parts = {"unet": ldm.UNet2DConditionModel(ldm.SD15.unet), "vae": ldm.AutoencoderKL(ldm.SD15.vae),
             "text_encoder": ldm.CLIPTextModel(ldm.SD15.text)}
    for seed, module in enumerate(parts.values()):
        trained_like_(module, seed=seed).eval()
    scheduler = ldm.schedulers.from_name("ddim", diffusers_config("sd15", "scheduler"))
    pipe = ldm.StableDiffusionPipeline(**parts, tokenizer=ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15"),
                                       scheduler=scheduler, family=ldm.SD15)
    return pipe.to(device, dtype)


class PeakMemory:
    """Peak memory of a block: CUDA's max_memory_allocated / reserved (absolute, weights included), or on the CPU
    the peak RSS over the block minus the RSS before it (extra memory only; NaN when the block's peak stayed below
    an earlier one of the process, e.g. building the weights, and so cannot be seen)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.before, self.earlier_peak = rss_mb(), peak_mb()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.allocated_mib = torch.cuda.max_memory_allocated() / 2**20
            self.reserved_mib = torch.cuda.max_memory_reserved() / 2**20
        else:
            self.allocated_mib = peak_mb() - self.before
            self.reserved_mib = float("nan")
            if peak_mb() <= self.earlier_peak:  # the block never passed the process's earlier peak: unknown
                self.allocated_mib = float("nan")
        self.seconds = time.perf_counter() - self.start


@torch.no_grad()
def run_pipeline_case(name: str, device: str, size: int, steps: int, chunk: int) -> dict:
    tiling, chunking = PIPELINE_CASES[name]
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = build_sd15(device, dtype)
    if tiling:
        pipe.enable_vae_tiling()
    if chunking:
        pipe.enable_attention_chunking(chunk)
    weights_mib = (torch.cuda.memory_allocated() / 2**20) if device == "cuda" else float("nan")
    call = dict(negative_prompt="blurry", height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                seed=0)
    with PeakMemory(device) as whole:  # the real call: prompt encoding, the loop, the decode
        images = pipe(PROMPT, output_type="np", **call).images
    loop = decode = None
    if device == "cuda":  # the CPU's peak RSS never resets: a later, smaller peak would read as 0
        with PeakMemory(device) as loop:  # the same call, split: the denoising loop ...
            latents = pipe(PROMPT, output_type="latent", **call).latents
        with PeakMemory(device) as decode:  # ... and the VAE decode (the latents stay alive, as in the call)
            pipe.decode(latents)
    return {"case": name, "device": device, "dtype": str(dtype).removeprefix("torch."), "size": size,
            "steps": steps, "chunk": chunk if chunking else None, "weights_mib": round(weights_mib, 1),
            "peak_allocated_mib": round(whole.allocated_mib, 1), "peak_reserved_mib": round(whole.reserved_mib, 1),
            "loop_peak_mib": round(loop.allocated_mib, 1) if loop else float("nan"),
            "decode_peak_mib": round(decode.allocated_mib, 1) if decode else float("nan"),
            "seconds": round(whole.seconds, 2), "vae_fp32_retry": pipe._warned_vae_upcast,
            "image_finite": bool(torch.isfinite(torch.as_tensor(images)).all()),
            "fits_8gib": device == "cuda" and whole.allocated_mib * 2**20 <= BUDGET}


def pipeline_report(args: argparse.Namespace) -> None:
    """Each pipeline case in a fresh process, then one table."""
    results = {}
    for name in PIPELINE_CASES:
        cmd = [sys.executable, __file__, "--pipeline", "--case", name, "--device", args.device, "--size",
               str(args.size), "--steps", str(args.steps), "--chunk", str(args.chunk), "--threads", str(args.threads)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:  # e.g. out of memory: a row that says so, the other cases still run
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{name:16s} FAILED: {last}", flush=True)
            continue
        r = results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
    cuda = args.device == "cuda"
    what = "peak allocated (weights incl.)" if cuda else "extra peak RSS (weights excl.)"
    print(f"\nSD 1.5 txt2img {args.size}x{args.size}, {args.steps} DDIM steps, CFG, "
          f"{'fp16 on CUDA' if cuda else 'fp32 on CPU'}; {what}, MiB")
    print(f"{'case':16s} {'whole call':>10s} {'loop':>8s} {'decode':>8s} {'reserved':>9s} {'seconds':>8s} "
          f"{'vs plain':>8s} {'fp32 retry':>10s}  fits 8 GiB")
    plain = results.get("plain", {}).get("peak_allocated_mib")
    for name, r in results.items():
        ratio = f"{r['peak_allocated_mib'] / plain:.2f}x" if plain and plain == plain else "-"  # NaN != NaN
        fits = ("yes" if r["fits_8gib"] else "NO") if cuda else "(GPU only)"
        print(f"{name:16s} {r['peak_allocated_mib']:10.0f} {r['loop_peak_mib']:8.0f} {r['decode_peak_mib']:8.0f} "
              f"{r['peak_reserved_mib']:9.0f} {r['seconds']:8.2f} {ratio:>8s} {str(r['vae_fp32_retry']):>10s}  {fits}")
    if cuda and "plain" in results:
        print(f"weights: {results['plain']['weights_mib']:.0f} MiB; 8 GiB = {BUDGET / 2**20:.0f} MiB; "
              f"device: {torch.cuda.get_device_name()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, *PIPELINE_CASES],
                        help="run one case in this process and print JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipeline", action="store_true",
                        help="the SD 1.5 txt2img cases (implied by --device cuda) instead of the VAE/attention ones")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the pipeline cases in fp16, peaks from torch.cuda.max_memory_allocated")
    parser.add_argument("--size", type=int, default=1024, help="pipeline cases: image side in px (default 1024)")
    parser.add_argument("--steps", type=int, default=3, help="pipeline cases: DDIM steps (default 3)")
    parser.add_argument("--chunk", type=int, default=1024,
                        help="pipeline cases: query rows per attention call with chunking (default 1024)")
    args = parser.parse_args()
    pipeline = args.pipeline or args.device == "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if args.case is not None and (args.case in PIPELINE_CASES) != pipeline:
        parser.error(f"--case {args.case} is a {'pipeline' if args.case in PIPELINE_CASES else 'CPU component'} "
                     f"case: {'add --pipeline' if args.case in PIPELINE_CASES else 'drop --pipeline/--device cuda'}")
    if args.size < 8 or args.size % 8 or args.steps < 1 or args.chunk < 1:
        parser.error("--size must be a positive multiple of 8, --steps and --chunk >= 1")
    torch.set_num_threads(args.threads)
    if pipeline:
        if args.case:
            print(json.dumps(run_pipeline_case(args.case, args.device, args.size, args.steps, args.chunk)))
        else:
            pipeline_report(args)
        return
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
