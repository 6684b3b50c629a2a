"""Configs: the reference's config.json dicts read loudly, presets equal to the shipped configs."""

import dataclasses
import inspect

import diffusers
import pytest
import transformers

import ldm
from ldm.config import FAMILIES, family
from tests.helpers import diffusers_config

SHIPPED = {"sd15": ldm.SD15, "sd21": ldm.SD21_V, "sd21base": ldm.SD21_BASE, "sd15-inpaint": ldm.SD15_INPAINT,
           "sd2-inpaint": ldm.SD2_INPAINT}


@pytest.mark.parametrize("folder", sorted(SHIPPED))
def test_presets_equal_the_shipped_configs(folder):
    preset = SHIPPED[folder]
    assert ldm.UNetConfig.from_diffusers(diffusers_config(folder, "unet")) == preset.unet
    assert ldm.VAEConfig.from_diffusers(diffusers_config(folder, "vae")) == preset.vae
    assert ldm.CLIPTextConfig.from_transformers(diffusers_config(folder, "text_encoder")) == preset.text
    shipped = diffusers_config(folder, "scheduler")
    assert shipped.get("prediction_type", "epsilon") == preset.prediction_type  # diffusers' default is epsilon
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "set_alpha_to_one"):
        assert shipped[key] == preset.scheduler[key], key
    assert shipped["_class_name"] == preset.scheduler_class


def test_family_facts():
    assert ldm.SD15.unet.num_heads == (8, 8, 8, 8) and not ldm.SD15.unet.use_linear_projection
    assert ldm.SD21_BASE.unet.num_heads == (5, 10, 20, 20) and ldm.SD21_BASE.unet.use_linear_projection
    assert ldm.SD21_V.unet.upcast_attention and not ldm.SD21_BASE.unet.upcast_attention
    assert ldm.SD21_V.prediction_type == "v_prediction" and ldm.SD21_BASE.prediction_type == "epsilon"
    assert ldm.SD15.text.hidden_act == "quick_gelu" and ldm.SD21_V.text.hidden_act == "gelu"
    assert ldm.SD21_V.text.num_hidden_layers == 23 and ldm.SD21_V.text.hidden_size == 1024
    assert (ldm.SD15.pad_token, ldm.SD21_V.pad_token) == ("<|endoftext|>", "!")
    assert (ldm.SD15.native_size, ldm.SD21_BASE.native_size, ldm.SD21_V.native_size) == (512, 512, 768)
    assert ldm.SD15_INPAINT.unet.in_channels == 9 and ldm.SD2_INPAINT.unet.in_channels == 9
    assert set(FAMILIES) == {"sd15", "sd21-base", "sd21-v", "sd15-inpaint", "sd2-inpaint", "x4-upscaler",
                             "sdxl-base", "sdxl-refiner"}
    assert ldm.SDXL_BASE.unet.transformer_layers_per_block == (1, 2, 10) and ldm.SDXL_REFINER.text is None
    assert ldm.SDXL_BASE.text_encoder_2.num_hidden_layers == 32 and ldm.SDXL_BASE.vae.scaling_factor == 0.13025


def test_presets_are_frozen_and_scheduler_dict_is_a_copy():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ldm.SD15.unet.in_channels = 9
    d = ldm.SD15.scheduler
    d["beta_end"] = 1.0
    assert ldm.SD15.scheduler["beta_end"] == 0.012


def test_every_reference_key_is_accepted():
    """Every __init__ argument of the reference classes, at its default value, reads without error."""
    for cls, ours in ((diffusers.AutoencoderKL, ldm.VAEConfig), (diffusers.UNet2DConditionModel, ldm.UNetConfig)):
        d = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
        if ours is ldm.UNetConfig:  # diffusers' defaults: cross_attention_dim 1280, heads 8
            cfg = ours.from_diffusers(d)
            assert cfg.cross_attention_dim == 1280 and cfg.num_heads == (8, 8, 8, 8)
        else:
            assert ours.from_diffusers(d).block_out_channels == (64,)
    d = transformers.CLIPTextConfig().to_dict()
    cfg = ldm.CLIPTextConfig.from_transformers(d)
    assert cfg.hidden_size == transformers.CLIPTextConfig().hidden_size
    assert cfg.eos_token_id == transformers.CLIPTextConfig().eos_token_id


