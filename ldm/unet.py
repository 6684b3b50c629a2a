"""The denoising UNet of Stable Diffusion 1.x / 2.x / XL: a text-conditioned UNet on latents.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022), section 3.3
(the conditioning mechanism); the UNet backbone follows Ho et al. (DDPM, 2020) and Dhariwal & Nichol (2021), the
spatial transformer follows Vaswani et al. (2017). Reference: diffusers 0.42.1
`models/unets/unet_2d_condition.py` (UNet2DConditionModel), with `unet_2d_blocks.py` (CrossAttnDownBlock2D,
DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D), `resnet.py` (ResnetBlock2D),
`transformers/transformer_2d.py`, `attention.py` (BasicTransformerBlock, FeedForward), `attention_processor.py`
(Attention, AttnProcessor2_0), `embeddings.py` (get_timestep_embedding, TimestepEmbedding). Module attribute names
mirror diffusers' state-dict keys, so a diffusers state dict loads with `strict=True` and no mapping.

The data path, for SD 1.5 at a 64x64 latent (block_out_channels 320/640/1280/1280):

    t ─ sinusoid (320) ─ MLP ─> temb (1280), added inside every ResNet block
    x (B,4,64,64) ─ conv_in ─> (B,320,64,64) ─┬─ down level 0: [ResNet, Transformer] x2, downsample ─> 32x32
                                              ├─ down level 1 ... level 3 (no attention, no downsample) ─> 8x8
                                              │  every block output is kept as a skip connection
                                              ├─ mid: ResNet, Transformer, ResNet
                                              └─ up levels (mirror, one more block each): concat a skip, ResNet,
                                                 Transformer, ..., upsample ─> conv_norm_out, SiLU, conv_out

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis") is the
same network with options of UNetConfig: three levels 320/640/1280, no attention at the first, 1/2/10 transformer
blocks stacked per spatial transformer (`transformer_layers_per_block`), a 2048-wide text context, and
micro-conditioning (`addition_embed_type="text_time"`): the pooled text embedding and the sinusoids of the six
size/crop numbers (`time_ids`) go through one more MLP, `add_embedding`, whose output is added to temb.

Shapes: B batch, C channels, H, W latent height and width, L = H*W, S text tokens (77), D transformer width (= C of
its level), D_text = cross_attention_dim, nh heads, hd head width (D = nh * hd), T = time embedding width,
N = number of micro-conditioning values (time_ids: 6 for SDXL base, 5 for the refiner), P = pooled text width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.attention import AttentionLayer
from ldm.config import UNetConfig

# ----------------------------------------------------------------------------------------------------------------
# Timestep embedding


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps (DDPM appendix B, Transformer positional encoding): (B, dim) fp32.

    Frequencies are max_period^(-i / (dim/2 - freq_shift)); the output is [sin | cos], or [cos | sin] when flipped.
    Mirrors diffusers' get_timestep_embedding exactly, including computing in fp32 whatever t's dtype.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (dim/2,)
    args = t[:, None].float() * freqs[None, :]  # (B, dim/2)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free wrapper of `timestep_embedding` (diffusers key `time_proj`, which holds no weights)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t: Tensor) -> Tensor:
        return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoid: (B, C0) -> (B, T), T = 4 * C0."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))  # (B, T)


# ----------------------------------------------------------------------------------------------------------------
# ResNet block, resampling


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, plus a (1x1-projected) residual."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, C_in, H, W), temb: (B, T) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # one shift per channel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------------------------------------------
# Spatial transformer: self-attention, cross-attention on the text, GEGLU feed-forward


class Attention(AttentionLayer):
    """Multi-head attention; self-attention when `context` is None, else cross-attention on the text context.

    The kernel (or an installed research processor) is reached through `self.attend`, see ldm/attention.py.
    ldm/optimize.py's `fuse_projections` swaps in a subclass that computes q, k, v as one matmul; the parameters
    and the state dict stay diffusers' to_q / to_k / to_v.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.is_cross = context_dim is not None
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        # key-compat: diffusers' `to_out` is [Linear, Dropout], so the projection's keys are `to_out.0.*`.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q: (B, L, D) from x; k, v: (B, S, D) from the context (x itself for self-attention)."""
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D), context: (B, S, D_text) or None (self-attention) -> (B, L, D)."""
        q, k, v = self._project(x, context)
        q = rearrange(q, "b l (nh hd) -> b nh l hd", nh=self.heads)  # (B, nh, L, hd): split the heads
        k = rearrange(k, "b s (nh hd) -> b nh s hd", nh=self.heads)  # (B, nh, S, hd)
        v = rearrange(v, "b s (nh hd) -> b nh s hd", nh=self.heads)  # (B, nh, S, hd)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            # upcast_attention (SD 2.1-768): in fp16 its q @ k^T overflows and the image turns black, so this layer
            # computes its scores, softmax and weighted sum in fp32. fp32 inputs are untouched, matching diffusers.
            out = self.attend(q.float(), k.float(), v.float(), mask).to(q.dtype)
        else:
            out = self.attend(q, k, v, mask)  # (B, nh, L, hd)
        out = rearrange(out, "b nh l hd -> b l (nh hd)")  # (B, L, D): merge the heads
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2 x inner, value * gelu(gate)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, inner) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP, D -> 4D -> D."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # key-compat: diffusers' `net` is [GEGLU, Dropout, Linear]: keys `ff.net.0.proj.*` and `ff.net.2.*`.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention on the text, feed-forward; each residual.

    only_cross: attn1 attends to the text as well (diffusers' only_cross_attention; the x4 upscaler's high
    resolution levels, where self-attention over every pixel would cost L^2).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool, only_cross: bool = False) -> None:
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        # self-attention: every pixel looks at every pixel (or, only_cross, at the text tokens)
        self.attn1 = Attention(dim, heads, context_dim if only_cross else None, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)  # cross-attention: pixels look at tokens
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D), context: (B, S, D_text) -> (B, L, D). `mask` reaches the cross-attention."""
        if self.only_cross:
            x = x + self.attn1(self.norm1(x), context, mask)
        else:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The spatial transformer: flatten the feature map to L = H*W tokens, run `depth` transformer blocks (1 in
    SD 1/2; SDXL stacks 2 or 10), fold back.

    proj_in / proj_out are 1x1 convs (SD 1) or Linear layers (SD 2, use_linear_projection); the same map either way.
    """

    def __init__(self, ch: int, heads: int, cfg: UNetConfig, only_cross: bool = False, depth: int = 1) -> None:
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, cfg.cross_attention_dim, cfg.upcast_attention, only_cross)
             for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), context: (B, S, D_text) -> (B, C, H, W)."""
        H = x.shape[2]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")  # (B, L, D): one token per latent pixel
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        if self.linear:
            h = self.proj_out(h)
        # (B, C, H, W) laid out as x is: a channels_last x (ldm/optimize.py) needs no copy here, the permuted view
        # already is channels_last in memory; a contiguous x gets the usual NCHW copy.
        h = rearrange(h, "b (h w) c -> b c h w", h=H).contiguous(memory_format=_memory_format(x))
        if not self.linear:
            h = self.proj_out(h)
        return x + h


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if the 4-D tensor x is laid out so (and not also plain contiguous), else contiguous_format.

    Kept in the model file, not ldm/optimize.py: the fold back must choose a layout (diffusers' `.contiguous()`),
    and following the input's is the choice that is right for any caller, channels_last or not; optimize.py
    imports this file, so the model cannot reach a helper there without a cycle."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------------------------
# Down, mid and up blocks: one class per role, with flags (diffusers' CrossAttn*/plain variants share the keys)


def _resnet(cfg: UNetConfig, in_ch: int, out_ch: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)


class DownBlock(nn.Module):
    """One encoder level: `layers_per_block` x [ResNet, (Transformer)], then an optional stride-2 downsample.

    Returns the features and every intermediate output, which become skip connections of the up path.
    depth: transformer blocks per spatial transformer (the level's transformer_layers_per_block).
    """

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, heads: int, with_attention: bool,
                 add_downsample: bool, only_cross: bool = False, depth: int = 1) -> None:
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([_resnet(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n)])
        self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, cfg, only_cross, depth) for _ in range(n)]
                                        if with_attention else [])
        # key-compat: diffusers keeps the downsampler in a one-element list, `downsamplers.0.conv`.
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if add_downsample else [])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x: (B, C_in, H, W) -> (B, C_out, H', W') and the skips [(B, C_out, H, W) ..., (B, C_out, H', W')]."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: ResNet, Transformer, ResNet at the lowest resolution (diffusers UNetMidBlock2DCrossAttn)."""

    def __init__(self, cfg: UNetConfig, ch: int, heads: int, depth: int = 1) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(cfg, ch, ch), _resnet(cfg, ch, ch)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, cfg, depth=depth)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UpBlock(nn.Module):
    """One decoder level: `layers_per_block + 1` x [concat a skip, ResNet, (Transformer)], optional upsample.

    skip_chs: the channel count of each skip this level consumes, in the order it consumes them.
    """

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, skip_chs: list[int], heads: int,
                 with_attention: bool, add_upsample: bool, only_cross: bool = False, depth: int = 1) -> None:
        super().__init__()
        ins = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.resnets = nn.ModuleList([_resnet(cfg, c + s, out_ch) for c, s in zip(ins, skip_chs)])
        self.attentions = nn.ModuleList([Transformer2DModel(out_ch, heads, cfg, only_cross, depth) for _ in skip_chs]
                                        if with_attention else [])
        # key-compat: diffusers keeps the upsampler in a one-element list, `upsamplers.0.conv`.
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor) -> Tensor:
        """x: (B, C_in, H, W); pops its skips off the end of `skips` -> (B, C_out, H', W')."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for up in self.upsamplers:
            x = up(x)  # (B, C_out, 2H, 2W)
        return x


# ----------------------------------------------------------------------------------------------------------------
# The model


class UNet2DConditionModel(nn.Module):
    """eps (or v) = UNet(x_t, t, text context); state-dict keys identical to diffusers' UNet2DConditionModel."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if not isinstance(cfg, UNetConfig):
            raise TypeError(f"UNet2DConditionModel: cfg must be a UNetConfig, got {type(cfg).__name__}")
        self.config = cfg
        widths, heads, attn = cfg.block_out_channels, cfg.num_heads, cfg.cross_attention_levels
        depth, only = cfg.transformer_depths, cfg.only_cross_attention
        last = len(widths) - 1

        self.time_proj = Timesteps(widths[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(widths[0], cfg.time_embed_dim)
        # Class conditioning (the x4 upscaler's noise level): one learned vector per class, added to temb.
        self.class_embedding = None if cfg.num_class_embeds is None else \
            nn.Embedding(cfg.num_class_embeds, cfg.time_embed_dim)
        # SDXL micro-conditioning ("text_time"): sinusoids of the time_ids (no weights) and the MLP that maps
        # [pooled text | sinusoids] (B, P + N * addition_time_embed_dim) to (B, T), added to temb.
        self.add_time_proj = self.add_embedding = None
        if cfg.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)

        # Down path; record the channel count of every skip it leaves behind (conv_in's output is the first).
        skip_chs = [widths[0]]
        self.down_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            in_ch = widths[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(cfg, in_ch, width, heads[i], attn[i], add_downsample=i < last,
                                              only_cross=only[i], depth=depth[i]))
            skip_chs += [width] * (cfg.layers_per_block + (i < last))

        self.mid_block = MidBlock(cfg, widths[-1], heads[-1], depth[-1])  # diffusers: the last level's depth

        # Up path: the mirror image, each level consuming layers_per_block + 1 skips from the end of the list.
        self.up_blocks = nn.ModuleList()
        in_ch = widths[-1]
        for i in reversed(range(len(widths))):
            n = cfg.layers_per_block + 1
            level_skips = skip_chs[-n:][::-1]
            del skip_chs[-n:]
            self.up_blocks.append(UpBlock(cfg, in_ch, widths[i], level_skips, heads[i], attn[i], add_upsample=i > 0,
                                          only_cross=only[i], depth=depth[i]))
            in_ch = widths[i]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                class_labels: Tensor | int | None = None, *, added_cond_kwargs: dict[str, Tensor] | None = None,
                down_block_additional_residuals: list[Tensor] | tuple[Tensor, ...] | None = None,
                mid_block_additional_residual: Tensor | None = None) -> Tensor:
        """sample: (B, C_in, H, W), timestep: scalar or (B,), encoder_hidden_states: (B, S, D_text) -> (B, C_out, H, W).

        H and W must be divisible by cfg.downsample_factor (8 for every SD preset). Timesteps are used as given,
        fractional ones included (LMS and Euler schedulers). class_labels: scalar or (B,) ints in
        [0, num_class_embeds), required exactly when the config has num_class_embeds (the x4 upscaler's noise level).
        added_cond_kwargs: SDXL's micro-conditioning, required exactly when addition_embed_type is "text_time":
        {"text_embeds": (B, P) pooled text embedding, "time_ids": (B, N) original size, crop and target size (or
        aesthetic score)}, as in diffusers.
        The two residuals (a ControlNet's outputs, diffusers' names and semantics) come together: one per skip
        connection, added to it, and one added to the middle block's output (ldm/controlnet.py).
        """
        self._check_inputs(sample, encoder_hidden_states)
        added = self._added_cond(added_cond_kwargs, sample)  # (text_embeds, time_ids) or (None, None)
        t = self._timesteps(timestep, sample)  # (B,) on the sample's device
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("UNet: class_labels given, but this model has no class embedding (num_class_embeds)")
            labels = None
        else:
            labels = self._class_labels(class_labels, sample)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("UNet: down_block_additional_residuals and mid_block_additional_residual come together "
                             "(a ControlNet gives both)")
        down = None if down_block_additional_residuals is None else list(down_block_additional_residuals)
        # self.network: ldm.optimize.compile_unet may shadow it on this instance (positional arguments only)
        if down is None and added[0] is None:
            return self.network(sample, t, encoder_hidden_states, labels)
        return self.network(sample, t, encoder_hidden_states, labels, down, mid_block_additional_residual, *added)

    def network(self, sample: Tensor, t: Tensor, context: Tensor, class_labels: Tensor | None = None,
                down_residuals: list[Tensor] | None = None, mid_residual: Tensor | None = None,
                text_embeds: Tensor | None = None, time_ids: Tensor | None = None) -> Tensor:
        """The network itself on checked inputs: sample (B, C_in, H, W), t (B,) on its device, context (B, S, D_text),
        class_labels (B,) int64 on its device where the model has a class embedding, the ControlNet residuals,
        SDXL's text_embeds (B, P) and time_ids (B, N) where the model has the text_time embedding.

        Kept apart from forward's input checks so the math reads alone, and so torch.compile sees tensors on one
        device and no Python checks: ldm.optimize.compile_unet shadows this method on one instance by its graph.
        down_residuals / mid_residual: a ControlNet's residuals, added to the skips and to the middle's output.
        """
        temb = self.time_proj(t).to(sample.dtype)  # (B, C0); the sinusoid is fp32, the MLP runs in the model dtype
        temb = self.time_embedding(temb)  # (B, T)
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(class_labels).to(sample.dtype)  # (B, T): diffusers adds, no concat
        if self.add_embedding is not None:  # SDXL: each micro-conditioning number gets its own sinusoid
            B = time_ids.shape[0]
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(B, -1)  # (B*N, E) -> (B, N*E), fp32
            add_embeds = torch.cat([text_embeds, time_embeds], dim=-1)  # (B, P + N*E), promoted as diffusers does
            temb = temb + self.add_embedding(add_embeds.to(temb.dtype))  # (B, T)

        x = self.conv_in(sample)  # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, level_skips = block(x, temb, context)
            skips += level_skips
        if down_residuals is not None:  # ControlNet: one residual per skip, the skips' shapes
            if len(down_residuals) != len(skips):
                raise ValueError(f"UNet: {len(down_residuals)} down_block_additional_residuals, the UNet has "
                                 f"{len(skips)} skip connections")
            skips = [skip + res for skip, res in zip(skips, down_residuals)]
        x = self.mid_block(x, temb, context)  # (B, C_last, H/f, W/f)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            x = block(x, skips, temb, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C_out, H, W)

    def _check_inputs(self, sample: Tensor, context: Tensor) -> None:
        cfg = self.config
        if not isinstance(sample, Tensor) or sample.ndim != 4:
            raise ValueError(f"UNet: sample must be a (B, C, H, W) tensor, got "
                             f"{tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__}")
        if sample.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet: sample has {sample.shape[1]} channels, expected in_channels={cfg.in_channels}")
        f = cfg.downsample_factor
        if sample.shape[2] % f or sample.shape[3] % f:
            raise ValueError(f"UNet: latent height and width must be divisible by {f}, got "
                             f"{sample.shape[2]}x{sample.shape[3]}")
        if not isinstance(context, Tensor) or context.ndim != 3:
            raise ValueError(f"UNet: encoder_hidden_states must be a (B, S, D) tensor, got "
                             f"{tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__}")
        if context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNet: encoder_hidden_states width is {context.shape[-1]}, expected "
                             f"cross_attention_dim={cfg.cross_attention_dim}")
        if context.shape[0] != sample.shape[0]:
            raise ValueError(f"UNet: encoder_hidden_states batch is {context.shape[0]}, expected the sample's batch "
                             f"{sample.shape[0]}")

    def _added_cond(self, added: dict[str, Tensor] | None,
                    sample: Tensor) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """SDXL's added_cond_kwargs checked against the config: (text_embeds (B, P), time_ids (B, N)) on the sample's
        device, or (None, None) for a UNet without the text_time embedding."""
        cfg, B = self.config, sample.shape[0]
        if cfg.addition_embed_type is None:
            if added:
                raise ValueError(f"UNet: added_cond_kwargs given ({', '.join(added)}), but this model has no added "
                                 f"conditioning (addition_embed_type is None)")
            return None, None
        missing = [k for k in ("text_embeds", "time_ids") if not isinstance(added, dict) or added.get(k) is None]
        if missing:
            raise ValueError(f"UNet: this model has addition_embed_type 'text_time' (SDXL), which needs "
                             f"added_cond_kwargs with {' and '.join(repr(k) for k in missing)} (text_embeds: (B, "
                             f"pooled text width), time_ids: (B, number of size/crop/score values))")
        unknown = set(added) - {"text_embeds", "time_ids"}
        if unknown:
            raise ValueError(f"UNet: unknown added_cond_kwargs {sorted(unknown)} (expected text_embeds and time_ids)")
        text, ids = added["text_embeds"], added["time_ids"]
        for name, x in (("text_embeds", text), ("time_ids", ids)):
            if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] != B or not x.is_floating_point():
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"UNet: added_cond_kwargs[{name!r}] must be a float tensor (B={B}, n), got {got}")
        width = text.shape[1] + ids.shape[1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"UNet: text_embeds width {text.shape[1]} + {ids.shape[1]} time_ids x "
                             f"{cfg.addition_time_embed_dim} = {width}, expected projection_class_embeddings_input_dim="
                             f"{cfg.projection_class_embeddings_input_dim}")
        return text.to(sample.device), ids.to(sample.device)

    def _class_labels(self, labels: Tensor | int | None, sample: Tensor) -> Tensor:
        """Class labels as a (B,) int64 tensor on the sample's device, checked against num_class_embeds."""
        n, B = self.config.num_class_embeds, sample.shape[0]
        if labels is None:
            raise ValueError(f"UNet: class_labels are required: this model has a class embedding "
                             f"(num_class_embeds={n}; for the x4 upscaler, the noise level)")
        if isinstance(labels, bool) or not isinstance(labels, (int, Tensor)):
            raise TypeError(f"UNet: class_labels must be an int or an integer tensor, got {type(labels).__name__}")
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"UNet: class_labels must be integers, got dtype {labels.dtype}")
        if labels.ndim > 1 or (labels.ndim == 1 and labels.shape[0] not in (1, B)):
            raise ValueError(f"UNet: class_labels must be a scalar or have shape (1,) or ({B},), got "
                             f"{tuple(labels.shape)}")
        if labels.device.type != "meta" and (bool((labels < 0).any()) or bool((labels >= n).any())):
            raise ValueError(f"UNet: class_labels must lie in [0, {n}), got {labels.tolist()}")
        return labels.reshape(-1).to(sample.device, torch.int64).expand(B)

    @staticmethod
    def _timesteps(timestep: Tensor | float | int, sample: Tensor) -> Tensor:
        """A scalar or per-item timestep as a (B,) tensor, values untouched (diffusers' get_time_embed)."""
        B = sample.shape[0]
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float, Tensor)):
            raise TypeError(f"UNet: timestep must be an int, a float or a tensor, got {type(timestep).__name__}")
        if not isinstance(timestep, Tensor):
            # python floats as float64, as diffusers does; the embedding computes in fp32 either way
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            return torch.full((B,), timestep, dtype=dtype, device=sample.device)
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise TypeError(f"UNet: timestep must have a real dtype, got {timestep.dtype}")
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, B)):
            raise ValueError(f"UNet: timestep must be a scalar, 0-d or shape (1,) or ({B},) (the batch), got shape "
                             f"{tuple(timestep.shape)}")
        return timestep.reshape(-1).to(sample.device).expand(B)
