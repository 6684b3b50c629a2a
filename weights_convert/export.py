"""Our loaded models back to the diffusers folder layout, which diffusers and ldm both load (the round trip).

    export_diffusers(parts, out_dir, dtype=None, variant=None)

Writes `model_index.json`, `unet/`, `vae/`, `text_encoder/` (config.json + safetensors weights, the `variant`
file name when given, e.g. `model.fp16.safetensors`), `scheduler/scheduler_config.json` and `tokenizer/`. Our
state-dict keys are diffusers' (UNet, VAE) and the official text_encoder/model.safetensors layout (`text_model.`),
so the weights need no mapping; the configs are written from our frozen config dataclasses. Each file is streamed
one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig

from weights_convert.load import Components
from weights_convert.safetensors_file import write_streaming

DIFFUSERS_VERSION = "0.42.1"  # the layout written; the reference these configs are read back by


def unet_config(cfg: UNetConfig) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config.json for `cfg` (heads go to the misnamed `attention_head_dim`)."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attention_levels)]
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": down, "up_block_types": up,
            "layers_per_block": cfg.layers_per_block, "attention_head_dim": list(cfg.num_heads),
            "cross_attention_dim": cfg.cross_attention_dim, "use_linear_projection": cfg.use_linear_projection,
            "upcast_attention": cfg.upcast_attention, "flip_sin_to_cos": cfg.flip_sin_to_cos,
            "freq_shift": cfg.freq_shift, "norm_num_groups": cfg.norm_num_groups, "norm_eps": cfg.norm_eps,
            "dropout": cfg.dropout, "sample_size": cfg.sample_size, "act_fn": "silu", "center_input_sample": False,
            "downsample_padding": 1, "mid_block_scale_factor": 1}


def vae_config(cfg: VAEConfig) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    d = dataclasses.asdict(cfg)
    d["block_out_channels"] = list(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **d, "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


def text_config(cfg: CLIPTextConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(cfg),
            "attention_dropout": 0.0, "dropout": 0.0, "torch_dtype": str(dtype).removeprefix("torch.")}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(model: nn.Module, path: Path, dtype: torch.dtype | None) -> None:
    state = model.state_dict()
    names = sorted(state)
    out_dtype = {k: (dtype if dtype is not None and state[k].is_floating_point() else state[k].dtype) for k in names}
    entries = [(k, out_dtype[k], tuple(state[k].shape)) for k in names]
    write_streaming(path, entries, (state[k].to(out_dtype[k]) for k in names), metadata={"format": "pt"})


def _tokenizer(tokenizer: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = resources.files("ldm") / "data" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt"):  # the CLIP BPE files: the same for SD 1 and SD 2
        shutil.copyfile(str(data / name), folder / name)
    special = dict(tokenizer.special_tokens)
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length":
                                                   tokenizer.model_max_length, "do_lower_case": True, **special})


def export_diffusers(parts: Components, out_dir: str | Path, dtype: torch.dtype | None = None,
                     variant: str | None = None) -> Path:
    """Write `parts` as a diffusers Stable Diffusion folder; dtype casts the weights (None: as loaded)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; export writes a fresh folder")
    mid = f".{variant}" if variant else ""
    weights_dtype = dtype or next(parts.unet.parameters()).dtype
    _write_json(out / "unet" / "config.json", unet_config(parts.family.unet))
    _write_weights(parts.unet, out / "unet" / f"diffusion_pytorch_model{mid}.safetensors", dtype)
    _write_json(out / "vae" / "config.json", vae_config(parts.family.vae))
    _write_weights(parts.vae, out / "vae" / f"diffusion_pytorch_model{mid}.safetensors", dtype)
    _write_json(out / "text_encoder" / "config.json", text_config(parts.family.text, weights_dtype))
    _write_weights(parts.text_encoder, out / "text_encoder" / f"model{mid}.safetensors", dtype)
    scheduler = {k: v for k, v in dict(parts.scheduler.config).items()}
    scheduler.setdefault("_class_name", type(parts.scheduler).__name__)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    _tokenizer(parts.tokenizer, out / "tokenizer")
    _write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False})
    return out
