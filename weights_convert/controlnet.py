"""ControlNet files -> ldm.controlnet.ControlNetModel, through a declarative, strictly verified table.

The layouts read (reference: lllyasviel/ControlNet `cldm/cldm.py` ControlNet, and diffusers 0.42.1
`loaders/single_file_utils.py` `convert_controlnet_checkpoint`, which we match):
- ControlNet 1.1 (`control_v11p_sd15_canny.pth` and the rest): only `control_model.*` tensors, a pickle (read with
  `torch.load(weights_only=True)`, so only with allow_pickle), or its fp16 `.safetensors` repack (same names).
- ControlNet 1.0 (`control_sd15_canny.pth`): the same `control_model.*` inside a whole SD 1.5 checkpoint; the
  ControlNet is taken and the rest is reported as ignored (a warning naming what, by prefix).
- Community SD 2.1 ControlNets: the same names without the `control_model.` prefix.
- diffusers (`diffusion_pytorch_model.safetensors`, with or without its folder's config.json): our keys already.

The original names differ from diffusers' only in the stem, the hint encoder and the zero convolutions: the encoder
and middle block are the UNet's, so their rules are the UNet table's (weights_convert/unet_rules.py).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ldm.config import UNetConfig
from ldm.controlnet import CONTROLNET_SD15, CONTROLNET_SD21, ControlNetConfig, ControlNetModel
from ldm.hub import WEIGHT_FILES

from weights_convert.convert import Source, verify
from weights_convert.rules import Rule, drop, expand, local
from weights_convert.safetensors_file import CheckpointError
from weights_convert.unet_rules import CONV, unet_blocks

PREFIX = "control_model."  # ControlNet 1.0 / 1.1 files (ControlLDM.control_model)
CONTEXT_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # [C0, D_text]: 768 SD 1, 1024 SD 2
CONV_IN_KEY = "input_blocks.0.0.weight"

STEM = local({
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",  # key-compat: index 1 is the SiLU
    "input_blocks.0.0": "conv_in",
    "middle_block_out.0": "controlnet_mid_block",  # key-compat: middle_block_out = [zero conv]
})


def hint_pairs(n_widths: int) -> dict[str, str]:
    """The hint encoder: the original's `input_hint_block` is one Sequential of convs with a SiLU after each, so
    conv k sits at index 2k: `.0` conv_in, `.2 ... .{4(n-1)}` the 2(n-1) level convs, then conv_out."""
    n_blocks = 2 * (n_widths - 1)
    pairs = {"input_hint_block.0": "controlnet_cond_embedding.conv_in"}
    pairs |= {f"input_hint_block.{2 * k + 2}": f"controlnet_cond_embedding.blocks.{k}" for k in range(n_blocks)}
    pairs[f"input_hint_block.{2 * n_blocks + 2}"] = "controlnet_cond_embedding.conv_out"
    return pairs


def controlnet_rules(cfg: ControlNetConfig, prefix: str = PREFIX) -> list[Rule]:
    """Every rule of an original-layout ControlNet for `cfg`, source keys under `prefix`."""
    u = cfg.unet
    rules = expand("controlnet", prefix, "", STEM + local(hint_pairs(len(cfg.hint_channels))))
    for src, dst, table in unet_blocks(u):  # the UNet's own table, down path and middle only
        if src.startswith(("input_blocks.", "middle_block.")):
            rules += expand("controlnet", prefix + src, dst, table)
    n_levels = len(u.block_out_channels)
    n_skips = 1 + n_levels * u.layers_per_block + (n_levels - 1)  # conv_in, the ResNets, the downsamplers
    for i in range(n_skips):  # key-compat: zero_convs.i = [zero conv] (TimestepEmbedSequential)
        rules += expand("controlnet", f"{prefix}zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", CONV)
    return rules


def diffusers_rules(expected: dict[str, tuple[int, ...]]) -> list[Rule]:
    """A diffusers ControlNetModel file holds our keys: the identity table."""
    return [Rule(k, (k,), "controlnet") for k in expected]


# ----------------------------------------------------------------------------------------------------------------
# Reading a file's layout and config


def _layout(keys: set[str], path: Path) -> str:
    """'original' (control_model.*), 'unprefixed' (community SD 2.1) or 'diffusers'; else a CheckpointError."""
    if PREFIX + CONV_IN_KEY in keys:
        return "original"
    if CONV_IN_KEY in keys and "time_embed.0.weight" in keys:
        return "unprefixed"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    if "model.diffusion_model.input_blocks.0.0.weight" in keys:
        raise CheckpointError(f"{path}: a Stable Diffusion checkpoint without a ControlNet (no "
                              f"'{PREFIX}*' keys); pass it as the model, not as controlnet=")
    raise CheckpointError(f"{path}: not a ControlNet file (no {PREFIX + CONV_IN_KEY!r}, no unprefixed "
                          f"{CONV_IN_KEY!r}, no diffusers 'controlnet_cond_embedding.*')")


def hint_channels_of(shape_of: dict[str, tuple[int, ...]], prefix: str) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, hint encoder widths) read from the hint encoder's conv shapes."""
    first = shape_of[f"{prefix}input_hint_block.0.weight"]  # [c0, C_cond, 3, 3]
    widths, k = [first[0]], 4
    while f"{prefix}input_hint_block.{k}.weight" in shape_of and f"{prefix}input_hint_block.{k + 2}.weight" in shape_of:
        widths.append(shape_of[f"{prefix}input_hint_block.{k}.weight"][0])  # the stride-2 conv: next width
        k += 4
    return first[1], tuple(widths)


def context_dim_of(shape_of: dict[str, tuple[int, ...]], prefix: str) -> int | None:
    shape = shape_of.get(prefix + CONTEXT_KEY)
    return shape[1] if shape is not None and len(shape) == 2 else None


