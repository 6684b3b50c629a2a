"""The original single-file checkpoint: what it holds, which family it is, and its complete mapping table.

Reference: CompVis / Stability `LatentDiffusion` state dicts (`model.diffusion_model.*` UNet, `first_stage_model.*`
VAE, `cond_stage_model.*` text encoder, the noise-schedule buffers, `model_ema.*`), and diffusers
`loaders/single_file_utils.py` (`infer_diffusers_model_type`, the convert_ldm_* functions) for the behaviour we
match: SD 2.x files are read as 768 v-prediction unless told otherwise, OpenCLIP's last layer is dropped.

Detection uses keys and shapes only:
- SD 1.x: a CLIP text model under `cond_stage_model.transformer.`; SD 2.x: OpenCLIP under `cond_stage_model.model.`
  (and a 1024-wide cross-attention in the UNet).
- inpainting: the UNet's first convolution takes 9 channels (4 latents + mask + 4 masked-image latents), not 4.
- the x4 upscaler: 7 channels (4 latents + the 3-channel low-resolution image) and a class embedding
  (`label_emb.weight`, the noise level); its `low_scale_model.*` buffers (the low-resolution image's noise schedule,
  which the pipeline recomputes) are dropped on purpose.
- SD 2.x 512 epsilon vs 768 v-prediction: identical keys and shapes, so it needs `family=`, a sidecar config
  (`<file>.yaml`, the original inference config with `parameterization: "v"` for v-prediction), or the default
  "sd21-v" with a warning (as diffusers assumes).
- SDXL (Stability `generative-models` DiffusionEngine): text encoders under `conditioner.embedders.*`. The base
  holds CLIP ViT-L at `conditioner.embedders.0.transformer.text_model.` and OpenCLIP bigG at
  `conditioner.embedders.1.model.`; the refiner only bigG, at `conditioner.embedders.0.model.` (diffusers calls
  them `xl_base` and `xl_refiner`). No noise-schedule buffers; some files carry the denoiser's `denoiser.sigmas`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from ldm.config import FAMILIES, FamilyPreset
from ldm.config import family as preset_named

from weights_convert.clip_rules import (SD1_LEGACY_PREFIX, SD1_PREFIX, SD2_PREFIX, XL_BIGG_PREFIX, XL_CLIP_PREFIX,
                                        XL_REFINER_BIGG_PREFIX, clip_rules, openclip_rules)
from weights_convert.rules import Rule, drop
from weights_convert.safetensors_file import CheckpointError
from weights_convert.unet_rules import PREFIX as UNET_PREFIX
from weights_convert.unet_rules import unet_rules
from weights_convert.vae_rules import vae_rules

# The DDPM noise schedule, stored as buffers by LatentDiffusion (`register_schedule`); the scheduler recomputes it.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# The x4 upscaler's `low_scale_model` (ImageConcatWithNoiseAugmentation) registers the same schedule again.
LOW_SCALE_BUFFERS = tuple(f"low_scale_model.{name}" for name in SCHEDULE_BUFFERS[:8])
EMA_PREFIX = "model_ema."
FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
CLASS_EMBEDDING = UNET_PREFIX + "label_emb.weight"
XL_EMBEDDERS = "conditioner.embedders."


def ema_key(unet_key: str) -> str:
    """LitEma's name for a UNet weight: the path below `model.` with its dots removed.

    `model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`.
    """
    return EMA_PREFIX + unet_key.removeprefix("model.").replace(".", "")


@dataclass(frozen=True)
class Layout:
    """What a single file holds, read from its keys and shapes."""

    generation: int  # 1 (CLIP ViT-L text encoder), 2 (OpenCLIP ViT-H) or 3 (SDXL: CLIP ViT-L and/or OpenCLIP bigG)
    inpainting: bool
    clip_prefix: str  # where the (first) text encoder's keys live; "" for the SDXL refiner, which has none
    has_ema: bool  # a full (non-pruned) file: `model_ema.*` copies of the UNet next to the regular weights
    upscaler: bool = False  # the SD x4 upscaler: 7 input channels and a class (noise level) embedding
    clip2_prefix: str = ""  # SDXL: where OpenCLIP bigG's keys (text_encoder_2) live

    @property
    def candidates(self) -> tuple[str, ...]:
        """The family names these keys are consistent with."""
        if self.upscaler:
            return ("x4-upscaler",)
        if self.generation == 3:
            return ("sdxl-base",) if self.clip_prefix else ("sdxl-refiner",)
        if self.generation == 1:
            return ("sd15-inpaint",) if self.inpainting else ("sd15",)
        return ("sd2-inpaint",) if self.inpainting else ("sd21-v", "sd21-base")


def official_layout(preset: FamilyPreset) -> Layout:
    """The layout of a family's official single file (pruned: no EMA copies)."""
    if preset.text_encoder_2 is not None:  # SDXL: the base's two encoders, or the refiner's bigG alone
        base = preset.text is not None
        return Layout(3, False, XL_CLIP_PREFIX if base else "", False,
                      clip2_prefix=XL_BIGG_PREFIX if base else XL_REFINER_BIGG_PREFIX)
    gen = 2 if preset.text.hidden_act == "gelu" else 1
    return Layout(gen, preset.unet.in_channels == 9, SD2_PREFIX if gen == 2 else SD1_PREFIX, False,
                  preset.unet.num_class_embeds is not None)  # the x4 upscaler: its low_scale_model buffers too


