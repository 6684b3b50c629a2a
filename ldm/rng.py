"""Random draws, exactly as diffusers draws them: the one place noise comes from.

Mirrors diffusers 0.42.1 `utils/torch_utils.py` `randn_tensor` and the pipelines' list-of-generators convention.
Draw order is the parity contract (DESIGN.md): the same generators consumed in the same order give the same
latents, so the pipeline's initial noise, the VAE posterior sample and the stochastic samplers' noise all go
through `randn` here.

(Named rng.py, not random.py: a module must not shadow the standard library's name.)

Shapes: B batch (one row per generator when a list is given).
"""

from __future__ import annotations

import numbers
from typing import Union

import torch
from torch import Tensor

Generator = Union[torch.Generator, list[torch.Generator], None]


def randn(shape: tuple[int, ...], generator: Generator, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Standard normal noise of `shape` with diffusers' `randn_tensor` rules.

    A CPU generator draws on the CPU and the result moves to `device` (so a CPU seed gives the same noise on any
    device); a list gives row i from generator i; a one-element list acts as that one generator.
    """
    device = torch.device(device)
    if isinstance(generator, list):
        if not generator or not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError(f"generator must be a torch.Generator, a list of them, or None, got a list of "
                            f"{[type(g).__name__ for g in generator]}")
        if len(generator) not in (1, shape[0]):
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {shape[0]}; "
                             f"pass one generator per batch item (or a single one)")
        first = generator[0]
    elif generator is None or isinstance(generator, torch.Generator):
        first = generator
    else:
        raise TypeError(f"generator must be a torch.Generator, a list of them, or None, got {type(generator).__name__}")
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"generator: cannot draw a {device.type} tensor from a {first.device.type} generator")
        draw_device = torch.device("cpu")  # CPU generator: draw on the CPU, then move (reproducible everywhere)
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)  # (B, ...)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def seed_generators(seed: int | None, generator: Generator, batch: int) -> tuple[Generator, list[int] | None]:
    """The pipeline's generators and seeds: seed=S -> [manual_seed(S + i) for each image] (diffusers' list
    convention, so image i matches diffusers' generator=[...][i]); a generator (or a list, one per image) is used
    as given, with seeds None."""
    if seed is not None and generator is not None:
        raise ValueError("give either seed= or generator=, not both")
    if seed is not None:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**63 - batch:
            raise ValueError(f"seed must be an int in [0, 2**63 - {batch}), got {seed!r}")
        seeds = [int(seed) + i for i in range(batch)]
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds
    if isinstance(generator, list):
        if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator: a list must hold one torch.Generator per image ({batch}), "
                             f"got {len(generator)} items")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, a list of them, or None, got {type(generator).__name__}")
    return generator, None
