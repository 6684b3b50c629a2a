"""LoRA files -> `ldm.lora.Adapter`: every key of the file mapped onto one of our modules, or an error.

A LoRA file names, for each adapted layer, a down matrix A, an up matrix B and optionally a scalar alpha. The
spellings (all of them read; one file may mix them, e.g. kohya UNet + kohya text encoder):
- kohya sd-scripts, A1111: `lora_unet_` + the diffusers module path with `_` for `.`
  (`lora_unet_down_blocks_0_attentions_0_proj_in`), or in older files the original LDM path
  (`lora_unet_input_blocks_1_1_proj_in`, SDXL's kohya files always); `lora_te_` / `lora_te1_` + the text
  encoder's path, and for SDXL's second encoder `lora_te2_` (`lora_te2_text_model_encoder_layers_0_mlp_fc1`);
  then `.lora_down.weight` / `.lora_up.weight` / `.alpha`.
- diffusers / PEFT: `unet.` / `text_encoder.` / `text_encoder_2.` + module path, then `.lora_A.weight` /
  `.lora_B.weight` / `.alpha`
  (optional); diffusers < 0.20: `.lora.down.weight` / `.lora.up.weight`.
A file without alphas means alpha = r (scale 1), except where a diffusers file's `lora_adapter_metadata` gives
peft's `lora_alpha` (and `alpha_pattern`) per component, which it then follows as diffusers does.

The table (`lora_module_table`) is expanded from the model itself: each Linear and Conv2d of the UNet and the text
encoder under each spelling; the LDM spellings come from the UNet's own converter table (weights_convert/
unet_rules.py). `python -m weights_convert lora-table` prints it. Checks, before any weight changes: every key
lands on a module (the leftovers are listed), each layer has both A and B, shapes fit the module (A (r, in[, kh,
kw]), B (out, r[, 1, 1])), and a file for another model family (SD 2.x's 1024-wide or SDXL's 2048-wide
cross-attention, SDXL's second text encoder) is named as such.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.lora import Adapter, LoRALayer
from weights_convert.adapter_files import read_tensors_file
from weights_convert.convert import MAX_LISTED
from weights_convert.safetensors_file import CheckpointError
from weights_convert.unet_rules import PREFIX as LDM_UNET_PREFIX
from weights_convert.unet_rules import unet_rules

# (key suffix, slot): the part of a key after the layer name.
SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),  # kohya / A1111
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # PEFT
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # diffusers' LoRACompatible layers
)
# (layer-name prefix, component, joiner): how a file spells a module of a component; joiner replaces the dots.
PREFIXES = (
    ("lora_unet_", "unet", "_"), ("lora_te_", "text_encoder", "_"), ("lora_te1_", "text_encoder", "_"),
    ("unet.", "unet", "."), ("text_encoder.", "text_encoder", "."),
    ("lora_te2_", "text_encoder_2", "_"), ("text_encoder_2.", "text_encoder_2", "."),  # SDXL's second encoder
)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
FAMILY_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention (text) width -> family


def lora_module_table(unet: nn.Module, text_encoder: nn.Module | None,
                      text_encoder_2: nn.Module | None = None) -> dict[str, tuple[str, str]]:
    """File layer name -> (component, our module name), for every spelling in PREFIXES (and LDM's for the UNet).
    text_encoder_2: SDXL's second encoder (text_encoder None: the SDXL refiner, which has only that one)."""
    table: dict[str, tuple[str, str]] = {}
    models = (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    for component, model in ((c, m) for c, m in models if m is not None):
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for prefix, comp, joiner in PREFIXES:
            if comp == component:
                table.update({prefix + n.replace(".", joiner): (component, n) for n in names})
        if component in TEXT_ENCODERS:  # transformers 5 writes CLIPTextModel's paths without `text_model.`
            table.update({f"{component}." + n.removeprefix("text_model."): (component, n) for n in names})
    table.update(_ldm_unet_names(unet))
    return table


def _ldm_unet_names(unet: nn.Module) -> dict[str, tuple[str, str]]:
    """kohya's spelling of the original LDM module paths, through the UNet's converter table."""
    ours = {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out: dict[str, tuple[str, str]] = {}
    for rule in unet_rules(unet.config):
        if len(rule.targets) == 1 and rule.source.endswith(".weight") and rule.targets[0].endswith(".weight"):
            source, target = rule.source[len(LDM_UNET_PREFIX):-len(".weight")], rule.targets[0][:-len(".weight")]
            if target in ours:
                out["lora_unet_" + source.replace(".", "_")] = ("unet", target)
    return out


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, slot in SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], slot
    return None


def read_lora(path: str | os.PathLike, unet: nn.Module, text_encoder: nn.Module | None,
              text_encoder_2: nn.Module | None = None) -> Adapter:
    """Read, map and check a LoRA file against the models (SDXL: the second text encoder too; the refiner has no
    first one); nothing is changed here."""
    path = Path(path)
    data, metadata = read_tensors_file(path)
    bad = [k for k, v in data.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a LoRA file: entries that are not tensors: {bad[:MAX_LISTED]}")
    if not data:
        raise CheckpointError(f"{path}: the file holds no tensors")
    models = {c: m for c, m in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
              if m is not None}
    _check_family(path, data, models)
    table = lora_module_table(unet, text_encoder, text_encoder_2)
    layers: dict[str, dict[str, Tensor]] = {}
    unmatched = []
    for key, tensor in data.items():
        split = _split_key(key)
        if split is None or split[0] not in table:
            unmatched.append(key)
            continue
        layers.setdefault(split[0], {})[split[1]] = tensor
    if unmatched:
        parts = ", ".join({"unet": "UNet", "text_encoder": "text encoder",
                           "text_encoder_2": "text encoder 2"}[c] for c in models)
        raise CheckpointError(f"{path}: {len(unmatched)} of {len(data)} keys match no LoRA layer of this model "
                              f"({parts}): {_listed(unmatched)}{_hint(unmatched)}")
    alphas = _metadata_alphas(path, metadata)
    adapter: Adapter = {}
    for name, slots in sorted(layers.items()):
        component, module_name = table[name]
        key = (component, module_name)
        if key in adapter:
            raise CheckpointError(f"{path}: two spellings of the same layer {module_name!r} ({component}); "
                                  f"one of them is {name!r}")
        module = models[component].get_submodule(module_name)
        adapter[key] = _layer(path, name, slots, module, alphas.get(component), module_name)
    return adapter


def _layer(path: Path, name: str, slots: dict[str, Tensor], module: nn.Module, alpha_rule: Any,
           module_name: str) -> LoRALayer:
    missing = [slot for slot in ("down", "up") if slot not in slots]
    if missing:
        raise CheckpointError(f"{path}: layer {name!r} has no {' and no '.join(missing)} matrix")
    down, up = slots["down"], slots["up"]
    weight = module.weight  # (out, in) or (out, in, kh, kw)
    out_f, in_f = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    r = down.shape[0]
    down_ok = down.ndim >= 2 and down.shape[1] == in_f and (
        tuple(down.shape[2:]) == kernel or (not kernel and tuple(down.shape[2:]) in ((), (1, 1)))
        or (kernel == (1, 1) and down.ndim == 2))
    up_ok = up.ndim >= 2 and up.shape[:2] == (out_f, r) and tuple(up.shape[2:]) in ((), (1, 1))
    if not (down_ok and up_ok):
        raise CheckpointError(f"{path}: layer {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do not "
                              f"fit {module_name!r}, a {type(module).__name__} of weight {tuple(weight.shape)}")
    if "alpha" in slots:
        alpha = float(slots["alpha"].float().reshape(-1)[0])
    elif alpha_rule is not None:
        alpha = alpha_rule(module_name, r)
    else:
        alpha = float(r)
    return LoRALayer(down.detach(), up.detach(), alpha)


def _check_family(path: Path, data: dict[str, Tensor], models: dict[str, nn.Module]) -> None:
    """A LoRA for another family, told from the text width its layers read: the UNet's cross-attention k/v and
    each text encoder's q projection and first MLP layer; or from SDXL's second text encoder."""
    ours = models["unet"].config.cross_attention_dim
    family = FAMILY_WIDTHS.get(ours, f"a model with {ours}-wide text embeddings")
    second = ("lora_te2_", "text_encoder_2.")
    if "text_encoder_2" not in models and any(k.startswith(second) for k in data):
        raise CheckpointError(f"{path}: a LoRA for SDXL (it adapts a second text encoder); this model is {family}")
    text = r"(self_attn[._]q_proj|mlp[._]fc1)$"
    for key, tensor in data.items():
        split = _split_key(key)
        if split is None or split[1] != "down" or tensor.ndim < 2:
            continue
        encoder = models.get("text_encoder_2" if key.startswith(second) else "text_encoder")
        widths = [(r"attn2[._]to_[kv]$", ours)] + ([(text, encoder.config.hidden_size)] if encoder else [])
        for pattern, expected in widths:
            if re.search(pattern, split[0]) and tensor.shape[1] != expected:
                width = tensor.shape[1]
                theirs = FAMILY_WIDTHS.get(width, f"another family ({width}-wide text)")
                ours_named = f" ({FAMILY_WIDTHS[expected]})" if expected in FAMILY_WIDTHS else ""
                raise CheckpointError(f"{path}: a LoRA for {theirs}: its layer {split[0]!r} reads {width}-wide text "
                                      f"embeddings, this model's reads {expected}{ours_named}")


def _metadata_alphas(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """diffusers' `lora_adapter_metadata`: per component, a function (module, r) -> alpha from peft's config."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: lora_adapter_metadata is not JSON: {e}") from None
    rules: dict[str, Any] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        config = {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}
        if "lora_alpha" in config:
            rules[component] = _alpha_rule(float(config["lora_alpha"]), config.get("alpha_pattern") or {})
    return rules


def _alpha_rule(default: float, patterns: dict[str, float]) -> Any:
    """peft's rule: the first pattern matching the end of the module path, else lora_alpha."""

    def alpha(module_name: str, r: int) -> float:
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                return float(value)
        return default

    return alpha


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def _hint(keys: list[str]) -> str:
    if any(re.search(r"\.(hada_|lokr_|lora_mid)", k) for k in keys):
        return " (LyCORIS LoHa / LoKr / Tucker layers are not plain LoRA and are not read)"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return " (an SDXL LoRA?)"
    return ""