def _detect_xl(keys: set[str], shape_of: dict[str, tuple[int, ...]], path: Path | str) -> Layout:
    """SDXL base (CLIP-L + bigG) or refiner (bigG alone), from where its text encoders' keys live."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(XL_CLIP_PREFIX) and has(XL_BIGG_PREFIX):
        clip_prefix, clip2_prefix = XL_CLIP_PREFIX, XL_BIGG_PREFIX
    elif has(XL_REFINER_BIGG_PREFIX) and not has(XL_EMBEDDERS + "1."):
        clip_prefix, clip2_prefix = "", XL_REFINER_BIGG_PREFIX
    else:
        found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith(XL_EMBEDDERS)})
        raise CheckpointError(f"{path}: an SDXL-style checkpoint ({XL_EMBEDDERS!r} keys), but no text encoder under "
                              f"{XL_CLIP_PREFIX!r} and {XL_BIGG_PREFIX!r} (SDXL base) or under "
                              f"{XL_REFINER_BIGG_PREFIX!r} alone (SDXL refiner); found {', '.join(found)}")
    channels = shape_of[FIRST_CONV][1] if len(shape_of[FIRST_CONV]) == 4 else None
    if channels != 4:
        raise CheckpointError(f"{path}: {FIRST_CONV!r} has shape {list(shape_of[FIRST_CONV])}; the SDXL base and "
                              f"refiner UNets take 4 channels (SDXL inpainting is not supported)")
    return Layout(3, False, clip_prefix, ema_key(FIRST_CONV) in keys, clip2_prefix=clip2_prefix)


def detect_layout(keys: set[str], shape_of: dict[str, tuple[int, ...]], path: Path | str) -> Layout:
    """Tell SD 1.x from SD 2.x from SDXL and plain from inpainting; raise CheckpointError for anything else."""
    if FIRST_CONV not in keys:
        sample = ", ".join(sorted(keys)[:3])
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x single-file checkpoint, nor SDXL (no "
                              f"{FIRST_CONV!r}; first keys: {sample})")
    if any(k.startswith(XL_EMBEDDERS) for k in keys):
        return _detect_xl(keys, shape_of, path)
    if any(k.startswith(SD2_PREFIX) for k in keys):
        generation, clip_prefix = 2, SD2_PREFIX
    elif any(k.startswith(SD1_PREFIX) for k in keys):
        generation, clip_prefix = 1, SD1_PREFIX
    elif any(k.startswith(SD1_LEGACY_PREFIX) for k in keys):
        generation, clip_prefix = 1, SD1_LEGACY_PREFIX
    else:
        raise CheckpointError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint: no text encoder under "
                              f"{SD1_PREFIX!r} (SD 1.x) or {SD2_PREFIX!r} (SD 2.x)")
    channels = shape_of[FIRST_CONV][1] if len(shape_of[FIRST_CONV]) == 4 else None
    if channels not in (4, 7, 9):
        raise CheckpointError(f"{path}: {FIRST_CONV!r} has shape {list(shape_of[FIRST_CONV])}; Stable Diffusion "
                              f"1.x/2.x UNets take 4 channels (9 for inpainting, 7 for the x4 upscaler)")
    upscaler = channels == 7
    if upscaler and (generation != 2 or CLASS_EMBEDDING not in keys):
        raise CheckpointError(f"{path}: a 7-channel UNet, as the SD x4 upscaler's, but without its OpenCLIP text "
                              f"encoder ({SD2_PREFIX!r}) and noise-level embedding ({CLASS_EMBEDDING!r})")
    has_ema = ema_key(FIRST_CONV) in keys
    return Layout(generation, channels == 9, clip_prefix, has_ema, upscaler)


def _sidecar_family(path: Path, layout: Layout) -> str | None:
    """The family named by an original inference config next to the file (`<stem>.yaml`), if there is one."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file() or layout.generation != 2 or layout.inpainting or layout.upscaler:
        return None
    text = sidecar.read_text(errors="replace")
    match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, flags=re.MULTILINE)
    parameterization = match.group(1) if match else "eps"  # LatentDiffusion's default
    if parameterization not in ("v", "eps"):
        raise CheckpointError(f"{sidecar}: parameterization {parameterization!r} is not supported ('eps' or 'v')")
    return "sd21-v" if parameterization == "v" else "sd21-base"


