"""Tiny SDXL builders shared by the SDXL pipeline and CLI tests: diffusers' SDXL pipelines (base with two text
encoders, refiner with bigG only) on trained-like random weights, and ours holding the same weights through
strict=True identity loads. Test modules import from here, never from each other."""

from __future__ import annotations

from pathlib import Path

import torch

import ldm
from ldm.clip import CLIPTextModel, CLIPTextModelWithProjection
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
from tests.helpers import TOKENIZER_DIR, VAE, diffusers_config, trained_like_

SIZE = 64  # px: 8x8 latents, 3 UNet levels (8, 4, 2)

TIME_DIM = 8  # addition_time_embed_dim (256 in SDXL)
CLIP_L = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
CLIP_G = {**CLIP_L, "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 4, "hidden_act": "gelu",
          "projection_dim": 40}

# SDXL's layout at a tiny size: a plain first level, then attention levels of mixed transformer depth (1, 2; the
# middle block takes the last depth), linear projections, the text_time added embedding over 6 (base) or 5
# (refiner) time ids plus bigG's pooled width.
BASE_UNET = dict(sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64),
                 layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), norm_num_groups=16,
                 cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                 projection_class_embeddings_input_dim=6 * TIME_DIM + CLIP_G["projection_dim"])
REFINER_UNET = {**BASE_UNET, "cross_attention_dim": CLIP_G["hidden_size"], "transformer_layers_per_block": (1, 2, 2),
                "projection_class_embeddings_input_dim": 5 * TIME_DIM + CLIP_G["projection_dim"]}
XL_VAE = {**VAE, "scaling_factor": 0.13025, "force_upcast": True}


def scheduler_config() -> dict:
    return diffusers_config("sdxl-base", "scheduler")  # EulerDiscreteScheduler, "leading" spacing


def reference_pipelines(refiner_unet: dict | None = None, inpaint_channels: int = 4):
    """(diffusers StableDiffusionXLPipeline base, StableDiffusionXLImg2ImgPipeline refiner) on tiny weights; the
    refiner shares the base's VAE and bigG encoder, as the official refiner shares the VAE."""
    import diffusers
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as RefCLIP
    from transformers import CLIPTextModelWithProjection as RefCLIPProjection
    from transformers import CLIPTokenizer

    vae = trained_like_(diffusers.AutoencoderKL(**XL_VAE), seed=2).eval()
    text = trained_like_(RefCLIP(RefConfig(**CLIP_L)), seed=3).eval()
    text_2 = trained_like_(RefCLIPProjection(RefConfig(**CLIP_G)), seed=4).eval()
    tok, tok_2 = (CLIPTokenizer.from_pretrained(TOKENIZER_DIR / name) for name in ("sd15", "sd21"))
    scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler_config())
    unet = trained_like_(diffusers.UNet2DConditionModel(**{**BASE_UNET, "in_channels": inpaint_channels}),
                         seed=1).eval()
    base = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                               tokenizer_2=tok_2, unet=unet, scheduler=scheduler,
                                               add_watermarker=False)
    refiner_unet = trained_like_(diffusers.UNet2DConditionModel(**(refiner_unet or REFINER_UNET)), seed=5).eval()
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None, tokenizer_2=tok_2, unet=refiner_unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(scheduler_config()), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def ours_from(ref, **kw) -> ldm.StableDiffusionXLPipeline:
    """Our pipeline holding the reference pipeline's weights (strict identity loads), its scheduler config."""
    unet = ldm.UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.unet.config))).eval()
    unet.load_state_dict(ref.unet.state_dict(), strict=True)
    vae = ldm.AutoencoderKL(VAEConfig.from_diffusers(dict(ref.vae.config))).eval()
    vae.load_state_dict(ref.vae.state_dict(), strict=True)
    text = None
    if ref.text_encoder is not None:
        text = CLIPTextModel(CLIPTextConfig.from_transformers(CLIP_L)).eval()
        text.load_state_dict(ref.text_encoder.state_dict(), strict=True)
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_transformers(CLIP_G)).eval()
    text_2.load_state_dict(ref.text_encoder_2.state_dict(), strict=True)
    tok = None if text is None else ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15")
    return ldm.StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
        tokenizer_2=ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd21"),
        scheduler=ldm.schedulers.from_name("euler", scheduler_config()), **kw)


def save_tiny_sdxl_folders(root: Path) -> tuple[Path, Path]:
    """The tiny base and refiner saved by diffusers in the model-folder layout (what `ldm.load_pipeline` and
    `ldm generate --model/--refiner` read)."""
    base, refiner = reference_pipelines()
    base.save_pretrained(root / "tiny-sdxl-base", safe_serialization=True)
    refiner.save_pretrained(root / "tiny-sdxl-refiner", safe_serialization=True)
    return root / "tiny-sdxl-base", root / "tiny-sdxl-refiner"


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
