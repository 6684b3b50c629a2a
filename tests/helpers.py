"""Shared test utilities: relative error, trained-like random weights, fixture paths, and the builders several test
modules use (the tiny pipeline and its reference kwargs, tiny family presets). Test modules import from here, never
from each other; shared fixtures live in conftest.py."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import ldm
from ldm.clip import CLIPTextModel
from ldm.config import SD15, SD21_BASE, CLIPTextConfig, UNetConfig, VAEConfig
from ldm.pipeline import StableDiffusionPipeline
from ldm.schedulers import DDIMScheduler
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet2DConditionModel
from ldm.vae import AutoencoderKL

FIXTURES = Path(__file__).parent / "fixtures"
DIFFUSERS_CONFIGS = FIXTURES / "diffusers_configs"
TOKENIZER_DIR = FIXTURES / "clip_tokenizer"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    if ours.shape != ref.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(ours, ref)
    assert math.isfinite(err) and err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@torch.no_grad()
def trained_like_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill a module with random weights that scale like trained ones (DESIGN.md's parity contract).

    N(0, 1) weights saturate every softmax and hide errors; here linear/conv weights get std 1/sqrt(fan_in),
    embeddings std 0.02, norm weights 1 + small noise, biases small noise.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1 and ("norm" in name or "ln" in name or name.endswith("gamma")):
            value = 1.0 + 0.05 * noise if name.endswith("weight") else 0.02 * noise
        elif p.ndim == 1:
            value = 0.02 * noise
        elif "embedding" in name:
            value = 0.02 * noise
        else:
            fan_in = p[0].numel()
            value = noise / math.sqrt(fan_in)
        p.copy_(value.to(p.dtype))
    return module


def load_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def diffusers_config(family: str, component: str) -> dict:
    """The shipped config.json of a component ('unet', 'vae', 'text_encoder') or the scheduler config."""
    folder = DIFFUSERS_CONFIGS / family / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return load_json(folder / name)


# ----------------------------------------------------------------------------------------------------------------
# The tiny SD 1.x pipeline of the pipeline tests: diffusers components with trained-like weights, ours holding the
# same weights (the `tiny` fixture in conftest.py builds them)


LATENT_TOL = 1e-4  # the contract for final latents (see the module docstring)


SIZE = 64  # px: 8x8 latents


PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]


NEGATIVES = ["blurry", "low quality, jpeg artefacts"]


UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32)


VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE)


CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)


def assert_images_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """Float images in [0, 1] as uint8: at most 1 level apart, on at most 0.1% of the values."""
    a, b = (ours * 255).round().astype(np.int16), (ref * 255).round().astype(np.int16)
    assert a.shape == b.shape, f"image shapes differ: {a.shape} vs {b.shape}"
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, \
        f"images differ: max {diff.max()} levels, {(diff > 0).mean():.2e} of values differ"


def ref_scheduler(name: str, config: dict):
    import diffusers

    classes = {"ddim": "DDIMScheduler", "lms": "LMSDiscreteScheduler", "pndm": "PNDMScheduler",
               "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
               "dpm++2m": "DPMSolverMultistepScheduler", "dpm++2m-karras": "DPMSolverMultistepScheduler"}
    extra = {"use_karras_sigmas": True} if name == "dpm++2m-karras" else {}
    return getattr(diffusers, classes[name]).from_config(config, **extra)


def pipelines(tiny, scheduler: str = "pndm", inpainting: bool = False, kind: str = "txt2img"):
    """(diffusers pipeline, ours) on the tiny weights with the named scheduler."""
    import diffusers

    ref_unet, unet = tiny.unet9 if inpainting else tiny.unet
    config = tiny.scheduler_config
    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    ref = cls(unet=ref_unet, vae=tiny.vae[0], text_encoder=tiny.text[0], tokenizer=tiny.tokenizer[0],
              scheduler=ref_scheduler(scheduler, config), safety_checker=None, feature_extractor=None,
              requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    family = dataclasses.replace(ldm.SD15_INPAINT if inpainting else ldm.SD15, unet=unet.config,
                                 vae=tiny.vae[1].config, text=tiny.text[1].config, native_size=SIZE)
    ours = ldm.StableDiffusionPipeline(unet=unet, vae=tiny.vae[1], text_encoder=tiny.text[1],
                                       tokenizer=tiny.tokenizer[1],
                                       scheduler=ldm.schedulers.from_name(scheduler, config), family=family)
    return ref, ours


def run_ref(ref, *args, seed: int, n_images: int, **kw):
    """diffusers with seed S as generator=[manual_seed(S + i)]; returns (float images, final latents)."""
    captured = {}

    def keep(pipe, i, t, tensors):
        captured["latents"] = tensors["latents"]
        return tensors

    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n_images)]
    out = ref(*args, generator=gens, output_type="np", callback_on_step_end=keep, **kw)
    return out.images, captured["latents"]


def picture(seed: int, size: int = SIZE) -> Image.Image:
    """A smooth random RGB picture (a photo-like input for img2img)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def disc_mask(size: int = SIZE) -> Image.Image:
    """White disc (repaint) on black (keep)."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2
    return Image.fromarray((inside * 255).astype(np.uint8))


def save_tiny_model_folder(folder: Path) -> Path:
    """The tiny SD 1.x model (random, trained-like weights) saved by diffusers in its model-folder layout: what
    `ldm.load_pipeline` and `ldm generate --model` read. With transformers 5 the tokenizer folder holds only
    tokenizer.json (no vocab.json / merges.txt), as fine-tunes saved by today's tools do."""
    import diffusers
    from transformers import CLIPTextConfig as RefCLIPTextConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = diffusers.StableDiffusionPipeline(
        unet=trained_like_(diffusers.UNet2DConditionModel(**UNET), seed=1),
        vae=trained_like_(diffusers.AutoencoderKL(**VAE), seed=2),
        text_encoder=trained_like_(CLIPTextModel(RefCLIPTextConfig(**CLIP)), seed=3),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR / "sd15"),
        scheduler=diffusers.PNDMScheduler.from_config(diffusers_config("sd15", "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    assert (folder / "tokenizer" / "tokenizer.json").is_file() and not (folder / "tokenizer" / "vocab.json").exists()
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Tiny family presets for the converter: synthetic single files are written from these shapes


TINY_UNET = UNetConfig(block_out_channels=(32, 64), cross_attention_levels=(True, False), layers_per_block=1,
                       num_heads=(2, 2), cross_attention_dim=32, norm_num_groups=8, sample_size=8)


TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)


TINY_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


TINY_SD1 = replace(SD15, unet=TINY_UNET, vae=TINY_VAE, text=TINY_CLIP)


TINY_SD2 = replace(SD21_BASE, unet=replace(TINY_UNET, use_linear_projection=True),
                   vae=TINY_VAE, text=replace(TINY_CLIP, hidden_act="gelu", num_hidden_layers=2))


# ----------------------------------------------------------------------------------------------------------------
# Reference constructor arguments


def reference_kwargs(cfg: VAEConfig) -> dict:
    """diffusers AutoencoderKL constructor arguments for our config."""
    n = len(cfg.block_out_channels)
    names = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
             "norm_num_groups", "scaling_factor", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
    return {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
            **{name: getattr(cfg, name) for name in names}}


# ----------------------------------------------------------------------------------------------------------------
# A tiny pipeline of our own modules (no reference), for the research and prompt tests


def tiny_pipeline(tok: CLIPTokenizer) -> StableDiffusionPipeline:
    """Our own modules at tiny sizes with trained-like weights, the real tokenizer, DDIM."""
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    unet = UNetConfig(block_out_channels=(32, 64), cross_attention_levels=(True, True), num_heads=(2, 2),
                      cross_attention_dim=32, norm_num_groups=8, sample_size=None)
    vae = VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8)
    return StableDiffusionPipeline(
        unet=trained_like_(UNet2DConditionModel(unet), seed=1).eval(),
        vae=trained_like_(AutoencoderKL(vae), seed=2).eval(),
        text_encoder=trained_like_(CLIPTextModel(text), seed=3).eval(),
        tokenizer=tok, scheduler=DDIMScheduler.from_config(SD15.scheduler), family=SD15)


