"""The mapping tables against diffusers' own converter, at the full SD shapes, in milliseconds.

Each manifest's checkpoint is built from zero-memory tensors: `torch.full((), i).expand(shape)` gives source key i
the constant value i at its full shape. diffusers' convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint /
convert_ldm_clip_checkpoint / convert_open_clip_checkpoint and our tables then convert the same dict; the key sets
must be equal, every shape equal, and every target must come from the same source key (its constant). The
fused OpenCLIP q/k/v projections get a distinct value per row (the order of q, k, v is what could go wrong).
Exact equality: a renaming and views cannot change a number. (Bit-identical values on real data: the slow
full-size tests in test_convert_full.py.)
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from ldm.config import FAMILIES
from tests.helpers import FIXTURES
from weights_convert.checkpoint import checkpoint_rules, detect_layout, ema_key
from weights_convert.convert import DictSource, convert_state_dict, verify
from weights_convert.unet_rules import unet_blocks

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

MANIFESTS = {"sd15": "sd15", "sd21-base": "sd21base", "sd21-v": "sd21v", "sd15-inpaint": "sd15_inpaint",
             "sd2-inpaint": "sd2_inpaint"}
XL_MANIFESTS = {"sdxl-base": "sdxl_base", "sdxl-refiner": "sdxl_refiner"}  # SDXL 1.0 (own tests below)


def manifest_checkpoint(family: str) -> dict[str, torch.Tensor]:
    name = MANIFESTS[family] if family in MANIFESTS else XL_MANIFESTS[family]
    keys = json.loads((FIXTURES / f"{name}_ldm_keys.json").read_text())["keys"]
    out = {}
    for i, (name, entry) in enumerate(sorted(keys.items())):
        dtype = getattr(torch, entry["dtype"])
        out[name] = torch.full((), i, dtype=dtype).expand(entry["shape"])
    for name in out:  # the fused attention projections: one value per row, so a wrong q/k/v order shows
        if name.endswith("in_proj_weight") or name.endswith("in_proj_bias"):
            shape = out[name].shape
            rows = torch.arange(shape[0], dtype=torch.float32) + 1000.0 * len(name)
            out[name] = rows.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, cheaply: constant (expanded) tensors compare one element, the others every element."""
    if a.shape != b.shape:
        return False
    if a.numel() and all(s == 0 for s in a.stride()) and all(s == 0 for s in b.stride()):
        return bool(a[(0,) * a.ndim] == b[(0,) * b.ndim])
    return torch.equal(a, b)


def diffusers_convert(family: str, ckpt: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    preset = FAMILIES[family]
    unet_cfg = {"layers_per_block": preset.unet.layers_per_block}
    vae_cfg = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    out = {"unet": single_file_utils.convert_ldm_unet_checkpoint(ckpt, unet_cfg),
           "vae": single_file_utils.convert_ldm_vae_checkpoint(ckpt, vae_cfg)}
    if preset.text.hidden_act == "quick_gelu":
        text = single_file_utils.convert_ldm_clip_checkpoint(ckpt)
        text.pop("text_model.embeddings.position_ids")  # a buffer; transformers 5 rebuilds it
    else:
        fake = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=preset.text.hidden_size))
        text = single_file_utils.convert_open_clip_checkpoint(fake, ckpt)
    out["text_encoder"] = text
    return out


@pytest.mark.parametrize("family", list(MANIFESTS))
def test_tables_match_diffusers_converter(family: str) -> None:
    ckpt = manifest_checkpoint(family)
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    layout = detect_layout(set(ckpt), shapes, family)
    rules = checkpoint_rules(FAMILIES[family], layout)
    ref = diffusers_convert(family, ckpt)
    expected = {c: {k: tuple(v.shape) for k, v in sd.items()} for c, sd in ref.items()}
    verify(rules, DictSource(ckpt, family), expected)  # complete, and every shape as diffusers makes it
    ours = convert_state_dict(rules, DictSource(ckpt, family))
    for component, ref_sd in ref.items():
        assert set(ours[component]) == set(ref_sd), component
        for key, ref_t in ref_sd.items():
            assert same(ours[component][key], ref_t), f"{component} {key}: comes from another source key"


def test_layout_detection() -> None:
    for family, manifest in MANIFESTS.items():
        ckpt = manifest_checkpoint(family)
        layout = detect_layout(set(ckpt), {k: tuple(v.shape) for k, v in ckpt.items()}, family)
        assert family in layout.candidates
        assert layout.generation == (2 if FAMILIES[family].text.hidden_act == "gelu" else 1)
        assert layout.inpainting == family.endswith("inpaint")
        assert not layout.has_ema


