"""The SD x4 upscaler pipeline: a low-resolution image and a prompt in, an image four times as wide and high out.

Model: Stability AI's `x4-upscaler-ema` (stabilityai/stable-diffusion-x4-upscaler), a latent diffusion model
conditioned on the low-resolution image itself (Rombach et al. 2022, section 4.4 "super-resolution"; the noise
augmentation of the conditioning image is cascaded diffusion's, Ho et al. 2021, arXiv:2106.15282). Mirrors
diffusers 0.42.1 `pipelines/stable_diffusion/pipeline_stable_diffusion_upscale.py`: the same prompt encoding, the
same random draws in the same order, the same scheduler calls.

    image    = low-res RGB in [-1, 1]                                     (N, 3, h, w)   h, w multiples of 8
    noise    = randn(generators)             # drawn FIRST, one row per input image
    image    = sqrt(a_bar[level]) image + sqrt(1 - a_bar[level]) noise    # the DDPM forward process, DDPM eq. (4)
    x_T      = randn(generators) * init_noise_sigma                       (B, 4, h, w)   drawn SECOND
    for t:   v = UNet([scale(x); image], t, context, class_labels=level)  # 7 input channels; the level is a class
             v = uncond + s * (cond - uncond); x = step(v, t, x)          # the unconditional half sees the same
    output   = VAE.decode(x / 0.08333)  in fp32                           (B, 3, 4h, 4w)  image and level

The low-resolution image is concatenated at the latent resolution: the VAE has three levels (f = 4), so the latents
are as large as the input and the output four times larger. `noise_level` (0..max_noise_level, 350 for the
official model; diffusers' default 20) both noises the input and tells the UNet how much it was noised, through a
class embedding added to the time embedding: more noise lets the model invent more detail, less keeps it faithful.

A difference from diffusers, on purpose: image sides that the UNet cannot take (not multiples of 8) are an error
instead of a silent bicubic resize. With several prompts and num_images_per_prompt > 1 we pair the images as
diffusers does (the image batch tiled, the prompts repeated in place), because same inputs, same outputs is the
contract, although it gives prompt i's second image the next prompt's picture.

Shapes: N input images (= prompts), B = N x num_images_per_prompt, h, w the input's (and latents') size, S text
tokens (77), D text width.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.config import FamilyPreset
from ldm.images import ImageInput, image_to_tensor
from ldm.pipeline import Callback, Generator, PipelineOutput, StableDiffusionPipeline, _prompts, randn
from ldm.schedulers.common import make_betas

MAX_NOISE_LEVEL = 350  # the official model's (x4-upscaling.yaml `low_scale_config.params.max_noise_level`)
# diffusers' low_res_scheduler (a DDPMScheduler): only its betas matter here (add_noise), which equal the
# LatentUpscaleDiffusion's `low_scale_model` schedule (linear in sqrt(beta) from 0.0001 to 0.02, 1000 steps).
LOW_RES_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                     "beta_end": 0.02, "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": True,
                     "prediction_type": "epsilon", "variance_type": "fixed_small"}
_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def check_low_res_scheduler(config: Mapping[str, Any]) -> None:
    """Raise ValueError unless `config` is a DDPM-style config whose noise schedule we can rebuild."""
    if not isinstance(config, Mapping):
        raise TypeError(f"low_res_scheduler must be a dict (a scheduler_config.json), got {type(config).__name__}")
    if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise ValueError(f"low_res_scheduler: only DDPMScheduler is supported, got {config.get('_class_name')!r}")
    T = config.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T <= 0:
        raise ValueError(f"low_res_scheduler: num_train_timesteps must be a positive int, got {T!r}")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in _SCHEDULES:
        raise ValueError(f"low_res_scheduler: beta_schedule must be one of {_SCHEDULES}, got "
                         f"{config.get('beta_schedule')!r}")


def low_res_alphas_cumprod(config: Mapping[str, Any]) -> Tensor:
    """(T,) float32 alpha_bar of the low-resolution image's noise schedule (diffusers' DDPMScheduler arithmetic)."""
    check_low_res_scheduler(config)
    cfg = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           **dict(config)}  # DDPMScheduler's own defaults where the config is silent
    return torch.cumprod(1.0 - make_betas(cfg), dim=0)


def add_image_noise(image: Tensor, noise: Tensor, level: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The DDPM forward process at `level` (DDPM eq. 4): sqrt(a_bar) image + sqrt(1 - a_bar) noise, computed in
    the image's dtype as diffusers' DDPMScheduler.add_noise does. image, noise: (N, 3, h, w); level: (1,) or (N,)."""
    a_bar = alphas_cumprod.to(image.device, image.dtype)[level.to(image.device)]  # (1,) or (N,)
    return a_bar.sqrt()[:, None, None, None] * image + (1 - a_bar).sqrt()[:, None, None, None] * noise


