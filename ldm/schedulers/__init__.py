"""Noise schedules and samplers, one file per algorithm, with diffusers 0.42.1's conventions and numbers.

Every scheduler: `Cls.from_config(diffusers_scheduler_config)`, `.set_timesteps(n)`, `.timesteps`,
`.init_noise_sigma`, `.scale_model_input(x, t)`, `.step(model_output, t, x, generator=None) -> Tensor`,
`.add_noise(x0, noise, t)`, `.timesteps_for_strength(n, strength)` (img2img), `.config`, `.order`.
See docs/schedulers.md for what each one does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import AlphaScheduler, Scheduler, SigmaScheduler
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler

# The names the pipeline and the CLI accept -> the class; OVERRIDES holds the config a name adds to the model's own.
SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "lms": LMSDiscreteScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "dpm++2m-karras": DPMSolverMultistepScheduler,
}
OVERRIDES: dict[str, dict[str, Any]] = {"dpm++2m-karras": {"use_karras_sigmas": True}}


def from_name(name: str, config: Mapping[str, Any]) -> Scheduler:
    """The scheduler `name` built from a model's own scheduler config, as diffusers users swap schedulers with
    `OtherScheduler.from_config(pipe.scheduler.config)` (plus OVERRIDES[name], e.g. Karras sigmas)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler name must be one of {sorted(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name].from_config(config, **OVERRIDES.get(name, {}))


def name_of(scheduler: Scheduler) -> str:
    """The SCHEDULERS name of a scheduler object (for the PNG metadata), its class name if it has none."""
    for name, cls in reversed(SCHEDULERS.items()):  # the most specific first: "dpm++2m-karras" before "dpm++2m"
        overrides = OVERRIDES.get(name, {})
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return name
    return type(scheduler).__name__


__all__ = ["OVERRIDES", "SCHEDULERS", "AlphaScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
           "EulerDiscreteScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "Scheduler", "SigmaScheduler",
           "from_name", "name_of"]
