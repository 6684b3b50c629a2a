"""UNet: the original LatentDiffusion layout (`model.diffusion_model.*`) -> diffusers UNet2DConditionModel keys.

Reference: CompVis `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel: `input_blocks`, `middle_block`,
`output_blocks` as flat numbered lists of TimestepEmbedSequential) and diffusers `unet_2d_condition.py`
(`down_blocks.i.resnets.j`, `attentions.j`, `downsamplers.0`). The original numbers every sub-block in one flat
list per path; diffusers nests them per resolution level. `unet_blocks` holds all of that index arithmetic.
Inside a block the names are a fixed renaming (ResNet) or identical (the spatial transformer, whose
`transformer_blocks.k` run to the level's depth: 1 in SD 1/2, up to 10 in SDXL). SDXL's micro-conditioning MLP is
the original's `label_emb.0` (ADM's class-embedding slot, a Sequential [Linear, SiLU, Linear]), diffusers'
`add_embedding`.
"""

from __future__ import annotations

import functools

from ldm.config import UNetConfig

from weights_convert.rules import PARAMS, Local, Rule, expand, local

PREFIX = "model.diffusion_model."

STEM = local({
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",  # key-compat: index 1 is the SiLU
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",  # key-compat: index 1 is the SiLU
})

RESNET = local({
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",  # key-compat: in_layers = [GroupNorm, SiLU, Conv]
    "emb_layers.1": "time_emb_proj",  # emb_layers = [SiLU, Linear]
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",  # out_layers = [GroupNorm, SiLU, Dropout, Conv]
})
RESNET_SHORTCUT = local({"skip_connection": "conv_shortcut"})  # only where the channel count changes

ADD_EMBEDDING = local({
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",  # key-compat: label_emb = [[Linear, SiLU, Linear]]
})


@functools.cache  # one table object per depth: the docs page names tables by identity (TRANSFORMER is depth 1)
def transformer(depth: int) -> Local:
    """The spatial transformer with `depth` blocks. It keeps its names in diffusers; proj_in/proj_out are 1x1 convs
    (SD 1) or linears (SD 2, SDXL) with the same keys, told apart by shape only."""
    table = local({k: k for k in ("norm", "proj_in", "proj_out")})
    for b in range(depth):
        block = f"transformer_blocks.{b}"
        table += local({f"{block}.{a}.{p}": f"{block}.{a}.{p}" for a in ("attn1", "attn2")
                        for p in ("to_q", "to_k", "to_v")}, params=("weight",))  # q, k, v have no bias
        table += local({f"{block}.{k}": f"{block}.{k}" for k in (
            "attn1.to_out.0", "attn2.to_out.0",  # key-compat: to_out = [Linear, Dropout]
            "norm1", "norm2", "norm3",
            "ff.net.0.proj", "ff.net.2",  # key-compat: ff.net = [GEGLU, Dropout, Linear]
        )})
    return table


TRANSFORMER = transformer(1)  # SD 1.x / 2.x
CONV: Local = tuple((p, p, "copy") for p in PARAMS)  # a bare conv (down/upsampler): the block prefix names it


def unet_blocks(cfg: UNetConfig) -> list[tuple[str, str, Local]]:
    """The index arithmetic, in one place: (source block prefix, target block prefix, local table) per block.

    Down path: the original's `input_blocks` is one flat list, block 0 being `conv_in`; level i holds
    `layers_per_block` ResNets (each followed by a transformer on attention levels), then a downsampler except on
    the last level, so ResNet j of level i is `input_blocks.{(layers_per_block + 1) * i + j + 1}`.
    Middle: `middle_block.0` ResNet, `.1` transformer, `.2` ResNet.
    Up path: `output_blocks.{(layers_per_block + 1) * i + j}` for up level i (the levels in reverse), ResNet j of
    `layers_per_block + 1`; the upsampler sits in the level's last block, after the transformer if there is one
    (`.2.conv`) or right after the ResNet (`.1.conv`).
    """
    widths, n, per = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    depth = [transformer(d) for d in cfg.transformer_depths]  # each level's table; the mid block: last
    blocks: list[tuple[str, str, Local]] = []

    def resnet(src: str, dst: str, c_in: int, c_out: int) -> None:
        blocks.append((src, dst, RESNET + (RESNET_SHORTCUT if c_in != c_out else ())))

    channels, skips = widths[0], [widths[0]]  # skips: channels of every activation the up path concatenates
    for i, width in enumerate(widths):
        for j in range(per):
            k = (per + 1) * i + j + 1
            resnet(f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", channels, width)
            if cfg.cross_attention_levels[i]:
                blocks.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.", depth[i]))
            channels = width
            skips.append(width)
        if i < n - 1:
            blocks.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", CONV))
            skips.append(width)

    resnet("middle_block.0.", "mid_block.resnets.0.", channels, channels)
    blocks.append(("middle_block.1.", "mid_block.attentions.0.", depth[-1]))
    resnet("middle_block.2.", "mid_block.resnets.1.", channels, channels)

    for i, width in enumerate(reversed(widths)):
        level = n - 1 - i
        for j in range(per + 1):
            k = (per + 1) * i + j
            resnet(f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", channels + skips.pop(), width)
            channels = width
            if cfg.cross_attention_levels[level]:
                blocks.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", depth[level]))
            if j == per and i < n - 1:
                at = 2 if cfg.cross_attention_levels[level] else 1
                blocks.append((f"output_blocks.{k}.{at}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", CONV))
    return blocks


def unet_rules(cfg: UNetConfig, prefix: str = PREFIX) -> list[Rule]:
    """Every UNet rule for `cfg`, source keys under `prefix`."""
    rules = expand("unet", prefix, "", STEM)
    if cfg.num_class_embeds is not None:  # the original's class embedding (the x4 upscaler's noise level)
        rules += expand("unet", prefix, "", local({"label_emb": "class_embedding"}, params=("weight",)))
    if cfg.addition_embed_type == "text_time":  # SDXL's micro-conditioning MLP
        rules += expand("unet", prefix, "", ADD_EMBEDDING)
    for src, dst, table in unet_blocks(cfg):
        rules += expand("unet", prefix + src, dst, table)
    return rules
