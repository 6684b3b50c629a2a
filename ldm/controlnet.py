"""ControlNet: conditioning Stable Diffusion on an image (edges, depth, pose, scribbles).

Paper: Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023),
section 3 (a trainable copy of the encoder joined by zero convolutions) and 3.2 (the hint encoder). Reference:
diffusers 0.42.1 `models/controlnets/controlnet.py` (ControlNetModel, ControlNetConditioningEmbedding). The encoder
and middle block are our UNet's own blocks (ldm/unet.py), not copies; attribute names mirror diffusers' keys, so a
diffusers ControlNetModel state dict loads with `strict=True` and no mapping.

The data path, for SD 1.5 at a 64x64 latent (hint 512x512):

    hint (B,3,512,512) in [0,1] ─ controlnet_cond_embedding: 8 3x3 convs, 3 of stride 2, SiLU ─> (B,320,64,64)
    x_t (B,4,64,64) ─ conv_in ─> (B,320,64,64) ─ + hint features ─┬─ down_blocks (the UNet's encoder) ─ mid_block
    every skip connection (12 of them) and the middle's output ─ controlnet_down_blocks / controlnet_mid_block
    (1x1 "zero convolutions", zero at initialisation) ─> 12 down residuals + 1 mid residual, each x scale,
    added by the UNet to its own skips and middle output (UNet2DConditionModel.forward's residual arguments)

Because the zero convolutions (and the hint encoder's last conv) start at zero, an untrained ControlNet adds
exactly nothing: training starts from the unchanged Stable Diffusion.

Shapes: B batch, C channels, H, W latent height and width, f the hint encoder's downsampling (8 for 4 widths).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config import SD15, SD21_BASE, UNetConfig
from ldm.unet import DownBlock, MidBlock, TimestepEmbedding, Timesteps, UNet2DConditionModel

# ----------------------------------------------------------------------------------------------------------------
# Config

# diffusers ControlNetModel config keys that belong to the ControlNet itself, not to the UNet encoder it copies.
_OWN_KEYS = {"conditioning_channels", "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order",
             "global_pool_conditions"}

# The UNet keys diffusers' ControlNetModel takes (no up path, no out_channels, sample_size or dropout).
_UNET_KEYS = {"_diffusers_version", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
              "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
              "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
              "upcast_attention"}


@dataclass(frozen=True)
class ControlNetConfig:
    # The UNet whose encoder and middle block the ControlNet copies (its up-path fields are unused).
    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3  # channels of the control image
    # Widths of the hint encoder's levels (diffusers `conditioning_embedding_out_channels`); each level after the
    # first halves the resolution, so 4 widths take a 512x512 hint to the 64x64 latent grid.
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"  # "bgr": the control image's channels are flipped first (diffusers' option)
    # ControlNet 1.1 shuffle: every residual is averaged over its pixels (diffusers `global_pool_conditions`).
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        owner = "ControlNetConfig"
        object.__setattr__(self, "hint_channels", tuple(self.hint_channels))
        if not isinstance(self.unet, UNetConfig):
            raise TypeError(f"{owner}: unet must be a UNetConfig, got {type(self.unet).__name__}")
        if not self.hint_channels or any(not isinstance(c, int) or c <= 0 for c in self.hint_channels):
            raise ValueError(f"{owner}: hint_channels must be positive ints, got {self.hint_channels}")
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels <= 0:
            raise ValueError(f"{owner}: conditioning_channels must be a positive int, got {self.conditioning_channels}")
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"{owner}: channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")

    @property
    def hint_factor(self) -> int:
        """How many control-image pixels make one latent pixel (8 for the official 4-level hint encoder)."""
        return 2 ** (len(self.hint_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "ControlNetConfig":
        """From a diffusers ControlNetModel config.json dict; the UNet keys are read by UNetConfig.from_diffusers."""
        own = {k: d[k] for k in _OWN_KEYS if k in d}
        rest = {k: v for k, v in d.items() if k not in _OWN_KEYS}
        down = rest.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        # A ControlNet has no up path: mirror the down path so UNetConfig's check is met (its fields go unused).
        up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
        unet = UNetConfig.from_diffusers({**rest, "up_block_types": up})
        return cls(unet=unet, conditioning_channels=own.get("conditioning_channels", 3),
                   hint_channels=tuple(own.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                   channel_order=own.get("controlnet_conditioning_channel_order", "rgb"),
                   global_pool_conditions=bool(own.get("global_pool_conditions", False)))

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ControlNetModel config.json (from_diffusers' inverse)."""
        d = {k: v for k, v in self.unet.to_diffusers().items() if k in _UNET_KEYS}
        return {"_class_name": "ControlNetModel", **d, "conditioning_channels": self.conditioning_channels,
                "conditioning_embedding_out_channels": list(self.hint_channels),
                "controlnet_conditioning_channel_order": self.channel_order,
                "global_pool_conditions": self.global_pool_conditions}


# Presets: the official ControlNet 1.0 / 1.1 for SD 1.5 (lllyasviel) and the community ones for SD 2.1.
# (sample_size None: diffusers' ControlNet config records none.)
CONTROLNET_SD15 = ControlNetConfig(unet=replace(SD15.unet, sample_size=None))
CONTROLNET_SD21 = ControlNetConfig(unet=replace(SD21_BASE.unet, sample_size=None))


