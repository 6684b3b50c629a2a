"""Train a small latent diffusion model from scratch on captioned shapes (docs/training.md).

    from ldm.train import TrainConfig, Trainer, train, ShapesDataset, classify
    train(TrainConfig(out_dir="runs/shapes"))            # VAE, then UNet + CLIP; writes runs/shapes/model/
    train(resume="runs/shapes/checkpoint.safetensors")   # continue a stopped run

The model the project ships (`ldm generate` without --model) is trained by scripts/train_default.py.
"""

from __future__ import annotations

from pathlib import Path

import importlib
from typing import Any

# Imported on first use, so `ldm train --help` and `ldm generate` (whose parser registers `ldm train`) start fast.
_EXPORTS = {
    "CheckpointFormatError": "checkpoint", "load_state": "checkpoint", "save_state": "checkpoint",
    "export_model": "export",
    "COLOURS": "shapes", "HELD_OUT": "shapes", "SHAPES": "shapes", "Prediction": "shapes",
    "ShapesDataset": "shapes", "classify": "shapes",
    "DEFAULT_TEXT": "config", "DEFAULT_UNET": "config", "DEFAULT_VAE": "config", "TrainConfig": "config",
    "EMA": "trainer", "History": "trainer", "Trainer": "trainer", "lr_at": "trainer", "train": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldm.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ldm.train' has no attribute {name!r}")


# The embedded default model (written by scripts/train_default.py): a diffusers-layout folder in the package, what
# `ldm generate` uses without --model once it exists.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "shapes-model"

__all__ = ["DEFAULT_MODEL_DIR", "COLOURS", "DEFAULT_TEXT", "DEFAULT_UNET", "DEFAULT_VAE", "EMA", "HELD_OUT", "SHAPES",
           "CheckpointFormatError", "History", "Prediction", "ShapesDataset", "TrainConfig", "Trainer", "classify",
           "export_model", "load_state", "lr_at", "save_state", "train"]
