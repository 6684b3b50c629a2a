"""Euler: Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364), Algorithm 2 with first-order (Euler) steps, as in k-diffusion's `sample_euler`.

Mirrors diffusers 0.42.1 `schedulers/scheduling_euler_discrete.py` (EulerDiscreteScheduler).

In the sigma parameterisation x = x0 + sigma eps, sampling solves the probability-flow ODE (eq. 3 with
sigma(t) = t, s(t) = 1):
    (3)    dx/dsigma = (x - D(x; sigma)) / sigma          D = the denoiser, x0 predicted from the model output
One step from sigma_i to sigma_{i+1} (Algorithm 2, lines 4-8; with churn gamma_i > 0 noise is added first):
    (A2.4) sigma_hat = sigma_i (1 + gamma_i);  x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) z
    (A2.7) d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
    (A2.8) x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d
Shapes: B batch, C channels, H, W latent size; T = num_train_timesteps, n = num_inference_steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ldm.rng import Generator, randn

from .common import SCHEDULE_CHOICES, SCHEDULE_DEFAULTS, SigmaScheduler


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler steps of the probability-flow ODE over the discrete SD noise levels (optionally Karras-spaced)."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        **SCHEDULE_DEFAULTS, "interpolation_type": "linear", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
        "timestep_type": "discrete", "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    }
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **SCHEDULE_CHOICES, "use_karras_sigmas": (True, False), "rescale_betas_zero_snr": (True, False),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    _FIXED: ClassVar[tuple[str, ...]] = ("interpolation_type", "use_exponential_sigmas", "use_beta_sigmas",
                                         "timestep_type")

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
             s_noise: float = 1.0) -> torch.Tensor:
        """x at sigma_i (B, C, H, W) -> x at sigma_{i+1} (B, C, H, W); churn as Algorithm 2 (default off)."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep: pass one of scheduler.timesteps (a float), not an integer step index")
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]

        # (A2.4) churn: raise the noise level to sigma_hat by adding fresh noise
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        # (A2.7) the ODE slope from the denoised estimate (v uses sigma, as diffusers)
        if self._cfg["prediction_type"] == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:
            x0 = self._x0_from(model_output, sample, sigma)
        derivative = (sample - x0) / sigma_hat

        # (A2.8) the Euler step
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        return prev_sample