def test_ema_rules_pick_the_ema_copy() -> None:
    ckpt = manifest_checkpoint("sd15")
    unet_keys = [k for k in ckpt if k.startswith("model.diffusion_model.")]
    for k in unet_keys:  # a full file: LitEma's flattened copies next to the regular weights
        ckpt[ema_key(k)] = torch.full((), ckpt[k][(0,) * ckpt[k].ndim] + 0.5).expand(ckpt[k].shape)
    layout = detect_layout(set(ckpt), {k: tuple(v.shape) for k, v in ckpt.items()}, "full")
    assert layout.has_ema
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    regular = convert_state_dict(checkpoint_rules(FAMILIES["sd15"], layout), DictSource(ckpt))["unet"]
    ema = convert_state_dict(checkpoint_rules(FAMILIES["sd15"], layout, ema=True), DictSource(ckpt))["unet"]
    ref = single_file_utils.convert_ldm_unet_checkpoint(ckpt, {"layers_per_block": 2}, extract_ema=True)
    assert set(ema) == set(regular) == set(ref)
    for key in ref:
        assert same(ema[key], ref[key]), key
        assert ema[key][(0,) * ema[key].ndim] == regular[key][(0,) * ema[key].ndim] + 0.5, key


def test_unet_index_arithmetic_sd15() -> None:
    blocks = {src: dst for src, dst, _ in unet_blocks(FAMILIES["sd15"].unet)}
    assert blocks["input_blocks.4.0."] == "down_blocks.1.resnets.0."
    assert blocks["input_blocks.9.0.op."] == "down_blocks.2.downsamplers.0.conv."
    assert blocks["output_blocks.2.1.conv."] == "up_blocks.0.upsamplers.0.conv."  # no attention on the top level
    assert blocks["output_blocks.5.2.conv."] == "up_blocks.1.upsamplers.0.conv."
    assert blocks["output_blocks.11.1."] == "up_blocks.3.attentions.2."


@pytest.mark.parametrize("name, shape", [("copy", (3, 5)), ("conv1x1_to_linear", (8, 4, 1, 1)),
                                         ("split_qkv", (12, 4)), ("split_qkv", (12,))])
def test_transforms_shapes_and_inverse(name: str, shape: tuple[int, ...]) -> None:
    from weights_convert.transforms import TRANSFORMS, target_shapes

    x = torch.randn(shape)
    outs = TRANSFORMS[name].forward(x)
    assert len(outs) == TRANSFORMS[name].arity
    assert tuple(tuple(o.shape) for o in outs) == target_shapes(name, shape)
    assert torch.equal(TRANSFORMS[name].inverse(outs), x)
    assert all(o.data_ptr() >= x.data_ptr() and o.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
               for o in outs), "transforms are views: no copy"
    assert target_shapes("conv1x1_to_linear", (8, 4, 3, 3)) is None and target_shapes("split_qkv", (10, 4)) is None


@pytest.mark.parametrize("family", list(XL_MANIFESTS))
def test_sdxl_tables_match_diffusers_converter(family: str) -> None:
    """The SDXL 1.0 files (every official key and shape): our tables against diffusers' converter, part by part."""
    ckpt = manifest_checkpoint(family)
    layout = detect_layout(set(ckpt), {k: tuple(v.shape) for k, v in ckpt.items()}, family)
    assert layout.candidates == (family,) and layout.generation == 3
    preset = FAMILIES[family]
    unet_cfg = {"layers_per_block": preset.unet.layers_per_block, "addition_embed_type": "text_time"}
    vae_cfg = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    ref = {"unet": single_file_utils.convert_ldm_unet_checkpoint(ckpt, unet_cfg),
           "vae": single_file_utils.convert_ldm_vae_checkpoint(ckpt, vae_cfg)}
    if preset.text is not None:
        ref["text_encoder"] = single_file_utils.convert_ldm_clip_checkpoint(ckpt)
        ref["text_encoder"].pop("text_model.embeddings.position_ids")  # a buffer; transformers 5 rebuilds it
    fake = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=preset.text_encoder_2.hidden_size))
    ref["text_encoder_2"] = single_file_utils.convert_open_clip_checkpoint(fake, ckpt, prefix=layout.clip2_prefix)
    rules = checkpoint_rules(preset, layout)
    expected = {c: {k: tuple(v.shape) for k, v in sd.items()} for c, sd in ref.items()}
    verify(rules, DictSource(ckpt, family), expected)  # complete, and every shape as diffusers makes it
    ours = convert_state_dict(rules, DictSource(ckpt, family))
    assert set(ours) == set(ref)
    for component, ref_sd in ref.items():
        assert set(ours[component]) == set(ref_sd), component
        for key, ref_t in ref_sd.items():
            assert same(ours[component][key], ref_t), f"{component} {key}: comes from another source key"
    assert len(ref["text_encoder_2"]) == 2 + 32 * 16 + 2 + 1  # every bigG layer kept, with its projection head
