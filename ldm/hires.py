"""Hires fix: generate at the model's own size, upscale, then repaint the details at the larger size (img2img).

The AUTOMATIC1111 web UI's most used txt2img option (not in diffusers). A model trained at 512 px composes well at
512 px and badly at 1024 px (repeated subjects, broken anatomy: the UNet has never seen such large latents); so the
composition is made at the native size, enlarged, and a partial denoising pass (SDEdit, Meng et al. 2021) at the
large size adds the detail the enlargement lacks while keeping the composition:

    latents  = pipe(prompt, output_type="latent")                          (B, 4, h, w)    the base pass
    enlarged = upscale(latents)                                            (B, 4, sh, sw)  s = scale
               "latent": bilinear in latent space (A1111's "Latent")
               "pixel":  decode, Lanczos-resize the pixels, encode again
               an x4 upscaler pipeline: decode, upscale x4 with the prompt, resize to s x, encode again
    x        = scheduler.add_noise(enlarged, noise, t_strength)            the img2img start (strength)
    image    = denoise(x from t_strength) -> VAE.decode                    (B, 3, sH, sW)

Both passes use the same prompts, guidance, scheduler and seeds (image i: seed S + i in both, as A1111 reuses the
seed). `hires_steps` is the second pass's schedule length; like img2img it runs int(hires_steps * strength) steps.

The command line's --hires-* options (`ldm generate --hires-scale S`) are registered, checked and run at the end.

Shapes: B images, h, w base latent size, s the scale, H, W base image size.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.images import image_to_tensor, to_numpy, to_pil
from ldm.pipeline import Callback, PipelineOutput, StableDiffusionPipeline, randn

UPSCALERS = ("latent", "pixel")  # or an ldm.upscale.StableDiffusionUpscalePipeline


@torch.no_grad()
def hires_fix(pipe: StableDiffusionPipeline, prompt: str | list[str], *, scale: float = 2.0, strength: float = 0.5,
              hires_steps: int | None = None, upscaler: Any = "latent", negative_prompt: str | list[str] | None = None,
              height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
              guidance_scale: float = 7.5, seed: int | None = None, num_images_per_prompt: int = 1,
              scheduler: Any = None, eta: float = 0.0, clip_skip: int | None = None, weighting: bool = True,
              callback: Callback | None = None, output_type: str = "pil",
              upscaler_kwargs: dict[str, Any] | None = None) -> PipelineOutput:
    """txt2img at (height, width), then img2img at `scale` times the size. Returns the second pass's output.

    upscaler: "latent", "pixel", or an x4 upscaler pipeline (`ldm.load_pipeline("x4-upscaler-ema.safetensors")`),
    called with `upscaler_kwargs` (e.g. {"noise_level": 20, "num_inference_steps": 20}). hires_steps: the second
    pass's num_inference_steps (default: num_inference_steps). The other arguments are `pipe(...)`'s, used by both
    passes; seed=S gives image i the seed S + i in both.
    """
    size = _target_size(pipe, height, width, scale)
    _check_hires(strength, hires_steps, upscaler)
    common = dict(negative_prompt=negative_prompt, guidance_scale=guidance_scale, seed=seed,
                  num_images_per_prompt=num_images_per_prompt, scheduler=scheduler, eta=eta, clip_skip=clip_skip,
                  weighting=weighting, callback=callback)
    base = pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps, output_type="latent",
                **common)
    steps = num_inference_steps if hires_steps is None else hires_steps
    run = pipe._prepare(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                        guidance_scale=guidance_scale, seed=seed, generator=None,
                        num_images_per_prompt=num_images_per_prompt, scheduler=scheduler, eta=eta,
                        callback=callback, clip_skip=clip_skip, output_type=output_type, weighting=weighting)
    f = pipe.vae_scale_factor
    if isinstance(upscaler, str) and upscaler == "latent":
        enlarged = F.interpolate(base.latents, size=(size[0] // f, size[1] // f), mode="bilinear",
                                 align_corners=False)  # (B, C, sH/f, sW/f)
    else:
        pixels = _enlarge_pixels(pipe, base.latents, prompt, size, upscaler, upscaler_kwargs or {}, seed,
                                 num_images_per_prompt)  # (B, 3, sH, sW) in [-1, 1]
        posterior = pipe.vae.encode(pixels.to(pipe.device, pipe.dtype))
        enlarged = pipe.vae.config.scaling_factor * posterior.sample(run.generator)  # (B, C, sH/f, sW/f)
    timesteps = run.scheduler.timesteps_for_strength(steps, strength)
    noise = randn(tuple(enlarged.shape), run.generator, pipe.device, run.context.dtype)
    latents = run.scheduler.add_noise(enlarged.to(run.context.dtype), noise, timesteps[:1].repeat(run.batch))
    latents, steps_run = pipe.denoise(latents, run.context, run.scheduler, timesteps, run.guidance_scale,
                                      step_kwargs=run.step_kwargs, callback=run.callback)
    out = pipe._output(latents, steps_run, base.seeds, output_type)
    return out


def _enlarge_pixels(pipe: StableDiffusionPipeline, latents: Tensor, prompt: str | list[str], size: tuple[int, int],
                    upscaler: Any, kwargs: dict[str, Any], seed: int | None, n: int) -> Tensor:
    """Decode the base latents and enlarge the pictures to `size` (H, W): Lanczos, or an x4 model then Lanczos."""
    images = to_pil(to_numpy(pipe.decode(latents)))  # B PIL images at the base size
    if not isinstance(upscaler, str):
        prompts = [prompt] * len(images) if isinstance(prompt, str) else [p for p in prompt for _ in range(n)]
        images = upscaler(prompts, images, seed=seed, **kwargs).images  # B PIL images at 4x
    resized = [im if im.size == (size[1], size[0]) else im.resize((size[1], size[0]), Image.LANCZOS)
               for im in images]
    return torch.cat([image_to_tensor(im) for im in resized])  # (B, 3, sH, sW)


def _target_size(pipe: StableDiffusionPipeline, height: int | None, width: int | None,
                 scale: float) -> tuple[int, int]:
    """(H, W) of the second pass: scale x the base size, rounded down to what the model takes (VAE x UNet
    downsampling: 64 px for SD, 16 px for the packaged shapes model)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 1 < scale <= 8:
        raise ValueError(f"scale must be a number in (1, 8], got {scale!r}")
    step = pipe.vae_scale_factor * pipe.unet.config.downsample_factor
    base_h = pipe.native_size if height is None else height
    base_w = pipe.native_size if width is None else width
    target = (math.floor(base_h * scale / step) * step, math.floor(base_w * scale / step) * step)
    if target[0] <= base_h and target[1] <= base_w:
        raise ValueError(f"scale {scale} enlarges {base_w}x{base_h} to less than one step of {step} px: use a "
                         f"larger scale")
    return target


