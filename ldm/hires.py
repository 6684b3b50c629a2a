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

Shapes: B images, h, w base latent size, s the scale, H, W base image size.
"""

from __future__ import annotations

import math
import numbers
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
