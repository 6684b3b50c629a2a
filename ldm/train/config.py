"""The configuration of a training run (ldm/train/trainer.py): its sizes, steps and rates, checked at construction.

`TrainConfig(out_dir=...)` is the shipped default: the model sizes below (docs/training.md explains the budget),
6,000 VAE steps then 4,000 UNet steps on 64 px shapes. A run's config is saved in its checkpoint (`to_json`) and a
resumed run must match it (`from_json`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig

# ------------------------------------------------------------------------------------------------------------------
# The model sizes of the shipped default (docs/training.md explains the budget)

DEFAULT_VAE = VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        mid_block_add_attention=False, sample_size=64, scaling_factor=1.0)  # f = 4: 64 px -> 16
DEFAULT_UNET = UNetConfig(block_out_channels=(32, 64, 128), cross_attention_levels=(False, True, True),
                          num_heads=(1, 2, 4), layers_per_block=1, cross_attention_dim=64, norm_num_groups=8,
                          sample_size=16)
# CLIP's 49,408-token embedding dominates the size: width 64 keeps it at 3.2 M parameters (6.3 MB in fp16).
DEFAULT_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              projection_dim=64, hidden_act="quick_gelu")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str  # checkpoint.safetensors, loss_curve.png, samples/, model/ (the exported diffusers folder)
    seed: int = 0
    image_size: int = 64
    vae_steps: int = 6000
    unet_steps: int = 4000
    vae_batch_size: int = 16
    batch_size: int = 32
    vae_crop: int = 32  # the VAE is fully convolutional: it trains on random crops (4x cheaper at 64 -> 32)
    vae_lr: float = 1e-3
    lr: float = 5e-4
    warmup_steps: int = 100  # linear warm-up at the start of each stage, then a cosine decay to 10%
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    kl_weight: float = 1e-4  # on the KL per latent element (a light penalty, as LDM's "KL-reg")
    edge_weight: float = 0.5  # on the L1 distance of Sobel gradients: crisp shape edges without a perceptual net
    caption_dropout: float = 0.1  # the probability of training on the empty caption (for guidance)
    two_objects: float = 0.4  # the share of two-object scenes in the data
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    sample_every: int = 500  # sample grids during the UNet stage (0: only at the end)
    vae: VAEConfig = DEFAULT_VAE
    unet: UNetConfig = DEFAULT_UNET
    text: CLIPTextConfig = DEFAULT_TEXT
    sample_prompts: tuple[str, ...] = ("a red circle", "a green triangle", "a blue square", "a yellow circle",
                                       "a purple triangle", "a cyan square", "a red square above a blue circle",
                                       "")

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise TypeError(f"out_dir must be a non-empty str, got {self.out_dir!r}")
        for name in ("seed", "vae_steps", "unet_steps", "warmup_steps", "checkpoint_every", "sample_every"):
            _check_int(name, getattr(self, name), 0)
        for name in ("image_size", "vae_batch_size", "batch_size", "vae_crop"):
            _check_int(name, getattr(self, name), 1)
        if self.vae_steps + self.unet_steps == 0:
            raise ValueError("vae_steps + unet_steps must be positive: there is nothing to train")
        for name in ("vae_lr", "lr", "ema_decay", "grad_clip"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("caption_dropout", "two_objects", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        f = self.vae.downsample_factor
        if self.image_size % f or self.vae_crop % f or self.vae_crop > self.image_size:
            raise ValueError(f"image_size {self.image_size} and vae_crop {self.vae_crop} must be multiples of the "
                             f"VAE's downsample factor {f}, with vae_crop <= image_size")
        if self.unet.in_channels != self.vae.latent_channels or self.unet.out_channels != self.vae.latent_channels:
            raise ValueError(f"unet in/out_channels ({self.unet.in_channels}/{self.unet.out_channels}) must equal "
                             f"the VAE's latent_channels {self.vae.latent_channels}")
        if self.unet.cross_attention_dim != self.text.hidden_size:
            raise ValueError(f"unet.cross_attention_dim {self.unet.cross_attention_dim} must equal the text "
                             f"encoder's hidden_size {self.text.hidden_size}")

    @property
    def total_steps(self) -> int:
        return self.vae_steps + self.unet_steps

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["vae"], d["unet"], d["text"] = VAEConfig(**d["vae"]), UNetConfig(**d["unet"]), CLIPTextConfig(**d["text"])
        d["sample_prompts"] = tuple(d["sample_prompts"])
        return cls(**d)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
