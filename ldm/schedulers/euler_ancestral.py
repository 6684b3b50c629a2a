"""Euler ancestral: an Euler step of the probability-flow ODE down to sigma_down, then fresh noise up to sigma_{i+1}.

Karras et al. 2022 (arXiv:2206.00364) eq. (3) for the ODE; the ancestral split is k-diffusion's
`get_ancestral_step` / `sample_euler_ancestral` (Crowson), which makes each step match the DDPM ancestral sampler
of Ho et al. 2020 (arXiv:2006.11239) in the variance-exploding sigma view. Mirrors diffusers 0.42.1
`schedulers/scheduling_euler_ancestral_discrete.py` (EulerAncestralDiscreteScheduler).

One step from sigma_i (= sigma_from) to sigma_{i+1} (= sigma_to):
    (1) sigma_up   = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)      the noise to re-inject
    (2) sigma_down = sqrt(sigma_to^2 - sigma_up^2)                                     where the ODE step lands
    (3) d = (x - x0) / sigma_from                                                      ODE slope, eq. (3)
    (4) x' = x + (sigma_down - sigma_from) d + sigma_up z,   z ~ N(0, I)
Shapes: B batch, C channels, H, W latent size; T = num_train_timesteps, n = num_inference_steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ldm.rng import Generator, randn

from .common import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, SigmaScheduler, make_betas
from .common import spaced_sigmas


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Stochastic Euler sampling ("euler-a"): reproducible with the same CPU generator as diffusers."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS,
        "rescale_betas_zero_snr": (True, False),
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.betas = make_betas(self._cfg)  # (T,)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)
        if self._cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2**-24  # zero SNR would make sigma infinite: nearly zero instead
        self.set_timesteps(self._cfg["num_train_timesteps"])  # a usable schedule before set_timesteps
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose n (float32) timesteps and their n + 1 sigmas (the last one 0)."""
        self._check_num_steps(num_inference_steps)
        cfg, n = self._cfg, num_inference_steps
        self.num_inference_steps = n
        timesteps, sigmas, _ = spaced_sigmas(cfg, n, self.alphas_cumprod)  # (n,), (n,)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (n + 1,)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None) -> torch.Tensor:
        """x at sigma_i (B, C, H, W) -> x at sigma_{i+1} (B, C, H, W); draws noise as diffusers' randn_tensor."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep: pass one of scheduler.timesteps (a float), not an integer step index")
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.to(torch.float32)
        x0 = self._x0_from(model_output, sample, sigma)

        sigma_from, sigma_to = sigma, self.sigmas[self._step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5  # (1)
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5  # (2)
        derivative = (sample - x0) / sigma  # (3)
        prev_sample = sample + derivative * (sigma_down - sigma)  # (4) the deterministic part
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        return prev_sample
