"""The SDXL pipeline: two text encoders, micro-conditioning, and the base + refiner hand-off, on the parent's loop.

Paper: Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis"
(arXiv:2307.01952). Mirrors diffusers 0.42.1 `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py` and its
`_img2img` and `_inpaint` siblings: the same prompt encoding, the same random draws in the same order, the same
time ids, so the same weights and seed give the same latents (DESIGN.md, the parity contract).

What SDXL adds to `StableDiffusionPipeline` (the rest, the loop, the schedulers, the checks, is the parent's):

    context  = [CLIP-L(prompt).hidden_states[-2] | bigG(prompt_2).hidden_states[-2]]     (B, 77, 768 + 1280)
    pooled   = bigG(prompt_2).text_embeds                                                 (B, 1280)
    time_ids = original_size + crops_coords_top_left + target_size                        (B, 6)  base
             = original_size + crops_coords_top_left + (aesthetic_score,)                 (B, 5)  refiner
    UNet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})

Both encoders are read at the penultimate layer WITHOUT the final layer norm. Without a negative prompt the
unconditional inputs are zeros (`force_zeros_for_empty_prompt`, the base model's setting; the refiner encodes "").
The refiner (`text_encoder` None) has only the bigG encoder and reads `prompt` with it, as diffusers does.

Ensemble of experts: the base runs `denoising_end=0.8` with output_type="latent"; the refiner's img2img takes those
latents as `image` with `denoising_start=0.8` and walks the remaining timesteps without adding noise.

Shapes: B images, C latent channels (4), h, w latent size, S = 77*k text tokens, D = 2048 context width, P = 1280
pooled width.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ldm.config import FamilyPreset
from ldm.embeddings import PLACEHOLDER, TextualInversion
from ldm.images import ImageInput, mask_to_tensor
from ldm.limits import check_generation
from ldm.pipeline import (Callback, PipelineOutput, StableDiffusionPipeline, _check_strength, _prompts, _Run,
                          guided_batch)
from ldm.prompts import CHUNK, apply_emphasis, chunk_tokens, count_chunks, tokenize_weighted
from ldm.rng import Generator, randn

Size = tuple[int, int]  # (height, width) or (top, left), diffusers' order


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base or refiner: `pipe(...)`, `pipe.img2img`, `pipe.inpaint` with diffusers' SDXL arguments.

    Built by `ldm.load_pipeline` from an SDXL file or folder, or from parts: `StableDiffusionXLPipeline(unet=...,
    vae=..., text_encoder=..., text_encoder_2=..., tokenizer=..., tokenizer_2=..., scheduler=...)`; the refiner has
    `text_encoder=None, tokenizer=None`. force_zeros_for_empty_prompt: zero unconditional inputs when no negative
    prompt is given (None: the official setting, True for the base, False for the refiner).
    """

    def __init__(self, *, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, text_encoder_2: nn.Module,
                 tokenizer: Any, tokenizer_2: Any, scheduler: Any, family: FamilyPreset | None = None,
                 force_zeros_for_empty_prompt: bool | None = None, optimize: bool = False) -> None:
        if not isinstance(text_encoder_2, nn.Module) or not hasattr(text_encoder_2, "text_projection"):
            raise TypeError(f"text_encoder_2 must be a CLIPTextModelWithProjection (its pooled output is SDXL's "
                            f"text_embeds), got {type(text_encoder_2).__name__}")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer go together: give both (SDXL base) or neither (refiner)")
        if text_encoder is not None and not isinstance(text_encoder, nn.Module):
            raise TypeError(f"text_encoder must be a torch.nn.Module or None, got {type(text_encoder).__name__}")
        # The parent checks the parts it knows; the bigG encoder stands in for the one the refiner lacks.
        super().__init__(unet=unet, vae=vae, text_encoder=text_encoder_2, tokenizer=tokenizer_2, scheduler=scheduler,
                         family=family)
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"the UNet's addition_embed_type is {unet.config.addition_embed_type!r}: an SDXL UNet "
                             f"has 'text_time' (use StableDiffusionPipeline for SD 1.x / 2.x)")
        widths = [e.config.hidden_size for e in (text_encoder, text_encoder_2) if e is not None]
        if sum(widths) != unet.config.cross_attention_dim:
            raise ValueError(f"the text encoders' widths {' + '.join(map(str, widths))} (concatenated) do not match "
                             f"the UNet's cross_attention_dim {unet.config.cross_attention_dim}")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = text_encoder is not None
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = self._time_id_count() == 5  # diffusers' flag, read off the UNet
        self.textual_inversion_2 = TextualInversion()  # the bigG halves of loaded SDXL embeddings
        if optimize:
            self.optimize()

    def _time_id_count(self) -> int:
        """How many micro-conditioning numbers the UNet's add_embedding reads: 6 (base) or 5 (refiner)."""
        cfg = self.unet.config
        width = cfg.projection_class_embeddings_input_dim - self.text_encoder_2.config.projection_dim
        count, rest = divmod(width, cfg.addition_time_embed_dim)
        if rest or count not in (5, 6):
            raise ValueError(f"the UNet's projection_class_embeddings_input_dim "
                             f"{cfg.projection_class_embeddings_input_dim} minus text_encoder_2's projection_dim "
                             f"{self.text_encoder_2.config.projection_dim} is not 5 or 6 time ids of "
                             f"addition_time_embed_dim {cfg.addition_time_embed_dim}")
        return count

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
           ) -> StableDiffusionXLPipeline:
        """Move every module to `device` and/or cast it to `dtype` (fp32, bf16, or fp16 on CUDA). Returns self."""
        super().to(device, dtype)  # unet, vae, text_encoder (None on the refiner)
        self.text_encoder_2.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------------------------------------------------
    # The three entry points

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], *, prompt_2: str | list[str] | None = None,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 denoising_end: float | None = None, guidance_scale: float = 5.0, seed: int | None = None,
                 generator: Generator = None, num_images_per_prompt: int = 1, scheduler: Any = None,
                 eta: float = 0.0, callback: Callback | None = None, clip_skip: int | None = None,
                 output_type: str = "pil", weighting: bool = True, original_size: Size | None = None,
                 crops_coords_top_left: Size = (0, 0), target_size: Size | None = None,
                 negative_original_size: Size | None = None, negative_crops_coords_top_left: Size | None = None,
                 negative_target_size: Size | None = None) -> PipelineOutput:
        """Text to image, diffusers' StableDiffusionXLPipeline. height/width default to the model's size (1024).

        prompt_2 / negative_prompt_2: what the bigG encoder reads (default: prompt / negative_prompt).
        Micro-conditioning, (height, width) pairs as diffusers: original_size and target_size default to the
        output size, crops_coords_top_left to (0, 0); the negative_* ones replace them for the unconditional row
        when both negative sizes are given (negative crops default (0, 0)), as diffusers.
        denoising_end: stop after this fraction of the schedule (the base of a base + refiner run; with
        output_type="latent" the latents go to the refiner's img2img with denoising_start=denoising_end).
        clip_skip, seed, generator, callback, weighting: as the parent's (`StableDiffusionPipeline.__call__`);
        SDXL reads the penultimate layer, so clip_skip=n reads hidden_states[-(n + 1)] (diffusers' n - 1).
        """
        if self.requires_aesthetics_score:
            raise ValueError("this UNet is conditioned on aesthetic scores (the SDXL refiner): it refines images, "
                             "use pipe.img2img(prompt, image) or pipe.inpaint(...)")
        self._check_not_inpainting()
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        self._check_size(height, width, "height/width")
        _check_fraction(denoising_end, "denoising_end")
        original = _pair(original_size, "original_size") or (height, width)
        target = _pair(target_size, "target_size") or (height, width)
        crops = _pair(crops_coords_top_left, "crops_coords_top_left")
        negative = _negative_sizes(negative_original_size, negative_crops_coords_top_left, negative_target_size)
        run = self._prepare_xl(prompt, prompt_2, negative_prompt, negative_prompt_2, num_inference_steps,
                               guidance_scale, seed, generator, num_images_per_prompt, scheduler, eta, callback,
                               clip_skip, output_type, weighting)
        check_generation(self, height, width, run.batch, run.guided)
        time_ids = original + crops + target
        self._add_time_ids(run, time_ids, time_ids if negative is None else negative, alternate=True)
        shape = (run.batch, self.vae.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn(shape, run.generator, self.device, run.context.dtype) * run.scheduler.init_noise_sigma
        timesteps = _until(run.scheduler, run.scheduler.timesteps, denoising_end)
        latents, steps_run = self.denoise(latents, run.context, run.scheduler, timesteps, run.guidance_scale,
                                          step_kwargs=run.step_kwargs, callback=run.callback,
                                          added_cond=run.added_cond)
        return self._output(latents, steps_run, run.seeds, output_type)

    @torch.no_grad()
    def img2img(self, prompt: str | list[str], image: ImageInput, *, strength: float = 0.3,
                prompt_2: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                negative_prompt_2: str | list[str] | None = None, num_inference_steps: int = 50,
                denoising_start: float | None = None, denoising_end: float | None = None,
                guidance_scale: float = 5.0, seed: int | None = None, generator: Generator = None,
                num_images_per_prompt: int = 1, scheduler: Any = None, eta: float = 0.0,
                callback: Callback | None = None, clip_skip: int | None = None, output_type: str = "pil",
                weighting: bool = True, original_size: Size | None = None, crops_coords_top_left: Size = (0, 0),
                target_size: Size | None = None, negative_original_size: Size | None = None,
                negative_crops_coords_top_left: Size = (0, 0), negative_target_size: Size | None = None,
                aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5) -> PipelineOutput:
        """Image to image, diffusers' StableDiffusionXLImg2ImgPipeline (the refiner's entry point).

        image: a picture (as the parent's img2img), or latents (1 or B, 4, h, w), e.g. the base's
        output_type="latent" output, used as they are. denoising_start: start at this fraction of the schedule
        WITHOUT adding noise (the refiner of a base + refiner run; strength is then ignored); otherwise the image's
        latents are noised to the step `strength` picks. aesthetic_score / negative_aesthetic_score: the refiner's
        conditioning (its UNet reads 5 time ids); other arguments as `__call__`.
        """
        self._check_not_inpainting()
        _check_strength(strength)
        _check_fraction(denoising_start, "denoising_start")
        _check_fraction(denoising_end, "denoising_end")
        pixels, given = self._image_or_latents(image)
        run = self._prepare_xl(prompt, prompt_2, negative_prompt, negative_prompt_2, num_inference_steps,
                               guidance_scale, seed, generator, num_images_per_prompt, scheduler, eta, callback,
                               clip_skip, output_type, weighting)
        timesteps = _walk(run.scheduler, num_inference_steps, strength, denoising_start, denoising_end)
        f = self.vae_scale_factor
        size = pixels.shape[-2:] if given is None else (given.shape[-2] * f, given.shape[-1] * f)
        check_generation(self, size[0], size[1], run.batch, run.guided)
        if given is None:
            image_latents = self._encode_image_img2img(pixels, run)  # (B, C, h, w)
        else:
            image_latents = _tile(given.to(self.device, run.context.dtype), run.batch)  # used as they are
        latents = image_latents
        if denoising_start is None:  # diffusers draws no noise when it starts mid-schedule
            noise = randn(image_latents.shape, run.generator, self.device, run.context.dtype)
            latents = run.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(run.batch))
        self._image_time_ids(run, latents, original_size, crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                             negative_aesthetic_score)
        latents, steps_run = self.denoise(latents, run.context, run.scheduler, timesteps, run.guidance_scale,
                                          step_kwargs=run.step_kwargs, callback=run.callback,
                                          added_cond=run.added_cond)
        return self._output(latents, steps_run, run.seeds, output_type)

    @torch.no_grad()
    def inpaint(self, prompt: str | list[str], image: ImageInput, mask_image: ImageInput, *, strength: float = 0.9999,
                prompt_2: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                negative_prompt_2: str | list[str] | None = None, num_inference_steps: int = 50,
                denoising_start: float | None = None, denoising_end: float | None = None,
                guidance_scale: float = 7.5, seed: int | None = None, generator: Generator = None,
                num_images_per_prompt: int = 1, scheduler: Any = None, eta: float = 0.0,
                callback: Callback | None = None, clip_skip: int | None = None, output_type: str = "pil",
                weighting: bool = True, original_size: Size | None = None, crops_coords_top_left: Size = (0, 0),
                target_size: Size | None = None, negative_original_size: Size | None = None,
                negative_crops_coords_top_left: Size = (0, 0), negative_target_size: Size | None = None,
                aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5) -> PipelineOutput:
        """Repaint the white part of `mask_image`, diffusers' StableDiffusionXLInpaintPipeline (default strength
        0.9999 and guidance 7.5, as there).

        4-channel UNets get the known region blended back after every step; 9-channel SDXL inpainting UNets see
        [x, mask, masked-image latents]. image: a picture of the mask's size, or (4-channel UNets) latents
        (1 or B, 4, h, w) of the mask's size / 8, e.g. a base's output_type="latent" output for the refiner.
        Random draws as diffusers: the image's posterior sample, the noise (drawn even with denoising_start), the
        masked image's posterior sample. Other arguments as `img2img`.
        """
        _check_strength(strength)
        _check_fraction(denoising_start, "denoising_start")
        _check_fraction(denoising_end, "denoising_end")
        pixels, given = self._image_or_latents(image)
        mask = mask_to_tensor(mask_image)  # (1, 1, H, W) in {0, 1}
        f, C = self.vae_scale_factor, self.vae.config.latent_channels
        size = pixels.shape[-2:] if given is None else (given.shape[-2] * f, given.shape[-1] * f)
        if tuple(mask.shape[-2:]) != tuple(size):
            raise ValueError(f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} (WxH) but the image is "
                             f"{size[1]}x{size[0]}: they must be the same size")
        native = self.unet.config.in_channels == 2 * C + 1  # 9 for SDXL inpainting checkpoints
        if not native and self.unet.config.in_channels != C:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} channels; inpainting needs {C} "
                             f"(latent blending) or {2 * C + 1} (an inpainting checkpoint)")
        if native and given is not None:
            raise ValueError("an inpainting UNet needs the masked picture: give image as a picture, not latents")
        run = self._prepare_xl(prompt, prompt_2, negative_prompt, negative_prompt_2, num_inference_steps,
                               guidance_scale, seed, generator, num_images_per_prompt, scheduler, eta, callback,
                               clip_skip, output_type, weighting)
        check_generation(self, size[0], size[1], run.batch, run.guided)
        timesteps = _walk(run.scheduler, num_inference_steps, strength, denoising_start, denoising_end)
        latents, image_latents, noise = self._inpaint_latents(pixels, given, run, timesteps, strength == 1.0,
                                                              native, denoising_start is None)
        small_mask = nn.functional.interpolate(mask, size=noise.shape[-2:])  # (1, 1, h, w) nearest
        small_mask = small_mask.to(self.device, run.context.dtype).repeat(run.batch, 1, 1, 1)  # (B, 1, h, w)
        condition, blend = None, None
        if given is None:  # diffusers encodes the masked picture for 4-channel UNets too: one more posterior draw
            masked = self._encode_image_inpaint(pixels * (mask < 0.5), run).repeat(run.batch, 1, 1, 1)  # (B, C, h, w)
            condition = torch.cat([small_mask, masked], dim=1) if native else None  # (B, 1 + C, h, w)
            condition = torch.cat([condition] * 2) if native and run.guided else condition
        if not native:
            def blend(i: int, x: Tensor) -> Tensor:
                known = image_latents
                if i < len(timesteps) - 1:  # the known region, noised to the level of the next step
                    known = run.scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
                return (1 - small_mask) * known + small_mask * x

        self._image_time_ids(run, latents, original_size, crops_coords_top_left, target_size, negative_original_size,
                             negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                             negative_aesthetic_score)
        latents, steps_run = self.denoise(latents, run.context, run.scheduler, timesteps, run.guidance_scale,
                                          step_kwargs=run.step_kwargs, callback=run.callback, condition=condition,
                                          blend=blend, added_cond=run.added_cond)
        return self._output(latents, steps_run, run.seeds, output_type)

    # ------------------------------------------------------------------------------------------------------------
    # Prompt encoding: two encoders, penultimate layers side by side, bigG's pooled embedding

    def encode_prompt(self, prompts: str | list[str], prompts_2: str | list[str] | None = None,
                      clip_skip: int | None = None, weighting: bool = True,
                      min_chunks: int = 1) -> tuple[Tensor, Tensor]:
        """Prompts -> (context (B, 77*k, D1 + D2), pooled (B, P)), as diffusers' SDXL `encode_prompt`.

        CLIP-L reads `prompts`, bigG `prompts_2` (default: the same); each gives hidden_states[-(clip_skip + 1)]
        (the penultimate layer by default, no final layer norm), concatenated along the width; pooled is bigG's
        text_embeds. The refiner (no CLIP-L) reads `prompts` with bigG, as diffusers. A1111's SDXL rules for
        emphasis `(word:1.3)` and long prompts: each encoder's hidden states are weighted and their mean restored
        on their own (ldm/prompts.py), prompts are cut into k chunks of 75 tokens (k the same for both encoders,
        at least min_chunks), and pooled comes from the first chunk, unweighted. A plain prompt of at most 75
        tokens gives exactly diffusers' encoding.
        """
        prompts = _prompts(prompts, "prompts")
        prompts_2 = prompts if prompts_2 is None else _prompts(prompts_2, "prompts_2")
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}")
        encoders = self._encoders(prompts, prompts_2)
        k = max([min_chunks] + [count_chunks(tok, texts, weighting) for tok, _, texts in encoders])
        parts = [_encode_chunks(tok, encoder, texts, k, clip_skip, weighting) for tok, encoder, texts in encoders]
        context = torch.cat([z for z, _ in parts], dim=-1)  # (B, 77*k, D1 + D2)
        return context, parts[-1][1]  # pooled: bigG's (B, P)

    def _encoders(self, prompts: list[str], prompts_2: list[str]) -> list[tuple[Any, nn.Module, list[str]]]:
        """(tokenizer, encoder, texts) per encoder: CLIP-L with prompts, bigG with prompts_2 (the refiner: bigG
        with prompts, diffusers' zip of [prompt, prompt_2] with its one encoder). The tokenizers splice the
        loaded textual inversion words (ldm/embeddings.py), each encoder its own vectors."""
        tokenizer_2 = self.textual_inversion_2.wrap(self.tokenizer_2)
        if self.text_encoder is None:
            return [(tokenizer_2, self.text_encoder_2, prompts)]
        return [(self.textual_inversion.wrap(self.tokenizer), self.text_encoder, prompts),
                (tokenizer_2, self.text_encoder_2, prompts_2)]

    def _conditioning(self, prompts: list[str], negatives: list[str] | None, n_per_prompt: int,
                      clip_skip: int | None, weighting: bool, *, prompts_2: list[str] | None = None,
                      negatives_2: list[str] | None = None, zeros: bool = False
                      ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The parent's hook: context (2B or B, S, D) and {"text_embeds": (2B or B, P)}; time_ids come later."""
        guided = negatives is not None
        encode = functools.partial(self._encode_pair, prompts_2=prompts_2, negatives_2=negatives_2)
        extra = (None if prompts_2 is None else tuple(prompts_2), None if negatives_2 is None else tuple(negatives_2),
                 id(self.text_encoder), id(self.tokenizer), _fingerprint(self.text_encoder),
                 self.textual_inversion.state, self.textual_inversion_2.state)
        cond, pooled, uncond, uncond_pooled = self._prompt_cache(
            encode, self.text_encoder_2, self.tokenizer_2, prompts, None if zeros else negatives, clip_skip,
            weighting, extra=extra)
        if guided and zeros:  # force_zeros_for_empty_prompt: no negative prompt means zero inputs, not ""
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        context = guided_batch(cond, uncond, n_per_prompt).to(self.device, self.dtype)  # (2B or B, S, D)
        text_embeds = guided_batch(pooled, uncond_pooled, n_per_prompt).to(self.device, self.dtype)  # (2B or B, P)
        return context, {"text_embeds": text_embeds}

    def _encode_pair(self, prompts: list[str], negatives: list[str] | None, clip_skip: int | None, weighting: bool,
                     *, prompts_2: list[str] | None, negatives_2: list[str] | None
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(cond, pooled, uncond, uncond_pooled), prompts and negatives padded to one chunk count. As diffusers,
        the negatives are read at the penultimate layer whatever clip_skip says."""
        read = self._encoders(prompts, prompts_2 or prompts)  # what the encoders read decides the chunk count
        read += self._encoders(negatives, negatives_2 or negatives) if negatives else []
        k = max(count_chunks(tokenizer, texts, weighting) for tokenizer, _, texts in read)
        cond, pooled = self.encode_prompt(prompts, prompts_2, clip_skip, weighting, min_chunks=k)
        if negatives is None:
            return cond, pooled, None, None
        uncond, uncond_pooled = self.encode_prompt(negatives, negatives_2, None, weighting, min_chunks=k)
        return cond, pooled, uncond, uncond_pooled

    # ------------------------------------------------------------------------------------------------------------
    # Shared preparation

    def _prepare_xl(self, prompt: str | list[str], prompt_2: str | list[str] | None,
                    negative_prompt: str | list[str] | None, negative_prompt_2: str | list[str] | None,
                    steps: int, guidance_scale: float, seed: int | None, generator: Generator, n_per_prompt: int,
                    scheduler: Any, eta: float, callback: Callback | None, clip_skip: int | None, output_type: str,
                    weighting: bool) -> _Run:
        """The parent's `_prepare` with SDXL's prompt rules (diffusers' `prompt_2 or prompt`, `negative_prompt_2 or
        negative_prompt`, zeros for a missing negative prompt when force_zeros_for_empty_prompt)."""
        prompts = _prompts(prompt, "prompt")
        text = {"prompts_2": _second(prompt_2 or prompt, len(prompts), "prompt_2"),
                "zeros": negative_prompt is None and self.force_zeros_for_empty_prompt}
        if negative_prompt is not None or negative_prompt_2 is not None:
            text["negatives_2"] = _second(negative_prompt_2 or negative_prompt or "", len(prompts),
                                          "negative_prompt_2")
        return self._prepare(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                             guidance_scale=guidance_scale, seed=seed, generator=generator,
                             num_images_per_prompt=n_per_prompt, scheduler=scheduler, eta=eta, callback=callback,
                             clip_skip=clip_skip, output_type=output_type, weighting=weighting, text=text)

    def _add_time_ids(self, run: _Run, time_ids: tuple[float, ...], negative: tuple[float, ...],
                      alternate: bool = False) -> None:
        """Put the micro-conditioning into the run's added conditioning, (2B or B, 6 or 5): the negative row for
        the unconditional half, the positive for the conditional half; alternate=True: diffusers' txt2img order,
        the pair [negative, positive] repeated B times over the whole guided batch (a diffusers quirk that matters
        only when the negative sizes differ and B > 1; kept for parity)."""
        expected = self._time_id_count()
        if len(time_ids) != expected:
            raise ValueError(f"the UNet reads {expected} time ids, {len(time_ids)} were made")

        def rows(*ids: tuple[float, ...]) -> Tensor:
            return torch.tensor(ids, dtype=run.context.dtype, device=self.device).repeat(run.batch, 1)  # (B*n, 6)

        if run.guided and alternate:
            run.added_cond["time_ids"] = rows(negative, time_ids)  # (2B, 6): negative, positive, negative, ...
        else:
            run.added_cond["time_ids"] = guided_batch(rows(time_ids), rows(negative) if run.guided else None, 1)

    def _image_time_ids(self, run: _Run, latents: Tensor, original_size: Size | None, crops: Size,
                        target_size: Size | None, negative_original_size: Size | None, negative_crops: Size,
                        negative_target_size: Size | None, aesthetic_score: float,
                        negative_aesthetic_score: float) -> None:
        """img2img's and inpainting's time ids, diffusers' rules: sizes default to the latents' size x 8; the
        refiner reads (original, crops, aesthetic score), the negative row its own crops (default (0, 0)); the base
        reads (original, crops, target), the negative row with the positive crops."""
        size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        original = _pair(original_size, "original_size") or size
        target = _pair(target_size, "target_size") or size
        crops = _pair(crops, "crops_coords_top_left")
        negative_original = _pair(negative_original_size, "negative_original_size") or original
        negative_target = _pair(negative_target_size, "negative_target_size") or target
        if self.requires_aesthetics_score:
            scores = (_number(aesthetic_score, "aesthetic_score"),
                      _number(negative_aesthetic_score, "negative_aesthetic_score"))
            negative_crops = _pair(negative_crops, "negative_crops_coords_top_left")
            self._add_time_ids(run, original + crops + scores[:1], negative_original + negative_crops + scores[1:])
        else:
            self._add_time_ids(run, original + crops + target, negative_original + crops + negative_target)

    def _check_not_inpainting(self) -> None:
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(f"this is an inpainting model (the UNet takes {self.unet.config.in_channels} channels): "
                             f"use pipe.inpaint(prompt, image, mask_image)")

    def _image_or_latents(self, image: ImageInput) -> tuple[Tensor | None, Tensor | None]:
        """(pixels (1, 3, H, W), None) for a picture; (None, latents) for a (N, C, h, w) tensor of latents."""
        C = self.vae.config.latent_channels
        if isinstance(image, Tensor) and image.ndim == 4 and image.shape[1] == C and C != 3:
            if not image.is_floating_point() or not bool(torch.isfinite(image).all()):
                raise ValueError(f"image: latents must be finite floats, got {image.dtype}")
            return None, image
        return self._load_image(image, "image"), None

    def _encode_image_img2img(self, pixels: Tensor, run: _Run) -> Tensor:
        """(B, C, h, w) scaled posterior samples as diffusers' SDXL img2img draws them: one per generator of a
        list, else one sample repeated."""
        if isinstance(run.generator, list):
            return self._posterior_samples(pixels, run.generator)
        return self._posterior_samples(pixels, [run.generator]).repeat(run.batch, 1, 1, 1)

    def _encode_image_inpaint(self, pixels: Tensor, run: _Run) -> Tensor:
        """(1, C, h, w): diffusers' SDXL inpaint `_encode_vae_image` of one picture (a list's first generator)."""
        return self._posterior_samples(pixels, [run.generator[0] if isinstance(run.generator, list)
                                                else run.generator])

    def _posterior_samples(self, pixels: Tensor, generators: list[Any]) -> Tensor:
        """One scaled posterior sample of pixels (1, 3, H, W) per generator: (N, C, h, w) in the pipeline's dtype.
        The VAE encodes in fp32 where its config says force_upcast, as diffusers."""
        with self._vae_in_fp32(self.vae.config.force_upcast) as dtype:
            posterior = self.vae.encode(pixels.to(self.device, dtype))  # over (1, C, h, w)
            z = torch.cat([posterior.sample(g) for g in generators])
        return self.vae.config.scaling_factor * z.to(self.dtype)  # diffusers casts, then scales

    def _inpaint_latents(self, pixels: Tensor | None, given: Tensor | None, run: _Run, timesteps: Tensor,
                         full: bool, native: bool, add_noise: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """(starting latents, image latents, noise), drawn as diffusers' SDXL inpaint prepare_latents draws them."""
        B, C, f = run.batch, self.vae.config.latent_channels, self.vae_scale_factor
        image_latents = None
        if given is not None:
            image_latents = _tile(given.to(self.device, run.context.dtype), B)
        elif not native or not full:
            image_latents = self._encode_image_inpaint(pixels, run).repeat(B, 1, 1, 1)  # (B, C, h, w)
        shape = (B, C, *(image_latents.shape[-2:] if pixels is None else (pixels.shape[-2] // f,
                                                                          pixels.shape[-1] // f)))
        noise = randn(shape, run.generator, self.device, run.context.dtype)
        if not add_noise:  # denoising_start: the hand-off's latents as they are
            if image_latents is None:
                raise ValueError("denoising_start with strength=1.0 on an inpainting UNet has no image latents to "
                                 "start from (diffusers fails here too): use strength < 1")
            return image_latents, image_latents, noise
        if full:
            return noise * run.scheduler.init_noise_sigma, image_latents, noise
        return run.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(B)), image_latents, noise

    # ------------------------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in about [-1, 1], float32. The SDXL VAE overflows in fp16:
        with `force_upcast` (its config's flag) an fp16 pipeline decodes in fp32, as diffusers; otherwise the
        parent's decode (retry in fp32 on overflow)."""
        if self.vae.config.force_upcast and next(self.vae.parameters()).dtype == torch.float16:
            with self._vae_in_fp32(True):
                return super().decode(latents.float())
        return super().decode(latents)

    @contextlib.contextmanager
    def _vae_in_fp32(self, upcast: bool) -> Iterator[torch.dtype]:
        """Inside the block the VAE runs in fp32 when `upcast` (and is not already), then it is cast back; yields
        the dtype its inputs need."""
        dtype = next(self.vae.parameters()).dtype
        if not upcast or dtype == torch.float32:
            yield dtype
            return
        self.vae.float()
        try:
            yield torch.float32
        finally:
            self.vae.to(dtype)

    # ------------------------------------------------------------------------------------------------------------
    # Adapters

    def load_textual_inversion(self, path: Any, token: str | None = None) -> str:
        """Load an SDXL textual inversion file (`clip_l` (n, 768) and `clip_g` (n, 1280) vectors, A1111's and
        kohya's SDXL format) so that `token` (default: the file stem) in a prompt stands for its clip_l vectors in
        CLIP-L's input and its clip_g vectors in bigG's (the refiner: clip_g only). Both are checked before either
        is added. Returns the word."""
        from weights_convert.adapter_files import read_sdxl_embedding

        clip_l, clip_g = read_sdxl_embedding(path, token)
        self.textual_inversion_2.add(clip_g, self.text_encoder_2.config.hidden_size)
        if self.text_encoder is not None:
            try:
                self.textual_inversion.add(clip_l, self.text_encoder.config.hidden_size)
            except ValueError:
                self.textual_inversion_2.remove(clip_g.word)  # nothing half-loaded
                raise
        return clip_g.word

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Forget the named embedding words (None: all), from both encoders."""
        for word in [tokens] if isinstance(tokens, str) else (tokens or [None]):
            self.textual_inversion_2.remove(word)
            if self.text_encoder is not None:
                self.textual_inversion.remove(word)

    def load_lora_weights(self, path: Any, adapter_name: str | None = None, weight: float = 1.0) -> str:
        """Merge an SDXL LoRA file (kohya `lora_unet_` / `lora_te1_` / `lora_te2_`, or diffusers / PEFT `unet.` /
        `text_encoder.` / `text_encoder_2.`) into the UNet and both text encoders at `weight`, as the parent's
        (weights_convert/lora.py). Returns the adapter's name (default: the file stem)."""
        from pathlib import Path

        from weights_convert.lora import read_lora

        name = Path(path).stem if adapter_name is None else adapter_name
        adapter = read_lora(path, self.unet, self.text_encoder, self.text_encoder_2)
        self.lora.add(name, adapter, self._lora_modules(), weight)
        return name

    def _lora_modules(self) -> dict[str, nn.Module]:
        modules = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in modules.items() if module is not None}


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _encode_chunks(tokenizer: Any, encoder: nn.Module, texts: list[str], k: int, clip_skip: int | None,
                   weighting: bool) -> tuple[Tensor, Tensor | None]:
    """One encoder over k chunks per prompt: (hidden states (B, 77*k, D) with emphasis, pooled (B, P) of the first
    chunk or None for an encoder without a projection). clip_skip=n: hidden_states[-(n + 1)], no final norm."""
    laid_out = [chunk_tokens(*tokenize_weighted(tokenizer, t, weighting), tokenizer, k) for t in texts]
    B, S = len(texts), k * (CHUNK + 2)
    ids = torch.tensor([i for i, _ in laid_out], dtype=torch.long, device=next(encoder.parameters()).device)  # (B, S)
    weights = torch.tensor([w for _, w in laid_out], dtype=torch.float32).view(B * k, CHUNK + 2)
    ids = ids.view(B * k, CHUNK + 2)
    splice = getattr(tokenizer, "splice", None)  # textual inversion: loaded vectors as the encoder's inputs_embeds
    out = encoder(ids) if splice is None else encoder(**splice(encoder, ids))
    n = 1 if clip_skip is None else clip_skip
    if not 1 <= n < len(out.hidden_states):
        raise ValueError(f"clip_skip must be between 1 and {len(out.hidden_states) - 1} (the text encoder's layer "
                         f"count), got {clip_skip}")
    z = apply_emphasis(out.hidden_states[-(n + 1)], weights)  # (B*k, 77, D)
    pooled = getattr(out, "text_embeds", None)
    if pooled is not None and splice is not None and encoder.config.eos_token_id == 2 \
            and bool((ids >= PLACEHOLDER).any()):
        pooled = _pooled_as_diffusers(encoder, out.last_hidden_state, ids)
    pooled = None if pooled is None else pooled.view(B, k, -1)[:, 0]  # (B, P): the first chunk's
    return z.reshape(B, S, z.shape[-1]), pooled


def _pooled_as_diffusers(encoder: nn.Module, last: Tensor, ids: Tensor) -> Tensor:
    """The pooled output (N, P) of ids holding textual inversion placeholders, where diffusers reads it: diffusers
    gives the loaded vectors new token ids above the vocabulary (in loading order, as our placeholder rows), and
    transformers' legacy EOS search of the official configs (eos_token_id 2: the position of the highest id) then
    lands on the last such token, not on the end-of-text token (A1111 reads the latter)."""
    vocab = encoder.config.vocab_size
    effective = torch.where(ids >= PLACEHOLDER, vocab + (ids - PLACEHOLDER), ids)  # diffusers' ids
    return encoder.text_projection(last[torch.arange(len(ids)), effective.argmax(dim=-1)])  # (N, P)


def _until(scheduler: Any, timesteps: Tensor, denoising_end: float | None) -> Tensor:
    """The timesteps before `denoising_end` of the schedule: those >= round(T - denoising_end * T), as diffusers."""
    if denoising_end is None or denoising_end == 1:
        return timesteps
    T = scheduler.config["num_train_timesteps"]
    cutoff = int(round(T - denoising_end * T))
    return timesteps[:int((timesteps >= cutoff).sum())]


def _walk(scheduler: Any, steps: int, strength: float, denoising_start: float | None,
          denoising_end: float | None) -> Tensor:
    """img2img's timesteps: the tail `strength` picks, or those after `denoising_start` (diffusers' get_timesteps:
    t < round(T - denoising_start * T), the scheduler's begin index set), then cut at `denoising_end`."""
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start {denoising_start} must be smaller than denoising_end {denoising_end}")
    if denoising_start is None:
        timesteps = scheduler.timesteps_for_strength(steps, strength)
    else:
        scheduler.set_timesteps(steps)
        T = scheduler.config["num_train_timesteps"]
        n = int((scheduler.timesteps < int(round(T - denoising_start * T))).sum())
        if n == 0:
            raise ValueError(f"denoising_start {denoising_start} with {steps} steps leaves no step to run")
        start = len(scheduler.timesteps) - n
        timesteps = scheduler.timesteps[start:]
        scheduler.set_begin_index(start)
    return _until(scheduler, timesteps, denoising_end)


def _tile(latents: Tensor, batch: int) -> Tensor:
    """Given latents (N, C, h, w) for a batch of B: as they are (N == B) or tiled (B a multiple of N), as diffusers."""
    if batch % latents.shape[0]:
        raise ValueError(f"image: {latents.shape[0]} latents cannot be spread over {batch} images")
    return torch.cat([latents] * (batch // latents.shape[0]))


def _second(prompt: str | list[str], n: int, name: str) -> list[str]:
    """A second prompt list (prompt_2, negative_prompt_2) for n prompts: a str for all, or one per prompt."""
    texts = _prompts(prompt, name)
    if len(texts) == 1 and n > 1:
        texts = texts * n
    if len(texts) != n:
        raise ValueError(f"{name} has {len(texts)} entries but prompt has {n}")
    return texts


def _negative_sizes(original: Size | None, crops: Size | None, target: Size | None) -> tuple[float, ...] | None:
    """txt2img's negative time ids: used when both sizes are given (crops default (0, 0)), as diffusers; one size
    alone would be ignored there, so it is an error here."""
    if original is None and target is None:
        if crops is not None:
            raise ValueError("negative_crops_coords_top_left needs negative_original_size and negative_target_size "
                             "(diffusers ignores it alone)")
        return None
    if original is None or target is None:
        raise ValueError("give both negative_original_size and negative_target_size (diffusers ignores one alone)")
    return (_pair(original, "negative_original_size") + _pair((0, 0) if crops is None else crops,
                                                              "negative_crops_coords_top_left")
            + _pair(target, "negative_target_size"))


def _pair(value: Any, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers (height, width) or (top, left), got {value!r}")
    return (_number(value[0], name), _number(value[1], name))


def _number(value: Any, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not abs(value) < float("inf"):
        raise ValueError(f"{name} must hold finite numbers, got {value!r}")
    return value


def _check_fraction(value: float | None, name: str) -> None:
    if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1] (a fraction of the schedule) or None, got {value!r}")


def _fingerprint(module: nn.Module | None) -> tuple | None:
    """Changes when the module's weights do (ldm.optimize.PromptCache's rule), for the prompt cache's key."""
    if module is None:
        return None
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters())
