"""GPU speed benchmark: ours (eager, each speed lever added in turn, optimize=True) next to diffusers (SDPA eager,
and torch.compile) on the same synthetic full-shape weights, one model family per run (each fits in ~10 minutes).

    python scripts/bench_gpu.py --family sd15 --write docs/performance.md       # SD 1.5, 512x512
    python scripts/bench_gpu.py --family sd21-v --write docs/performance.md     # SD 2.1-768-v, 768x768
    python scripts/bench_gpu.py --smoke --write /tmp/perf.md                    # CPU, tiny model, 2 steps: a check

Setup: 50 DDIM steps, batch 1 with classifier-free guidance (the UNet sees 2 rows), fp16 (--dtype bf16 also).
Weights: diffusers' models built from the shipped configs (tests/fixtures/diffusers_configs) on this machine, filled
with trained-like random values (tests/helpers.trained_like_), and loaded into ours with strict=True, so both run
identical numbers; the pictures are noise, the timings are the real architecture's. Only the pipeline being
measured is on the GPU (the weights wait in CPU memory), so peak memory is that pipeline's own.

Per variant: the UNet's time per call at the CFG batch (CUDA events, median of --unet-iters calls after warm-up),
end-to-end seconds per image (median of --repeats full calls: prompt encoding, 50 steps, VAE decode), the first
call's seconds (which hold the compile; "compile s" = first call - steady call), peak allocated memory
(torch.cuda.max_memory_allocated, reset before each variant), the PSNR of its image against diffusers eager's, and
inductor's FX-graph cache hits/misses (run the command twice: the second process shows the cached compile time).
Ratios are times over diffusers eager's time measured in the same run (< 1: faster).

Our variants are cumulative: eager (no prompt cache) -> + prompt cache -> + channels_last -> + fused projections
-> + torch.compile (no CUDA graphs) -> optimize=True (the CUDA defaults: CUDA graphs, cudnn.benchmark).
diffusers + torch.compile follows diffusers' own recipe: channels_last, fused QKV, torch.compile(fullgraph=True)
in the same mode as ours. --write PATH replaces this family's section of PATH (between bench_gpu markers) or appends
one. diffusers is a benchmark reference only (never imported by ldm/).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldm  # noqa: E402
from ldm import optimize as opt  # noqa: E402
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig  # noqa: E402
from tests.helpers import DIFFUSERS_CONFIGS, TOKENIZER_DIR, load_json, trained_like_  # noqa: E402

PROMPT = "a watercolour painting of a fox in the snow, highly detailed"
NEGATIVE = "blurry, low quality"
# family: (fixture folder of configs and tokenizer, our preset, image side in px)
FAMILIES = {"sd15": ("sd15", ldm.SD15, 512), "sd21-v": ("sd21", ldm.SD21_V, 768)}
# --smoke: a tiny SD 1.x model (the tests' tiny pipeline) at 64x64 px
SMOKE_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(2, 4), norm_num_groups=32)
SMOKE_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 sample_size=64)
SMOKE_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)

# Our cumulative variants: name -> what is on. "optimize" is the switch with this device's defaults.
OUR_VARIANTS = {
    "ours eager": dict(cache=False),
    "+ prompt cache": dict(),
    "+ channels_last": dict(channels_last=True),
    "+ fused projections": dict(channels_last=True, fuse=True),
    "+ torch.compile": dict(channels_last=True, fuse=True, compile=True),
    "ours optimize=True": dict(optimize=True),
}
REF_VARIANTS = ("diffusers eager", "diffusers + compile")
COMPILED = {"+ torch.compile", "ours optimize=True", "diffusers + compile"}


# ----------------------------------------------------------------------------------------------------------------
# Weights and pipelines


@dataclasses.dataclass
class Model:
    """The configs and one CPU copy of the weights (in the benchmark dtype) that every variant is built from."""

    family: str
    preset: Any  # ldm FamilyPreset
    tokenizer_dir: Path
    configs: dict[str, dict]  # "unet", "vae", "text_encoder", "scheduler" (diffusers / transformers form)
    weights: dict[str, dict[str, torch.Tensor]]  # "unet", "vae", "text_encoder" state dicts
    size: int


def make_model(args: argparse.Namespace, dtype: torch.dtype) -> Model:
    import diffusers
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel

    if args.smoke:
        folder, preset, size = "sd15", ldm.SD15, 64
        configs = {"unet": SMOKE_UNET, "vae": SMOKE_VAE, "text_encoder": SMOKE_CLIP}
    else:
        folder, preset, size = FAMILIES[args.family]
        configs = {c: load_json(DIFFUSERS_CONFIGS / folder / c / "config.json")
                   for c in ("unet", "vae", "text_encoder")}
    configs["scheduler"] = load_json(DIFFUSERS_CONFIGS / folder / "scheduler" / "scheduler_config.json")
    size = args.size or size
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    refs = {"unet": diffusers.UNet2DConditionModel.from_config(configs["unet"]),
            "vae": diffusers.AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(RefCLIPConfig(**text_cfg))}
    weights = {}
    for seed, (name, module) in enumerate(refs.items()):
        trained_like_(module, seed=seed)
        weights[name] = {k: v.to(dtype) for k, v in module.state_dict().items()}
        del module
    if args.smoke:  # a preset for the tiny shapes
        preset = dataclasses.replace(preset, unet=UNetConfig.from_diffusers(configs["unet"]),
                                     vae=VAEConfig.from_diffusers(configs["vae"]),
                                     text=CLIPTextConfig.from_transformers(text_cfg), native_size=size)
    return Model(args.family, preset, TOKENIZER_DIR / folder, configs, weights, size)


def build_ours(model: Model, device: str, dtype: torch.dtype) -> Any:
    with torch.device(device):  # initialise on the device (fast), then load the shared weights
        parts = dict(unet=ldm.UNet2DConditionModel(model.preset.unet), vae=ldm.AutoencoderKL(model.preset.vae),
                     text_encoder=ldm.CLIPTextModel(model.preset.text))
    pipe = ldm.StableDiffusionPipeline(
        **parts, tokenizer=ldm.CLIPTokenizer.from_dir(model.tokenizer_dir),
        scheduler=ldm.schedulers.from_name("ddim", model.configs["scheduler"]), family=model.preset)
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        module.load_state_dict(model.weights[name], strict=True)
        module.eval()
    return pipe.to(device, dtype)


def build_reference(model: Model, device: str, dtype: torch.dtype) -> Any:
    import diffusers
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    text_cfg = {k: v for k, v in model.configs["text_encoder"].items() if not k.startswith("_")}
    with torch.device(device):
        parts = {"unet": diffusers.UNet2DConditionModel.from_config(model.configs["unet"]),
                 "vae": diffusers.AutoencoderKL.from_config(model.configs["vae"]),
                 "text_encoder": CLIPTextModel(RefCLIPConfig(**text_cfg))}
    for name, module in parts.items():
        module.load_state_dict(model.weights[name], strict=True)
        module.eval()
    pipe = diffusers.StableDiffusionPipeline(
        **parts, tokenizer=CLIPTokenizer.from_pretrained(model.tokenizer_dir),
        scheduler=diffusers.DDIMScheduler.from_config(model.configs["scheduler"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> list[float]:
    """Seconds per call of fn: CUDA events on a GPU, perf_counter on the CPU; after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def apply_ours(pipe: Any, levers: dict[str, Any], args: argparse.Namespace) -> None:
    if levers.get("cache") is False:
        pipe.prompt_cache_size = 0
    if levers.get("optimize"):
        if args.device == "cuda":  # the CUDA defaults, in the asked compile mode (graphs if the mode has them)
            graphs = args.compile_mode in ("reduce-overhead", "max-autotune")
            pipe.optimize(cache_dir=args.cache_dir, compile_mode=args.compile_mode, cuda_graphs=graphs)
        else:
            pipe.optimize(cache_dir=args.cache_dir, compile=True)
        return
    if levers.get("channels_last"):
        opt.to_channels_last(pipe.unet, pipe.vae)
    if levers.get("fuse"):
        opt.fuse_projections(pipe.unet)
    if levers.get("compile"):
        opt.compile_cache_dir(args.cache_dir)
        mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(args.compile_mode,
                                                                                              args.compile_mode)
        opt.compile_unet(pipe.unet, cuda_graphs=False, mode=mode)


