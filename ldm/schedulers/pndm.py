"""PNDM: Pseudo Numerical Methods for Diffusion Models on Manifolds, Liu, Ren, Lin & Zhao 2022 (arXiv:2202.09778).

Mirrors diffusers 0.42.1 `schedulers/scheduling_pndm.py` (PNDMScheduler). Stable Diffusion 1.x/2.x ship it with
`skip_prk_steps=True`: pure PLMS (pseudo linear multistep), with a 2-evaluation start instead of the Runge-Kutta one.

The "transfer" phi(x_t, eps, t -> t') of eq. (11) moves x_t to x_t' along the DDIM direction for a given eps:
    (11) x_t' = sqrt(a_t'/a_t) x_t - (a_t' - a_t) eps / (a_t sqrt(1 - a_t') + sqrt(a_t (1 - a_t) a_t'))
The eps fed to it is a linear multistep combination of the last model outputs e_i (eq. 12, Adams-Bashforth):
    1 output:  e_0                       (first step; its model output is kept, the step is repeated)
    2 outputs: (e_0 + e_1) / 2           (the repeated timestep: a Heun-like second evaluation, "S-PNDM")
               (3 e_1 - e_0) / 2
    3 outputs: (23 e_2 - 16 e_1 + 5 e_0) / 12
    4 outputs: (55 e_3 - 59 e_2 + 37 e_1 - 9 e_0) / 24     (eq. 12, PLMS)
Without skip_prk_steps the first 3 steps are pseudo Runge-Kutta (eq. 13, 4 model calls each, weights 1/6 1/3 1/3
1/6) before PLMS takes over. `step` is counter driven, exactly as diffusers.

Shapes: B batch, C channels, H, W latent size; T = num_train_timesteps, n = num_inference_steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ldm.rng import Generator

from .common import SCHEDULE_CHOICES, SCHEDULE_DEFAULTS, AlphaScheduler, spaced_timesteps


class PNDMScheduler(AlphaScheduler):
    """PLMS sampling (the SD 1.x default), optionally with pseudo Runge-Kutta warm-up steps."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        **SCHEDULE_DEFAULTS, "timestep_spacing": "leading", "skip_prk_steps": False, "set_alpha_to_one": False,
    }
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **SCHEDULE_CHOICES, "skip_prk_steps": (True, False), "set_alpha_to_one": (True, False),
    }
    pndm_order = 4

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._reset_history()

    def _reset_history(self) -> None:
        self.ets: list[torch.Tensor] = []  # past model outputs e_i (at most 4 kept)
        self.counter = 0  # steps taken since set_timesteps
        self.cur_model_output: torch.Tensor | float = 0  # running Runge-Kutta sum
        self.cur_sample: torch.Tensor | None = None  # x at the start of a multi-evaluation step

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The visited timesteps (int64): PLMS repeats the second one; PRK visits midpoints first."""
        self._check_num_steps(num_inference_steps)
        cfg, n, T = self._cfg, num_inference_steps, self._cfg["num_train_timesteps"]
        self.num_inference_steps = n
        base = spaced_timesteps(cfg["timestep_spacing"], n, T, cfg["steps_offset"], round_linspace=True)[::-1]
        base = base.astype(np.int64)  # ascending
        if cfg["skip_prk_steps"]:
            # [t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0]: the second timestep is evaluated twice
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if n < self.pndm_order:
                raise ValueError(f"num_inference_steps must be >= {self.pndm_order} when skip_prk_steps=False "
                                 f"(the Runge-Kutta warm-up spans 4 timesteps), got {n}")
            # each of the last 4 timesteps and its midpoint t + T//n//2, as diffusers lays them out
            prk = base[-self.pndm_order:].repeat(2) + np.tile(np.array([0, T // n // 2]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset_history()

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: Generator = None) -> torch.Tensor:
        """x_t (B, C, H, W) -> the next sample (B, C, H, W); `generator` is unused (PNDM is deterministic)."""
        self._check_ready()
        self._check_in_schedule(timestep)
        if self.counter < len(self.prk_timesteps) and not self._cfg["skip_prk_steps"]:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    def _step_prk(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """Eq. (13): a 4-stage pseudo Runge-Kutta step spread over 4 calls (full step, 2 midpoints, end)."""
        half = self._cfg["num_train_timesteps"] // self.num_inference_steps // 2
        prev_timestep = timestep - (0 if self.counter % 2 else half)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._transfer(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _step_plms(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """Eq. (12): the linear multistep combination of the stored outputs, then the transfer (11)."""
        if not self._cfg["skip_prk_steps"] and len(self.ets) < 3:
            raise RuntimeError("PNDM: PLMS steps need the 3 Runge-Kutta steps first (12 model calls)")
        step = self._cfg["num_train_timesteps"] // self.num_inference_steps
        prev_timestep = timestep - step
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # the repeated timestep: redo the first step from its start with the averaged output
            prev_timestep = timestep
            timestep = timestep + step

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        prev_sample = self._transfer(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _transfer(self, sample: torch.Tensor, timestep: int, prev_timestep: int,
                  model_output: torch.Tensor) -> torch.Tensor:
        """Eq. (11): x_t -> x_t' for the noise estimate model_output (v is converted to eps first)."""
        alpha_t = self.alphas_cumprod[timestep]
        alpha_prev = self._alpha_prev(prev_timestep)
        beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
        if self._cfg["prediction_type"] == "v_prediction":
            model_output = alpha_t**0.5 * model_output + beta_t**0.5 * sample  # v -> eps
        sample_coeff = (alpha_prev / alpha_t) ** 0.5
        denom = alpha_t * beta_prev**0.5 + (alpha_t * beta_t * alpha_prev) ** 0.5
        return sample_coeff * sample - (alpha_prev - alpha_t) * model_output / denom
