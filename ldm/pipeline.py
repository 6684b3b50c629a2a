"""The Stable Diffusion pipeline: text to image, image to image, inpainting, around one denoising loop.

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv:2112.10752);
classifier-free guidance: Ho & Salimans 2022 (arXiv:2207.12598), eps = eps(x, "") + s * (eps(x, c) - eps(x, "")).
Mirrors diffusers 0.42.1 `pipelines/stable_diffusion/pipeline_stable_diffusion.py` (and its `_img2img` and
`_inpaint` siblings): the same prompt encoding, the same random draws in the same order from the same generators,
the same scheduler calls, so the same weights and seed give the same latents (DESIGN.md, the parity contract).

    context  = [CLIP(negative or ""); CLIP(prompt)]                      (2B, S, D)     one row per image
    x_T      = randn(seed) * init_noise_sigma                            (B, 4, h, w)   h, w = H/8, W/8
    for t:   eps = UNet(scale(x), t, context); eps = uncond + s * (cond - uncond); x = step(eps, t, x)
    image    = VAE.decode(x / scaling_factor)                            (B, 3, H, W)

img2img starts from the noised latents of an image at the timestep `strength` selects; inpainting feeds the
9-channel inpainting UNets [x, mask, masked-image latents], and for ordinary checkpoints blends the known region
back into the latents after every step.

Shapes: B images (prompts x num_images_per_prompt), C latent channels (4), h, w latent size, H, W image size,
S text tokens (77), D text width.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ldm import schedulers
from ldm.attention import set_attention_chunk
from ldm.adapters import AdapterMixin, LoRAMerger, TextualInversion
from ldm.config import FamilyPreset
from ldm.control import Control
from ldm.images import ImageInput, image_to_tensor, mask_to_tensor, to_numpy, to_pil
from ldm.limits import check_generation
from ldm.optimize import PromptCache
from ldm.prompts import encode_prompt as encode_weighted
from ldm.prompts import encode_prompt_pair
from ldm.rng import Generator, randn, seed_generators

Callback = Callable[[int, Tensor, Tensor], Union[bool, None]]
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class PipelineOutput:
    images: list[Image.Image] | np.ndarray | Tensor  # PIL images, (B, H, W, 3) floats in [0, 1], or the latents
    latents: Tensor  # (B, C, h, w) the final latents, whatever output_type
    seeds: list[int] | None  # the seed of each image when the call was given `seed=`
    steps_run: int  # denoising steps taken (fewer than asked when the callback stopped the run)


class StableDiffusionPipeline(AdapterMixin):  # AdapterMixin: load_textual_inversion, load_lora_weights, ...
    """The loaded parts of a model and the three ways to run them: `pipe(...)`, `pipe.img2img`, `pipe.inpaint`.

    Built by `ldm.load_pipeline`, or from parts as a diffusers user composes one:
    `StableDiffusionPipeline(unet=..., vae=..., text_encoder=..., tokenizer=..., scheduler=...)`. The parts carry
    their configs (`pipe.unet.config`, the scheduler's prediction type); `family` (an `ldm.config.FamilyPreset`
    or None: docs/loading.md) is the family the parts are, and gives the native image size. Device and dtype are
    those of the modules (`pipe.to(...)`).
    """

    def __init__(self, *, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Callable,
                 scheduler: Any, family: FamilyPreset | None = None, optimize: bool = False) -> None:
        if family is not None and not isinstance(family, FamilyPreset):
            raise TypeError(f"family must be an ldm.config.FamilyPreset or None, got {type(family).__name__}")
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable (list[str] -> ids), got {type(tokenizer).__name__}")
        _check_scheduler(scheduler)
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if family is not None and prediction != family.prediction_type:
            raise ValueError(f"scheduler prediction_type {prediction!r} does not match family {family.name!r} "
                             f"({family.prediction_type!r})")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler, self.family = tokenizer, scheduler, family
        # The text encoder runs once per prompt: the last 8 prompt encodings (a speed lever, ldm/optimize.py).
        self._prompt_cache = PromptCache(size=8)
        self._warned_vae_upcast = False
        self.levers = None  # the ldm.optimize.Levers pulled by optimize(), None on the eager pipeline
        self.textual_inversion = TextualInversion()  # loaded embeddings (ldm/embeddings.py)
        self.lora = LoRAMerger()  # loaded LoRAs, merged into the weights (ldm/lora.py)
        if optimize:
            self.optimize()

    # ------------------------------------------------------------------------------------------------------------
    # Device and precision

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along a side (8 for SD): image sides must be multiples of it."""
        return self.vae.config.downsample_factor

    @property
    def native_size(self) -> int:
        """The default image side in pixels: the family's (512; 768 for sd21-v), else diffusers' rule, the UNet's
        sample_size times the VAE's factor."""
        if self.family is not None:
            return self.family.native_size
        if self.unet.config.sample_size is None:
            raise ValueError("the UNet config has no sample_size and the pipeline no family: pass height= and width=")
        return self.unet.config.sample_size * self.vae_scale_factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
        """Move every module to `device` and/or cast it to `dtype` (fp32, bf16, or fp16 on CUDA). Returns self."""
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:  # the SDXL refiner has no first text encoder
                module.to(device=device, dtype=dtype)
        return self

    def optimize(self, **levers: Any) -> StableDiffusionPipeline:
        """Pull the speed levers (ldm/optimize.py): channels_last, fused attention projections, torch.compile
        with CUDA graphs, each switchable (`fuse=False`, `compile=False`, ...; None or absent: the device's
        default). Call after `.to(device, dtype)`. Returns self."""
        from ldm.optimize import optimize

        return optimize(self, **levers)

    # ------------------------------------------------------------------------------------------------------------
    # Memory for large images (diffusers' method names; docs/pipeline.md, "Large images and memory")

    def enable_vae_tiling(self, tile_sample_size: int | None = None, overlap: float = 0.25) -> None:
        """Encode and decode images larger than one tile (default: the VAE's sample_size, 512 px for SD 1.x) tile
        by tile, cross-fading the overlaps (ldm/vae.py, diffusers' tiled_encode / tiled_decode). Every path of the
        pipeline goes through it: txt2img's decode, img2img's and inpainting's encodes, the fp32 retry.

        Trade-off: VAE memory follows the tile size, not the image size; the image changes a little (GroupNorm
        statistics and the mid attention see one tile, seams are blended, not exact) and the overlaps cost about
        1.6-1.8x the VAE's work. Images that fit in one tile are untouched.
        """
        self.vae.enable_tiling(tile_sample_size, overlap)

    def disable_vae_tiling(self) -> None:
        """Back to one encoder/decoder pass over the whole image."""
        self.vae.disable_tiling()

    def enable_attention_chunking(self, chunk: int = 1024) -> None:
        """Run every attention layer of the UNet and the VAE on at most `chunk` query rows at a time
        (ldm.attention.set_attention_chunk), so at most a (chunk, S) block of scores exists per head.

        Trade-off: the result is the same (each query row's softmax is independent of the others; equal up to
        the summation order of the matrix kernels), at the cost of ceil(L / chunk) kernel calls per layer
        instead of one. It saves memory where the whole score matrix would be built: the "math" backend, SDPA's
        math fallback (e.g. the VAE's 512-wide single head) and fp32-upcast layers; SDPA's fused kernels never
        build it. Layers with a research processor installed ignore it.
        """
        for module in (self.unet, self.vae):  # a bad chunk raises on the UNet, before any layer changes
            set_attention_chunk(module, chunk)

    def disable_attention_chunking(self) -> None:
        """Back to one kernel call per attention layer (UNet and VAE)."""
        for module in (self.unet, self.vae):
            set_attention_chunk(module, None)

    # ------------------------------------------------------------------------------------------------------------
    # The three entry points

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, seed: int | None = None, generator: Generator = None,
                 num_images_per_prompt: int = 1, scheduler: Any = None, eta: float = 0.0,
                 callback: Callback | None = None, clip_skip: int | None = None, output_type: str = "pil",
                 weighting: bool = True) -> PipelineOutput:
        """Text to image. height/width default to the model's size (`pipe.native_size`: 512, 768 for sd21-v;
        a diffusers folder's is its unet.sample_size x the VAE's factor, 64 for the packaged shapes model).

        seed=S gives image i the generator manual_seed(S + i) (diffusers' list-of-generators convention);
        `generator` is used as diffusers uses it. `scheduler`: an object, or a name from `ldm.schedulers` built
        from this model's scheduler config. clip_skip=n takes the n-th-from-last CLIP layer (1 = the last),
        through the final layer norm, as the A1111 web UI does. weighting: read A1111's emphasis syntax
        `(word:1.3)` (a plain prompt encodes exactly as plain tokenization; prompts longer than 75 tokens are
        encoded in chunks either way). callback(i, t, latents) runs after each step; returning False stops and
        decodes the current latents.
        """
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(f"this is an inpainting model (the UNet takes {self.unet.config.in_channels} channels): "
                             f"use pipe.inpaint(prompt, image, mask_image)")
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        self._check_size(height, width, "height/width")
        run = self._begin(prompt, height, width, negative_prompt=negative_prompt,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                          generator=generator, num_images_per_prompt=num_images_per_prompt, scheduler=scheduler,
                          eta=eta, callback=callback, clip_skip=clip_skip, output_type=output_type,
                          weighting=weighting)
        shape = (run.batch, self.vae.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn(shape, run.generator, self.device, run.context.dtype) * run.scheduler.init_noise_sigma
        latents, steps_run = self.denoise(latents, run.context, run.scheduler, run.timesteps, run.guidance_scale,
                                          step_kwargs=run.step_kwargs, callback=run.callback, control=run.control)
        return self._output(latents, steps_run, run.seeds, output_type)

    @torch.no_grad()
    def img2img(self, prompt: str | list[str], image: ImageInput, *, strength: float = 0.8,
                negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, seed: int | None = None, generator: Generator = None,
                num_images_per_prompt: int = 1, scheduler: Any = None, eta: float = 0.0,
                callback: Callback | None = None, clip_skip: int | None = None, output_type: str = "pil",
                weighting: bool = True) -> PipelineOutput:
        """Image to image (SDEdit, Meng et al. 2021): noise the image's latents to the timestep `strength` picks
        (1.0: pure noise, all steps; 0.3: the last 30% of the steps) and denoise from there.

        Random draws as diffusers: the VAE posterior sample, then the noise. The output has the image's size.
        """
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError("this is an inpainting model: use pipe.inpaint(prompt, image, mask_image)")
        _check_strength(strength)
        pixels = self._load_image(image, "image")  # (1, 3, H, W) in [-1, 1]
        run = self._begin(prompt, pixels.shape[-2], pixels.shape[-1], strength=strength,
                          negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, seed=seed, generator=generator,
                          num_images_per_prompt=num_images_per_prompt, scheduler=scheduler, eta=eta,
                          callback=callback, clip_skip=clip_skip, output_type=output_type, weighting=weighting)
        image_latents = self._encode_image_img2img(pixels, run)  # (B, C, h, w)
        noise = randn(image_latents.shape, run.generator, self.device, run.context.dtype)
        latents = run.scheduler.add_noise(image_latents, noise, run.timesteps[:1].repeat(run.batch))
        latents, steps_run = self.denoise(latents, run.context, run.scheduler, run.timesteps, run.guidance_scale,
                                          step_kwargs=run.step_kwargs, callback=run.callback, control=run.control)
        return self._output(latents, steps_run, run.seeds, output_type)

    @torch.no_grad()
    def inpaint(self, prompt: str | list[str], image: ImageInput, mask_image: ImageInput, *, strength: float = 1.0,
                negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, seed: int | None = None, generator: Generator = None,
                num_images_per_prompt: int = 1, scheduler: Any = None, eta: float = 0.0,
                callback: Callback | None = None, clip_skip: int | None = None, output_type: str = "pil",
                weighting: bool = True) -> PipelineOutput:
        """Repaint the white part of `mask_image` (same size as `image`), as diffusers' inpainting pipeline.

        9-channel inpainting checkpoints see [x, mask, masked-image latents] at every step; ordinary checkpoints
        get the known region blended back: x = (1 - m) * noised(image latents, next t) + m * x after each step.
        Random draws as diffusers: the image's posterior sample (ordinary checkpoints, or strength < 1), the noise,
        then the masked image's posterior sample.
        """
        _check_strength(strength)
        pixels = self._load_image(image, "image")  # (1, 3, H, W) in [-1, 1]
        mask = mask_to_tensor(mask_image)  # (1, 1, H, W) in {0, 1}
        if mask.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} (WxH) but image is "
                             f"{pixels.shape[-1]}x{pixels.shape[-2]}: they must be the same size")
        native = self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1  # 9 for SD
        if not native and self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} channels; inpainting needs 4 "
                             f"(latent blending) or 9 (an inpainting checkpoint)")
        run = self._begin(prompt, pixels.shape[-2], pixels.shape[-1], strength=strength,
                          negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, seed=seed, generator=generator,
                          num_images_per_prompt=num_images_per_prompt, scheduler=scheduler, eta=eta,
                          callback=callback, clip_skip=clip_skip, output_type=output_type, weighting=weighting)
        timesteps = run.timesteps
        pixels, mask = pixels.to(self.device, self.dtype), mask.to(self.device, self.dtype)
        f, B, full = self.vae_scale_factor, run.batch, strength == 1.0

        image_latents = None
        if not native or not full:
            image_latents = self._encode_image_inpaint(pixels, run).repeat(B, 1, 1, 1)  # (B, C, h, w)
        noise = randn((B, self.vae.config.latent_channels, pixels.shape[-2] // f, pixels.shape[-1] // f),
                      run.generator, self.device, run.context.dtype)
        if full:
            latents = noise * run.scheduler.init_noise_sigma
        else:
            latents = run.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(B))
        small_mask = nn.functional.interpolate(mask, size=noise.shape[-2:]).repeat(B, 1, 1, 1)  # (B, 1, h, w) nearest
        masked_latents = self._encode_image_inpaint(pixels * (mask < 0.5), run).repeat(B, 1, 1, 1)  # (B, C, h, w)

        condition, blend = None, None
        if native:
            condition = torch.cat([small_mask, masked_latents], dim=1)  # (B, 1 + C, h, w)
            condition = torch.cat([condition] * 2) if run.guided else condition  # (2B, 1 + C, h, w)
        else:
            def blend(i: int, x: Tensor) -> Tensor:
                known = image_latents
                if i < len(timesteps) - 1:  # the known region, noised to the level of the next step
                    known = run.scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
                return (1 - small_mask) * known + small_mask * x

        latents, steps_run = self.denoise(latents, run.context, run.scheduler, timesteps, run.guidance_scale,
                                          step_kwargs=run.step_kwargs, callback=run.callback, condition=condition,
                                          blend=blend, control=run.control)
        return self._output(latents, steps_run, run.seeds, output_type)

    # ------------------------------------------------------------------------------------------------------------
    # The denoising loop

    def denoise(self, latents: Tensor, context: Tensor, scheduler: Any, timesteps: Tensor, guidance_scale: float, *,
                step_kwargs: dict[str, Any], callback: Callback | None = None, condition: Tensor | None = None,
                blend: Callable[[int, Tensor], Tensor] | None = None, class_labels: Tensor | None = None,
                control: Control | None = None, added_cond: dict[str, Tensor] | None = None) -> tuple[Tensor, int]:
        """Run the scheduler over `timesteps` from `latents` (B, C, h, w). Returns the final latents, steps taken.

        context: (2B, S, D) [uncond; cond] when guidance_scale > 1, else (B, S, D). condition: extra UNet input
        channels (inpainting checkpoints, the upscaler's low-resolution image). blend(i, latents): applied after
        each step (inpainting by blending). class_labels: (2B or B,) for UNets with a class embedding (the
        upscaler's noise level). control: the ControlNets' residuals, computed on the scaled latents before any
        condition channels. added_cond: the UNet's added conditioning, rows as the context's (SDXL: text_embeds
        (2B or B, 1280) and time_ids (2B or B, 6)), passed as `added_cond_kwargs`.
        """
        extra = {} if class_labels is None else {"class_labels": class_labels}
        if added_cond is not None:
            extra["added_cond_kwargs"] = added_cond
        guided = guidance_scale > 1
        for i, t in enumerate(timesteps):
            x = torch.cat([latents] * 2) if guided else latents  # (2B or B, C, h, w)
            x = scheduler.scale_model_input(x, t)
            residuals = {} if control is None else control.residuals(i, len(timesteps), x, t, context)
            if condition is not None:
                x = torch.cat([x, condition], dim=1)  # (2B or B, 2C + 1, h, w)
            out = self.unet(x, t, context, **extra, **residuals)  # (2B or B, C, h, w): noise, or v for sd21-v
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(out, t, latents, **step_kwargs)
            if blend is not None:
                latents = blend(i, latents)
            if callback is not None and callback(i, t, latents) is False:
                return latents, i + 1
        return latents, len(timesteps)

    # ------------------------------------------------------------------------------------------------------------
    # Prompt encoding

    def encode_prompt(self, prompts: list[str], clip_skip: int | None = None, weighting: bool = True) -> Tensor:
        """Prompts -> text context (len(prompts), 77*k, D): k chunks of 77 for long prompts, A1111 emphasis
        `(word:1.3)` when `weighting` (see ldm/prompts.py). A plain prompt of at most 75 tokens gives
        exactly the plain encoding, (B, 77, D).

        clip_skip=n: the n-th-from-last layer's hidden states through the final layer norm (n=1 is the usual
        output). diffusers' clip_skip=k is ours k + 1.
        """
        tokenizer = self.textual_inversion.wrap(self.tokenizer)  # splices loaded embeddings (ldm/embeddings.py)
        return encode_weighted(tokenizer, self.text_encoder, prompts, clip_skip, weighting)

    # ------------------------------------------------------------------------------------------------------------
    # Shared preparation

    def _prepare(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None, num_inference_steps: int,
                 guidance_scale: float, seed: int | None, generator: Generator, num_images_per_prompt: int,
                 scheduler: Any, eta: float, callback: Callback | None, clip_skip: int | None, output_type: str,
                 weighting: bool, text: dict[str, Any] | None = None) -> _Run:
        """Validate the common arguments, encode the prompts, set up the scheduler and the generators. text: more
        arguments of a subclass's `_conditioning` (SDXL's second prompts)."""
        steps, n_per_prompt = num_inference_steps, num_images_per_prompt
        prompts = _prompts(prompt, "prompt")
        negatives = [""] * len(prompts) if negative_prompt is None else _prompts(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
        _check_int(steps, "num_inference_steps", 1)
        _check_int(n_per_prompt, "num_images_per_prompt", 1)
        if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool) \
                or not 0 <= guidance_scale < math.inf:
            raise ValueError(f"guidance_scale must be a number >= 0 and finite, got {guidance_scale!r}")
        if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not 0 <= eta < math.inf:
            raise ValueError(f"eta must be a number >= 0 and finite, got {eta!r}")
        if clip_skip is not None:
            _check_int(clip_skip, "clip_skip", 1)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable (i, t, latents) or None, got {type(callback).__name__}")
        if not isinstance(weighting, bool):
            raise TypeError(f"weighting must be a bool, got {type(weighting).__name__}")
        batch = len(prompts) * n_per_prompt
        generator, seeds = seed_generators(seed, generator, batch)

        sched = self._scheduler(scheduler)
        sched.set_timesteps(steps)
        # diffusers' prepare_extra_step_kwargs without the signature reflection: every ldm scheduler's step takes
        # `generator` (the stochastic ones draw from it), and DDIM alone takes `eta`.
        step_kwargs: dict[str, Any] = {"generator": generator}
        if isinstance(sched, schedulers.DDIMScheduler):
            step_kwargs["eta"] = float(eta)
        elif eta != 0:
            raise ValueError(f"eta={eta} needs a scheduler that takes it (DDIM); {type(sched).__name__} does not")

        guided = guidance_scale > 1
        context, added_cond = self._conditioning(prompts, negatives if guided else None, n_per_prompt, clip_skip,
                                                 weighting, **(text or {}))
        return _Run(batch, context, guided, float(guidance_scale), generator, seeds, sched, step_kwargs, callback,
                    added_cond=added_cond)

    def _conditioning(self, prompts: list[str], negatives: list[str] | None, n_per_prompt: int,
                      clip_skip: int | None, weighting: bool) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The UNet's text inputs: the context (2B or B, S, D) and the added conditioning (None here; SDXL's pooled
        text embedding). As diffusers: the prompts, then the negatives (padded to as many 77-token chunks as the
        prompts, or the prompts to theirs), each row repeated num_images_per_prompt times."""
        cond, uncond = self._prompt_cache(self._encode_prompts, self.text_encoder, self.tokenizer, prompts, negatives,
                                          clip_skip, weighting, extra=self.textual_inversion.state)
        return guided_batch(cond, uncond, n_per_prompt).to(self.device, self.dtype), None  # (2B or B, S, D)

    def _begin(self, prompt: str | list[str], height: int, width: int, *, num_inference_steps: int,
               strength: float | None = None, **settings: Any) -> _Run:
        """The entry points' common start, for an output of height x width: `_prepare` with the call's other
        keyword arguments (`settings`, by name), the memory check (refuse what cannot fit, before the work), the
        steps to run, and the call's ControlNet state from the `_control` hook."""
        run = self._prepare(prompt, num_inference_steps=num_inference_steps, **settings)
        check_generation(self, height, width, run.batch, run.guided)
        # every step, or with `strength` the last int(steps * strength) (diffusers' get_timesteps; the scheduler's
        # begin index is set)
        run.timesteps = run.scheduler.timesteps if strength is None else \
            run.scheduler.timesteps_for_strength(num_inference_steps, strength)
        run.control = self._control(run, height, width)
        return run

    def _control(self, run: _Run, height: int, width: int) -> Control | None:
        """The hook for the residuals `denoise` adds (ldm/pipeline_controlnet.py prepares the call's ControlNets
        here); a plain pipeline has none."""
        return None

    def _encode_prompts(self, prompts: list[str], negatives: list[str] | None, clip_skip: int | None,
                        weighting: bool) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond) text contexts; uncond is None without negatives (no guidance)."""
        if negatives is None:
            return self.encode_prompt(prompts, clip_skip, weighting), None
        tokenizer = self.textual_inversion.wrap(self.tokenizer)  # splices loaded embeddings (ldm/embeddings.py)
        return encode_prompt_pair(tokenizer, self.text_encoder, prompts, negatives, clip_skip, weighting)

    @property
    def prompt_cache_size(self) -> int:
        """How many prompt encodings the pipeline keeps (ldm.optimize.PromptCache); 0 turns the cache off."""
        return self._prompt_cache.size

    @prompt_cache_size.setter
    def prompt_cache_size(self, size: int) -> None:
        self._prompt_cache.size = size

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    def _scheduler(self, scheduler: Any) -> Any:
        """None: the pipeline's own; a name: that class from the model's scheduler config; else the object given."""
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, str):
            return schedulers.from_name(scheduler, dict(self.scheduler.config))
        _check_scheduler(scheduler)
        return scheduler

    def _load_image(self, image: ImageInput, what: str) -> Tensor:
        pixels = image_to_tensor(image, what)  # (1, 3, H, W)
        self._check_size(pixels.shape[-2], pixels.shape[-1], f"{what} size")
        return pixels

    def _check_size(self, height: int, width: int, what: str) -> None:
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            _check_int(value, name, f)
            if value % f:
                raise ValueError(f"{what}: {name} must be a multiple of {f} (the VAE's downsampling), got {value}")

    def _encode_image_img2img(self, pixels: Tensor, run: _Run) -> Tensor:
        """Scaled posterior samples (B, C, h, w), drawn as diffusers' img2img prepare_latents draws them."""
        posterior = self.vae.encode(pixels.to(self.device, self.dtype))  # over (1, C, h, w)
        scale = self.vae.config.scaling_factor
        if isinstance(run.generator, list):  # one posterior sample per image, each from its own generator
            return scale * torch.cat([posterior.sample(g) for g in run.generator])
        return scale * posterior.sample(run.generator).repeat(run.batch, 1, 1, 1)

    def _encode_image_inpaint(self, pixels: Tensor, run: _Run) -> Tensor:
        """Scaled posterior sample (1, C, h, w) as diffusers' inpaint `_encode_vae_image`: with a list of
        generators, one sample per input image (here one), from the first generator."""
        generator = run.generator[0] if isinstance(run.generator, list) else run.generator
        return self.vae.config.scaling_factor * self.vae.encode(pixels).sample(generator)

    # ------------------------------------------------------------------------------------------------------------
    # Running and decoding

    def _output(self, latents: Tensor, steps_run: int, seeds: list[int] | None, output_type: str) -> PipelineOutput:
        _check_finite(latents, "the latents after denoising")
        if output_type == "latent":
            return PipelineOutput(latents, latents, seeds, steps_run)
        decoded = self.decode(latents)  # (B, 3, H, W)
        _check_finite(decoded, "the decoded images")
        images = to_numpy(decoded)  # (B, H, W, 3) in [0, 1]
        return PipelineOutput(to_pil(images) if output_type == "pil" else images, latents, seeds, steps_run)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1], float32.

        In fp16 the SD VAE decoder can overflow (inf, then NaN) on some latents; then it decodes again in fp32
        and says so, once per pipeline (diffusers' `force_upcast` decides up front; checking the result costs one
        reduction when it works). The module is upcast in place for the retry and cast back (memory format kept).
        Both passes go through `vae.decode`, so VAE tiling (enable_vae_tiling) applies to the retry as well.
        """
        z = latents / self.vae.config.scaling_factor
        images = self.vae.decode(z)
        if not bool(torch.isfinite(images).all()) and images.dtype != torch.float32:
            if not self._warned_vae_upcast:
                warnings.warn(f"VAE decoding in {images.dtype} overflowed (inf/NaN); decoding again in float32 "
                              f"(said once per pipeline)", RuntimeWarning, stacklevel=3)
                self._warned_vae_upcast = True
            dtype = images.dtype
            self.vae.float()
            try:
                images = self.vae.decode(z.float())
            finally:
                self.vae.to(dtype)
        return images.float()


@dataclass
class _Run:
    """What one call prepared: the batch size, the text context, the generators and the scheduler."""

    batch: int  # B = prompts x num_images_per_prompt
    context: Tensor  # (2B, S, D) with guidance, else (B, S, D)
    guided: bool
    guidance_scale: float
    generator: Generator
    seeds: list[int] | None
    scheduler: Any
    step_kwargs: dict[str, Any]
    callback: Callback | None
    timesteps: Tensor | None = None  # the steps this call runs (set by _begin)
    control: Control | None = None  # the call's ControlNets (set by _begin; ldm/control.py)
    added_cond: dict[str, Tensor] | None = None  # the UNet's added_cond_kwargs, rows as the context's (SDXL)


def guided_batch(cond: Tensor, uncond: Tensor | None, n_per_prompt: int) -> Tensor:
    """[uncond; cond] with each prompt's row repeated n_per_prompt times (2B, ...), or cond alone (B, ...) without
    guidance (uncond None): the row order of diffusers' guided batch."""
    cond = cond.repeat_interleave(n_per_prompt, dim=0)
    return cond if uncond is None else torch.cat([uncond.repeat_interleave(n_per_prompt, dim=0), cond])


# ----------------------------------------------------------------------------------------------------------------
# Argument checks


def _prompts(prompt: str | list[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {prompt!r:.80}")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_finite(x: Tensor, what: str) -> None:
    """Non-finite latents or pixels would become a black picture: an error instead (after decode's fp32 retry)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} hold NaN or inf values: the model's weights are not finite, or the numbers "
                         f"overflowed (a huge guidance scale, fp16); nothing was written")


def _check_strength(strength: float) -> None:
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")


def _check_scheduler(scheduler: Any) -> None:
    for attr in ("set_timesteps", "scale_model_input", "step", "add_noise", "timesteps_for_strength", "config"):
        if not hasattr(scheduler, attr):
            raise TypeError(f"scheduler must be an ldm.schedulers scheduler (or a name), got "
                            f"{type(scheduler).__name__} without .{attr}")
