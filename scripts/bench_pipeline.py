"""Benchmark the whole pipeline, ours next to diffusers on the same weights: time, memory, and agreement.

    python scripts/bench_pipeline.py --model v1-5-pruned-emaonly.safetensors --device cuda --dtype fp16
    python scripts/bench_pipeline.py --synthetic sd15 --device cuda --dtype fp16 --reference   # no weights needed
    python scripts/bench_pipeline.py --synthetic sd15 --size 256 --steps 4 --reference          # CPU, quick

Per implementation: load seconds, seconds per image (median of --repeats runs after a warm-up), seconds per
denoising step, peak memory (CUDA: max allocated; CPU: the process's peak RSS, which includes both models when
--reference is given). With --reference: diffusers' StableDiffusionPipeline on the same file, the same seeds
(generator=[manual_seed(S + i)]) and scheduler, and the agreement: final latents' relative error, images' PSNR and
the largest uint8 difference (the contract: fp32 latents within 1e-4; fp16 on CUDA PSNR >= 35 dB).

--synthetic FAMILY writes a full-shape checkpoint with trained-like random values (tests/synth.py) into a
temporary folder: the timings are those of the real architecture, the pictures are noise. Run heavy CPU jobs under
`flock /tmp/ldm-heavy.lock` on shared machines. diffusers is a benchmark reference only (never imported by ldm/).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldm  # noqa: E402

CONFIG_DIRS = {"sd15": "sd15", "sd21-base": "sd21base", "sd21-v": "sd21", "sd15-inpaint": "sd15-inpaint",
               "sd2-inpaint": "sd2-inpaint"}
MANIFESTS = {"sd15": "sd15", "sd21-base": "sd21base", "sd21-v": "sd21v"}
DIFFUSERS_SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
                        "pndm": ("PNDMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
                        "euler-a": ("EulerAncestralDiscreteScheduler", {}),
                        "dpm++2m": ("DPMSolverMultistepScheduler", {}),
                        "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed_runs(run, device: str, repeats: int) -> tuple[list[float], list[float], object]:
    """run(callback) -> output; returns per-run seconds, per-step seconds (all runs), the last output."""
    run(None)  # warm-up: kernels, allocator, page cache
    totals, steps, out = [], [], None
    for _ in range(repeats):
        stamps = []

        def stamp(*_args) -> None:
            sync(device)
            stamps.append(time.perf_counter())

        sync(device)
        start = time.perf_counter()
        out = run(stamp)
        sync(device)
        totals.append(time.perf_counter() - start)
        steps += [b - a for a, b in zip([start] + stamps[:-1], stamps)][1:]  # the first step also encodes prompts
    return totals, steps, out


def bench_ours(args: argparse.Namespace, model: str, dtype: torch.dtype) -> dict:
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = ldm.load_pipeline(model, dtype=dtype, device=args.device, family=args.family)
    load_s = time.perf_counter() - start
    kw = dict(negative_prompt=args.negative_prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
              guidance_scale=args.guidance, seed=args.seed, num_images_per_prompt=args.batch,
              scheduler=args.scheduler, output_type="np")
    totals, steps, out = timed_runs(lambda cb: pipe(args.prompt, callback=cb, **kw), args.device, args.repeats)
    result = summary("ldm", load_s, totals, steps, args)
    family = pipe.family.name if pipe.family is not None else "none"
    del pipe
    return result | {"family": family, "images": out.images, "latents": out.latents.float().cpu()}


def bench_reference(args: argparse.Namespace, model: str, family: str, dtype: torch.dtype) -> dict:
    import diffusers

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if Path(model).is_dir():
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None,
                                                                 requires_safety_checker=False)
    else:
        config = ROOT / "tests" / "fixtures" / "diffusers_configs" / CONFIG_DIRS[family]
        pipe = diffusers.StableDiffusionPipeline.from_single_file(model, config=str(config), local_files_only=True,
                                                                  dtype=dtype, safety_checker=None,
                                                                  feature_extractor=None,
                                                                  requires_safety_checker=False)
    pipe.to(args.device)
    if args.scheduler is not None:
        name, extra = DIFFUSERS_SCHEDULERS[args.scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    n = args.batch
    captured = {}

    def run(cb):
        def on_step(p, i, t, tensors):
            captured["latents"] = tensors["latents"]
            if cb is not None:
                cb()
            return tensors

        gens = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(n)]
        return pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.size, width=args.size,
                    num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                    num_images_per_prompt=n, output_type="np", callback_on_step_end=on_step)

    totals, steps, out = timed_runs(run, args.device, args.repeats)
    result = summary("diffusers", load_s, totals, steps, args)
    del pipe
    return result | {"images": out.images, "latents": captured["latents"].float().cpu()}


def summary(name: str, load_s: float, totals: list[float], steps: list[float], args: argparse.Namespace) -> dict:
    return {"impl": name, "load_s": round(load_s, 3), "s_per_image": round(statistics.median(totals) / args.batch, 4),
            "s_per_step": round(statistics.median(steps), 4) if steps else None,
            "peak_memory_gb": round(peak_memory_gb(args.device), 3)}


def agreement(ours: dict, ref: dict) -> dict:
    a, b = ours["images"].astype(np.float64), ref["images"].astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    levels = np.abs(np.round(a * 255) - np.round(b * 255))
    rel = float((ours["latents"] - ref["latents"]).double().norm() / ref["latents"].double().norm())
    return {"latents_rel_err": rel, "psnr_db": (10 * math.log10(1 / mse)) if mse > 0 else math.inf,
            "max_uint8_diff": int(levels.max()), "share_differing": float((levels > 0).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint file or a diffusers folder")
    src.add_argument("--synthetic", choices=tuple(MANIFESTS), help="write a random full-shape checkpoint first")
    p.add_argument("--family", default=None, help="family for an SD 2.x single file (sd21-base / sd21-v)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default: fp16 on cuda, else fp32")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scheduler", default="dpm++2m", choices=tuple(DIFFUSERS_SCHEDULERS))
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a watercolour painting of a fox in the snow, highly detailed")
    p.add_argument("--negative-prompt", default="blurry, low quality")
    p.add_argument("--reference", action="store_true", help="also run diffusers and compare")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            from tests.synth import write_synthetic_checkpoint

            model = str(write_synthetic_checkpoint(MANIFESTS[args.synthetic], Path(tmp) / "synthetic.safetensors",
                                                   dtype=torch.float16 if dtype_name == "fp16" else None))
            args.family = args.family or args.synthetic
        else:
            model = args.model
        results = [bench_ours(args, model, dtype)]
        if args.reference:
            results.append(bench_reference(args, model, results[0]["family"], dtype))

    setup = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
             "dtype": dtype_name, "size": args.size, "steps": args.steps, "scheduler": args.scheduler,
             "guidance": args.guidance, "batch": args.batch, "torch": torch.__version__}
    print(json.dumps(setup))
    print(f"{'impl':10} {'load s':>8} {'s/image':>9} {'s/step':>8} {'peak GB':>8}")
    for r in results:
        print(f"{r['impl']:10} {r['load_s']:8.2f} {r['s_per_image']:9.3f} {r['s_per_step'] or 0:8.3f} "
              f"{r['peak_memory_gb']:8.2f}")
    report = {"setup": setup, "results": [{k: v for k, v in r.items() if k not in ("images", "latents", "family")}
                                          for r in results]}
    if len(results) == 2:
        report["agreement"] = agreement(*results)
        print("agreement:", json.dumps(report["agreement"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
