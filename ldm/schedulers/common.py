"""What every scheduler shares: the noise schedule, timestep spacing, config reading, the step index.

Papers: DDPM, Ho et al. 2020 (arXiv:2006.11239) for the forward process q(x_t | x_0), eq. (4):
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,        alpha_bar_t = prod_{s<=t} (1 - beta_s)
Improved DDPM, Nichol & Dhariwal 2021 (arXiv:2102.09672) eq. (17) for the cosine schedule `squaredcos_cap_v2`;
Lin et al. 2023 (arXiv:2305.08891) Algorithm 1 for `rescale_betas_zero_snr`; Karras et al. 2022 (arXiv:2206.00364)
eq. (5) for Karras sigmas. The "sigma" view (k-diffusion): x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps with
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).

Mirrors diffusers 0.42.1 `schedulers/scheduling_utils.py`, `betas_for_alpha_bar`, `rescale_zero_terminal_snr` and
the `set_timesteps` / `index_for_timestep` / `_init_step_index` methods repeated in each scheduler file. numpy is
used where diffusers uses numpy, so the timesteps and sigmas come out bit-identical.

Shapes: B batch, C channels, H, W latent size; T = num_train_timesteps, n = num_inference_steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers also knows "sample" (x0) / "flow_prediction": not here

# The keys every diffusers 0.42.1 scheduler class takes, with their defaults (DDIM and PNDM default to "leading"
# spacing); each scheduler file adds its own keys to these.
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
}
SCHEDULE_CHOICES: dict[str, tuple[Any, ...]] = {
    "beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS,
}



# ----------------------------------------------------------------------------------------------------------------
# The noise schedule: betas -> alphas_cumprod -> sigmas


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Improved DDPM eq. 17): beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last timestep has zero SNR."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last  # last -> 0
    alphas_bar_sqrt *= first / (first - last)  # first stays
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(cfg: Mapping[str, Any]) -> torch.Tensor:
    """The (T,) float32 betas a config describes, exactly as diffusers builds them."""
    T = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        if betas.shape != (T,):
            raise ValueError(f"trained_betas: expected {T} values (num_train_timesteps), "
                             f"got shape {tuple(betas.shape)}")
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":  # the SD schedule: linear in sqrt(beta)
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    else:  # "squaredcos_cap_v2" (the value was validated by from_config)
        betas = betas_for_alpha_bar(T)
    if cfg.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, ascending, float32 numpy (T,)."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def spaced_timesteps(spacing: str, n: int, T: int, steps_offset: int, round_linspace: bool) -> np.ndarray:
    """The n inference timesteps, descending, float64 (diffusers' `set_timesteps`, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed" Table 2). round_linspace: DDIM/PNDM round "linspace" to integers."""
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy() + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


def spaced_sigmas(cfg: Mapping[str, Any], n: int,
                  alphas_cumprod: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sigma samplers' (Euler, Euler ancestral, LMS) start of set_timesteps: n float32 timesteps, descending,
    the sigma of each, interpolated in the training sigmas, and those training sigmas (T,) ascending."""
    timesteps = spaced_timesteps(cfg["timestep_spacing"], n, cfg["num_train_timesteps"], cfg["steps_offset"],
                                 round_linspace=False).astype(np.float32)  # (n,)
    base = train_sigmas(alphas_cumprod)  # (T,)
    return timesteps, np.interp(timesteps, np.arange(0, len(base)), base), base  # sigmas: (n,)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. (5): sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, descending."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear interpolation in log sigma (diffusers `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample coefficients -> (B, 1, 1, 1) so they broadcast against x (B, C, H, W)."""
    values = values.flatten()
    while values.ndim < x.ndim:
        values = values.unsqueeze(-1)
    return values


# ----------------------------------------------------------------------------------------------------------------
# The base class: config reading and the step index


class Scheduler:
    """Config handling shared by all schedulers; subclasses list their diffusers keys and what they implement.

    _DEFAULTS: every key the diffusers 0.42.1 class's __init__ accepts, with its default.
    _CHOICES: keys with an enumerated set of values we implement (anything else is a ValueError naming the key).
    _FIXED: keys of features we do not implement: only the default value is accepted.
    """

    _DEFAULTS: ClassVar[dict[str, Any]] = {}
    _CHOICES: ClassVar[dict[str, tuple[Any, ...]]] = {}
    _FIXED: ClassVar[tuple[str, ...]] = ()
    _REGISTRY: ClassVar[list[type[Scheduler]]] = []
    order: ClassVar[int] = 1  # model calls per step; 1 for all six in diffusers 0.42.1
    # Samplers that divide by sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) cannot take the zero terminal SNR of
    # rescale_betas_zero_snr: diffusers sets their last alpha_bar to 2**-24 instead. DDIM works with alpha_bar = 0.
    _finite_terminal_sigma: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Scheduler._REGISTRY.append(cls)

    def __init__(self, **config: Any) -> None:
        self._cfg = self._read_config(config)
        # diffusers' `_use_default_values`: the keys the given config lacked. Another class built from this config
        # uses its own defaults for them (e.g. Euler from SD 1.5's PNDM config gets "linspace", not "leading").
        given = set(config) - set(config.get("_use_default_values", ()))
        self._defaulted = sorted(k for k in self._DEFAULTS if k not in given)
        # Keys of other classes are kept in .config, as diffusers keeps them: DDIM built from SD 1.5's PNDM config
        # must still see clip_sample=False (its own default is True).
        self._foreign = {k: v for k, v in config.items() if k in given and not k.startswith("_") and k not in self._cfg}
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        # The noise schedule, DDPM eq. (4): alpha_bar_t = prod_{s<=t} (1 - beta_s)
        self.betas = make_betas(self._cfg)  # (T,)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) alpha_bar_t
        if self._cfg.get("rescale_betas_zero_snr", False) and self._finite_terminal_sigma:
            self.alphas_cumprod[-1] = 2**-24  # zero SNR would make sigma infinite: nearly zero instead

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> Scheduler:
        """Build from a diffusers scheduler_config.json dict (or a live diffusers `scheduler.config`, or our own
        `.config`), possibly written for another scheduler class; keyword overrides win."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict (a diffusers scheduler config), got {type(config).__name__}")
        return cls(**{**dict(config), **overrides})

    @classmethod
    def _read_config(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        known_elsewhere = set().union(*(c._DEFAULTS for c in Scheduler._REGISTRY))
        cfg = dict(cls._DEFAULTS)
        used_defaults = set(given.get("_use_default_values", ()))  # keys the original config lacked: ours apply
        for key, value in given.items():
            if key.startswith("_") or key in used_defaults:
                continue  # _class_name, _diffusers_version, _use_default_values ...
            if key in cls._DEFAULTS:
                cfg[key] = value
            elif key in known_elsewhere:  # e.g. skip_prk_steps given to Euler: diffusers ignores it with a warning
                logger.debug("%s ignores the key %r of another scheduler class", cls.__name__, key)
            else:
                raise ValueError(f"{cls.__name__}: unknown scheduler config key {key!r} (value {value!r})")
        for key, choices in cls._CHOICES.items():
            if cfg[key] not in choices:
                raise ValueError(f"{cls.__name__}: {key} must be one of {choices}, got {cfg[key]!r}")
        for key in cls._FIXED:
            if cfg[key] != cls._DEFAULTS[key]:
                raise ValueError(f"{cls.__name__}: {key}={cfg[key]!r} is not implemented here "
                                 f"(only the default {cls._DEFAULTS[key]!r} is supported)")
        T = cfg["num_train_timesteps"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {T!r}")
        if not isinstance(cfg.get("steps_offset", 0), int) or cfg.get("steps_offset", 0) < 0:
            raise ValueError(f"steps_offset must be a non-negative int, got {cfg['steps_offset']!r}")
        return cfg

    @property
    def config(self) -> dict[str, Any]:
        """A fresh diffusers-style config dict, `_class_name` included, so any class's from_config accepts it."""
        return {"_class_name": type(self).__name__, **self._foreign, **self._cfg,
                "_use_default_values": list(self._defaulted)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._cfg})"

    def __len__(self) -> int:
        return self._cfg["num_train_timesteps"]

    # -- validation ---------------------------------------------------------------------------------------------

    def _check_num_steps(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"num_inference_steps must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if n > self._cfg["num_train_timesteps"]:
            raise ValueError(f"num_inference_steps ({n}) cannot exceed num_train_timesteps "
                             f"({self._cfg['num_train_timesteps']}): the model was trained on that many timesteps")

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")

    # -- the step index (diffusers `index_for_timestep`, `_init_step_index`, `set_begin_index`) -------------------

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the loop starts in `timesteps` (img2img); set by `timesteps_for_strength`."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule: torch.Tensor | None = None) -> int:
        """The position of `timestep` in the schedule; the second one if it occurs twice (diffusers' rule, so a
        loop started mid-schedule never skips a sigma)."""
        schedule = self.timesteps if schedule is None else schedule
        indices = (schedule == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in the schedule {schedule.tolist()}")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _check_in_schedule(self, timestep: float | torch.Tensor) -> None:
        if not bool((self.timesteps == timestep).any()):
            raise ValueError(f"timestep {float(timestep)} is not in the schedule {self.timesteps.tolist()}")

    # -- img2img ------------------------------------------------------------------------------------------------

    def timesteps_for_strength(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """set_timesteps(n), then the tail of the schedule an img2img run of this strength walks, as diffusers'
        StableDiffusionImg2ImgPipeline.get_timesteps; the scheduler's begin index is set to match."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.set_timesteps(num_inference_steps)
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.timesteps[t_start * self.order:]
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run "
                             f"(int(num_inference_steps * strength) = 0)")
        if self._uses_begin_index:
            self.set_begin_index(t_start * self.order)
        return timesteps

    _uses_begin_index: ClassVar[bool] = True  # DDIM and PNDM look timesteps up directly and have no begin index

    # -- the sigma view, for the samplers that keep a sigma per step (LMS, Euler, Euler ancestral, DPM-Solver) -----

    def _reset_history(self) -> None:
        """Forget what past steps stored (multistep samplers override this); called by set_timesteps."""

    def _sigmas_at_steps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The sigma of each (B,) timestep: by lookup in the schedule, or the begin index (img2img)."""
        schedule = self.timesteps.to(timesteps.device)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t, schedule) for t in timesteps.reshape(-1)]
        elif self._step_index is not None:
            indices = [self._step_index] * timesteps.reshape(-1).shape[0]
        else:
            indices = [self._begin_index] * timesteps.reshape(-1).shape[0]
        return self.sigmas[indices]  # (B,)

    def _final_sigma(self) -> float | torch.Tensor:
        """The sigma after the last step: 0, or the smallest training sigma for final_sigmas_type "sigma_min"."""
        if self._cfg.get("final_sigmas_type", "zero") == "sigma_min":
            return ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        return 0.0


class AlphaScheduler(Scheduler):
    """The DDPM view shared by DDIM and PNDM: the state is x_t itself (unit variance at the start), the model input
    is the sample unchanged, and a step from t to t' reads alpha_bar at both ends."""

    _uses_begin_index: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        # alpha_bar "before" t = 0: 1 (a clean sample) or, as SD was trained, alpha_bar_0.
        self.final_alpha_cumprod = torch.tensor(1.0) if self._cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = torch.from_numpy(np.arange(0, self._cfg["num_train_timesteps"])[::-1].copy().astype(np.int64))

    def _alpha_prev(self, prev_timestep: int) -> torch.Tensor:
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """DDIM and PNDM work on x_t itself: the model input is the sample unchanged."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process, DDPM eq. (4): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; timesteps (B,)."""
        alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = torch.as_tensor(timesteps).to(original_samples.device)
        sqrt_alpha = broadcast_to(alphas_cumprod[timesteps] ** 0.5, original_samples)  # (B, 1, 1, 1)
        sqrt_one_minus_alpha = broadcast_to((1 - alphas_cumprod[timesteps]) ** 0.5, original_samples)
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise


class SigmaScheduler(Scheduler):
    """The k-diffusion view shared by LMS, Euler and Euler ancestral: the state is x = x0 + sigma eps with
    sigma_max^2 + 1 variance at the start, so the model input is x / sqrt(sigma^2 + 1) (= the DDPM x_t)."""

    sigmas: torch.Tensor  # (n + 1,) float32 on the CPU, descending, last = 0 (or sigma_min)
    timesteps: torch.Tensor  # (n,) float32: possibly fractional training timesteps

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.set_timesteps(self._cfg["num_train_timesteps"])  # as diffusers: a usable schedule before set_timesteps
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose n (float32) timesteps, spaced as the config says, and their n + 1 sigmas, interpolated in the
        training sigmas (or Karras-spaced, eq. 5, when use_karras_sigmas), the last one 0 (or sigma_min)."""
        self._check_num_steps(num_inference_steps)
        cfg, n = self._cfg, num_inference_steps
        self.num_inference_steps = n
        timesteps, sigmas, base = spaced_sigmas(cfg, n, self.alphas_cumprod)  # (n,), (n,), (T,)
        if cfg.get("use_karras_sigmas", False):
            sigma_min = cfg["sigma_min"] if cfg.get("sigma_min") is not None else sigmas[-1].item()
            sigma_max = cfg["sigma_max"] if cfg.get("sigma_max") is not None else sigmas[0].item()
            sigmas = karras_sigmas(sigma_min, sigma_max, n)
            timesteps = sigma_to_t(sigmas, np.log(base))  # fractional timesteps of the new sigmas
        sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)  # (n + 1,) kept on the CPU as diffusers does
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device)
        self._step_index = None
        self._begin_index = None
        self._reset_history()

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The std of x at the first step: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" (diffusers' rule)."""
        max_sigma = self.sigmas.max()
        if self._cfg["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> x / sqrt(sigma^2 + 1), the DDPM-scaled x_t the UNet was trained on."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + sigma_t noise: the forward process in the sigma parameterisation; timesteps (B,)."""
        timesteps = torch.as_tensor(timesteps).to(original_samples.device)
        sigma = self._sigmas_at_steps(timesteps).to(original_samples.device, original_samples.dtype)
        return original_samples + noise * broadcast_to(sigma, original_samples)

    def _x0_from(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The denoised estimate: eps -> x - sigma eps; v -> x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)."""
        if self._cfg["prediction_type"] == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
