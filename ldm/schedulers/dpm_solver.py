"""DPM-Solver++ (multistep): Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (arXiv:2211.01095). Karras sigmas: Karras et al. 2022 (arXiv:2206.00364) eq. (5).

Mirrors diffusers 0.42.1 `schedulers/scheduling_dpmsolver_multistep.py` (DPMSolverMultistepScheduler) for the
`dpmsolver++` algorithm (the data-prediction ODE solver; "dpm++2m" with solver_order=2).

With alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t, lambda = log(alpha_t / sigma_t) (half the log-SNR),
and x0_i the data prediction at step i, a step from s (= step i) to t (= step i + 1), h = lambda_t - lambda_s:
    (first order, eq. 8 / Algorithm 1 with k = 1)
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_i
    (second order multistep, Algorithm 2 "DPM-Solver++(2M)"; r = h_{i-1} / h, D1 = (x0_i - x0_{i-1}) / r)
        midpoint: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (x0_i + D1 / 2)
        heun:     x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_i + alpha_t ((e^{-h} - 1) / h + 1) D1
    (third order multistep, appendix B "DPM-Solver++(3M)", as diffusers writes it)
The first step is first order (no history yet); so is the last one (lower_order_final / final sigma 0).

Shapes: B batch, C channels, H, W latent size; T = num_train_timesteps, n = num_inference_steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ldm.rng import Generator

from .common import SCHEDULE_CHOICES, SCHEDULE_DEFAULTS, TIMESTEP_SPACINGS, Scheduler, broadcast_to
from .common import karras_sigmas, sigma_to_t, train_sigmas


def dpm_timesteps(spacing: str, n: int, T: int, last_timestep: int, steps_offset: int) -> np.ndarray:
    """DPM-Solver's own spacing (diffusers): n + 1 points down to 0 with the final 0 dropped, descending int64."""
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last_timestep, 0, -T / n).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VP pair (alpha_t, sigma_t) of a VE sigma: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ multistep (order 2 by default: "dpm++2m"; `use_karras_sigmas=True`: "dpm++2m-karras")."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        **SCHEDULE_DEFAULTS, "solver_order": 2, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "variance_type": None, "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential",
    }
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **SCHEDULE_CHOICES, "solver_order": (1, 2, 3), "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"), "lower_order_final": (True, False), "euler_at_final": (True, False),
        "use_karras_sigmas": (True, False), "final_sigmas_type": ("zero", "sigma_min"),
        "rescale_betas_zero_snr": (True, False),
    }
    _FIXED: ClassVar[tuple[str, ...]] = ("thresholding", "use_exponential_sigmas", "use_beta_sigmas",
                                         "use_lu_lambdas", "use_flow_sigmas", "variance_type",
                                         "use_dynamic_shifting")

    @classmethod
    def _read_config(cls, given: dict[str, Any]) -> dict[str, Any]:
        given = dict(given)
        # diffusers maps the configs of its sibling solvers onto this one: DEIS -> dpmsolver++, UniPC -> midpoint
        if given.get("algorithm_type") == "deis":
            given["algorithm_type"] = "dpmsolver++"
        if given.get("solver_type") in ("logrho", "bh1", "bh2"):
            given["solver_type"] = "midpoint"
        return super()._read_config(given)

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)  # (T,) half log-SNR, descending
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.linspace(0, len(self) - 1, len(self), dtype=np.float32)[::-1].copy())
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self._cfg["solver_order"]  # past x0 predictions
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the n timesteps (int64) and n + 1 sigmas (the last 0, or sigma_min); forget the history."""
        self._check_num_steps(num_inference_steps)
        cfg, n, T = self._cfg, num_inference_steps, self._cfg["num_train_timesteps"]
        # skip the noisiest timesteps whose lambda is below lambda_min_clipped (none by default)
        clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg["lambda_min_clipped"])
        last_timestep = (T - clipped_idx).numpy().item()
        timesteps = dpm_timesteps(cfg["timestep_spacing"], n, T, last_timestep, cfg["steps_offset"])
        base = train_sigmas(self.alphas_cumprod)  # (T,) ascending
        if cfg["use_karras_sigmas"]:
            sigmas = karras_sigmas(base[0].item(), base[-1].item(), n)
            timesteps = sigma_to_t(sigmas, np.log(base))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(base)), base)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32))  # (n + 1,)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_history()
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """DPM-Solver works on the VP x_t: the model input is the sample unchanged."""
        return sample

    def _data_prediction(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 from the model output: eps -> (x - sigma_t eps) / alpha_t; v -> alpha_t x - sigma_t v."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[self._step_index])
        if self._cfg["prediction_type"] == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output

    def _lambdas(self, *offsets: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(alpha, sigma, lambda) at step_index + offset for each offset (1 = the target, 0 = now, -1 ...)."""
        out = []
        for offset in offsets:
            alpha, sigma = alpha_sigma(self.sigmas[self._step_index + offset])
            out.append((alpha, sigma, torch.log(alpha) - torch.log(sigma)))
        return out

    def _first_order(self, x0: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        (alpha_t, sigma_t, lambda_t), (_, sigma_s, lambda_s) = self._lambdas(1, 0)
        h = lambda_t - lambda_s
        return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * x0

    def _second_order(self, sample: torch.Tensor) -> torch.Tensor:
        (alpha_t, sigma_t, lambda_t), (_, sigma_s0, lambda_s0), (_, _, lambda_s1) = self._lambdas(1, 0, -1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, 1.0 / r0 * (m0 - m1)
        if self._cfg["solver_type"] == "midpoint":
            return (sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * D0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        return (sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * D0
                + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1)

    def _third_order(self, sample: torch.Tensor) -> torch.Tensor:
        lam = self._lambdas(1, 0, -1, -2)
        (alpha_t, sigma_t, lambda_t), (_, sigma_s0, lambda_s0), (_, _, lambda_s1), (_, _, lambda_s2) = lam
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D1_0, D1_1 = 1.0 / r0 * (m0 - m1), 1.0 / r1 * (m1 - m2)
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = 1.0 / (r0 + r1) * (D1_0 - D1_1)
        return (sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * m0
                + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1
                - alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5) * D2)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None) -> torch.Tensor:
        """x at step i (B, C, H, W) -> x at step i + 1 (B, C, H, W); `generator` is unused (the ODE solver)."""
        self._check_ready()
        if self._step_index is None:
            self._init_step_index(timestep)
        cfg, n, i = self._cfg, len(self.timesteps), self._step_index
        lower_order_final = i == n - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                                            or cfg["final_sigmas_type"] == "zero")
        lower_order_second = i == n - 2 and cfg["lower_order_final"] and n < 15

        x0 = self._data_prediction(model_output, sample)
        self.model_outputs = [*self.model_outputs[1:], x0]
        sample = sample.to(torch.float32)
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(x0, sample)
        elif cfg["solver_order"] == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self._second_order(sample)
        else:
            prev_sample = self._third_order(sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg["solver_order"])
        self._step_index += 1
        return prev_sample.to(x0.dtype)  # diffusers casts to the converted output's dtype

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t x0 + sigma_t noise at the sigma of each (B,) timestep (looked up, or the begin index)."""
        timesteps = torch.as_tensor(timesteps).to(original_samples.device)
        sigma = self._sigmas_at_steps(timesteps).to(original_samples.device, original_samples.dtype)
        alpha_t, sigma_t = alpha_sigma(broadcast_to(sigma, original_samples))
        return alpha_t * original_samples + sigma_t * noise
