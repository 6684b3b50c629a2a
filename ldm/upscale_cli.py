"""`ldm upscale IMAGE --model X4 [--prompt TEXT] [--out OUT.png]` and `ldm generate`'s hires-fix options.

`ldm upscale` runs the SD x4 upscaler (ldm/upscale.py) on one picture and writes a PNG four times as wide and high,
with its parameters in an A1111-style `parameters` text chunk, atomically. Without --out the file is named after the
image (`photo.png` -> `photo-x4.png`, then `photo-x4-1.png`, ... never replacing a file). As `ldm generate`, it
checks everything it can before loading the model (the image, the sizes, the output) and answers a bad input with
one line and exit status 2, writing nothing.

`ldm generate ... --hires-scale S [--hires-strength 0.5] [--hires-steps N] [--hires-upscaler latent|pixel]
[--hires-model X4]`: generate at the base size, enlarge S times (in latent space, by Lanczos on the pixels, or
through an x4 upscaler model), then img2img at the large size (ldm/hires.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from ldm import cli
from ldm.cli import UsageError
from ldm.images import a1111_parameters, image_to_tensor, model_hash, save_png

SAMPLE_STEP = 8  # the official x4 UNet halves its input three times: image sides must be multiples of 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the low-resolution picture (PNG, JPEG, ...); its sides must be multiples of 8")
    p.add_argument("--model", required=True, help="the x4 upscaler: x4-upscaler-ema.safetensors, its diffusers "
                                                  "folder, or the hub id stabilityai/stable-diffusion-x4-upscaler")
    p.add_argument("--prompt", default="", help="what the picture shows (guides the detail; default: empty)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--out", default=None, help="output PNG (default: IMAGE's name + -x4.png in the current folder)")
    p.add_argument("--noise-level", type=int, default=20,
                   help="noise added to the input before upscaling, 0..350: more invents more detail (default 20)")
    p.add_argument("--steps", type=int, default=75, help="denoising steps (default 75)")
    p.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (default 9)")
    p.add_argument("--seed", type=int, default=None, help="default: a random seed")
    p.add_argument("--dtype", choices=cli.DTYPES, default=None, help="UNet and text encoder (the VAE stays fp32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode the large output in overlapping tiles: VAE memory follows the tile (512 px), not the "
                        "image (needed for large inputs: a 512x512 input gives a 2048x2048 output)")
    p.add_argument("--attention-chunk", type=int, metavar="N", default=None,
                   help="attention over N query rows at a time (same image, smaller peak memory)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .ckpt files (runs code!)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    """`ldm upscale`: check, load, upscale under a progress bar, write the PNG."""
    out, size = _check_upscale_args(args)
    pipe = load_upscaler(args.model, args)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.attention_chunk is not None:
        pipe.enable_attention_chunking(args.attention_chunk)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    from tqdm import tqdm

    try:
        with tqdm(total=args.steps, desc="upscaling", unit="step", file=sys.stderr, disable=None) as bar:
            result = pipe(args.prompt, args.image, negative_prompt=args.negative_prompt,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, noise_level=args.noise_level,
                          seed=seed, callback=lambda i, t, latents: bar.update(1))
    except ValueError as e:  # what only the loaded model can tell (its max_noise_level, its UNet's sides)
        raise UsageError(cli._one_line(e)) from None
    image = result.images[0]
    text = a1111_parameters(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, sampler="ddim",
                            guidance_scale=args.guidance, seed=seed, width=image.size[0], height=image.size[1],
                            model_name=cli._model_name(args.model), model_hash=model_hash(args.model),
                            extra={"Noise level": args.noise_level, "Upscale": 4,
                                   "Source size": f"{size[0]}x{size[1]}"})
    try:
        save_png(image, out, parameters=text, overwrite=args.overwrite)
    except FileExistsError:
        raise UsageError(f"output {str(out)!r} appeared while upscaling; not overwritten (use --overwrite)") from None
    print(out)
    return 0


def load_upscaler(model: str, args: argparse.Namespace) -> Any:
    """The x4 upscaler pipeline at --device / --dtype, or a UsageError (not loadable, not an upscaler)."""
    import ldm
    from ldm.upscale import StableDiffusionUpscalePipeline

    device, dtype = cli.device_and_dtype(args)
    try:
        pipe = ldm.load_pipeline(model, dtype=dtype, device=device, allow_pickle=args.allow_pickle)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"cannot load model {model!r}: {cli._one_line(e)}") from None
    if not isinstance(pipe, StableDiffusionUpscalePipeline):
        raise UsageError(f"{model!r} is a {type(pipe).__name__}, not the x4 upscaler")
    return pipe


def _check_upscale_args(args: argparse.Namespace) -> tuple[Path, tuple[int, int]]:
    """Every check possible before loading the model. Returns the output path and the input's (width, height)."""
    for flag, value, minimum in (("--steps", args.steps, 1), ("--noise-level", args.noise_level, 0),
                                 ("--threads", args.threads, 1), ("--attention-chunk", args.attention_chunk, 1)):
        if value is not None and value < minimum:
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    if not args.guidance >= 0:
        raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
    if args.seed is not None and not 0 <= args.seed < 2**63 - 1:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    try:
        H, W = image_to_tensor(args.image, "IMAGE").shape[-2:]
    except (ValueError, TypeError) as e:
        raise UsageError(cli._one_line(e)) from None
    if H % SAMPLE_STEP or W % SAMPLE_STEP:
        raise UsageError(f"IMAGE is {W}x{H}: the x4 upscaler needs sides that are multiples of {SAMPLE_STEP} "
                         f"(resize it, e.g. to {max(8, W // 8 * 8)}x{max(8, H // 8 * 8)})")
    if not os.path.exists(args.model) and not cli._looks_like_hub_id(args.model):
        raise UsageError(f"--model: no such file or folder {args.model!r}")
    if args.out is None:
        args.out = str(_free_name(Path(args.image).stem + "-x4"))
    args.num_images = 1  # what cli._check_outputs reads
    return cli._check_outputs(args)[0], (int(W), int(H))


