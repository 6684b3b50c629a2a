"""Our loaded models back to the diffusers folder layout, which diffusers and ldm both load (the round trip).

    export_diffusers(parts, out_dir, dtype=None, variant=None)

Writes `model_index.json`, `unet/`, `vae/`, `text_encoder/` (config.json + safetensors weights, the `variant`
file name when given, e.g. `model.fp16.safetensors`), `scheduler/scheduler_config.json` and `tokenizer/`; for SDXL
also `text_encoder_2/` and `tokenizer_2/` (the refiner: those without `text_encoder/` and `tokenizer/`). Our
state-dict keys are diffusers' (UNet, VAE) and the official text_encoder/model.safetensors layout (`text_model.`),
so the weights need no mapping; the configs are written from our frozen config dataclasses. Each file is streamed
one tensor at a time, into a folder renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.config import DIFFUSERS_VERSION
from ldm.hub import WEIGHT_FILES

CLIP_VOCAB_SIZE = 49_408  # the packaged vocab.json, the same for SD 1 and SD 2

from weights_convert.load import Components
from weights_convert.safetensors_file import write_streaming



def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(model: nn.Module, path: Path, dtype: torch.dtype | None) -> None:
    state = model.state_dict()
    names = sorted(state)
    out_dtype = {k: (dtype if dtype is not None and state[k].is_floating_point() else state[k].dtype) for k in names}
    entries = [(k, out_dtype[k], tuple(state[k].shape)) for k in names]
    write_streaming(path, entries, (state[k].to(out_dtype[k]) for k in names), metadata={"format": "pt"})


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer.vocab_size != CLIP_VOCAB_SIZE:  # e.g. a textual-inversion word loaded from a tokenizer.json
        raise ValueError(f"export: the tokenizer has {tokenizer.vocab_size} tokens, CLIP's vocabulary "
                         f"{CLIP_VOCAB_SIZE}; the export writes CLIP's vocab.json + merges.txt, which would drop the "
                         f"added tokens")


def _tokenizer(tokenizer: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = resources.files("ldm") / "data" / "clip_tokenizer"
    for name in ("vocab.json", "merges.txt"):  # the CLIP BPE files: the same for SD 1 and SD 2
        shutil.copyfile(str(data / name), folder / name)
    special = dict(tokenizer.special_tokens)
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length":
                                                   tokenizer.model_max_length, "do_lower_case": True, **special})


def export_diffusers(parts: Components | Any, out_dir: str | Path, dtype: torch.dtype | None = None,
                     variant: str | None = None, replace: bool = False) -> Path:
    """Write `parts` as a diffusers Stable Diffusion folder; dtype casts the weights (None: as loaded).

    `parts`: loaded Components, or anything with the same unet / vae / text_encoder / tokenizer / scheduler /
    family attributes (a StableDiffusionPipeline: ldm.train exports its trained pipelines through here). The folder
    is written next to `out_dir` and renamed into place, so a stopped export never leaves a half-written model where
    a loader would find it. An existing non-empty `out_dir` is an error unless `replace=True`.
    """
    out = Path(out_dir)
    for tokenizer in (parts.tokenizer, getattr(parts, "tokenizer_2", None)):
        if tokenizer is not None:
            _check_tokenizer(tokenizer)
    if out.exists() and any(out.iterdir()) and not replace:
        raise FileExistsError(f"{out}: exists and is not empty; export writes a fresh folder")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(parts, tmp, dtype, variant)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_folder(parts: Any, out: Path, dtype: torch.dtype | None, variant: str | None) -> None:
    mid = f".{variant}" if variant else ""
    weights_dtype = dtype or next(parts.unet.parameters()).dtype
    _write_json(out / "unet" / "config.json", parts.family.unet.to_diffusers())
    _write_weights(parts.unet, out / "unet" / f"{WEIGHT_FILES['unet']}{mid}.safetensors", dtype)
    _write_json(out / "vae" / "config.json", parts.family.vae.to_diffusers())
    _write_weights(parts.vae, out / "vae" / f"{WEIGHT_FILES['vae']}{mid}.safetensors", dtype)
    torch_dtype = str(weights_dtype).removeprefix("torch.")
    encoders = [("text_encoder", parts.text_encoder, parts.family.text, "CLIPTextModel", parts.tokenizer, "tokenizer"),
                ("text_encoder_2", getattr(parts, "text_encoder_2", None), parts.family.text_encoder_2,
                 "CLIPTextModelWithProjection", getattr(parts, "tokenizer_2", None), "tokenizer_2")]
    for sub, model, config, architecture, tokenizer, tokenizer_sub in encoders:
        if model is None:  # the SDXL refiner has no first encoder; SD 1.x / 2.x no second
            continue
        _write_json(out / sub / "config.json", config.to_transformers(torch_dtype, architecture))
        _write_weights(model, out / sub / f"{WEIGHT_FILES[sub]}{mid}.safetensors", dtype)
        _tokenizer(tokenizer, out / tokenizer_sub)
    scheduler = {k: v for k, v in dict(parts.scheduler.config).items() if k != "_use_default_values"}
    scheduler.setdefault("_class_name", type(parts.scheduler).__name__)
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}
    if parts.family.name == "x4-upscaler":
        del index["requires_safety_checker"]  # not an argument of diffusers' StableDiffusionUpscalePipeline
        index.update(_upscaler_folder(parts, out))
    if getattr(parts, "text_encoder_2", None) is not None:
        index = _xl_index(parts, scheduler["_class_name"])
    _write_json(out / "model_index.json", index)


def _xl_index(parts: Any, scheduler_class: str) -> dict[str, Any]:
    """SDXL's model_index.json, as the official base and refiner repos write it."""
    base = parts.text_encoder is not None
    zeros = getattr(parts, "force_zeros_for_empty_prompt", None)
    index = {"_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
             "_diffusers_version": DIFFUSERS_VERSION, "force_zeros_for_empty_prompt": base if zeros is None else zeros,
             "scheduler": ["diffusers", scheduler_class], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"] if base else [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"] if base else [None, None],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    if not base:
        index["requires_aesthetics_score"] = True
    return index


def _upscaler_folder(parts: Any, out: Path) -> dict[str, Any]:
    """The x4 upscaler's extras: `low_res_scheduler/` and the model_index.json entries diffusers' class expects."""
    from ldm.upscale import LOW_RES_SCHEDULER, MAX_NOISE_LEVEL

    low_res = getattr(parts, "low_res_scheduler", None) or LOW_RES_SCHEDULER
    level = getattr(parts, "max_noise_level", None)
    _write_json(out / "low_res_scheduler" / "scheduler_config.json",
                {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **dict(low_res)})
    return {"_class_name": "StableDiffusionUpscalePipeline", "low_res_scheduler": ["diffusers", "DDPMScheduler"],
            "max_noise_level": MAX_NOISE_LEVEL if level is None else level, "safety_checker": [None, None],
            "watermarker": [None, None]}
