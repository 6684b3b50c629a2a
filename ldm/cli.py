"""The `ldm` command: `ldm generate "PROMPT" [--model PATH_OR_ID] [--out out.png] [options]`.

Without --model it uses the small shapes model packaged with ldm (ldm/data/shapes-model, docs/training.md); without
--out it names the file after the prompt in the current folder ("a green triangle" -> a-green-triangle.png, then
a-green-triangle-1.png, ... so an automatic name never replaces a file).

Everything the command can check before loading a model (sizes, counts, finite numbers, UTF-8 prompts, a
writable output folder, the init image and mask, the model path) is checked first, so a mistake costs no model load
and writes nothing; after the load, the memory the request needs is estimated (ldm/limits.py) and refused with the
figures if it cannot fit. Errors print one line `ldm generate: error: ...` and exit with status 2 (argparse's own
usage errors are 2 as well), Ctrl-C exits with 130; no traceback unless --debug or LDM_DEBUG=1 asks
(docs/reliability.md). Images are PNGs with the generation parameters in an A1111-style `parameters` text chunk,
written atomically with the umask's permissions; an existing file is never replaced without `--overwrite`.
`--num-images N` writes N numbered files, image i with seed S + i, in batches that fit in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm import schedulers
from ldm.config import FAMILIES
from ldm.hub import SINGLE_FILE_SUFFIXES
from ldm.fileio import check_writable
from ldm.images import a1111_parameters, image_to_tensor, mask_to_tensor, model_hash, save_png

SCHEDULERS = tuple(schedulers.SCHEDULERS)  # the names --scheduler takes
DTYPES = ("fp32", "bf16", "fp16")
MAX_THREADS = 1024  # more would only spawn idle threads (and can exhaust the process's thread limit)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UsageError(Exception):
    """A problem with the command's arguments or inputs: one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm",
                                     description="Stable Diffusion (1.x, 2.x, SDXL) from scratch in PyTorch.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command's and each feature's options live with its code: `add_arguments(parser)` in its module.
    from ldm import adapters, batch, control_cli, hires, summary, upscale_cli, xl_cli
    from ldm.train import cli as train_cli
    from ldm.train import embedding_cli

    g = commands.add_parser("generate", help="generate images from a prompt (txt2img, img2img, inpainting)",
                            description="Generate images and write them as PNGs with their generation parameters.")
    add_arguments(g)  # the prompt, the model, sampling, output, memory and speed (below)
    control_cli.add_arguments(g)  # --controlnet, --control-*, --canny-*, --guess-mode (ldm/control_cli.py)
    adapters.add_arguments(g)  # --embedding, --lora, --lora-dir (ldm/adapters.py)
    batch.add_arguments(g)  # --prompts, --outdir, --batch-size (ldm/batch.py)
    hires.add_arguments(g)  # --hires-* (ldm/hires.py)
    xl_cli.add_arguments(g)  # SDXL: --prompt-2, --refiner, micro-conditioning (ldm/xl_cli.py)
    g.set_defaults(run=generate)

    for name, module, help_, description in (
            ("upscale", upscale_cli, "upscale a picture 4x with the SD x4 upscaler",
             "Upscale a picture 4x (each side) with the SD x4 upscaler, guided by a prompt."),
            ("inspect", summary, "layer tables of a model (a family preset needs no weights)",
             "Layer tables (name, input and output shapes, parameters) of each part."),
            ("train", train_cli, "train a small latent diffusion model on captioned shapes (CPU)",
             "Train the VAE, then the UNet with a small CLIP, on the shapes dataset."),
            ("train-embedding", embedding_cli, "teach the shapes model a new word (textual inversion, CPU)",
             "Learn a word's vectors from images of a new concept (default: orange shapes), everything else "
             "frozen; writes an A1111 / diffusers embedding.")):
        c = commands.add_parser(name, help=help_, description=description)
        module.add_arguments(c)
        if name in ("inspect", "train"):  # these two also take --debug after the command (generate too, above)
            c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        c.set_defaults(run=module.run)
    return parser


