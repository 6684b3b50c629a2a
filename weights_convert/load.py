"""Loading: a single file, a diffusers folder or a hub id -> our models, through the tables, cheaply and strictly.

    load_components(path_or_id, ...) -> Components(unet, vae, text_encoder, tokenizer, scheduler, family,
                                                   text_encoder_2, tokenizer_2)   (the last two: SDXL only)
    load_pipeline(path_or_id, ...)   -> ldm.StableDiffusionPipeline of those parts (the x4 upscaler's and SDXL's
                                        pipeline classes for those models, as diffusers picks them)

The cheap path: the file is memory-mapped and verified from its header (keys, shapes) before any data is read;
each model is built with its parameters on the meta device (no memory, no random init), then filled with
`load_state_dict(strict=True, assign=True)`, taking the mapped tensors themselves when the file's dtype is the
requested one (no copy at all) or their cast copies otherwise (the file's pages are released after each cast).
Peak memory stays near one copy of the weights. Any fault raises before a model is returned: nothing half-loaded
ever reaches the caller.

Pickle checkpoints (.ckpt, .pt, .bin) can run code when unpickled: refused unless `allow_pickle=True`, and even
then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.config import FAMILIES, CLIPTextConfig, FamilyPreset, UNetConfig, VAEConfig
from ldm.config import family as preset_named
from ldm.hub import PICKLE_SUFFIXES, WEIGHT_FILES

from weights_convert.checkpoint import checkpoint_rules, detect_layout, resolve_family
from weights_convert.configs import check_counts, read_config, read_json
from weights_convert.convert import MAX_LISTED, DictSource, Source, tensors, verify
from weights_convert.rules import Rule, drop
from weights_convert.safetensors_file import CheckpointError, SafetensorsFile
from weights_convert.vae_rules import PREFIX as VAE_PREFIX
from weights_convert.vae_rules import vae_rules

COMPONENTS = ("unet", "vae", "text_encoder")
XL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # SDXL's parts (the refiner lacks text_encoder)


def model_components(preset: FamilyPreset) -> tuple[str, ...]:
    """The model components a family has: unet, vae, and its text encoders (SDXL base: two; the refiner: only the
    second)."""
    return tuple(c for c in XL_COMPONENTS if (c != "text_encoder" or preset.text is not None)
                 and (c != "text_encoder_2" or preset.text_encoder_2 is not None))


@dataclass
class Components:
    """The loaded parts of a model, ready for `ldm.StableDiffusionPipeline(**parts.pipeline_kwargs())` (SDXL:
    ldm.StableDiffusionXLPipeline)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None  # None for the SDXL refiner
    tokenizer: Any
    scheduler: Any
    family: FamilyPreset | None  # the family these parts ARE, or None (the rule: _identity)
    source: Path
    # The x4 upscaler's extras (diffusers' model_index.json `max_noise_level`, `low_res_scheduler/`); None elsewhere.
    max_noise_level: int | None = None
    low_res_scheduler: dict[str, Any] | None = None
    # SDXL's second text encoder (OpenCLIP bigG, a CLIPTextModelWithProjection) and its tokenizer; None elsewhere.
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    # A diffusers SDXL folder's model_index.json flag (empty negative prompt -> zero embeddings); None: not stated.
    force_zeros_for_empty_prompt: bool | None = None

    def pipeline_kwargs(self) -> dict[str, Any]:
        kw = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
              "scheduler": self.scheduler, "family": self.family}
        if self.text_encoder_2 is not None:  # SDXL: StableDiffusionXLPipeline's extra parts
            kw |= {"text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
            if self.force_zeros_for_empty_prompt is not None:
                kw["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt
        return kw


# ----------------------------------------------------------------------------------------------------------------
# Sources: opening files


class ShardedSource:
    """Several safetensors files read as one (a sharded diffusers component: `*.safetensors.index.json`)."""

    def __init__(self, files: list[SafetensorsFile], path: Path) -> None:
        self.path = path
        self._files = files
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for key in f.keys():
                if key in self._where:
                    raise CheckpointError(f"{path}: key {key!r} is in two shards ({self._where[key].path.name}, "
                                          f"{f.path.name})")
                self._where[key] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def tensor(self, key: str) -> torch.Tensor:
        return self._where[key].tensor(key)

    def release(self, key: str) -> None:
        self._where[key].release(key)


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def open_source(path: str | os.PathLike, allow_pickle: bool = False) -> Source:
    """Open one weights file: safetensors by memory map; a pickle only with allow_pickle (weights_only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.suffix == ".safetensors" or (path.suffix not in PICKLE_SUFFIXES and _looks_like_safetensors(path)):
        return SafetensorsFile(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, or with allow_pickle=True "
                              f"one of {', '.join(PICKLE_SUFFIXES)})")
    if not allow_pickle:
        raise CheckpointError(f"{path}: a pickle checkpoint; unpickling can run arbitrary code, so it is refused. "
                              f"Convert it to .safetensors, or pass allow_pickle=True (--allow-pickle) to read it "
                              f"with torch.load(weights_only=True)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; the message is what matters
        raise CheckpointError(f"{path}: cannot read the pickle checkpoint with torch.load(weights_only=True): "
                              f"{type(e).__name__}: {e}") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # LatentDiffusion's Lightning checkpoints nest the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    return DictSource(obj, path)


# ----------------------------------------------------------------------------------------------------------------
# Building models on the meta device and filling them


def _empty_model(component: str, config: UNetConfig | VAEConfig | CLIPTextConfig) -> nn.Module:
    from ldm.clip import CLIPTextModel, CLIPTextModelWithProjection
    from ldm.unet import UNet2DConditionModel
    from ldm.vae import AutoencoderKL

    # Every parameter on the meta device: no memory, init is a no-op; load_state_dict(assign=True) then puts the
    # file's tensors in. (The models hold no buffers a file lacks, so nothing real needs building here.)
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                "text_encoder_2": CLIPTextModelWithProjection}[component](config)


def _meta_model(component: str, config: UNetConfig | VAEConfig | CLIPTextConfig, where: Path) -> nn.Module:
    """_empty_model, with sizes too large even to describe (beyond int64) reported against the config file."""
    try:
        return _empty_model(component, config)
    except (RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{where}: the config's sizes cannot be built ({' '.join(str(e).split())[:160]})") \
            from None


def _expected(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fill(model: nn.Module, rules: list[Rule], source: Source, component: str, dtype: torch.dtype | None,
          device: str | torch.device) -> nn.Module:
    state = dict(tensors(rules, source, component, dtype))
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftovers:  # cannot happen after a strict load; a guard against a half-built model escaping
        raise CheckpointError(f"{source.path}: {component} tensors left unloaded: {leftovers[:MAX_LISTED]}")
    if dtype is not None:
        model.to(dtype)  # the buffers; parameters already have it (a no-op for them)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# The three source kinds


MAX_TRAIN_TIMESTEPS = 100_000  # SD uses 1000; the schedules are arrays of this length


def _scheduler(config: dict[str, Any], where: str | Path = "scheduler config") -> Any:
    """The scheduler a config names, among ldm.schedulers' own classes only (never any other attribute)."""
    from ldm import schedulers

    known = {c.__name__: c for c in schedulers.SCHEDULERS.values()}
    name = config.get("_class_name")
    if not isinstance(name, str) or name not in known:
        raise CheckpointError(f"{where}: scheduler class {name!r:.80} is not implemented; ldm.schedulers has "
                              f"{', '.join(known)}")
    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise CheckpointError(f"{where}: num_train_timesteps must be an int in [1, {MAX_TRAIN_TIMESTEPS:,}], "
                              f"got {steps!r:.80}")
    try:
        return known[name].from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a value of the wrong type or range
        raise CheckpointError(f"{where}: {type(e).__name__}: {e}") from None


def _tokenizer_packaged(pad_token: str | None) -> Any:
    from ldm.tokenizer import CLIPTokenizer

    return None if pad_token is None else CLIPTokenizer.packaged(pad_token)


def _single_file(path: Path, family: str | FamilyPreset | None, dtype: torch.dtype | None,
                 device: str | torch.device, ema: bool, allow_pickle: bool, skip_vae: bool) -> Components:
    source = open_source(path, allow_pickle)
    shapes = {k: source.shape(k) for k in source.keys()}
    layout = detect_layout(set(shapes), shapes, path)
    preset = resolve_family(layout, family, path)
    rules = checkpoint_rules(preset, layout, ema=ema)
    wanted = [c for c in model_components(preset) if not (skip_vae and c == "vae")]
    configs = {"unet": preset.unet, "vae": preset.vae, "text_encoder": preset.text,  # a file has no configs of its
               "text_encoder_2": preset.text_encoder_2}                                # own: the family's
    models = {c: _empty_model(c, configs[c]) for c in wanted}
    verify(rules, source, {c: _expected(m) for c, m in models.items()}, what=f"{preset.name} checkpoint")
    loaded = {c: _fill(m, rules, source, c, dtype, device) for c, m in models.items()}
    return Components(loaded["unet"], loaded.get("vae"), loaded.get("text_encoder"),
                      _tokenizer_packaged(preset.pad_token if preset.text is not None else None),
                      _scheduler(preset.scheduler), preset, path, text_encoder_2=loaded.get("text_encoder_2"),
                      tokenizer_2=_tokenizer_packaged(preset.pad_token_2))


def folder_weights(sub: Path, stem: str, variant: str | None, allow_pickle: bool) -> Source:
    """The weights of one component folder: `<stem>[.<variant>].safetensors`, sharded or not.

    With no variant asked and no plain weights present, a folder holding a single variant (e.g. only the fp16
    files) is read as that variant, as diffusers finds them.
    """
    def candidates(v: str | None) -> list[Path]:
        mid = f".{v}" if v else ""
        return [sub / f"{stem}{mid}.safetensors", sub / f"{stem}.safetensors.index{mid}.json",
                sub / f"{stem}{mid}.safetensors.index.json"]

    found = [p for p in candidates(variant) if p.is_file()]
    if not found and variant is None:
        variants = sorted({p.name[len(stem) + 1:].split(".")[0] for p in sub.glob(f"{stem}.*.safetensors")})
        if len(variants) == 1:
            found = [p for p in candidates(variants[0]) if p.is_file()]
    if not found:
        pickled = [p for p in (sub / f"{stem}{f'.{variant}' if variant else ''}.bin",) if p.is_file()]
        if pickled:
            return open_source(pickled[0], allow_pickle)
        raise CheckpointError(f"{sub}: no weights file {stem}{f'.{variant}' if variant else ''}.safetensors "
                              f"(found: {', '.join(sorted(p.name for p in sub.iterdir())) or 'nothing'})")
    first = found[0]
    if first.suffix == ".safetensors":
        return SafetensorsFile(first)
    shards = sorted(set(read_json(first).get("weight_map", {}).values()))
    if not shards:
        raise CheckpointError(f"{first}: an index without a weight_map")
    return ShardedSource([SafetensorsFile(sub / s) for s in shards], first)


# diffusers < 0.14 saved the VAE's attention projections under these names (its deprecated attention block)
OLD_VAE_ATTENTION_KEYS = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _old_vae_key(key: str, keys: set[str]) -> str:
    """The deprecated name of a VAE attention key when the file uses it (and not also the current name)."""
    for new, old in OLD_VAE_ATTENTION_KEYS.items():
        if f".attentions.0.{new}." in key:
            old_key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            if old_key in keys and key not in keys:
                return old_key
    return key


def folder_rules(component: str, expected: dict[str, tuple[int, ...]], source: Source) -> list[Rule]:
    """A diffusers folder holds our keys already: the identity table, plus the other layouts of the same weights
    (transformers 5.x saves CLIPTextModel without the `text_model.` prefix; old files carry `position_ids`; old
    diffusers VAEs name their attention projections `query/key/value/proj_attn`)."""
    keys = set(source.keys())
    text = component in ("text_encoder", "text_encoder_2")
    prefixed = not text or any(k.startswith("text_model.") for k in keys)
    if component == "vae":
        return [Rule(_old_vae_key(k, keys), (k,), component) for k in expected]
    # (text_projection.weight, SDXL's second encoder's head, has no prefix in either layout)
    rules = [Rule(k if prefixed else k.removeprefix("text_model."), (k,), component) for k in expected]
    if text:
        rules.append(drop(f"{'text_model.' if prefixed else ''}embeddings.position_ids", "a buffer", optional=True))
    return rules


def is_upscaler(unet: UNetConfig) -> bool:
    """An x4 upscaler UNet: 7 input channels (4 latents + the RGB low-res image) and noise-level classes."""
    return unet.num_class_embeds is not None and unet.in_channels == 7


def _folder_family(folder: Path, unet: UNetConfig, text: CLIPTextConfig | None, scheduler: dict[str, Any],
                   family: str | FamilyPreset | None, xl: bool = False) -> str:
    """The family whose architecture a folder's configs follow (a requested family that contradicts it raises)."""
    generation = 2 if text is not None and text.hidden_act == "gelu" else 1
    inpainting = unet.in_channels == 9
    if xl:  # a text_encoder_2/ folder: SDXL, whose UNet must take the micro-conditioning
        if unet.addition_embed_type != "text_time" or inpainting:
            raise CheckpointError(f"{folder}: a text_encoder_2/ folder (SDXL), but unet/config.json is not an SDXL "
                                  f"base or refiner UNet (addition_embed_type 'text_time', 4 input channels)")
        name = "sdxl-base" if text is not None else "sdxl-refiner"
    elif unet.addition_embed_type is not None:
        raise CheckpointError(f"{folder}: unet/config.json has addition_embed_type {unet.addition_embed_type!r} "
                              f"(SDXL), but the folder has no text_encoder_2/")
    elif is_upscaler(unet):
        name = "x4-upscaler"
    elif generation == 1:
        name = "sd15-inpaint" if inpainting else "sd15"
    elif inpainting:
        name = "sd2-inpaint"
    else:
        name = "sd21-v" if scheduler.get("prediction_type") == "v_prediction" else "sd21-base"
    wanted = family.name if isinstance(family, FamilyPreset) else family
    if wanted is not None and wanted != name:
        preset_named(wanted)  # an unknown name is a ValueError listing the known ones
        raise CheckpointError(f"{folder}: its configs describe a {name!r} model, not the requested family "
                              f"{wanted!r}")
    return name


def _identity(name: str, configs: dict[str, Any], prediction: str,
              family: str | FamilyPreset | None) -> FamilyPreset | None:
    """The family a folder IS: `family` identifies a model, it does not configure one.

    A folder is that family only when its UNet, VAE and text encoder configs and its prediction type equal the
    preset's (the official folders do); the preset passed as `family=`, if one was, is tried first. Anything
    else (a fine-tune with other sizes, the packaged 8 M-parameter shapes model, a tiny test model) has no family:
    None. The parts carry their own configs either way (`pipe.unet.config`, `pipe.scheduler.config`).
    """
    candidates = ([family] if isinstance(family, FamilyPreset) else []) + [FAMILIES[name]]
    for preset in candidates:
        if (preset.unet, preset.vae, preset.text, preset.text_encoder_2, preset.prediction_type) == \
                (configs["unet"], configs["vae"], configs.get("text_encoder"), configs.get("text_encoder_2"),
                 prediction):
            return preset
    return None


def _folder(folder: Path, family: str | FamilyPreset | None, dtype: torch.dtype | None, device: str | torch.device,
            variant: str | None, allow_pickle: bool, skip_vae: bool) -> Components:
    if not any(folder.iterdir()):
        raise CheckpointError(f"{folder}: an empty folder (expected a diffusers model folder or a weights file)")
    xl = (folder / "text_encoder_2").is_dir()  # SDXL; its refiner has no text_encoder/ and tokenizer/
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if xl:
        parts = ["unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"] + \
                (["text_encoder", "tokenizer"] if (folder / "text_encoder").is_dir() else [])
    for part in parts:
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: not a diffusers Stable Diffusion folder (no {part}/ subfolder)")
    unet_cfg = read_config(folder / "unet" / "config.json", UNetConfig.from_diffusers)
    vae_cfg = read_config(folder / "vae" / "config.json", VAEConfig.from_diffusers)
    configs = {"unet": unet_cfg, "vae": vae_cfg}
    for c in ("text_encoder", "text_encoder_2"):
        if c in parts:
            configs[c] = read_config(folder / c / "config.json", CLIPTextConfig.from_transformers)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_path)
    scheduler = _scheduler(sched_cfg, sched_path)  # a bad scheduler config is found before any weights are read
    tokenizers = {t: _tokenizer_dir(folder / t) for t in ("tokenizer", "tokenizer_2") if t in parts}
    name = _folder_family(folder, unet_cfg, configs.get("text_encoder"), sched_cfg, family, xl)
    preset = _identity(name, configs, sched_cfg.get("prediction_type", "epsilon"), family)
    wanted = [c for c in XL_COMPONENTS if c in configs and not (skip_vae and c == "vae")]
    sources: dict[str, Source] = {}
    for c in wanted:  # the configs' counts against the files, before any model is built
        sources[c] = folder_weights(folder / c, WEIGHT_FILES[c], variant, allow_pickle)
        check_counts(c, configs[c], sources[c], folder / c / "config.json")
    models = {c: _meta_model(c, configs[c], folder / c / "config.json") for c in wanted}
    rules: dict[str, list[Rule]] = {}
    for c, model in models.items():  # verify every component before filling any
        rules[c] = folder_rules(c, _expected(model), sources[c])
        verify(rules[c], sources[c], {c: _expected(model)}, what=f"diffusers {c}")
    extras = _upscaler_extras(folder) if name == "x4-upscaler" else _xl_extras(folder) if xl else {}
    filled = {c: _fill(m, rules[c], sources[c], c, dtype, device) for c, m in models.items()}
    return Components(filled["unet"], filled.get("vae"), filled.get("text_encoder"), tokenizers.get("tokenizer"),
                      scheduler, preset, folder, text_encoder_2=filled.get("text_encoder_2"),
                      tokenizer_2=tokenizers.get("tokenizer_2"), **extras)


def _xl_extras(folder: Path) -> dict[str, Any]:
    """An SDXL folder's model_index.json `force_zeros_for_empty_prompt` (true for the base, false for the refiner),
    when the folder has a model_index.json that states it."""
    if not (folder / "model_index.json").is_file():
        return {}
    flag = read_json(folder / "model_index.json").get("force_zeros_for_empty_prompt")
    if flag is not None and not isinstance(flag, bool):
        raise CheckpointError(f"{folder / 'model_index.json'}: force_zeros_for_empty_prompt must be true or false, "
                              f"got {flag!r:.80}")
    return {} if flag is None else {"force_zeros_for_empty_prompt": flag}


def _tokenizer_dir(folder: Path) -> Any:
    """The folder's tokenizer; a damaged vocab.json / merges.txt / config raises CheckpointError naming it."""
    from ldm.tokenizer import CLIPTokenizer

    try:
        return CLIPTokenizer.from_dir(folder)
    except RecursionError:
        raise CheckpointError(f"{folder}: a tokenizer file is nested too deeply to be JSON") from None
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for damaged files
        raise CheckpointError(f"{folder}: cannot read the tokenizer ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None


def _upscaler_extras(folder: Path) -> dict[str, Any]:
    """The x4 upscaler folder's `max_noise_level` (model_index.json) and `low_res_scheduler/` config, checked."""
    from ldm.upscale import check_low_res_scheduler

    index = read_json(folder / "model_index.json")
    level = index.get("max_noise_level")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise CheckpointError(f"{folder / 'model_index.json'}: max_noise_level must be an int >= 0, got {level!r}")
    low_res = read_json(folder / "low_res_scheduler" / "scheduler_config.json")
    try:
        check_low_res_scheduler(low_res)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'low_res_scheduler' / 'scheduler_config.json'}: {e}") from None
    return {"max_noise_level": level, "low_res_scheduler": low_res}


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
             config: VAEConfig | None = None, allow_pickle: bool = False) -> nn.Module:
    """A separate VAE: a diffusers AutoencoderKL folder (config.json + weights, or a model folder's vae/), or one
    file in the original layout (`encoder.down.0...`, with or without `first_stage_model.`) or diffusers'."""
    from ldm.vae import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        sub = path / "vae" if (path / "vae").is_dir() else path
        cfg = read_config(sub / "config.json", VAEConfig.from_diffusers)
        source = folder_weights(sub, WEIGHT_FILES["vae"], None, allow_pickle)
        check_counts("vae", cfg, source, sub / "config.json")
        diffusers_layout = True
    else:
        cfg = config or VAEConfig()
        source = open_source(path, allow_pickle)
        keys = set(source.keys())
        diffusers_layout = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    expected = _expected(model)
    if diffusers_layout:
        rules = folder_rules("vae", expected, source)
    else:
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in source.keys()) else ""
        rules = vae_rules(cfg, prefix) + [drop(k, "EMA bookkeeping", optional=True)
                                          for k in ("model_ema.decay", "model_ema.num_updates")]
    verify(rules, source, {"vae": expected}, what="VAE")
    return _fill(model, rules, source, "vae", dtype, device)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16, torch.bfloat16 or None (the file's own), "
                         f"got {dtype!r}")


