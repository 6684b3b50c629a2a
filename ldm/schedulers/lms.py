"""LMS: a linear multistep (variable-step Adams-Bashforth) solver of the probability-flow ODE in sigma.

The ODE is eq. (3) of Karras et al. 2022 (arXiv:2206.00364), dx/dsigma = (x - x0(x; sigma)) / sigma; the method is
k-diffusion's `sample_lms` / `linear_multistep_coeff` (Crowson), Adams-Bashforth as in Hairer, Norsett & Wanner,
"Solving ODEs I", section III.1, eq. (1.5). Mirrors diffusers 0.42.1 `schedulers/scheduling_lms_discrete.py`
(LMSDiscreteScheduler); where diffusers integrates the Lagrange basis with scipy's `quad`, the polynomial is
integrated exactly here (its degree is at most 3).

One step from sigma_i to sigma_{i+1} with the last m = min(i + 1, order) slopes d_{i}, d_{i-1}, ..., d_{i-m+1}:
    (1) d_i = (x - x0) / sigma_i                                           the ODE slope at sigma_i
    (2) c_j = integral_{sigma_i}^{sigma_{i+1}} l_j(tau) dtau,                 the Lagrange basis polynomial
            l_j(tau) = prod_{k != j, k < m} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})
    (3) x_{i+1} = x_i + sum_j c_j d_{i-j}                                  (the Lagrange interpolant of the slopes,
                                                                            integrated over the step)
Shapes: B batch, C channels, H, W latent size; T = num_train_timesteps, n = num_inference_steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ldm.rng import Generator

from .common import SCHEDULE_CHOICES, SCHEDULE_DEFAULTS, SigmaScheduler


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Eq. (2): the weight of slope d_{i-j} in an order-`order` step from sigmas[i] to sigmas[i + 1], exact."""
    roots = [sigmas[i - k] for k in range(order) if k != j]
    scale = float(np.prod([sigmas[i - j] - sigmas[i - k] for k in range(order) if k != j]))
    antiderivative = np.polyint(np.atleast_1d(np.poly(roots)) / scale)  # the Lagrange basis polynomial, integrated
    return float(np.polyval(antiderivative, sigmas[i + 1]) - np.polyval(antiderivative, sigmas[i]))


class LMSDiscreteScheduler(SigmaScheduler):
    """Linear multistep sampling (order 4 by default) over the discrete SD noise levels."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        **SCHEDULE_DEFAULTS, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    }
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {**SCHEDULE_CHOICES, "use_karras_sigmas": (True, False)}
    _FIXED: ClassVar[tuple[str, ...]] = ("use_exponential_sigmas", "use_beta_sigmas")

    def _reset_history(self) -> None:
        """Forget past slopes (set_timesteps calls this after choosing the sigmas)."""
        self._sigma_list = self.sigmas.tolist()  # the coefficients of eq. (2) are computed in Python floats
        self.derivatives: list[torch.Tensor] = []

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None, order: int = 4) -> torch.Tensor:
        """x at sigma_i (B, C, H, W) -> x at sigma_{i+1} (B, C, H, W); `generator` is unused (deterministic)."""
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        x0 = self._x0_from(model_output, sample, sigma)
        self.derivatives.append((sample - x0) / sigma)  # (1)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # diffusers' rule: the order follows the step index (an img2img start uses the high-order weights at once)
        order = min(i + 1, order)
        coeffs = [lms_coefficient(self._sigma_list, i, order, j) for j in range(order)]  # (2)
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))  # (3)
        self._step_index += 1
        return prev_sample
