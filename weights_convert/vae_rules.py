"""VAE: the original LatentDiffusion autoencoder (`first_stage_model.*`) -> diffusers AutoencoderKL keys.

Reference: CompVis `ldm/modules/diffusionmodules/model.py` (Encoder/Decoder: `down.i.block.j`, `mid.block_1`,
`mid.attn_1`, `up.i.block.j` with the decoder's levels numbered from the lowest resolution) and diffusers
`autoencoders/vae.py` (`down_blocks.i.resnets.j`, `mid_block`, `up_blocks.i` numbered in execution order).
The mid-block attention's q, k, v, proj_out are 1x1 convolutions in the original, Linear layers in diffusers
(transform `conv1x1_to_linear`). A stand-alone VAE file (a fine-tuned VAE) has the same keys without the prefix.
"""

from __future__ import annotations

from ldm.config import VAEConfig

from weights_convert.rules import PARAMS, Local, Rule, expand, local

PREFIX = "first_stage_model."

RESNET = local({"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"})
RESNET_SHORTCUT = local({"nin_shortcut": "conv_shortcut"})  # only where the channel count changes
ATTENTION = (
    local({"norm": "group_norm"})
    + local({"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}, params=("weight",),
            transform="conv1x1_to_linear")  # key-compat: to_out = [Linear, Dropout]
    + local({"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}, params=("bias",))
)
CONV: Local = tuple((p, p, "copy") for p in PARAMS)


ENDS = local({"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"})  # per encoder/decoder


def vae_blocks(cfg: VAEConfig) -> list[tuple[str, str, Local]]:
    """The index arithmetic, in one place: (source block prefix, target block prefix, local table) per block.

    Encoder level i is `encoder.down.{i}` in both layouts (ResNet j = `block.{j}` -> `resnets.{j}`). The decoder
    runs its levels from the lowest resolution up: diffusers numbers them in that order (`up_blocks.{i}`), the
    original by resolution (`up.{n - 1 - i}`); each has `layers_per_block + 1` ResNets and, except the last, an
    upsampler. The mid block is ResNet `block_1`, attention `attn_1`, ResNet `block_2`.
    """
    widths, n, per = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    blocks: list[tuple[str, str, Local]] = []

    def resnet(src: str, dst: str, c_in: int, c_out: int) -> None:
        blocks.append((src, dst, RESNET + (RESNET_SHORTCUT if c_in != c_out else ())))

    def mid(part: str, channels: int) -> None:
        resnet(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", channels, channels)
        if cfg.mid_block_add_attention:
            blocks.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", ATTENTION))
        resnet(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", channels, channels)

    blocks.append(("encoder.", "encoder.", ENDS))
    channels = widths[0]
    for i, width in enumerate(widths):
        for j in range(per):
            resnet(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", channels, width)
            channels = width
        if i < n - 1:
            blocks.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", CONV))
    mid("encoder", channels)

    blocks.append(("decoder.", "decoder.", ENDS))
    channels = widths[-1]
    mid("decoder", channels)
    for i, width in enumerate(reversed(widths)):
        level = n - 1 - i
        for j in range(per + 1):
            resnet(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", channels, width)
            channels = width
        if i < n - 1:
            blocks.append((f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.", CONV))

    if cfg.use_quant_conv:
        blocks.append(("quant_conv.", "quant_conv.", CONV))
    if cfg.use_post_quant_conv:
        blocks.append(("post_quant_conv.", "post_quant_conv.", CONV))
    return blocks


def vae_rules(cfg: VAEConfig, prefix: str = PREFIX) -> list[Rule]:
    """Every VAE rule for `cfg`, source keys under `prefix` ("" for a stand-alone VAE file)."""
    rules: list[Rule] = []
    for src, dst, table in vae_blocks(cfg):
        rules += expand("vae", prefix + src, dst, table)
    return rules
