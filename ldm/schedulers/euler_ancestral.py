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

import torch

from ldm.rng import Generator, randn

from .common import SCHEDULE_CHOICES, SCHEDULE_DEFAULTS, SigmaScheduler


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Stochastic Euler sampling ("euler-a"): reproducible with the same CPU generator as diffusers."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {**SCHEDULE_DEFAULTS, "rescale_betas_zero_snr": False}
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {**SCHEDULE_CHOICES, "rescale_betas_zero_snr": (True, False)}

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
