"""Text encoders: the original layouts -> CLIPTextModel keys (`text_model.*`, as in text_encoder/model.safetensors).

SD 1 (CompVis `FrozenCLIPEmbedder`) wraps a transformers CLIPTextModel, so its keys are already ours under
`cond_stage_model.transformer.text_model.*`; community files written with older transformers lack the
`text_model.` level (`cond_stage_model.transformer.*`). `position_ids` is a buffer, not a weight: dropped.

SD 2 (Stability `FrozenOpenCLIPEmbedder`, OpenCLIP ViT-H/14, `cond_stage_model.model.*`) names everything its
own way (reference: open_clip `transformer.py`): `resblocks.i` with `ln_1`, `attn` (an nn.MultiheadAttention
with q, k, v fused in `in_proj_*`, transform `split_qkv`), `ln_2`, `mlp.c_fc`, `mlp.c_proj`. SD 2 reads the
penultimate layer's output (`layer="penultimate"`), so the last resblock never runs: diffusers drops it and keeps
23 layers, and so do we, with `text_projection` and `logit_scale` (the image-text contrastive head, unused).

SDXL (Stability `generative-models`, `conditioner.embedders.*`): the base holds CLIP ViT-L under
`conditioner.embedders.0.transformer.text_model.` (SD 1's layout) and OpenCLIP ViT-bigG under
`conditioner.embedders.1.model.` (SD 2's layout); the refiner holds only bigG, at `conditioner.embedders.0.model.`.
SDXL reads bigG's penultimate layer too, but its pooled embedding runs the last layer, so all 32 layers are kept
and `text_projection` becomes the `text_projection.weight` of CLIPTextModelWithProjection (transposed, as diffusers
does); only `logit_scale` is dropped.
"""

from __future__ import annotations

from ldm.config import CLIPTextConfig

from weights_convert.rules import Rule, drop, expand, local

SD1_PREFIX = "cond_stage_model.transformer.text_model."
SD1_LEGACY_PREFIX = "cond_stage_model.transformer."  # files written with transformers < 4.x layout change
SD2_PREFIX = "cond_stage_model.model."
TARGET = "text_model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL base: CLIP ViT-L
XL_BIGG_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG
XL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: bigG is its only embedder

CLIP_LAYER = local({f"self_attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
                   | {k: k for k in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")})
CLIP_ENDS = (local({"embeddings.token_embedding": "embeddings.token_embedding",
                    "embeddings.position_embedding": "embeddings.position_embedding"}, params=("weight",))
             + local({"final_layer_norm": "final_layer_norm"}))

OPENCLIP_LAYER = (
    local({"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
           "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
    + (("attn.in_proj_weight", "self_attn.{q,k,v}_proj.weight", "split_qkv"),
       ("attn.in_proj_bias", "self_attn.{q,k,v}_proj.bias", "split_qkv"))
)
OPENCLIP_ENDS = (
    ("token_embedding.weight", "embeddings.token_embedding.weight", "copy"),
    ("positional_embedding", "embeddings.position_embedding.weight", "copy"),
) + local({"ln_final": "final_layer_norm"})


def _qkv(rules: list[Rule]) -> list[Rule]:
    """Give split_qkv rules their three targets ("{q,k,v}" in a table entry)."""
    out = []
    for r in rules:
        if r.transform == "split_qkv":
            (t,) = r.targets
            r = Rule(r.source, tuple(t.replace("{q,k,v}", x) for x in "qkv"), r.component, r.transform)
        out.append(r)
    return out


def clip_rules(cfg: CLIPTextConfig, prefix: str = SD1_PREFIX) -> list[Rule]:
    """SD 1 (and SDXL's first encoder): the CLIP text model's keys under `prefix` (SD1_PREFIX, SD1_LEGACY_PREFIX or
    XL_CLIP_PREFIX), renamed to ours."""
    rules = expand("text_encoder", prefix, TARGET, CLIP_ENDS)
    for i in range(cfg.num_hidden_layers):
        rules += expand("text_encoder", f"{prefix}encoder.layers.{i}.", f"{TARGET}encoder.layers.{i}.", CLIP_LAYER)
    rules.append(drop(f"{prefix}embeddings.position_ids", "a buffer (0..76), rebuilt by the model", optional=True))
    return rules


def openclip_rules(cfg: CLIPTextConfig, prefix: str = SD2_PREFIX, component: str = "text_encoder",
                   projection: bool = False) -> list[Rule]:
    """OpenCLIP's text tower under `prefix`. SD 2 (projection=False): the file holds one layer more than the model
    runs, and the projection is dropped. SDXL's bigG (projection=True, component "text_encoder_2"): every layer, and
    `text_projection` transposed into CLIPTextModelWithProjection's head."""
    rules = expand(component, prefix, TARGET, OPENCLIP_ENDS)
    for i in range(cfg.num_hidden_layers):
        rules += expand(component, f"{prefix}transformer.resblocks.{i}.", f"{TARGET}encoder.layers.{i}.",
                        OPENCLIP_LAYER)
    if projection:
        rules.append(Rule(f"{prefix}text_projection", ("text_projection.weight",), component, "transpose"))
    else:
        last = cfg.num_hidden_layers  # the final resblock, whose output SD 2 never reads
        for src, _, _ in OPENCLIP_LAYER:
            rules.append(drop(f"{prefix}transformer.resblocks.{last}.{src}",
                              "the last OpenCLIP layer: SD 2 reads the penultimate layer's output"))
        rules.append(drop(f"{prefix}text_projection", "the contrastive head's projection, unused by SD"))
    rules.append(drop(f"{prefix}logit_scale", "the contrastive loss temperature, unused by SD", optional=True))
    rules.append(drop(f"{prefix}attn_mask", "the causal mask buffer, rebuilt by the model", optional=True))
    return _qkv(rules)