def _check_hires(strength: float, hires_steps: int | None, upscaler: Any) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if hires_steps is not None and (isinstance(hires_steps, bool) or not isinstance(hires_steps, int)
                                    or hires_steps < 1):
        raise ValueError(f"hires_steps must be an int >= 1, got {hires_steps!r}")
    if isinstance(upscaler, str):
        if upscaler not in UPSCALERS:
            raise ValueError(f"upscaler must be one of {UPSCALERS} or an x4 upscaler pipeline, got {upscaler!r}")
    elif not callable(upscaler) or not hasattr(upscaler, "max_noise_level"):
        raise TypeError(f"upscaler must be one of {UPSCALERS} or an ldm StableDiffusionUpscalePipeline, got "
                        f"{type(upscaler).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# `ldm generate --hires-scale S [--hires-strength 0.5] [--hires-steps N] [--hires-upscaler latent|pixel]
# [--hires-model X4]` (registered by ldm/cli.py)


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--hires-scale", type=float, default=None, metavar="S",
                   help="hires fix: generate at the base size, enlarge S times (1 < S <= 8), then img2img at the "
                        "large size (the output is S x --height/--width)")
    g.add_argument("--hires-strength", type=float, default=None,
                   help="hires fix: how much the second pass repaints, in (0, 1] (default 0.5)")
    g.add_argument("--hires-steps", type=int, default=None,
                   help="hires fix: the second pass's schedule length (default --steps; it runs steps x strength)")
    g.add_argument("--hires-upscaler", choices=UPSCALERS, default=None,
                   help="hires fix: enlarge the latents (bilinear, default) or the decoded pixels (Lanczos)")
    g.add_argument("--hires-model", default=None,
                   help="hires fix: enlarge through this x4 upscaler model (file, folder or hub id) instead")


def check_args(args: argparse.Namespace) -> None:
    """The --hires-* checks `ldm generate` can make before loading anything."""
    from ldm.cli import UsageError, _looks_like_hub_id

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
    if getattr(args, "controlnet", None):  # hires_fix runs the plain txt2img and img2img passes
        raise UsageError("--hires-scale does not take --controlnet (the hires fix runs without ControlNets)")
    if args.hires_model is not None:
        if args.hires_upscaler is not None:
            raise UsageError("give --hires-upscaler or --hires-model, not both")
        if not os.path.exists(args.hires_model) and not _looks_like_hub_id(args.hires_model):
            raise UsageError(f"--hires-model: no such file or folder {args.hires_model!r}")


def run_hires(pipe: Any, args: argparse.Namespace, common: dict[str, Any]) -> tuple[Any, tuple[int, int]]:
    """`ldm generate --hires-scale`: the hires fix under one progress bar. Returns the output and the base
    (width, height), which A1111's metadata calls Size."""
    from tqdm import tqdm

    from ldm.upscale_cli import load_upscaler

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
        from ldm.cli import _model_name

        return strength, steps, _model_name(args.hires_model)
    return strength, steps, {"latent": "Latent", "pixel": "Lanczos"}[args.hires_upscaler or "latent"]