# The tokenizer tests' hard prompts (whitespace, unicode, specials, long texts), reused where ids are compared
HARD_PROMPTS = [
    "a dog wearing hat",
    "",
    " ",
    "A Photograph of an ASTRONAUT riding a horse, 4K, HDR, trending on ArtStation",
    "hello, world! what's up? it'll be fine; they're here, we've won, I'm done, you'd see",
    "don't won't can't isn't SHE'S",
    "numbers 1234567 3.14159 -42 1e10 2024-11-23 #1 $5 50% 1/2",
    "punctuation !!! ??? ... --- ((masterpiece)), [best quality:1.2], {a|b}, <lora:x:0.8>",
    "café naïve résumé Ångström Zürich façade coöperate",
    "Cafe\u0301 (combining accent, NFC makes it café)",
    "emoji 🐶🐱 👩‍🚀 🚀✨ ❤️",
    "CJK 東京の夜景 北京 서울 の猫",
    "Ελληνικά кириллица עברית العربية हिन्दी ไทย",
    "runs   of  spaces\tand\ttabs\nand\nnewlines\r\n\u00a0nbsp\u2003em-space   ",
    "  leading and trailing whitespace  ",
    "<|startoftext|>special<|endoftext|> tokens in the text <|ENDOFTEXT|>",
    "snake_case camelCase kebab-case dots.and.more @mention #hashtag http://example.com/a?b=c",
    "a " * 100,
    "an extremely detailed " + "and very long prompt with many different words " * 12 + "END",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "\x00\x07 control chars \u200b zero width \ufeff bom",
]