def apply_reference(pipe: Any, args: argparse.Namespace) -> str:
    """diffusers' documented recipe for a compiled SD UNet; returns a note on what could not be applied."""
    note = ""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    try:
        pipe.fuse_qkv_projections()
    except Exception as e:  # an older or newer diffusers without it: say so in the table
        note = f"no fused QKV ({type(e).__name__})"
    opt.compile_cache_dir(args.cache_dir)
    mode = args.compile_mode if args.device == "cuda" else "default"
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    return note


def run_variant(name: str, model: Model, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    device = args.device
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    counters_before = opt.compile_counters()
    ours = name not in REF_VARIANTS
    note = ""
    pipe = build_ours(model, device, dtype) if ours else build_reference(model, device, dtype)
    if ours:
        apply_ours(pipe, OUR_VARIANTS[name], args)
    elif name == "diffusers + compile":
        note = apply_reference(pipe, args)

    f = 8
    rows = 2  # batch 1 with classifier-free guidance
    unet_in = torch.randn(rows, 4, model.size // f, model.size // f, device=device, dtype=dtype)
    text_dim = model.preset.unet.cross_attention_dim
    context = torch.randn(rows, 77, text_dim, device=device, dtype=dtype)
    if ours:
        sched = pipe.scheduler
        sched.set_timesteps(args.steps)
        t = sched.timesteps[len(sched.timesteps) // 2]

        def call_pipe() -> Any:
            return pipe(PROMPT, negative_prompt=NEGATIVE, height=model.size, width=model.size,
                        num_inference_steps=args.steps, guidance_scale=7.5, seed=args.seed, output_type="np").images

        def call_unet() -> Any:
            return pipe.unet(unet_in, t, context)
    else:
        pipe.scheduler.set_timesteps(args.steps, device=device)
        t = pipe.scheduler.timesteps[len(pipe.scheduler.timesteps) // 2]

        def call_pipe() -> Any:
            gens = [torch.Generator("cpu").manual_seed(args.seed)]
            return pipe(PROMPT, negative_prompt=NEGATIVE, height=model.size, width=model.size,
                        num_inference_steps=args.steps, guidance_scale=7.5, generator=gens, output_type="np").images

        def call_unet() -> Any:
            return pipe.unet(unet_in, t, encoder_hidden_states=context, return_dict=False)[0]

    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        call_pipe()  # the first call: compiles (compiled variants), warms kernels and the allocator
        sync(device)
        first = time.perf_counter() - t0
        unet_times = time_calls(call_unet, device, warmup=3, iters=args.unet_iters)
        e2e_times, images = [], None
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            images = call_pipe()
            sync(device)
            e2e_times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    counters = {k: v - counters_before[k] for k, v in opt.compile_counters().items()}
    e2e = statistics.median(e2e_times)
    result = {"variant": name, "unet_s": statistics.median(unet_times), "e2e_s": e2e, "first_s": first,
              "compile_s": first - e2e if name in COMPILED else None, "peak_gb": peak,
              "images": np.asarray(images, dtype=np.float64), "finite": bool(np.isfinite(images).all()),
              "cache": f"{counters['fxgraph_cache_hit']}/{counters['fxgraph_cache_miss']}"
              if name in COMPILED else "", "note": note}
    del pipe, unet_in, context
    if name in COMPILED:
        torch._dynamo.reset()  # drop the graphs (and CUDA graph memory pools) before the next variant
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# ----------------------------------------------------------------------------------------------------------------
# Report


def setup_lines(args: argparse.Namespace, model: Model, dtype_name: str) -> list[str]:
    import diffusers
    import transformers

    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        gpu, cuda = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", "no CUDA"
    command = "python scripts/bench_gpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return [f"- device: {gpu}; {cuda}",
            f"- versions: torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}",
            f"- setup: {model.family if not args.smoke else 'tiny smoke model'}, {model.size}x{model.size} px, "
            f"{args.steps} DDIM steps, batch 1 with classifier-free guidance (UNet batch 2), {dtype_name}; "
            f"compile mode {args.compile_mode!r}; UNet: median of {args.unet_iters} calls; end to end: median of "
            f"{args.repeats} calls",
            f"- command: `{command}` ({date.today().isoformat()})"]


def table(results: list[dict[str, Any]]) -> list[str]:
    base = next((r for r in results if r["variant"] == "diffusers eager"), None)

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base else "n/a"

    def fmt(x: float | None, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    lines = ["| variant | UNet ms/call | vs diffusers | end to end s | vs diffusers | first call s | compile s | "
             "peak GiB | PSNR vs diffusers dB | FX cache hit/miss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} |  |  |  |  |  |  |  |  |")
            continue
        p = psnr(r["images"], base["images"]) if base else None
        p_text = "n/a" if p is None else ("inf" if math.isinf(p) else f"{p:.1f}")
        if not r["finite"]:
            p_text += " (NaN/inf in image!)"
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['variant']}{note} | {r['unet_s'] * 1000:.2f} | {ratio(r, 'unet_s')} | {r['e2e_s']:.3f} | "
                     f"{ratio(r, 'e2e_s')} | {r['first_s']:.2f} | {fmt(r['compile_s'], '.1f')} | "
                     f"{fmt(r['peak_gb'], '.2f')} | {p_text} | {r['cache']} |")
    return lines


def write_section(path: Path, key: str, title: str, body: list[str]) -> None:
    """Replace the section between this key's markers in `path`, or append it."""
    start, end = f"<!-- bench_gpu:{key}:start -->", f"<!-- bench_gpu:{key}:end -->"
    section = "\n".join([start, f"### {title}", "", *body, end])
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=tuple(FAMILIES), default="sd15")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps: checks the script, not speed")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 (fp32 on cpu)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: the family's, 512 / 768)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 2 with --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed end-to-end calls (default 3; 1 with --smoke)")
    p.add_argument("--unet-iters", type=int, default=None, help="timed UNet calls (default 20; 3 with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-mode", default="reduce-overhead", choices=opt.COMPILE_MODES,
                   help="torch.compile mode of the compiled variants (CUDA graphs: reduce-overhead, max-autotune)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants (default with --smoke)")
    p.add_argument("--smoke-compile", action="store_true", help="with --smoke: run the compiled variants too")
    p.add_argument("--cache-dir", default=None, help="inductor cache folder (default: ldm's, ~/.cache/ldm/inductor)")
    p.add_argument("--write", type=Path, default=None, help="write the table into this markdown file")
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --smoke for the CPU check")
    dtype_name = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    args.steps = args.steps or (2 if args.smoke else 50)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.unet_iters = args.unet_iters or (3 if args.smoke else 20)
    skip_compile = args.no_compile or (args.smoke and not args.smoke_compile)

    start = time.perf_counter()
    model = make_model(args, dtype)
    print(f"weights ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    results = []
    for name in [*REF_VARIANTS[:1], *OUR_VARIANTS, *REF_VARIANTS[1:]]:  # diffusers eager first: the baseline
        if skip_compile and name in COMPILED:
            results.append({"variant": name, "skipped": "--smoke" if args.smoke else "--no-compile"})
            continue
        t0 = time.perf_counter()
        try:
            results.append(run_variant(name, model, args, dtype))
        except Exception as e:  # one failing variant (e.g. a compile error) must not lose the others' figures
            if name == REF_VARIANTS[0] or args.smoke:
                raise
            reason = " ".join(str(e).split())[:200]
            results.append({"variant": name, "skipped": f"failed: {type(e).__name__}: {reason}"})
            gc.collect()
            torch._dynamo.reset()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    title = (f"{'smoke (tiny model, CPU)' if args.smoke else model.family}: {model.size}x{model.size}, "
             f"{args.steps} DDIM steps, {dtype_name}")
    body = [*setup_lines(args, model, dtype_name), "", *table(results)]
    print("\n".join([f"### {title}", "", *body]))
    if args.write:
        write_section(args.write, "smoke" if args.smoke else model.family, title, body)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