def resolve_family(layout: Layout, family: str | FamilyPreset | None, path: Path) -> FamilyPreset:
    """The family preset for a file: the explicit argument, a sidecar config, or the default with a warning."""
    if isinstance(family, FamilyPreset):
        preset = family
    elif family is not None:
        preset = preset_named(family)
    else:
        name = _sidecar_family(path, layout)
        if name is None:
            name = layout.candidates[0]
            if len(layout.candidates) > 1:
                warnings.warn(f"{path}: an SD 2.x checkpoint; its keys cannot tell 512 epsilon from 768 "
                              f"v-prediction, loading it as {name!r} (as diffusers does). Pass family='sd21-base' "
                              f"(or a sidecar {path.with_suffix('.yaml').name}) for the 512 base model.",
                              stacklevel=3)
        preset = FAMILIES[name]
    if preset.name not in layout.candidates:
        raise CheckpointError(f"{path}: this checkpoint is {' or '.join(layout.candidates)} (from its keys and "
                              f"shapes), not the requested family {preset.name!r}")
    return preset


def checkpoint_rules(preset: FamilyPreset, layout: Layout, ema: bool = False) -> list[Rule]:
    """The complete table for one single file: every key it may hold, mapped or dropped on purpose."""
    if ema and not layout.has_ema:
        raise CheckpointError("ema=True, but the file carries no EMA weights (no 'model_ema.*' copies of the UNet)")
    unet = unet_rules(preset.unet)
    rules: list[Rule] = []
    if ema:  # the EMA copy feeds the UNet; the regular weights are dropped
        rules += [replace(r, source=ema_key(r.source)) for r in unet]
        rules += [drop(r.source, "regular UNet weight; ema=True loads the EMA copy") for r in unet]
    else:
        rules += unet
        if layout.has_ema:
            rules += [drop(ema_key(r.source), "EMA copy of a UNet weight; loaded with ema=True") for r in unet]
    rules += vae_rules(preset.vae)
    if layout.generation == 3:  # SDXL: CLIP-L (the base only) and bigG with its projection head
        if layout.clip_prefix:
            rules += clip_rules(preset.text, layout.clip_prefix)
        rules += openclip_rules(preset.text_encoder_2, layout.clip2_prefix, "text_encoder_2", projection=True)
        rules.append(drop("denoiser.sigmas", "the sgm denoiser's sigma table; the scheduler recomputes it",
                          optional=True))
    elif layout.generation == 1:
        rules += clip_rules(preset.text, layout.clip_prefix)
    else:
        rules += openclip_rules(preset.text, layout.clip_prefix)
    rules += [drop(name, "noise-schedule buffer; the scheduler recomputes it", optional=True)
              for name in SCHEDULE_BUFFERS]
    if layout.upscaler:
        rules += [drop(name, "the low-resolution image's noise schedule; the upscale pipeline recomputes it",
                       optional=True) for name in LOW_SCALE_BUFFERS]
    rules.append(drop("lvlb_weights", "training loss weights", optional=True))
    rules.append(drop("model_ema.decay", "EMA bookkeeping", optional=True))
    rules.append(drop("model_ema.num_updates", "EMA bookkeeping", optional=True))
    return rules