def load_components(path_or_id: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", family: str | FamilyPreset | None = None,
                    vae: str | os.PathLike | nn.Module | None = None, ema: bool = False, allow_pickle: bool = False,
                    variant: str | None = None) -> Components:
    """Load every part of a model: a single file, a diffusers folder, or a hub id (see ldm/hub.py).

    dtype: the models' dtype (None keeps the file's); family: settles what keys cannot tell (see checkpoint.py);
    vae: a separate VAE (file, folder, or a loaded module) replacing the checkpoint's; ema: a full file's EMA
    weights; variant: a diffusers folder's weight variant ("fp16"); allow_pickle: read .ckpt/.pt/.bin files.
    """
    from ldm.hub import resolve

    _check_dtype(dtype)
    if not isinstance(ema, bool):
        raise TypeError(f"ema must be a bool, got {ema!r}")
    path = resolve(path_or_id, variant=variant)
    skip_vae = vae is not None
    if path.is_dir():
        if ema:
            raise ValueError(f"{path}: ema=True applies to single-file checkpoints; a diffusers folder holds one "
                             f"set of weights")
        parts = _folder(path, family, dtype, device, variant, allow_pickle, skip_vae)
    else:
        if variant is not None:
            warnings.warn(f"variant={variant!r} applies to diffusers folders; ignored for the file {path}",
                          stacklevel=2)
        parts = _single_file(path, family, dtype, device, ema, allow_pickle, skip_vae)
    if vae is not None:
        if isinstance(vae, nn.Module):
            parts.vae = vae
        else:
            own = read_config(path / "vae" / "config.json", VAEConfig.from_diffusers) if path.is_dir() else \
                parts.family.vae  # the model's own VAE config: a single file always has its family
            parts.vae = load_vae(vae, dtype=dtype, device=device, config=own, allow_pickle=allow_pickle)
    return parts


