"""Write a trained pipeline as a diffusers-layout folder that `ldm.load_pipeline(folder)` (and diffusers) load.

    export_model(pipe, folder, dtype=torch.float16) -> folder
      model_index.json, unet/, vae/, text_encoder/ (config.json + safetensors), scheduler/, tokenizer/

Our state-dict keys are diffusers' (UNet, VAE) and transformers' (`text_model.` prefix), so the weights go out as
they are. The writer is the converter's `weights_convert.export.export_diffusers` (one writer of the layout; like
`ldm.load_pipeline`, imported lazily): it writes next to the destination and renames into place, so a stopped
export never leaves a half-written model where a loader would find it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def export_model(pipe: Any, folder: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write `pipe`'s parts as a diffusers folder at `folder` (replacing an earlier export there)."""
    from weights_convert.export import export_diffusers

    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    return export_diffusers(pipe, folder, dtype=dtype, replace=True)
