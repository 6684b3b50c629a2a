"""Shared test utilities: relative error, trained-like random weights, fixture paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

FIXTURES = Path(__file__).parent / "fixtures"
DIFFUSERS_CONFIGS = FIXTURES / "diffusers_configs"
TOKENIZER_DIR = FIXTURES / "clip_tokenizer"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    if ours.shape != ref.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_err(ours, ref)
    assert math.isfinite(err) and err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@torch.no_grad()
def trained_like_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill a module with random weights that scale like trained ones (DESIGN.md's parity contract).

    N(0, 1) weights saturate every softmax and hide errors; here linear/conv weights get std 1/sqrt(fan_in),
    embeddings std 0.02, norm weights 1 + small noise, biases small noise.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1 and ("norm" in name or "ln" in name or name.endswith("gamma")):
            value = 1.0 + 0.05 * noise if name.endswith("weight") else 0.02 * noise
        elif p.ndim == 1:
            value = 0.02 * noise
        elif "embedding" in name:
            value = 0.02 * noise
        else:
            fan_in = p[0].numel()
            value = noise / math.sqrt(fan_in)
        p.copy_(value.to(p.dtype))
    return module


def load_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def diffusers_config(family: str, component: str) -> dict:
    """The shipped config.json of a component ('unet', 'vae', 'text_encoder') or the scheduler config."""
    folder = DIFFUSERS_CONFIGS / family / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return load_json(folder / name)
