"""Train a small latent diffusion model from scratch on captioned shapes (docs/training.md).

    from ldm.train import TrainConfig, Trainer, train, ShapesDataset, classify
    train(TrainConfig(out_dir="runs/shapes"))            # VAE, then UNet + CLIP; writes runs/shapes/model/
    train(resume="runs/shapes/checkpoint.safetensors")   # continue a stopped run

The model the project ships (`ldm generate` without --model) is trained by scripts/train_default.py.
"""

from __future__ import annotations

from pathlib import Path

from ldm.train.checkpoint import CheckpointFormatError, load_state, save_state
from ldm.train.export import export_model
from ldm.train.shapes import COLOURS, HELD_OUT, SHAPES, Prediction, ShapesDataset, classify
from ldm.train.trainer import (DEFAULT_TEXT, DEFAULT_UNET, DEFAULT_VAE, EMA, History, TrainConfig, Trainer,
                               lr_at, train)

# The embedded default model (written by scripts/train_default.py): a diffusers-layout folder in the package, what
# `ldm generate` uses without --model once it exists.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "shapes-model"

__all__ = ["DEFAULT_MODEL_DIR", "COLOURS", "DEFAULT_TEXT", "DEFAULT_UNET", "DEFAULT_VAE", "EMA", "HELD_OUT", "SHAPES",
           "CheckpointFormatError", "History", "Prediction", "ShapesDataset", "TrainConfig", "Trainer", "classify",
           "export_model", "load_state", "lr_at", "save_state", "train"]
