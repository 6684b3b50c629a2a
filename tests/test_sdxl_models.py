"""SDXL's model options: configs read from diffusers' SDXL configs, the presets, parameter counts at full shape, and
tiny-config parity of the UNet (text_time embedding, mixed transformer depths, a level without attention) and of
CLIPTextModelWithProjection with the references.

Parity method as in test_unet.py / test_clip.py: build the reference with trained-like random weights, load its state
dict into ours with strict=True (the keys are the same), run both on the same inputs. Tolerance: the contract's 1e-5
relative error in fp32 (both run the same ops; a wrong time_ids embedding or a missing transformer block gives errors
of order 1e-1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from diffusers import AutoencoderKL as RefVAE
from diffusers import UNet2DConditionModel as RefUNet

import ldm
from ldm.clip import CLIPTextModel, CLIPTextModelWithProjection
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
from ldm.unet import UNet2DConditionModel
from ldm.vae import AutoencoderKL
from tests.helpers import assert_rel, diffusers_config, load_json, FIXTURES, trained_like_

TOL = 1e-5  # the parity contract for components in fp32
XL = {"sdxl-base": ldm.SDXL_BASE, "sdxl-refiner": ldm.SDXL_REFINER}

# ---------------------------------------------------------------------------------------------------------------
# Configs and presets


@pytest.mark.parametrize("name", list(XL))
def test_presets_equal_diffusers_configs(name: str) -> None:
    preset = XL[name]
    assert UNetConfig.from_diffusers(diffusers_config(name, "unet")) == preset.unet
    assert VAEConfig.from_diffusers(diffusers_config(name, "vae")) == preset.vae
    assert CLIPTextConfig.from_transformers(diffusers_config(name, "text_encoder_2")) == preset.text_encoder_2
    if name == "sdxl-base":
        assert CLIPTextConfig.from_transformers(diffusers_config(name, "text_encoder")) == preset.text
    else:
        assert preset.text is None and not (FIXTURES / "diffusers_configs" / name / "text_encoder").exists()
    scheduler = diffusers_config(name, "scheduler")
    assert preset.scheduler == {k: v for k, v in scheduler.items() if not k.startswith("_") or k == "_class_name"}
    assert preset.vae.scaling_factor == 0.13025 and preset.vae.force_upcast and preset.native_size == 1024
    assert preset.pad_token_2 == "!" and ldm.config.family(name) is preset


def test_sd_presets_have_no_second_encoder() -> None:
    for preset in (ldm.SD15, ldm.SD21_BASE, ldm.SD21_V, ldm.SD15_INPAINT, ldm.SD2_INPAINT, ldm.X4_UPSCALER):
        assert preset.text_encoder_2 is None and preset.pad_token_2 is None
        assert preset.unet.transformer_layers_per_block == 1
        assert preset.unet.transformer_depths == (1,) * len(preset.unet.block_out_channels)
        assert preset.unet.addition_embed_type is None


@pytest.mark.parametrize("bad, match", [
    (dict(addition_embed_type="text"), r"addition_embed_type 'text' is not supported"),
    (dict(addition_embed_type="text_time", projection_class_embeddings_input_dim=None),
     r"projection_class_embeddings_input_dim must be a positive int, got None"),
    (dict(addition_embed_type=None), r"addition_time_embed_dim = 256 is only used with addition_embed_type"),
    (dict(transformer_layers_per_block=(1, 2)),
     r"transformer_layers_per_block has 2 entries, block_out_channels has 3"),
    (dict(transformer_layers_per_block=(1, 0, 2)), r"transformer_layers_per_block must be a positive int, got 0"),
    (dict(transformer_layers_per_block="2"), r"transformer_layers_per_block must be an int or a list of ints"),
])
def test_bad_sdxl_options_raise(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ldm.SDXL_BASE.unet, **bad)


def test_uniform_depth_stays_an_int_so_variants_derive_by_replace() -> None:
    assert UNetConfig(transformer_layers_per_block=(2, 2, 2, 2)).transformer_layers_per_block == 2
    assert ldm.SDXL_REFINER.unet.transformer_layers_per_block == 4  # diffusers' config says 4
    assert ldm.SDXL_REFINER.unet.transformer_depths == (4, 4, 4, 4)
    assert ldm.SDXL_BASE.unet.transformer_depths == (1, 2, 10)
    tiny = dataclasses.replace(ldm.SD15.unet, block_out_channels=(32, 64), cross_attention_levels=(True, False),
                               num_heads=(2, 4), only_cross_attention=False)  # as tests and docs derive tiny UNets
    assert tiny.transformer_depths == (1, 1)
    assert UNetConfig.from_diffusers(ldm.SDXL_REFINER.unet.to_diffusers()) == ldm.SDXL_REFINER.unet


def test_reader_rejects_asymmetric_depths() -> None:
    d = diffusers_config("sdxl-base", "unet") | {"reverse_transformer_layers_per_block": [[10, 10, 10], [2, 2, 2],
                                                                                          [1, 1, 1]]}
    with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
        UNetConfig.from_diffusers(d)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts and keys at full shape, against the references built on the meta device


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, expected", [("sdxl-base", 2_567_463_684), ("sdxl-refiner", 2_259_526_660)])
def test_unet_parameter_count_and_keys_match_diffusers(name: str, expected: int) -> None:
    with torch.device("meta"):
        ours = UNet2DConditionModel(XL[name].unet)
        ref = RefUNet.from_config(diffusers_config(name, "unet"))
    assert _count(ours) == _count(ref) == expected
    assert _shapes(ours) == _shapes(ref)


def test_text_encoders_and_vae_parameter_counts_and_keys_match_references() -> None:
    manifest = load_json(FIXTURES / "sdxl_base_ldm_keys.json")["param_counts"]
    pairs = [
        (CLIPTextModel, "text_encoder", transformers.CLIPTextModel, ldm.SDXL_BASE.text, 123_060_480),
        (CLIPTextModelWithProjection, "text_encoder_2", transformers.CLIPTextModelWithProjection,
         ldm.SDXL_BASE.text_encoder_2, 694_659_840),  # the file's 694,659,841 holds OpenCLIP's logit_scale too
    ]
    for ours_cls, sub, ref_cls, cfg, expected in pairs:
        ref_cfg = transformers.CLIPTextConfig(**diffusers_config("sdxl-base", sub))
        with torch.device("meta"):
            ours, ref = ours_cls(cfg), ref_cls(ref_cfg)
        assert _count(ours) == _count(ref) == expected, sub
        ref_keys = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: s
                    for k, s in _shapes(ref).items() if not k.endswith("position_ids")}  # 5.x: unprefixed
        assert _shapes(ours) == ref_keys, sub
    with torch.device("meta"):
        vae, ref_vae = AutoencoderKL(ldm.SDXL_BASE.vae), RefVAE.from_config(diffusers_config("sdxl-base", "vae"))
    assert _count(vae) == _count(ref_vae) == 83_653_863 and _shapes(vae) == _shapes(ref_vae)
    assert manifest["text_encoder"] == 123_060_480 and manifest["vae"] == 83_653_863


# ---------------------------------------------------------------------------------------------------------------
# Tiny parity: UNet with text_time, depths (1, 2), a first level without attention


_TINY_XL = UNetConfig(block_out_channels=(32, 64, 64), cross_attention_levels=(False, True, True), num_heads=(2, 2, 4),
                      transformer_layers_per_block=(1, 2, 3), cross_attention_dim=48, norm_num_groups=8,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=24 + 6 * 8, sample_size=None)
_TINY_REFINER = UNetConfig(block_out_channels=(32, 64), cross_attention_levels=(True, False), num_heads=(2, 4),
                           transformer_layers_per_block=2, cross_attention_dim=40, norm_num_groups=8,
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=6,
                           projection_class_embeddings_input_dim=40 + 5 * 6, sample_size=None)


def _pair(cfg: UNetConfig, seed: int = 0) -> tuple[UNet2DConditionModel, RefUNet]:
    ref = trained_like_(RefUNet.from_config(cfg.to_diffusers()), seed=seed).eval()
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(cfg: UNetConfig, batch: int, pooled: int, n_ids: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    # time_ids as SDXL uses them: sizes in pixels and crop offsets (refiner: an aesthetic score), not defaults
    ids = torch.tensor([[1024.0, 768.0, 32.0, 0.0, 896.0, 1152.0][:n_ids - 1] + [6.0 if n_ids == 5 else 1152.0]])
    ids = ids.repeat(batch, 1) + torch.arange(batch)[:, None] * 64.0
    added = {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": ids}
    return x, ctx, added


@pytest.mark.parametrize("cfg, pooled, n_ids", [(_TINY_XL, 24, 6), (_TINY_REFINER, 40, 5)], ids=["base", "refiner"])
@torch.no_grad()
def test_tiny_text_time_parity(cfg: UNetConfig, pooled: int, n_ids: int) -> None:
    ours, ref = _pair(cfg)
    x, ctx, added = _inputs(cfg, 2, pooled, n_ids)
    t = torch.tensor([999, 421])
    expected = ref(x, t, ctx, added_cond_kwargs=added).sample
    assert_rel(ours(x, t, ctx, added_cond_kwargs=added), expected, TOL, "UNet text_time")
    # the micro-conditioning matters: other time_ids change the output by far more than the tolerance
    other = dict(added, time_ids=added["time_ids"] + 128.0)
    assert (ours(x, t, ctx, added_cond_kwargs=other) - expected).norm() / expected.norm() > 1e-3
    # text_embeds in fp16 with an fp32 model: diffusers promotes the concatenation, it does not round the sinusoids
    half = dict(added, text_embeds=added["text_embeds"].half())
    assert_rel(ours(x, t, ctx, added_cond_kwargs=half), ref(x, t, ctx, added_cond_kwargs=half).sample, TOL, "fp16")
    depths = [len(a.transformer_blocks) for block in ours.down_blocks for a in block.attentions]
    assert depths == [d for d, a in zip(cfg.transformer_depths, cfg.cross_attention_levels) if a
                      for _ in range(cfg.layers_per_block)]


@pytest.mark.cuda
@torch.no_grad()
def test_fp16_cuda_text_time_parity() -> None:
    """fp16 on CUDA: within the contract's 1e-2 relative of diffusers fp16 on the same weights (fused fp16 kernels
    round differently, so not the fp32 tolerance)."""
    ours, ref = _pair(_TINY_XL)
    ours, ref = ours.to("cuda", torch.float16), ref.to("cuda", torch.float16)
    x, ctx, added = _inputs(_TINY_XL, 2, 24, 6)
    x, ctx = x.to("cuda", torch.float16), ctx.to("cuda", torch.float16)
    added = {k: v.to("cuda", torch.float16) for k, v in added.items()}
    out = ours(x, torch.tensor([999, 421]), ctx, added_cond_kwargs=added)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_rel(out, ref(x, torch.tensor([999, 421]), ctx, added_cond_kwargs=added).sample, 1e-2, "UNet fp16")


@pytest.mark.parametrize("added, match", [
    (None, r"needs added_cond_kwargs with 'text_embeds' and 'time_ids'"),
    ({"text_embeds": torch.zeros(1, 24)}, r"needs added_cond_kwargs with 'time_ids'"),
    ({"text_embeds": torch.zeros(1, 24), "time_ids": torch.zeros(1, 5)}, r"= 64, expected "
                                                                          r"projection_class_embeddings_input_dim=72"),
    ({"text_embeds": torch.zeros(2, 24), "time_ids": torch.zeros(1, 6)}, r"'text_embeds'\] must be a float tensor "
                                                                         r"\(B=1, n\), got \(2, 24\)"),
    ({"text_embeds": torch.zeros(1, 24), "time_ids": torch.zeros(1, 6), "extra": 1}, r"unknown added_cond_kwargs"),
])
def test_missing_or_bad_added_cond_raise(added: dict | None, match: str) -> None:
    unet = UNet2DConditionModel(_TINY_XL)
    with pytest.raises(ValueError, match=match):
        unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 7, 48), added_cond_kwargs=added)


def test_added_cond_on_a_plain_unet_raises() -> None:
    unet = UNet2DConditionModel(dataclasses.replace(_TINY_XL, addition_embed_type=None, addition_time_embed_dim=None,
                                                    projection_class_embeddings_input_dim=None))
    assert unet.add_embedding is None
    with pytest.raises(ValueError, match="no added conditioning"):
        unet(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 7, 48),
             added_cond_kwargs={"text_embeds": torch.zeros(1, 24), "time_ids": torch.zeros(1, 6)})


# ---------------------------------------------------------------------------------------------------------------
# CLIPTextModelWithProjection against transformers


_BIGG_TINY = dict(vocab_size=49408, hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=24, bos_token_id=0, eos_token_id=2,
                  pad_token_id=1)


@torch.no_grad()
def test_clip_with_projection_parity() -> None:
    ref = trained_like_(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**_BIGG_TINY)),
                        seed=3).eval()
    ours = CLIPTextModelWithProjection(CLIPTextConfig.from_transformers(_BIGG_TINY)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # transformers 5.x's keys (text_model.*, text_projection)
    assert set(ours.state_dict()) >= {"text_projection.weight", "text_model.final_layer_norm.weight"}
    assert ours.text_projection.bias is None
    ids = torch.tensor([[49406, 320, 1929, 3309, 49407] + [0] * 72, [49406, 1125, 539, 49407] + [0] * 73])
    got, expected = ours(ids), ref(ids, output_hidden_states=True)
    assert_rel(got.text_embeds, expected.text_embeds, TOL, "text_embeds")
    assert_rel(got.last_hidden_state, expected.last_hidden_state, TOL, "last_hidden_state")
    assert len(got.hidden_states) == len(expected.hidden_states) == 4
    assert_rel(got.hidden_states[-2], expected.hidden_states[-2], TOL, "penultimate hidden state")
    assert got.text_embeds.shape == (2, 24)
    assert CLIPTextModel(ours.config)(ids).text_embeds is None  # the plain model has no head


# ---------------------------------------------------------------------------------------------------------------
# `ldm inspect sdxl-base` (the docs page quotes it)


def test_inspect_lists_both_encoders_and_the_refiners_one() -> None:
    from ldm.summary import inspect_model

    base = inspect_model("sdxl-base", size=256, depth=1)
    assert list(base) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert [base[c].total_params for c in base] == [123_060_480, 694_659_840, 2_567_463_684, 83_653_863]
    assert base["unet"].row("add_embedding").input_shape == (1, 2816)
    assert base["text_encoder_2"].row("text_projection").output_shape == (1, 1280)
    refiner = inspect_model("sdxl-refiner", size=256, depth=1, components=("text_encoder", "unet"))
    assert list(refiner) == ["unet"] and refiner["unet"].row("add_embedding").input_shape == (1, 2560)