@pytest.mark.parametrize("reader, d, key", [
    (ldm.UNetConfig.from_diffusers, {"class_embed_type": "timestep"}, "class_embed_type"),
    (ldm.UNetConfig.from_diffusers, {"class_embeddings_concat": True}, "class_embeddings_concat"),
    (ldm.UNetConfig.from_diffusers, {"only_cross_attention": [True, False]}, "only_cross_attention"),
    (ldm.UNetConfig.from_diffusers, {"down_block_types": ["DownBlock2D", "AttnDownBlock2D"]}, "down_block_types"),
    (ldm.UNetConfig.from_diffusers, {"up_block_types": ["UpBlock2D"] * 4}, "up_block_types"),
    (ldm.UNetConfig.from_diffusers, {"no_such_key": 1}, "no_such_key"),
    (ldm.VAEConfig.from_diffusers, {"shift_factor": 0.1}, "shift_factor"),
    (ldm.VAEConfig.from_diffusers, {"act_fn": "gelu"}, "act_fn"),
    (ldm.VAEConfig.from_diffusers, {"block_out_channels": [64, 64]}, "down_block_types"),
    (ldm.CLIPTextConfig.from_transformers, {"hidden_act": "relu"}, "hidden_act"),
    (ldm.CLIPTextConfig.from_transformers, {"attention_dropout": 0.1}, "attention_dropout"),
    (ldm.CLIPTextConfig.from_transformers, {"bogus": 1}, "bogus"),
])
def test_unsupported_or_unknown_keys_name_the_key(reader, d, key):
    with pytest.raises(ValueError, match=key):
        reader(d)


def test_bookkeeping_keys_are_ignored():
    d = {**diffusers_config("sd15", "unet"), "_anything": object()}
    assert ldm.UNetConfig.from_diffusers(d) == ldm.SD15.unet


@pytest.mark.parametrize("make, match", [
    (lambda: ldm.UNetConfig(block_out_channels=(32, 64), num_heads=(3, 3), cross_attention_levels=(True, False)),
     "not divisible by its num_heads 3"),
    (lambda: ldm.UNetConfig(block_out_channels=(48, 64), num_heads=2, norm_num_groups=32,
                            cross_attention_levels=(True, False)), "norm_num_groups 32"),
    (lambda: ldm.UNetConfig(block_out_channels=(32, 64), num_heads=2), "cross_attention_levels has 4 entries"),
    (lambda: ldm.UNetConfig.with_head_dim(48), "head_dim 48"),
    (lambda: ldm.CLIPTextConfig(hidden_size=100, num_attention_heads=12), "num_attention_heads 12"),
    (lambda: ldm.VAEConfig(block_out_channels=(30,), norm_num_groups=32), "norm_num_groups 32"),
    (lambda: ldm.VAEConfig(layers_per_block=0), "layers_per_block"),
])
def test_widths_and_heads_that_do_not_divide(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_head_dim_constructor_and_family_lookup():
    cfg = ldm.UNetConfig.with_head_dim(64, block_out_channels=(320, 640, 1280, 1280))
    assert cfg.num_heads == (5, 10, 20, 20)
    assert family("sd21-v") is ldm.SD21_V
    with pytest.raises(ValueError, match="unknown family 'sd3'"):
        family("sd3")


@pytest.mark.parametrize("preset", list(FAMILIES.values()), ids=list(FAMILIES))
def test_to_diffusers_round_trips_and_diffusers_builds_it(preset):
    """to_diffusers()/to_transformers() are from_*'s inverses, and the references accept what they write."""
    assert ldm.UNetConfig.from_diffusers(preset.unet.to_diffusers()) == preset.unet
    assert ldm.VAEConfig.from_diffusers(preset.vae.to_diffusers()) == preset.vae
    for text in (preset.text, preset.text_encoder_2):
        if text is not None:
            assert ldm.CLIPTextConfig.from_transformers(text.to_transformers()) == text
    for cls, d in ((diffusers.UNet2DConditionModel, preset.unet.to_diffusers()),
                   (diffusers.AutoencoderKL, preset.vae.to_diffusers())):
        init, unused = cls.extract_init_dict(d)[:2]  # what diffusers' from_config would pass to __init__
        assert not unused and {k for k in d if not k.startswith("_")} <= set(init), cls.__name__
    text = preset.text or preset.text_encoder_2
    assert transformers.CLIPTextConfig(**text.to_transformers()).hidden_act == text.hidden_act