# ----------------------------------------------------------------------------------------------------------------
# The hint encoder


class ControlNetConditioningEmbedding(nn.Module):
    """The hint encoder (the original's `input_hint_block`): image (B, 3, fH, fW) -> features (B, C0, H, W).

    conv_in, then per level a 3x3 conv and a stride-2 3x3 conv to the next width, SiLU after each; conv_out (zero at
    initialisation) to the UNet's first width.
    """

    def __init__(self, out_ch: int, in_ch: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_ch, 3, padding=1))

    def forward(self, hint: Tensor) -> Tensor:
        x = F.silu(self.conv_in(hint))  # (B, c0, fH, fW)
        for block in self.blocks:
            x = F.silu(block(x))  # every second block halves the size
        return self.conv_out(x)  # (B, C0, H, W)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """A zero convolution: weights and bias zero at initialisation, so the ControlNet's output starts at zero."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


# ----------------------------------------------------------------------------------------------------------------
# The model


class ControlNetModel(nn.Module):
    """(down residuals, mid residual) = ControlNet(x_t, t, text context, control image); diffusers' keys."""

    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ControlNetConfig):
            raise TypeError(f"ControlNetModel: cfg must be a ControlNetConfig, got {type(cfg).__name__}")
        self.config = cfg
        u = cfg.unet
        widths, heads, attn = u.block_out_channels, u.num_heads, u.cross_attention_levels
        last = len(widths) - 1

        self.time_proj = Timesteps(widths[0], u.flip_sin_to_cos, u.freq_shift)
        self.time_embedding = TimestepEmbedding(widths[0], u.time_embed_dim)
        self.conv_in = nn.Conv2d(u.in_channels, widths[0], 3, padding=1)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(widths[0], cfg.conditioning_channels,
                                                                         cfg.hint_channels)

        # The UNet's encoder, with one zero convolution per skip connection it leaves behind (conv_in's first).
        self.down_blocks = nn.ModuleList()
        skip_chs = [widths[0]]
        for i, width in enumerate(widths):
            in_ch = widths[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(u, in_ch, width, heads[i], attn[i], add_downsample=i < last))
            skip_chs += [width] * (u.layers_per_block + (i < last))
        self.controlnet_down_blocks = nn.ModuleList([_zero(nn.Conv2d(c, c, 1)) for c in skip_chs])

        self.mid_block = MidBlock(u, widths[-1], heads[-1])
        self.controlnet_mid_block = _zero(nn.Conv2d(widths[-1], widths[-1], 1))

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                controlnet_cond: Tensor, conditioning_scale: float = 1.0,
                guess_mode: bool = False) -> tuple[list[Tensor], Tensor]:
        """sample (B, C_in, H, W), timestep scalar or (B,), encoder_hidden_states (B, S, D_text), controlnet_cond
        (B, 3, fH, fW) -> ([12 x (B, C_i, H_i, W_i)] down residuals, (B, C_last, H/8, W/8) mid residual).

        conditioning_scale multiplies every residual; guess_mode scales them from 0.1 (the first skip) to 1.0 (the
        middle) on a log scale, times conditioning_scale (diffusers' formula, for prompts that say little).
        """
        self._check_inputs(sample, encoder_hidden_states, controlnet_cond)
        t = UNet2DConditionModel._timesteps(timestep, sample)  # (B,)
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # (B, T)
        if self.config.channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])

        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, level_skips = block(x, temb, encoder_hidden_states)
            skips += level_skips
        x = self.mid_block(x, temb, encoder_hidden_states)  # (B, C_last, H/8, W/8)

        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale  # 0.1 .. 1.0
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]  # (B, C_i, 1, 1)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid

    def _check_inputs(self, sample: Tensor, context: Tensor, cond: Tensor) -> None:
        cfg, u, f = self.config, self.config.unet, self.config.hint_factor
        checks = (("sample", sample, 4), ("encoder_hidden_states", context, 3), ("controlnet_cond", cond, 4))
        for name, x, ndim in checks:
            if not isinstance(x, Tensor) or x.ndim != ndim:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"ControlNet: {name} must be a {ndim}-D tensor, got {got}")
        B, C, H, W = sample.shape
        if C != u.in_channels or H % u.downsample_factor or W % u.downsample_factor:
            raise ValueError(f"ControlNet: sample must be (B, {u.in_channels}, H, W) with H, W divisible by "
                             f"{u.downsample_factor}, got {tuple(sample.shape)}")
        if context.shape[0] != B or context.shape[-1] != u.cross_attention_dim:
            raise ValueError(f"ControlNet: encoder_hidden_states must be ({B}, S, {u.cross_attention_dim}), got "
                             f"{tuple(context.shape)}")
        expected = (B, cfg.conditioning_channels, H * f, W * f)
        if tuple(cond.shape) != expected:
            raise ValueError(f"ControlNet: controlnet_cond must have shape {expected} (the sample's batch, "
                             f"{cfg.conditioning_channels} channels, {f}x the latent size), got {tuple(cond.shape)}")
