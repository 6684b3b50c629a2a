"""The KL-regularised autoencoder (VAE) of Stable Diffusion: images <-> latents.

Paper: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv:2112.10752),
section 3.1 and appendix G; the autoencoder itself follows Esser et al. 2021 (VQGAN, arXiv:2012.09841) with a
KL penalty (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") in place of the vector quantiser.
Reference: diffusers 0.42.1 `models/autoencoders/autoencoder_kl.py` (AutoencoderKL), `models/autoencoders/vae.py`
(Encoder, Decoder, DiagonalGaussianDistribution), `models/unets/unet_2d_blocks.py` (DownEncoderBlock2D,
UpDecoderBlock2D, UNetMidBlock2D), `models/resnet.py` (ResnetBlock2D), `models/downsampling.py`,
`models/upsampling.py` and `models/attention_processor.py` (Attention with AttnProcessor2_0).
Module names mirror diffusers' state-dict keys, so a diffusers AutoencoderKL state dict loads with strict=True.

    image (B, in_channels, H, W) --Encoder--> (B, 2*latent_channels, H/f, W/f) --quant_conv--> posterior
    posterior.sample() or .mode() (B, latent_channels, H/f, W/f) --post_quant_conv--Decoder--> (B, out_channels, H, W)

f = cfg.downsample_factor = 2 ** (len(block_out_channels) - 1) (8 for SD). The pipeline multiplies latents by
cfg.scaling_factor (0.18215) before the UNet sees them and divides by it before decoding; the VAE does not.

Large images: `vae.enable_tiling()` makes encode/decode cut inputs larger than one tile into overlapping tiles, run
each through the encoder/decoder alone and cross-fade the overlaps (diffusers' `tiled_encode` / `tiled_decode`,
same arithmetic, same numbers). Peak activation memory then follows the tile size, not the image size; the price
is that GroupNorm statistics and the mid attention see one tile, so the result differs slightly from an untiled
pass and seams can show faintly. See `AutoencoderKL.enable_tiling` and docs/vae.md, "Large images".

Shapes: B batch, C channels, H, W spatial size of the tensor at hand (image, latent or an intermediate level),
L = H*W positions, f the downsample factor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.attention import AttentionLayer
from ldm.config import VAEConfig
from ldm.rng import randn

_EPS = 1e-6  # every GroupNorm of the VAE (diffusers: resnet_eps=1e-6)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises fp16/bf16 inputs in fp32 and returns the input dtype.

    Why: the VAE's activations reach the thousands (the decoder's last levels especially); in fp16 the sum of
    squares over a group of 512 channels x 64x64 positions loses precision or overflows, and the mean/variance
    are what everything after depends on. CompVis' `GroupNorm32` does the same. In fp32 this is nn.GroupNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return super().forward(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus the input (through a 1x1 conv when the width changes).

    The VAE's basic unit: the residual path lets each block refine features without having to re-learn them.
    No timestep input (the UNet's ResNets have one; the VAE's do not).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # a 1x1 conv matches the widths on the residual path when they differ (the first ResNet of a level)
        self.conv_shortcut = None if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        # In-place SiLU and residual add: the norm and conv outputs are fresh tensors nobody else holds, so this
        # only saves a full-size allocation per op (the decoder's last levels are 128 x 512 x 512 floats).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # dropout sits here in training; it is 0 at inference
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv, padding only the right and bottom edge (asymmetric, as diffusers).

    The original LDM VAE pads (0, 1, 0, 1) then convolves with padding 0; a symmetric padding=1 conv would shift
    the sampling grid by a pixel and break parity with the trained weights.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H+1, W+1): right and bottom only
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv to smooth the blocky result."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        # The nearest-neighbour kernel for channels-last tensors fails on large batches or outputs of more than
        # 2**31 elements (pytorch#141831, diffusers#984); diffusers makes the input contiguous there, and so do we.
        if x.shape[0] >= 64 or x.numel() * 4 > 2**31:
            x = x.contiguous()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class DownEncoderBlock2D(nn.Module):
    """One encoder level: `num_layers` ResNets at this width, then (except at the last level) a downsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        # key-compat: diffusers keeps the downsampler in a list, hence `downsamplers.0.conv`
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if add_downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) without a downsampler."""
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """One decoder level: `num_layers` ResNets at this width, then (except at the last level) an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        )
        # key-compat: diffusers keeps the upsampler in a list, hence `upsamplers.0.conv`
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, H, W) without an upsampler."""
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


# diffusers' deprecated attention-block names -> the current ones (ModelMixin._convert_deprecated_attention_blocks)


class VAEAttention(AttentionLayer):
    """Single-head self-attention over all H*W positions, with a GroupNorm in front and a residual around it.

    The one place in the VAE where every position sees every other: it gives the lowest-resolution features a
    global view (colour and lighting consistency across the image). One head as wide as the channels (diffusers:
    heads = C // attention_head_dim with attention_head_dim = C). Old diffusers files name the projections
    `query/key/value/proj_attn`: the converter (weights_convert/load.py, `folder_rules`) maps them.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # key-compat: diffusers' to_out is [Linear, Dropout]; the dropout has no weights, so only `to_out.0` exists
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        # Flatten first, then normalise the (B, C, L) view, in diffusers' order (AttnProcessor2_0). The order is
        # invisible for a contiguous x but not for a channels-last one, which is what img2img and inpainting encode
        # (an HWC picture transposed to NCHW, see ldm/images.py): normalising the 4-D x would run GroupNorm's
        # channels-last kernel and hand the projections a contiguous (B, L, C), where diffusers runs the contiguous
        # kernel on a copy and hands them a transposed one; each path sums in another order (~1e-6 apart).
        h = x.reshape(B, C, H * W)  # (B, C, L)
        h = self.group_norm(h).transpose(1, 2)  # (B, L, C)
        q = self.to_q(h).unsqueeze(1)  # (B, 1, L, C): one head of width C
        k = self.to_k(h).unsqueeze(1)
        v = self.to_v(h).unsqueeze(1)
        h = self.attend(q, k, v).squeeze(1)  # (B, L, C)
        h = self.to_out[0](h.to(q.dtype))  # a research processor may hand back fp32
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + h


class MidBlock2D(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution (diffusers: UNetMidBlock2D without a timestep).

    With `add_attention=False` (config `mid_block_add_attention`) it is two ResNets and has no attention keys.
    """

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image -> the parameters (mean and log-variance) of the latent Gaussian, at 1/f of the resolution."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(widths[max(i - 1, 0)], width, cfg.layers_per_block, groups,
                               add_downsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock2D(widths[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)  # mean, logvar

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, 2*latent_channels, H/f, W/f)."""
        x = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            x = block(x)  # (B, C_i, H/2^i, W/2^i) after level i's downsampler
        x = self.mid_block(x)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2*latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent -> image. Mirrors the encoder with one more ResNet per level and upsamplers in place of downsamplers."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], kernel_size=3, padding=1)
        # up_blocks is registered before mid_block (it runs after it) so the state-dict order matches diffusers'
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(widths[max(i - 1, 0)], width, cfg.layers_per_block + 1, groups,
                             add_upsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock2D(widths[0], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""
        x = self.conv_in(z)  # (B, C_last, h, w)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)  # doubles h and w at every level but the last
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, H, W)


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))), as diffusers' class of the same name.

    `parameters` is the encoder output (B, 2*latent_channels, h, w): the first half of the channels is the mean,
    the second the log-variance, clamped to [-30, 20] so exp() neither underflows to 0 nor overflows.
    """

    def __init__(self, parameters: Tensor) -> None:
        if not isinstance(parameters, Tensor) or parameters.ndim != 4 or parameters.shape[1] % 2:
            shape = tuple(parameters.shape) if isinstance(parameters, Tensor) else type(parameters).__name__
            raise ValueError(f"DiagonalGaussianDistribution: parameters must be a (B, 2*latent_channels, h, w) "
                             f"tensor with an even channel count, got {shape}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, latent_channels, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> Tensor:
        """The most likely latent: the mean (B, latent_channels, h, w)."""
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """mean + std * noise, the noise drawn exactly as diffusers' `randn_tensor` draws it.

        Same shape, dtype and generator; drawn on the generator's device when that is the CPU (then moved), so a
        CPU generator gives the same latents on any device; a list holds one generator per batch item.
        """
        noise = randn(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) per batch item (B,), summed over C, h, w; `other=None` means the standard normal."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )


def _blend_into(a: Tensor, b: Tensor, extent: int, dim: int) -> None:
    """Cross-fade, in place, the first `extent` rows (dim=2) or columns (dim=3) of tile `b` from the last ones of
    its neighbour `a` (above or to the left): b[y] = a[-extent + y] * (1 - y/extent) + b[y] * (y/extent).

    At y = 0 the result is all `a`, and the weight moves linearly to `b`, so the picture is continuous across the
    seam. diffusers' blend_v / blend_h row by row, vectorised (the same fp32 products and sums). As in diffusers,
    `extent` shrinks to the smaller tile's size when an edge tile is thinner than the overlap.
    """
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return
    # weights y/extent computed in float64 and rounded once, as diffusers' Python-float scalars are
    t = (torch.arange(extent, dtype=torch.float64, device=b.device) / extent).to(b.dtype)
    t = t.view(-1, 1) if dim == 2 else t  # broadcast along rows (dim 2) or columns (dim 3)
    a_end = a.narrow(dim, a.shape[dim] - extent, extent)
    b_start = b.narrow(dim, 0, extent)
    b_start.copy_(a_end * (1 - t) + b_start * t)


def _run_tiled(x: Tensor, fn: Callable[[Tensor], Tensor], tile: int, stride: int, blend: int, keep: int) -> Tensor:
    """fn on overlapping `tile` x `tile` windows of x every `stride` positions, blended and stitched.

    Tiles are visited row by row; each is cross-faded with its already-blended neighbour above and then with the
    one to its left over `blend` output rows/columns, and contributes its first `keep` x `keep` outputs (the rest
    is the overlap the next tile fades over). Edge tiles are smaller; they keep what they have.
    """
    above: list[Tensor] = []  # the previous row of tiles, full size and blended: the next row fades from them
    rows = []
    for top in range(0, x.shape[2], stride):
        row: list[Tensor] = []
        for left in range(0, x.shape[3], stride):
            out = fn(x[:, :, top:top + tile, left:left + tile])  # (B, C_out, <= tile', <= tile')
            if above:
                _blend_into(above[len(row)], out, blend, dim=2)
            if row:
                _blend_into(row[-1], out, blend, dim=3)
            row.append(out)
        rows.append(torch.cat([out[:, :, :keep, :keep] for out in row], dim=3))  # (B, C_out, <= keep, W_out)
        above = row
    return torch.cat(rows, dim=2)  # (B, C_out, H_out, W_out)


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE: `encode(image) -> DiagonalGaussianDistribution`, `decode(latents) -> image`.

    Images are in [-1, 1]; latents are unscaled (the pipeline applies `scaling_factor`). Any H, W divisible by
    `cfg.downsample_factor` work. `quant_conv` / `post_quant_conv` are None when the config turns them off.
    Tiling (`enable_tiling`) is off by default; `use_tiling`, `tile_sample_size` and `tile_overlap` hold its state.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, VAEConfig):
            raise TypeError(f"AutoencoderKL: cfg must be an ldm.VAEConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        lat = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, kernel_size=1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, kernel_size=1) if cfg.use_post_quant_conv else None
        self.use_tiling = False
        self.tile_sample_size = cfg.sample_size  # image pixels per tile side (diffusers: tile_sample_min_size)
        self.tile_overlap = 0.25  # fraction of a tile shared with its neighbour (diffusers: tile_overlap_factor)

    def enable_tiling(self, tile_sample_size: int | None = None, overlap: float = 0.25) -> None:
        """Encode/decode inputs larger than one tile tile by tile (diffusers' enable_tiling + tiled_encode/decode).

        tile_sample_size: a tile's side in image pixels (None: the config's sample_size, 512 for SD 1.x, as
        diffusers); latent tiles are tile_sample_size / f. overlap: the fraction of a tile that overlaps the next
        one and is cross-faded; a tile starts every tile * (1 - overlap). The overlap must be a whole number of
        latent pixels (tile_sample_size / f * overlap), else tiles would not line up.
        """
        size = self.config.sample_size if tile_sample_size is None else tile_sample_size
        self._tile_plan("encode", size, overlap)  # raises on a bad size or overlap before anything changes
        self.tile_sample_size, self.tile_overlap = size, overlap
        self.use_tiling = True

    def disable_tiling(self) -> None:
        """Back to one pass over the whole input."""
        self.use_tiling = False

    def _tile_plan(self, kind: str, tile_sample_size: int, overlap: float) -> tuple[int, int, int, int]:
        """diffusers' tiling arithmetic for "encode" or "decode": (tile, stride) on the input side, (blend, keep)
        on the output side, each in that side's pixels. Raises on sizes where the input strides and the output
        rows kept would not line up (diffusers silently produces a misaligned image there)."""
        f = self.config.downsample_factor
        if isinstance(tile_sample_size, bool) or not isinstance(tile_sample_size, int) \
                or tile_sample_size <= 0 or tile_sample_size % f:
            raise ValueError(f"tile_sample_size must be a positive multiple of the downsample factor {f}, "
                             f"got {tile_sample_size!r}")
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
            raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}")
        sample, latent = tile_sample_size, tile_sample_size // f
        # exactly diffusers' int() truncations, so the tile grid is the same
        enc = (sample, int(sample * (1 - overlap)), int(latent * overlap), latent - int(latent * overlap))
        dec = (latent, int(latent * (1 - overlap)), int(sample * overlap), sample - int(sample * overlap))
        if enc[1] != enc[3] * f or dec[1] * f != dec[3] or dec[1] < 1:
            raise ValueError(f"overlap {overlap} of a {sample} px tile is {latent * overlap:g} latent pixels; it must "
                             f"be a whole number of latent pixels below {latent} (tile_sample_size / {f}) so the "
                             f"tiles line up, e.g. overlap 0.25 with a tile that is a multiple of {4 * f} px")
        return enc if kind == "encode" else dec

    @property
    def scaling_factor(self) -> float:
        """Latents are multiplied by this before the UNet (0.18215 for SD) to give them roughly unit variance."""
        return self.config.scaling_factor

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Images (B, in_channels, H, W) in [-1, 1] -> posterior over latents (B, latent_channels, H/f, W/f)."""
        f = self.config.downsample_factor
        self._check_input("encode", "x", x, self.config.in_channels, "in_channels")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode: image height and width must be divisible by {f} (the downsample factor), "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            plan = self._tile_plan("encode", self.tile_sample_size, self.tile_overlap)
            return DiagonalGaussianDistribution(_run_tiled(x, self._encode_one, *plan))
        return DiagonalGaussianDistribution(self._encode_one(x))

    def _encode_one(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> encoder moments (B, 2*latent_channels, H/f, W/f) in one pass."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f), roughly in [-1, 1]."""
        self._check_input("decode", "z", z, self.config.latent_channels, "latent_channels")
        if self.use_tiling and max(z.shape[-2:]) > self.tile_sample_size // self.config.downsample_factor:
            plan = self._tile_plan("decode", self.tile_sample_size, self.tile_overlap)
            return _run_tiled(z, self._decode_one, *plan)
        return self._decode_one(z)

    def _decode_one(self, z: Tensor) -> Tensor:
        """(B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f) in one pass."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample_posterior: bool = False,
                generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Reconstruct: decode(encode(x).mode()), or a posterior sample with `sample_posterior=True`."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def _check_input(self, fn: str, arg: str, t: Any, channels: int, field: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {arg} must be a floating-point tensor, got {t.dtype}")
        if t.ndim != 4:
            raise ValueError(f"{fn}: {arg} must be 4-D (B, {field}={channels}, H, W), got shape {tuple(t.shape)}")
        if t.shape[1] != channels:
            raise ValueError(f"{fn}: {arg} must have {channels} channels (config {field}), got {t.shape[1]} "
                             f"(shape {tuple(t.shape)})")
        weight = self.encoder.conv_in.weight
        device = t.device.type  # under autocast mixed dtypes are the point; meta has no autocast to ask about
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        if t.dtype != weight.dtype and not autocast:
            raise TypeError(f"{fn}: {arg} has dtype {t.dtype} but the model's weights are {weight.dtype}; "
                            f"convert one of them (e.g. vae.to({t.dtype}))")