def load_pipeline(path_or_hub_id: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu", family: str | FamilyPreset | None = None,
                  vae: str | os.PathLike | nn.Module | None = None, ema: bool = False, allow_pickle: bool = False,
                  variant: str | None = None, optimize: bool = False,
                  controlnet: str | os.PathLike | nn.Module | list | None = None) -> Any:
    """`ldm.load_pipeline`: the parts of `load_components`, assembled into an ldm.StableDiffusionPipeline.

    optimize=True pulls the device's default speed levers once the weights are on `device` in `dtype`
    (`pipe.optimize()`, ldm/optimize.py: on CUDA channels_last, fused attention projections and torch.compile with
    CUDA graphs; on the CPU fused projections only); `pipe.levers` records what was pulled. For other levers,
    load with optimize=False and call `pipe.optimize(...)` yourself.

    controlnet: a ControlNet file or folder (weights_convert/controlnet.py), a loaded ControlNetModel, or a list of
    them; each is checked against the model's UNet and loaded in `dtype` on `device` (allow_pickle applies), and
    the pipeline is an ldm.StableDiffusionControlNetPipeline.
    """
    from ldm.pipeline import StableDiffusionPipeline
    from ldm.pipeline_xl import StableDiffusionXLPipeline
    from ldm.upscale import StableDiffusionUpscalePipeline

    if not isinstance(optimize, bool):
        raise TypeError(f"optimize must be a bool, got {type(optimize).__name__}")
    parts = load_components(path_or_hub_id, dtype=dtype, device=device, family=family, vae=vae, ema=ema,
                            allow_pickle=allow_pickle, variant=variant)
    if parts.text_encoder_2 is not None:  # SDXL base or refiner: diffusers' StableDiffusionXLPipeline
        if controlnet is not None:
            raise ValueError("controlnet: SDXL ControlNets are not supported (ControlNet here is for SD 1.x / 2.x)")
        return StableDiffusionXLPipeline(**parts.pipeline_kwargs(), optimize=optimize)
    if is_upscaler(parts.unet.config):  # the pipeline class that fits the checkpoint, as diffusers picks it
        if controlnet is not None:
            raise ValueError("controlnet: the x4 upscaler takes no ControlNet (they are made for SD 1.x / 2.x UNets)")
        extras = {k: v for k, v in (("max_noise_level", parts.max_noise_level),
                                    ("low_res_scheduler", parts.low_res_scheduler)) if v is not None}
        return StableDiffusionUpscalePipeline(**parts.pipeline_kwargs(), **extras, optimize=optimize)
    if controlnet is not None:  # diffusers' StableDiffusionControlNetPipeline
        from ldm.pipeline_controlnet import StableDiffusionControlNetPipeline
        from weights_convert.controlnet import load_controlnets

        nets = load_controlnets(controlnet, parts.unet.config, dtype=dtype, device=device, allow_pickle=allow_pickle)
        return StableDiffusionControlNetPipeline(**parts.pipeline_kwargs(), controlnet=nets, optimize=optimize)
    return StableDiffusionPipeline(**parts.pipeline_kwargs(), optimize=optimize)
