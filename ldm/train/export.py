"""Write a trained pipeline as a diffusers-layout folder that `ldm.load_pipeline(folder)` (and diffusers) load.

    export_model(pipe, folder, dtype=torch.float16) -> folder
      model_index.json, unet/, vae/, text_encoder/ (config.json + safetensors), scheduler/, tokenizer/

Our state-dict keys are diffusers' (UNet, VAE) and transformers' (`text_model.` prefix), so the weights go out as
they are: this is our safetensors layout. The folder is written next to its destination and renamed into place,
so a stopped export never leaves a half-written model where a loader would find it. (weights_convert/export.py
writes the same layout from loaded checkpoints; ldm/ does not import weights_convert, hence this small writer.)
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.config import DIFFUSERS_VERSION


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def _tokenizer(tokenizer: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = resources.files("ldm") / "data" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(str(data / name), folder / name)
    special = dict(tokenizer.special_tokens)
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
                                                   "model_max_length": tokenizer.model_max_length, **special})


def export_model(pipe: Any, folder: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write `pipe`'s parts as a diffusers folder at `folder` (replacing an earlier export there)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    out = Path(folder)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        family = pipe.family
        _write_json(tmp / "unet" / "config.json", family.unet.to_diffusers())
        _write_weights(pipe.unet, tmp / "unet" / "diffusion_pytorch_model.safetensors", dtype)
        _write_json(tmp / "vae" / "config.json", family.vae.to_diffusers())
        _write_weights(pipe.vae, tmp / "vae" / "diffusion_pytorch_model.safetensors", dtype)
        _write_json(tmp / "text_encoder" / "config.json", family.text.to_transformers(
            str(dtype).removeprefix("torch.")))
        _write_weights(pipe.text_encoder, tmp / "text_encoder" / "model.safetensors", dtype)
        scheduler = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        _tokenizer(pipe.tokenizer, tmp / "tokenizer")
        _write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler["_class_name"]], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
