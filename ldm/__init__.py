"""ldm: Stable Diffusion (latent diffusion) written from scratch in PyTorch.

The names below are imported on first use, so `import ldm` stays cheap (the CLI starts fast) and each component
file can be read on its own. See README.md for the tour and docs/ for every part.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # configs and presets
    "UNetConfig": "ldm.config", "VAEConfig": "ldm.config", "CLIPTextConfig": "ldm.config",
    "FamilyPreset": "ldm.config", "SD15": "ldm.config", "SD21_BASE": "ldm.config", "SD21_V": "ldm.config",
    "SD15_INPAINT": "ldm.config", "SD2_INPAINT": "ldm.config", "X4_UPSCALER": "ldm.config",
    "SDXL_BASE": "ldm.config", "SDXL_REFINER": "ldm.config",
    "FAMILIES": "ldm.config",
    # models
    "UNet2DConditionModel": "ldm.unet", "AutoencoderKL": "ldm.vae", "CLIPTextModel": "ldm.clip",
    "CLIPTextModelWithProjection": "ldm.clip",
    "CLIPTokenizer": "ldm.tokenizer", "ControlNetModel": "ldm.controlnet", "ControlNetConfig": "ldm.controlnet",
    # generating
    "StableDiffusionPipeline": "ldm.pipeline", "StableDiffusionUpscalePipeline": "ldm.upscale",
    "StableDiffusionControlNetPipeline": "ldm.pipeline_controlnet",
    "StableDiffusionXLPipeline": "ldm.pipeline_xl",
    # Loading is the converter's job (weights_convert/), re-exported here because `ldm.load_pipeline` is the
    # documented entry point. Model files never import weights_convert; this lazy seam is the one exception.
    "load_pipeline": "weights_convert.load",
}
_SUBMODULES = {"attention", "config", "schedulers", "research", "pipeline", "unet", "vae", "clip", "tokenizer",
               "optimize", "upscale",
               "adapters", "embeddings", "lora", "controlnet",
               "pipeline_xl"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"ldm.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