class StableDiffusionUpscalePipeline(StableDiffusionPipeline):
    """The x4 upscaler's parts and `pipe(prompt, image, ...)`. Built by `ldm.load_pipeline` from the official single
    file or a diffusers folder.

    Shares the main pipeline's prompt encoding (and cache), denoising loop, device/dtype handling, VAE tiling and
    attention chunking; the VAE always stays in fp32 (the original config warns that this decoder breaks in half
    precision; it only decodes here, the low-resolution image never goes through the encoder).
    `max_noise_level`: the highest accepted noise_level; `low_res_scheduler`: the config of the schedule that noises
    the input image (diffusers' `low_res_scheduler/scheduler_config.json`).
    """

    def __init__(self, *, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                 family: FamilyPreset | None = None, max_noise_level: int = MAX_NOISE_LEVEL,
                 low_res_scheduler: Mapping[str, Any] | None = None, optimize: bool = False) -> None:
        super().__init__(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                         family=family)
        ucfg, latent = unet.config, vae.config.latent_channels
        if ucfg.num_class_embeds is None or ucfg.in_channels != latent + 3:
            raise ValueError(f"an upscaler UNet takes {latent} latent + 3 image channels and a class embedding "
                             f"(the noise level); this one takes {ucfg.in_channels} channels and "
                             f"num_class_embeds={ucfg.num_class_embeds}")
        if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, int) \
                or not 0 <= max_noise_level < ucfg.num_class_embeds:
            raise ValueError(f"max_noise_level must be an int in [0, {ucfg.num_class_embeds}) (the UNet's classes), "
                             f"got {max_noise_level!r}")
        self.max_noise_level = max_noise_level
        self.low_res_scheduler = dict(LOW_RES_SCHEDULER if low_res_scheduler is None else low_res_scheduler)
        self._low_res_alphas_cumprod = low_res_alphas_cumprod(self.low_res_scheduler)
        self.vae.float()
        if optimize:
            self.optimize()

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> StableDiffusionUpscalePipeline:
        """Move every module to `device`; cast the UNet and text encoder to `dtype`, the VAE stays in fp32."""
        super().to(device, dtype)
        self.vae.float()
        return self

    def img2img(self, *args: Any, **kwargs: Any) -> PipelineOutput:
        raise TypeError("the x4 upscaler has no img2img: call pipe(prompt, image) to upscale")

    def inpaint(self, *args: Any, **kwargs: Any) -> PipelineOutput:
        raise TypeError("the x4 upscaler has no inpainting: call pipe(prompt, image) to upscale")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: ImageInput | list[ImageInput], *,
                 negative_prompt: str | list[str] | None = None, num_inference_steps: int = 75,
                 guidance_scale: float = 9.0, noise_level: int = 20, seed: int | None = None,
                 generator: Generator = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 callback: Callback | None = None, output_type: str = "pil") -> PipelineOutput:
        """Upscale `image` (one picture, or a list with one per prompt) four times along each side.

        noise_level: 0..max_noise_level, how much the input is noised before the model sees it (and the class it
        is told). seed=S gives image i the generator manual_seed(S + i) (diffusers' list-of-generators convention);
        `generator` is used as diffusers uses it. callback(i, t, latents) runs after each step; returning False
        stops and decodes the current latents. output_type "pil", "np" (B, 4h, 4w, 3) in [0, 1] or "latent".
        """
        self._check_noise_level(noise_level)
        prompts = _prompts(prompt, "prompt")
        pixels = self._low_res_images(image, len(prompts))  # (N, 3, h, w) in [-1, 1]
        run = self._prepare(prompts, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, seed=seed, generator=generator,
                            num_images_per_prompt=num_images_per_prompt, scheduler=None, eta=eta, callback=callback,
                            clip_skip=None, output_type=output_type, weighting=False)
        dtype, n = run.context.dtype, num_images_per_prompt
        pixels = pixels.to(self.device, dtype)

        # Draw 1: the augmentation noise, one row per input image (from the first N generators of a list).
        gens = run.generator[:len(pixels)] if isinstance(run.generator, list) else run.generator
        noise = randn(tuple(pixels.shape), gens, self.device, dtype)
        level = torch.tensor([noise_level], dtype=torch.long, device=self.device)
        pixels = add_image_noise(pixels, noise, level, self._low_res_alphas_cumprod)
        # diffusers tiles the images (torch.cat([image] * n)) while each prompt's rows are repeated in place: row k
        # gets image k % N. Kept for parity; it only matters with several prompts and n > 1.
        condition = torch.cat([pixels] * n)  # (B, 3, h, w)
        condition = torch.cat([condition] * 2) if run.guided else condition  # (2B or B, 3, h, w)
        levels = level.repeat(condition.shape[0])  # (2B or B,): the unconditional half is told the same level

        # Draw 2: the initial latents, as large as the input image (the VAE's f = 4 gives the 4x output).
        shape = (run.batch, self.vae.config.latent_channels, *pixels.shape[-2:])
        latents = randn(shape, run.generator, self.device, dtype) * run.scheduler.init_noise_sigma
        latents, steps_run = self.denoise(latents, run.context, run.scheduler, run.scheduler.timesteps,
                                          run.guidance_scale, step_kwargs=run.step_kwargs, callback=run.callback,
                                          condition=condition, class_labels=levels)
        return self._output(latents, steps_run, run.seeds, output_type)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 4h, 4w) in about [-1, 1], always decoded in fp32."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).float()

    # ------------------------------------------------------------------------------------------------------------
    # Checks

    def _check_noise_level(self, noise_level: int) -> None:
        if isinstance(noise_level, bool) or not isinstance(noise_level, numbers.Integral) \
                or not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"noise_level must be an int in [0, {self.max_noise_level}] (this model's "
                             f"max_noise_level), got {noise_level!r}")

    def _low_res_images(self, image: ImageInput | list[ImageInput], n_prompts: int) -> Tensor:
        """One image or a list of them as (N, 3, h, w) in [-1, 1]; N must equal the number of prompts, the sides
        multiples of the UNet's downsampling (the image enters the UNet at the latent resolution)."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("image: an empty list")
        tensors = [image_to_tensor(x, f"image {i}" if len(images) > 1 else "image") for i, x in enumerate(images)]
        sizes = {tuple(t.shape[-2:]) for t in tensors}
        if len(sizes) > 1:
            raise ValueError(f"image: the images must all have one size, got (HxW) {sorted(sizes)}")
        if len(tensors) != n_prompts:
            raise ValueError(f"prompt has {n_prompts} entries but {len(tensors)} image(s) were given: give one image "
                             f"per prompt")
        pixels = torch.cat(tensors)  # (N, 3, h, w)
        f = self.unet.config.downsample_factor
        h, w = pixels.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image is {w}x{h} (WxH); the upscaler needs sides that are multiples of {f} (its UNet "
                             f"halves the image {f.bit_length() - 1} times), e.g. {max(f, w // f * f)}x"
                             f"{max(f, h // f * f)}")
        return pixels