def _free_name(stem: str) -> Path:
    for k in range(10_000):
        out = Path(f"{stem}{f'-{k}' if k else ''}.png")
        if not out.exists():
            return out
    raise UsageError(f"no free file name for {stem!r} in the current folder: pass --out")


# ----------------------------------------------------------------------------------------------------------------
# ldm generate --hires-*


def add_hires_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--hires-scale", type=float, default=None, metavar="S",
                   help="hires fix: generate at the base size, enlarge S times (1 < S <= 8), then img2img at the "
                        "large size (the output is S x --height/--width)")
    g.add_argument("--hires-strength", type=float, default=None,
                   help="hires fix: how much the second pass repaints, in (0, 1] (default 0.5)")
    g.add_argument("--hires-steps", type=int, default=None,
                   help="hires fix: the second pass's schedule length (default --steps; it runs steps x strength)")
    g.add_argument("--hires-upscaler", choices=("latent", "pixel"), default=None,
                   help="hires fix: enlarge the latents (bilinear, default) or the decoded pixels (Lanczos)")
    g.add_argument("--hires-model", default=None,
                   help="hires fix: enlarge through this x4 upscaler model (file, folder or hub id) instead")


def check_hires_args(args: argparse.Namespace) -> None:
    """The --hires-* checks `ldm generate` can make before loading anything."""
    given = [f for f, v in (("--hires-strength", args.hires_strength), ("--hires-steps", args.hires_steps),
                            ("--hires-upscaler", args.hires_upscaler), ("--hires-model", args.hires_model))
             if v is not None]
    if args.hires_scale is None:
        if given:
            raise UsageError(f"{given[0]} needs --hires-scale")
        return
    if not 1 < args.hires_scale <= 8:
        raise UsageError(f"--hires-scale must be in (1, 8], got {args.hires_scale}")
    if args.hires_strength is not None and not 0 < args.hires_strength <= 1:
        raise UsageError(f"--hires-strength must be in (0, 1], got {args.hires_strength}")
    if args.hires_steps is not None and args.hires_steps < 1:
        raise UsageError(f"--hires-steps must be >= 1, got {args.hires_steps}")
    if args.init_image is not None:
        raise UsageError("--hires-scale applies to txt2img, not with --init-image")
    if args.hires_model is not None:
        if args.hires_upscaler is not None:
            raise UsageError("give --hires-upscaler or --hires-model, not both")
        if not os.path.exists(args.hires_model) and not cli._looks_like_hub_id(args.hires_model):
            raise UsageError(f"--hires-model: no such file or folder {args.hires_model!r}")


def run_hires(pipe: Any, args: argparse.Namespace, common: dict[str, Any]) -> tuple[Any, tuple[int, int]]:
    """`ldm generate --hires-scale`: the hires fix under one progress bar. Returns the output and the base
    (width, height), which A1111's metadata calls Size."""
    from tqdm import tqdm

    from ldm.hires import hires_fix

    strength, hires_steps, _ = _hires_settings(args)
    upscaler: Any = args.hires_upscaler or "latent"
    upscaler_kwargs: dict[str, Any] = {}
    if args.hires_model is not None:
        upscaler = load_upscaler(args.hires_model, args)
        upscaler_kwargs = {"num_inference_steps": hires_steps}
    total = args.steps + min(int(hires_steps * strength), hires_steps)
    common = {k: v for k, v in common.items() if k not in ("output_type", "callback")}
    with tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, disable=None) as bar:
        result = hires_fix(pipe, args.prompt, scale=args.hires_scale, strength=strength, hires_steps=hires_steps,
                           upscaler=upscaler, height=args.height, width=args.width, upscaler_kwargs=upscaler_kwargs,
                           callback=lambda i, t, latents: bar.update(1), **common)
    native = pipe.native_size
    return result, (args.width or native, args.height or native)


def hires_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The A1111 metadata of a hires-fix run: Denoising strength, Hires upscale, Hires steps, Hires upscaler."""
    strength, hires_steps, name = _hires_settings(args)
    return {"Denoising strength": strength, "Hires upscale": args.hires_scale, "Hires steps": hires_steps,
            "Hires upscaler": name}


def _hires_settings(args: argparse.Namespace) -> tuple[float, int, str]:
    """(strength, second-pass steps, the upscaler's A1111 name) with their defaults."""
    strength = 0.5 if args.hires_strength is None else args.hires_strength
    steps = args.steps if args.hires_steps is None else args.hires_steps
    if args.hires_model is not None:
        return strength, steps, cli._model_name(args.hires_model)
    return strength, steps, {"latent": "Latent", "pixel": "Lanczos"}[args.hires_upscaler or "latent"]