def add_arguments(g: argparse.ArgumentParser) -> None:
    """`ldm generate`'s own options; the features' come from their modules (build_parser)."""
    g.add_argument("prompt", nargs="?", default=None, help="what to draw (or --prompts FILE --outdir DIR)")
    g.add_argument("--model", help="a .safetensors checkpoint, a diffusers folder, or a hub id (from the local "
                                   "huggingface_hub cache); default: the packaged 64x64 shapes model")
    g.add_argument("--out", default=None, help="output PNG; with --num-images N: OUT-0.png ... OUT-(N-1).png "
                                              "(default: the prompt as a file name in the current folder)")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the empty prompt)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off")
    g.add_argument("--seed", type=int, default=None, help="image i uses seed SEED + i (default: a random seed)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the model's own")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    g.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    g.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    g.add_argument("--num-images", type=int, default=1, help="images to generate (in as few batches as memory allows)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on cuda, fp32 on cpu")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--family", choices=tuple(FAMILIES), default=None,
                   help="model family, where the checkpoint's keys cannot tell (SD 2.x single files)")
    g.add_argument("--vae", default=None, help="a VAE checkpoint to use instead of the model's own")
    g.add_argument("--clip-skip", type=int, default=None, help="use the n-th-from-last CLIP layer (1: the last)")
    g.add_argument("--no-weighting", dest="weighting", action="store_false",
                   help="read brackets in the prompt literally (default: A1111 emphasis, e.g. (word:1.3))")
    g.add_argument("--init-image", default=None, help="img2img / inpainting: the starting picture")
    g.add_argument("--strength", type=float, default=None,
                   help="how much of the init image to repaint, in (0, 1] (default 0.8; 1.0 for inpainting)")
    g.add_argument("--mask", default=None, help="inpainting: white = repaint, same size as --init-image")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .ckpt files (runs code!)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--optimize", action="store_true",
                   help="speed levers (ldm/optimize.py): on cuda channels_last, fused attention projections and "
                        "torch.compile with CUDA graphs (the first image pays the compile, reported on stderr; "
                        "cached in ~/.cache/ldm/inductor); on cpu none (none measured faster there)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="encode/decode images larger than the VAE's tile (its sample size, 512 px for SD 1.x) in "
                        "overlapping, blended tiles: VAE memory follows the tile, not the image (the image "
                        "changes slightly; ~1.7x VAE work)")
    g.add_argument("--attention-chunk", type=int, metavar="N", default=None,
                   help="attention over N query rows at a time in the UNet and the VAE: same image, smaller peak "
                        "memory where the full score matrix would be built, more kernel calls (e.g. 1024)")
    g.add_argument("--attention-maps", metavar="DIR", default=None,
                   help="also write DIR/<index>-<word>.png: each prompt word's cross-attention heatmap over the image")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Any error is one line on stderr and exit status 2, Ctrl-C is exit status 130; --debug or
    LDM_DEBUG=1 lets the exception through with its traceback (docs/reliability.md)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("LDM_DEBUG", "") not in ("", "0")
    try:
        return args.run(args)
    except UsageError as e:
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nldm {args.command}: interrupted; every file written is complete, no partial file is left",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the promise: no traceback unless asked for
        if debug:
            raise
        print(f"ldm {args.command}: error: {describe_error(e)}", file=sys.stderr)
        return 2


DEBUG_HELP = "show the traceback of an error (also: environment variable LDM_DEBUG=1)"


def describe_error(e: BaseException) -> str:
    """One line for an error: its message; for an OS error the file and the reason; for anything unexpected its
    type and a pointer to --debug."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    if isinstance(e, MemoryError):
        return f"out of memory ({_one_line(e)}); ask for less (smaller size, fewer images) or free memory"
    if isinstance(e, (ValueError, TypeError, OSError)):
        return _one_line(e)
    return f"{type(e).__name__}: {_one_line(e)} (--debug or LDM_DEBUG=1 shows the traceback)"


# ----------------------------------------------------------------------------------------------------------------
# ldm generate


def generate(args: argparse.Namespace) -> int:
    """`ldm generate`: check everything a model is not needed for, load the model, then run and write the images
    batch by batch (and the attention maps, if asked). A batch job (--prompts) is ldm/batch.py's."""
    from ldm import batch, xl_cli

    if batch.requested(args):
        xl_cli.check_batch(args)  # SDXL options are not part of a batch job
        return batch.run(args)
    outputs = _check_args(args)
    pipe = _load(args)
    store = _attention_store(args)
    result = _run_batches(pipe, args, outputs, store)
    if store is not None:
        from ldm.research import save_attention_maps

        for path in save_attention_maps(store, pipe.tokenizer, args.prompt, result.images, args.attention_maps,
                                        weighting=args.weighting):
            print(path)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# 1. Checks: everything that needs no model, before any load


def _check_args(args: argparse.Namespace) -> list[Path]:
    """Every check possible before loading the model, the features' included. Returns the output paths."""
    from ldm import adapters, control_cli, hires

    if args.prompt is None:
        raise UsageError("give a PROMPT, or --prompts FILE --outdir DIR for a batch")
    _check_numbers(args)
    for flag, text in (("prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        _check_utf8(flag, text)
    if args.strength is not None:
        if args.init_image is None:
            raise UsageError("--strength needs --init-image")
        if not 0 < args.strength <= 1:
            raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image")
    if args.init_image is not None and (args.height is not None or args.width is not None):
        raise UsageError("--height/--width do not apply with --init-image: the output has the image's size")
    _check_images(args)
    hires.check_args(args)
    control_cli.check_args(args)
    _check_model(args)
    adapters.check_args(args)
    _check_attention_maps(args)
    if args.threads is not None and args.threads > MAX_THREADS:
        raise UsageError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    return _check_outputs(args)


def _check_numbers(args: argparse.Namespace) -> None:
    """Sizes, counts, finite scales and the seed's range."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"--{name} must be a positive multiple of 8, got {value}")
    for flag, value, minimum in (("--steps", args.steps, 1), ("--num-images", args.num_images, 1),
                                 ("--threads", args.threads, 1), ("--clip-skip", args.clip_skip, 1),
                                 ("--attention-chunk", args.attention_chunk, 1)):
        if value is not None and value < minimum:
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    for flag, value in (("--guidance", args.guidance), ("--eta", args.eta)):
        if not 0 <= value < math.inf:
            raise UsageError(f"{flag} must be >= 0 and finite, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2**63 - args.num_images:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")


def _check_images(args: argparse.Namespace) -> None:
    if args.init_image is None:
        return
    try:
        image = image_to_tensor(args.init_image, "--init-image")  # (1, 3, H, W)
        mask = None if args.mask is None else mask_to_tensor(args.mask, "--mask")  # (1, 1, H, W)
    except (ValueError, TypeError) as e:
        raise UsageError(_one_line(e)) from None
    H, W = image.shape[-2:]
    if H % 8 or W % 8:
        raise UsageError(f"--init-image is {W}x{H}: width and height must be multiples of 8")
    if mask is not None and mask.shape[-2:] != image.shape[-2:]:
        raise UsageError(f"--mask is {mask.shape[-1]}x{mask.shape[-2]} but --init-image is {W}x{H}: "
                         f"they must be the same size")


def _check_model(args: argparse.Namespace) -> None:
    if args.model is None:
        from ldm.train import DEFAULT_MODEL_DIR  # a path constant; imports no torch

        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise UsageError(f"no --model given and the packaged model is missing ({DEFAULT_MODEL_DIR}; "
                             f"scripts/train_default.py makes it): pass --model with a .safetensors file, a "
                             f"diffusers folder or a hub id")
        args.model = str(DEFAULT_MODEL_DIR)
    for flag, value in (("--model", args.model), ("--vae", args.vae)):
        if value is not None and not os.path.exists(value) and not _looks_like_hub_id(value):
            raise UsageError(f"{flag}: no such file or folder {value!r}")


def _looks_like_hub_id(value: str) -> bool:
    """'org/name' (not a path that happens to be missing: no leading ./ or /, no checkpoint suffix)."""
    return bool(_HUB_ID.match(value)) and not value.lower().endswith(SINGLE_FILE_SUFFIXES)


def _check_attention_maps(args: argparse.Namespace) -> None:
    """--attention-maps DIR: a folder (or one to be made) that is writable, empty unless --overwrite."""
    maps = None if args.attention_maps is None else Path(args.attention_maps)
    if maps is not None and maps.exists() and not maps.is_dir():
        raise UsageError(f"--attention-maps: {str(maps)!r} is a file, not a folder")
    if maps is not None and maps.is_dir() and any(maps.iterdir()) and not args.overwrite:
        raise UsageError(f"--attention-maps: folder {str(maps)!r} is not empty; use --overwrite to write into it")
    if maps is not None and (maps.is_dir() or maps.parent.is_dir()):
        try:
            check_writable(maps if maps.is_dir() else maps.parent, "--attention-maps")
        except ValueError as e:
            raise UsageError(str(e)) from None


def _check_outputs(args: argparse.Namespace) -> list[Path]:
    if args.out is None:
        args.out = str(_free_name(args.prompt, args.num_images))
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    paths = _numbered(out, args.num_images)
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"--out: folder {str(folder)!r} does not exist")
    try:
        check_writable(folder, "--out")
    except ValueError as e:
        raise UsageError(str(e)) from None
    for path in paths:
        if path.is_dir():
            raise UsageError(f"--out: {str(path)!r} is a folder")
        if path.exists() and not args.overwrite:
            raise UsageError(f"output {str(path)!r} exists; use --overwrite to replace it")
    return paths


def _numbered(out: Path, n: int) -> list[Path]:
    """The files one run writes: OUT itself, or OUT-0 ... OUT-(n-1) for n images."""
    if n == 1:
        return [out]
    digits = len(str(n - 1))
    return [out.with_name(f"{out.stem}-{i:0{digits}d}{out.suffix}") for i in range(n)]


def _free_name(prompt: str, n: int) -> Path:
    """The default --out: the prompt's words as a file name, with -1, -2, ... until none of its files exist."""
    stem = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:60].strip("-") or "ldm"
    for k in range(10_000):
        out = Path(f"{stem}{f'-{k}' if k else ''}.png")
        if not any(p.exists() for p in _numbered(out, n)):
            return out
    raise UsageError(f"no free file name for {stem!r} in the current folder: pass --out")


def _check_utf8(flag: str, text: str | None) -> None:
    """A prompt the shell handed over with bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{flag} is not valid UTF-8 text (character {e.start}: {text[e.start]!r}); check the "
                         f"terminal's encoding") from None


# ----------------------------------------------------------------------------------------------------------------
# 2. Loading: the model on its device, adapters, speed levers


def _load(args: argparse.Namespace) -> Any:
    """The model on its device, with the --embedding / --lora adapters and, with --optimize, the speed levers."""
    from ldm import adapters

    device, dtype = device_and_dtype(args)
    pipe = load_model(args, device, dtype)
    adapters.load_from_args(pipe, args)
    if args.optimize:
        _optimize(pipe, args)
    return pipe


def device_and_dtype(args: argparse.Namespace) -> tuple[str, Any]:
    """--device / --dtype / --threads: the device name and torch dtype (UsageError where they cannot work)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    dtype_name = args.dtype or ("fp16" if device == "cuda" else "fp32")
    if dtype_name == "fp16" and device == "cpu":
        raise UsageError("--dtype fp16 needs --device cuda (on the CPU use fp32 or bf16)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]


def load_model(args: argparse.Namespace, device: Any, dtype: Any) -> Any:
    """load_pipeline with the command's model options and memory switches (--vae-tiling, --attention-chunk);
    a model that does not load is a UsageError. Shared with batch generation (ldm/batch.py)."""
    import ldm
    from ldm.upscale import StableDiffusionUpscalePipeline

    try:
        pipe = ldm.load_pipeline(args.model, dtype=dtype, device=device, family=args.family, vae=args.vae,
                                 allow_pickle=args.allow_pickle, controlnet=getattr(args, "controlnet", None) or None)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {_one_line(e)}") from None
    if isinstance(pipe, StableDiffusionUpscalePipeline):
        raise UsageError(f"{args.model!r} is the x4 upscaler: use `ldm upscale IMAGE --model {args.model}` (or "
                         f"--hires-model with another model)")
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.attention_chunk is not None:
        pipe.enable_attention_chunking(args.attention_chunk)
    return pipe


def _optimize(pipe: Any, args: argparse.Namespace) -> None:
    """Pull the device's default speed levers; compile now for a txt2img call and say how long it took.

    With --attention-maps the UNet stays eager (the heatmap processor is Python that a compiled graph would not
    run); the other levers still apply.
    """
    from ldm.optimize import warm_up

    pipe.optimize(compile=False if args.attention_maps else None)
    if pipe.levers.compile and args.init_image is None:  # img2img / inpainting compile on their first step
        seconds = warm_up(pipe, height=args.height, width=args.width, batch=args.num_images, guided=args.guidance > 1,
                          scheduler=args.scheduler)
        print(f"ldm generate: compiled the UNet in {seconds:.1f} s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# 3. Running: as many images per batch as fit, each batch under a progress bar


def _attention_store(args: argparse.Namespace) -> Any:
    """--attention-maps: a processor that sums each word's cross-attention (heatmap sums only); None without."""
    if not args.attention_maps:
        return None
    from ldm.research import AttentionStore

    return AttentionStore(keep=False, guided=args.guidance > 1)


def _run_batches(pipe: Any, args: argparse.Namespace, outputs: list[Path], store: Any) -> Any:
    """--num-images images (image i with seed S + i whatever the batches), as many per batch as fit in memory (all
    in one with --attention-maps, which need them together); each batch's PNGs are written as it ends. Returns the
    last batch's output. An error only the loaded model can tell is a UsageError saying what was written."""
    from ldm import control_cli
    from ldm.research import use_processor

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, seed=seed, num_images_per_prompt=args.num_images,
                  scheduler=args.scheduler, eta=args.eta, clip_skip=args.clip_skip, weighting=args.weighting,
                  output_type="pil", **control_cli.pipeline_kwargs(args))
    per_batch = args.num_images if store else _images_per_batch(pipe, args)
    written, stamp = 0, _stamp(args, pipe)
    try:
        with use_processor(pipe.unet, store) if store else contextlib.nullcontext():
            for start in range(0, args.num_images, per_batch):
                common.update(seed=seed + start, num_images_per_prompt=min(per_batch, args.num_images - start))
                result, size = _run(pipe, args, common)
                written += _write_images(args, stamp, outputs[start:], result, size)
    except ValueError as e:  # what only the loaded model can tell (e.g. an inpainting model without --mask)
        done = f" ({written} of {args.num_images} images were written)" if written else ""
        raise UsageError(_one_line(e) + done) from None
    return result


def _images_per_batch(pipe: Any, args: argparse.Namespace) -> int:
    """How many images one batch may hold in the free memory; a UsageError with the figures if not even one."""
    from ldm.limits import MemoryLimitError, check_generation, images_per_batch

    if args.init_image is not None:
        width, height = _image_size(args.init_image)
    else:
        height = args.height or pipe.native_size
        width = args.width or pipe.native_size
    try:
        check_generation(pipe, height, width, 1, args.guidance > 1)
    except MemoryLimitError as e:
        raise UsageError(str(e)) from None
    return images_per_batch(pipe, height, width, args.num_images, args.guidance > 1)


def _run(pipe: Any, args: argparse.Namespace, common: dict[str, Any]) -> tuple[Any, tuple[int, int]]:
    """Run the right pipeline method under a progress bar. Returns the output and the (width, height)."""
    from tqdm import tqdm

    from ldm import xl_cli

    if xl_cli.applies(pipe, args):  # SDXL, with its refiner hand-off (ldm/xl_cli.py)
        return xl_cli.run(pipe, args, common)
    if args.hires_scale is not None:
        from ldm.hires import run_hires

        return run_hires(pipe, args, common)

    steps = _steps_run(args)
    with tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, disable=None) as bar:
        common["callback"] = lambda i, t, latents: bar.update(1)
        if args.init_image is None:
            result = pipe(args.prompt, height=args.height, width=args.width, **common)
        elif args.mask is None:
            result = pipe.img2img(args.prompt, args.init_image, strength=_strength(args), **common)
        else:
            result = pipe.inpaint(args.prompt, args.init_image, args.mask, strength=_strength(args), **common)
    return result, result.images[0].size


def _strength(args: argparse.Namespace) -> float:
    if args.strength is not None:
        return args.strength
    return 1.0 if args.mask is not None else 0.8


def _steps_run(args: argparse.Namespace) -> int:
    """The denoising steps a run takes (the progress bar's length): all, or with --init-image the strength's share."""
    return args.steps if args.init_image is None else min(int(args.steps * _strength(args)), args.steps)


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


# ----------------------------------------------------------------------------------------------------------------
# 4. Writing: PNGs with their generation parameters


def _stamp(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """The generation parameters every PNG of the run records (the model hash is computed once)."""
    sampler = args.scheduler or schedulers.name_of(pipe.scheduler)
    extra: dict[str, Any] = {}
    if args.init_image is not None:
        extra["Denoising strength"] = _strength(args)
    if args.clip_skip is not None:
        extra["Clip skip"] = args.clip_skip
    if args.eta:
        extra["Eta"] = args.eta
    if args.hires_scale is not None:
        from ldm.hires import hires_fields

        extra.update(hires_fields(args))
    from ldm import xl_cli

    extra.update(xl_cli.fields(args))  # Refiner, Refiner switch at (A1111's names)
    return dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler=sampler,
                guidance_scale=args.guidance, model_name=_model_name(args.model), model_hash=model_hash(args.model),
                extra=extra)


def _write_images(args: argparse.Namespace, stamp: dict[str, Any], outputs: list[Path], result: Any,
                  size: tuple[int, int]) -> int:
    """Write one batch's PNGs with their parameters; returns how many. A failed write (a full disk) removes its
    temporary file and raises a UsageError naming the file; the images already written stay, each complete."""
    for path, image, image_seed in zip(outputs, result.images, result.seeds):
        text = a1111_parameters(getattr(args, "prompt_as_given", args.prompt), seed=image_seed, width=size[0], height=size[1], **stamp)
        try:
            save_png(image, path, parameters=text, overwrite=args.overwrite)
        except FileExistsError:
            raise UsageError(f"output {str(path)!r} appeared while generating; not overwritten (use --overwrite)") \
                from None
        except OSError as e:
            raise UsageError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
        print(path)
    return len(result.images)


def _model_name(model: str) -> str:
    path = Path(model)
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return model  # a hub id


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
