"""DDIM: Denoising Diffusion Implicit Models, Song, Meng & Ermon 2020 (arXiv:2010.02502).

Mirrors diffusers 0.42.1 `schedulers/scheduling_ddim.py` (DDIMScheduler). v-prediction: Salimans & Ho 2022,
"Progressive Distillation" (arXiv:2202.00512), section 4 / appendix D.

One step from t to the previous timestep t' = t - T // n (alpha = alphas_cumprod):
    (12a) x0 = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)                  "predicted x_0"
    (16)  sigma_t = eta * sqrt((1 - alpha_t') / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_t')
    (12b) dir = sqrt(1 - alpha_t' - sigma_t^2) eps                              "direction pointing to x_t"
    (12c) x_t' = sqrt(alpha_t') x0 + dir + sigma_t z,   z ~ N(0, I)            (eta = 0: deterministic DDIM;
                                                                                  eta = 1: DDPM's posterior)
Shapes: B batch, C channels, H, W latent size; T = num_train_timesteps, n = num_inference_steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ldm.rng import Generator, randn

from .common import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, Scheduler, broadcast_to, make_betas
from .common import spaced_timesteps


class DDIMScheduler(Scheduler):
    """Deterministic (eta = 0) or stochastic (eta > 0) DDIM sampling; the SD 2.x 768-v default."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS,
        "clip_sample": (True, False), "set_alpha_to_one": (True, False), "rescale_betas_zero_snr": (True, False),
    }
    _FIXED: ClassVar[tuple[str, ...]] = ("thresholding",)  # Imagen's dynamic thresholding: not for latents
    _uses_begin_index: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        cfg = self._cfg
        self.betas = make_betas(cfg)  # (T,)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) alpha_bar_t
        # alpha_bar "before" t = 0: 1 (a clean sample) or, as SD was trained, alpha_bar_0.
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.arange(0, cfg["num_train_timesteps"])[::-1].copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the n timesteps (int64, descending) the sampler visits."""
        self._check_num_steps(num_inference_steps)
        cfg = self._cfg
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(cfg["timestep_spacing"], num_inference_steps, cfg["num_train_timesteps"],
                              cfg["steps_offset"], round_linspace=True)
        self.timesteps = torch.from_numpy(ts.astype(np.int64)).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """DDIM works on x_t itself: the model input is the sample unchanged."""
        return sample

    def _alpha_prev(self, prev_timestep: int) -> torch.Tensor:
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None, eta: float = 0.0, use_clipped_model_output: bool = False,
             variance_noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, C, H, W) -> x_{t'} (B, C, H, W), eq. (12) with sigma_t of eq. (16)."""
        self._check_ready()
        self._check_in_schedule(timestep)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        cfg = self._cfg
        t = int(timestep)
        prev_t = t - cfg["num_train_timesteps"] // self.num_inference_steps
        alpha_t, alpha_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        beta_t = 1 - alpha_t

        # (12a) predicted x_0 and the noise it implies
        if cfg["prediction_type"] == "epsilon":
            x0 = (sample - beta_t**0.5 * model_output) / alpha_t**0.5
            eps = model_output
        else:  # v_prediction: v = sqrt(alpha) eps - sqrt(1 - alpha) x0
            x0 = alpha_t**0.5 * sample - beta_t**0.5 * model_output
            eps = alpha_t**0.5 * model_output + beta_t**0.5 * sample
        if cfg["clip_sample"]:
            x0 = x0.clamp(-cfg["clip_sample_range"], cfg["clip_sample_range"])

        # (16) the noise level of this step
        variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
        std_dev_t = eta * variance**0.5
        if use_clipped_model_output:  # re-derive eps from the clipped x0 (as in Glide)
            eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5

        # (12b, 12c)
        direction = (1 - alpha_prev - std_dev_t**2) ** 0.5 * eps
        prev_sample = alpha_prev**0.5 * x0 + direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        return prev_sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process, DDPM eq. (4): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; timesteps (B,)."""
        alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = torch.as_tensor(timesteps).to(original_samples.device)
        sqrt_alpha = broadcast_to(alphas_cumprod[timesteps] ** 0.5, original_samples)  # (B, 1, 1, 1)
        sqrt_one_minus_alpha = broadcast_to((1 - alphas_cumprod[timesteps]) ** 0.5, original_samples)
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise
