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

from .common import SCHEDULE_CHOICES, SCHEDULE_DEFAULTS, AlphaScheduler, spaced_timesteps


class DDIMScheduler(AlphaScheduler):
    """Deterministic (eta = 0) or stochastic (eta > 0) DDIM sampling; the SD 2.x 768-v default."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        **SCHEDULE_DEFAULTS, "timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True,
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
        "rescale_betas_zero_snr": False,
    }
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **SCHEDULE_CHOICES, "clip_sample": (True, False), "set_alpha_to_one": (True, False),
        "rescale_betas_zero_snr": (True, False),
    }
    _FIXED: ClassVar[tuple[str, ...]] = ("thresholding",)  # Imagen's dynamic thresholding: not for latents
    _finite_terminal_sigma: ClassVar[bool] = False  # DDIM takes the zero terminal SNR as it is

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the n timesteps (int64, descending) the sampler visits."""
        self._check_num_steps(num_inference_steps)
        cfg = self._cfg
        self.num_inference_steps = num_inference_steps
        ts = spaced_timesteps(cfg["timestep_spacing"], num_inference_steps, cfg["num_train_timesteps"],
                              cfg["steps_offset"], round_linspace=True)
        self.timesteps = torch.from_numpy(ts.astype(np.int64)).to(device)

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