# ----------------------------------------------------------------------------------------------------------------
# The tiny x4 upscaler (tests/test_upscale.py, tests/test_upscale_cli.py): 16 px in, 64 px out

X4_UNET = dict(sample_size=16, in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 2, 4), norm_num_groups=32, num_class_embeds=1000,
            only_cross_attention=[True, True, False], use_linear_projection=True)
X4_VAE = dict(block_out_channels=(32, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
           scaling_factor=0.08333)
X4_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)


def x4_low_res_picture(seed: int, size: int = 16) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def tiny_x4_manifest(family) -> dict:
    """The x4 single-file layout at the tiny sizes: our tables run backwards, plus the low_scale_model buffers."""
    from tests.synth import tiny_ldm_manifest
    from weights_convert.checkpoint import LOW_SCALE_BUFFERS

    m = tiny_ldm_manifest(family)
    m["keys"].update({name: {"shape": [1000], "dtype": "float32"} for name in LOW_SCALE_BUFFERS})
    m["keys"] = dict(sorted(m["keys"].items()))
    m["schedule_buffer_values_reference"] = load_json(FIXTURES / "x4_upscaler_ldm_keys.json")[
        "schedule_buffer_values_reference"]
    return m


# ----------------------------------------------------------------------------------------------------------------
# Tiny SDXL presets (the official layouts at small sizes) and a diffusers config folder for them: CLIP-L and bigG
# of different widths (diffusers tells the two encoders of a file apart by width), the first level without
# attention, transformer depths 1 and 2, bigG's projection narrower than its width (a transposed head shows).

TINY_XL_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_XL_BIGG = CLIPTextConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=3, num_attention_heads=5,
                              hidden_act="gelu", projection_dim=24)
TINY_XL_UNET = UNetConfig(block_out_channels=(32, 64, 64), cross_attention_levels=(False, True, True),
                          num_heads=(2, 2, 4), transformer_layers_per_block=(1, 1, 2), layers_per_block=1,
                          cross_attention_dim=32 + 40, norm_num_groups=8, use_linear_projection=True,
                          addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=24 + 6 * 8, sample_size=8)
TINY_XL_BASE = replace(ldm.config.SDXL_BASE, unet=TINY_XL_UNET, vae=replace(TINY_VAE, scaling_factor=0.13025),
                       text=TINY_XL_CLIP, text_encoder_2=TINY_XL_BIGG)
TINY_XL_REFINER = replace(ldm.config.SDXL_REFINER, unet=UNetConfig(
    block_out_channels=(32, 64, 64, 64), cross_attention_levels=(False, True, True, False), num_heads=(2, 2, 4, 4),
    transformer_layers_per_block=2, layers_per_block=1, cross_attention_dim=40, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 5 * 8, sample_size=8), vae=TINY_XL_BASE.vae, text=None,
    text_encoder_2=TINY_XL_BIGG)


def write_xl_configs(preset, folder: Path) -> Path:  # preset: ldm.config.FamilyPreset (SDXL)
    """A diffusers SDXL folder without weights (configs, scheduler, tokenizers, model_index.json) for a preset:
    diffusers' from_single_file(config=folder) and create_diffusers_clip_model_from_ldm read it offline."""
    import shutil

    shipped = DIFFUSERS_CONFIGS / ("sdxl-base" if preset.text is not None else "sdxl-refiner")
    parts = {"unet": preset.unet.to_diffusers(), "vae": preset.vae.to_diffusers(),
             "text_encoder_2": preset.text_encoder_2.to_transformers(architecture="CLIPTextModelWithProjection")}
    if preset.text is not None:
        parts["text_encoder"] = preset.text.to_transformers()
    for sub, config in parts.items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))
    for sub in ("scheduler", "tokenizer", "tokenizer_2"):
        if (shipped / sub).is_dir():
            shutil.copytree(shipped / sub, folder / sub, dirs_exist_ok=True)
    shutil.copyfile(shipped / "model_index.json", folder / "model_index.json")
    return folder


def official_state(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """A part's state dict with a text encoder's keys in the official `text_model.` layout (transformers 5.x's
    CLIPTextModel has no such level; CLIPTextModelWithProjection keeps it), position_ids dropped; the UNet's and
    the VAE's as they are."""
    if not part.startswith("text_encoder"):
        return state
    out = {f"text_model.{k}" if k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) else k: v
           for k, v in state.items()}
    out.pop("text_model.embeddings.position_ids", None)
    return out