def config_for_file(shape_of: dict[str, tuple[int, ...]], prefix: str, base: UNetConfig | None,
                    path: Path) -> ControlNetConfig:
    """The config of an original-layout file: the base UNet's encoder (or the SD 1.5 / 2.1 preset by its
    cross-attention width) with the file's hint encoder. A ControlNet made for another base is an error here."""
    cond_ch, hint = hint_channels_of(shape_of, prefix)
    ctx = context_dim_of(shape_of, prefix)
    if base is None:
        preset = {768: CONTROLNET_SD15, 1024: CONTROLNET_SD21}.get(ctx)
        if preset is None:
            raise CheckpointError(f"{path}: cross-attention width {ctx} matches neither SD 1.5 (768) nor SD 2.x "
                                  f"(1024); pass config= for this ControlNet")
        return replace(preset, conditioning_channels=cond_ch, hint_channels=hint)
    if ctx is not None and ctx != base.cross_attention_dim:
        kinds = {768: "SD 1.x", 1024: "SD 2.x"}
        raise CheckpointError(f"{path}: a ControlNet for {kinds.get(ctx, f'a {ctx}-wide text encoder')} "
                              f"(cross-attention width {ctx}) cannot control this "
                              f"{kinds.get(base.cross_attention_dim, 'model')} UNet (width {base.cross_attention_dim})")
    unet = replace(base, in_channels=shape_of[prefix + CONV_IN_KEY][1], sample_size=None)
    return ControlNetConfig(unet=unet, conditioning_channels=cond_ch, hint_channels=hint)


def check_base(cfg: ControlNetConfig, base: UNetConfig, path: Path) -> None:
    """A ControlNet's residuals must fit the UNet's skips: same widths, levels and text width."""
    u = cfg.unet
    for name in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        if getattr(u, name) != getattr(base, name):
            raise CheckpointError(f"{path}: this ControlNet has {name}={getattr(u, name)}, the UNet it should "
                                  f"control has {getattr(base, name)}: it was made for another model")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _ignored_rules(keys: set[str], path: Path) -> list[Rule]:
    """ControlNet 1.0: the whole SD checkpoint around `control_model.*` is dropped, and the caller is told."""
    rest = sorted(k for k in keys if not k.startswith(PREFIX))
    if rest:
        by_prefix = Counter(k.split(".")[0] for k in rest)
        listed = ", ".join(f"{p}.* ({n})" for p, n in sorted(by_prefix.items()))
        warnings.warn(f"{path}: a ControlNet 1.0 file (the ControlNet inside a whole Stable Diffusion checkpoint): "
                      f"loading the {len(keys) - len(rest)} '{PREFIX}*' tensors, ignoring {len(rest)}: {listed}",
                      stacklevel=4)
    return [drop(k, "not part of the ControlNet (ControlNet 1.0 files carry a whole SD checkpoint)") for k in rest]


def _source_and_config(path: Path, base: UNetConfig | None, config: ControlNetConfig | None,
                       allow_pickle: bool) -> tuple[Source, ControlNetConfig, str]:
    from weights_convert.configs import read_config
    from weights_convert.load import folder_weights, open_source

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers ControlNet folder (no config.json)")
        cfg = config or read_config(path / "config.json", ControlNetConfig.from_diffusers)
        return folder_weights(path, WEIGHT_FILES["unet"], None, allow_pickle), cfg, "diffusers"
    source = open_source(path, allow_pickle)
    shape_of = {k: source.shape(k) for k in source.keys()}
    layout = _layout(set(shape_of), path)
    if layout == "diffusers":
        if config is None and base is None:
            raise CheckpointError(f"{path}: a diffusers-layout ControlNet file alone; pass its folder (with "
                                  f"config.json) or config=")
        cfg = config or ControlNetConfig(unet=replace(base, in_channels=4, sample_size=None))
        return source, cfg, layout
    prefix = PREFIX if layout == "original" else ""
    return source, config or config_for_file(shape_of, prefix, base, path), layout


def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", config: ControlNetConfig | None = None,
                    base: UNetConfig | None = None, allow_pickle: bool = False) -> ControlNetModel:
    """A ControlNet from a 1.0/1.1 file (.pth with allow_pickle, or .safetensors), an unprefixed SD 2.1 file, or
    a diffusers folder; verified strictly before any weight is read. base: the UNet it will control (its config
    settles the encoder and is checked against the file)."""
    from weights_convert.load import _check_dtype, _expected, _fill

    _check_dtype(dtype)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    source, cfg, layout = _source_and_config(path, base, config, allow_pickle)
    if base is not None:
        check_base(cfg, base, path)
    with torch.device("meta"):
        model = ControlNetModel(cfg)
    expected = _expected(model)
    if layout == "diffusers":
        rules = diffusers_rules(expected)
    elif layout == "original":
        rules = controlnet_rules(cfg) + _ignored_rules(set(source.keys()), path)
    else:
        rules = controlnet_rules(cfg, prefix="")
    verify(rules, source, {"controlnet": expected}, what="ControlNet")
    return _fill(model, rules, source, "controlnet", dtype, device)


def load_controlnets(paths: str | os.PathLike | nn.Module | list, base: UNetConfig, **kw) -> list[ControlNetModel]:
    """One path (or loaded model) or a list of them -> a list of ControlNets checked against the base UNet."""
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    if not items:
        raise ValueError("controlnet: an empty list; pass a path or a list of paths")
    out = []
    for item in items:
        if isinstance(item, ControlNetModel):
            check_base(item.config, base, Path("<ControlNetModel>"))
            out.append(item)
        else:
            out.append(load_controlnet(item, base=base, **kw))
    return out
