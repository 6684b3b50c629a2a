"""`ldm upscale IMAGE --model X4 [--prompt TEXT] [--out OUT.png]`.

`ldm upscale` runs the SD x4 upscaler (ldm/upscale.py) on one picture and writes a PNG four times as wide and high,
with its parameters in an A1111-style `parameters` text chunk, atomically. Without --out the file is named after the
image (`photo.png` -> `photo-x4.png`, then `photo-x4-1.png`, ... never replacing a file). As `ldm generate`, it
checks everything it can before loading the model (the image, the sizes, the output) and answers a bad input with
one line and exit status 2, writing nothing. (`ldm generate --hires-model X4` loads its upscaler with
`load_upscaler`; the --hires-* options live with the hires fix in ldm/hires.py.)
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
