"""LoRA: low-rank updates merged into the weights of the UNet and the text encoder, and taken out exactly.

Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685). A layer y = W x
(W: (out, in)) is fine-tuned as y = W x + (alpha / r) * B (A x), with A: (r, in) ("down", kohya's lora_down,
PEFT's lora_A), B: (out, r) ("up", lora_up, lora_B), r << min(out, in). Merging folds the update into the weight:

    W' = W + sum_i  s_i * (alpha_i / r_i) * B_i @ A_i          s_i: the weight each adapter is applied with

so the merged model costs nothing extra per step. A 3x3 convolution (LoCon) is the same with A a (r, in, 3, 3)
convolution and B a (r -> out) 1x1 one: B @ A over the flattened kernels, reshaped to (out, in, 3, 3).

Reference: diffusers 0.42.1 `load_lora_weights` + `fuse_lora(lora_scale=s)` (through peft's
`LoraLayer.get_delta_weight`); the kohya / A1111 key formats are read by weights_convert/lora.py, which hands this
file layers already named after our modules (diffusers' module names).

Exact removal: the first time a weight is changed its original tensor is kept (a copy, same device and dtype);
every change recomputes W' from that original (never from the previous W'), and removing the adapters copies the
original back, bit for bit. Nothing is subtracted. The merge arithmetic runs in float32 and is cast to the
weight's dtype once.

Shapes: out/in features (channels), r rank, kh, kw kernel size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


@dataclass(frozen=True)
class LoRALayer:
    """The update of one module's weight."""

    down: Tensor  # A: (r, in) or (r, in, kh, kw)
    up: Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float  # the scale is alpha / r; alpha = r when a file has none

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size, device: torch.device | str = "cpu") -> Tensor:
        """(alpha / r) * B @ A as a float32 tensor of the weight's `shape`, on `device`."""
        up = self.up.to(device, torch.float32).flatten(1)  # (out, r)
        down = self.down.to(device, torch.float32).flatten(1)  # (r, in * kh * kw)
        return (up @ down).reshape(shape) * (self.alpha / self.rank)  # (out, in[, kh, kw])


# A loaded LoRA: (component, module name) -> its update, e.g. ("unet", "down_blocks.0.attentions.0.proj_in").
Adapter = dict[tuple[str, str], LoRALayer]


class LoRAMerger:
    """The LoRAs of one pipeline (`pipe.lora`): loaded adapters, the active ones with their weights, the originals."""

    def __init__(self) -> None:
        self.adapters: dict[str, Adapter] = {}
        self.active: dict[str, float] = {}  # adapter name -> weight, in the order set
        self._originals: dict[tuple[str, str], Tensor] = {}  # (component, module) -> the weight before any LoRA

    def add(self, name: str, adapter: Adapter, modules: dict[str, nn.Module], weight: float = 1.0) -> None:
        """Load `adapter` under `name` and merge it at `weight` next to the active ones."""
        if name in self.adapters:
            raise ValueError(f"LoRA: an adapter named {name!r} is already loaded; pick another adapter_name or "
                             f"unload_lora_weights() first")
        self.adapters[name] = adapter
        try:
            self.set_active({**self.active, name: weight}, modules)
        except BaseException:
            del self.adapters[name]
            raise

    def set_active(self, weights: dict[str, float], modules: dict[str, nn.Module]) -> None:
        """Merge exactly the adapters in `weights` (name -> weight): W' = W + sum weight * delta over them."""
        for name, w in weights.items():
            if name not in self.adapters:
                raise ValueError(f"LoRA: no adapter named {name!r} (loaded: {sorted(self.adapters)})")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not torch.isfinite(torch.tensor(float(w))):
                raise ValueError(f"LoRA: the weight of {name!r} must be a finite number, got {w!r}")
        targets = {key for name in weights for key in self.adapters[name]} | set(self._originals)
        new: dict[tuple[str, str], Tensor | None] = {}  # None: back to the original
        for key in sorted(targets):  # compute everything first: a failure leaves the weights as they were
            weight = _weight(modules, key)
            layers = [(w, self.adapters[n][key]) for n, w in weights.items() if key in self.adapters[n]]
            if not layers:
                new[key] = None
                continue
            total = self._originals.get(key, weight.detach()).float()  # (out, in[, kh, kw])
            for w, layer in layers:
                if w != 0:
                    total = total + float(w) * layer.delta(weight.shape, total.device)
            new[key] = total.to(weight.dtype)
        with torch.no_grad():
            for key, value in new.items():
                weight = _weight(modules, key)
                if value is None:
                    weight.copy_(self._originals.pop(key))
                    continue
                if key not in self._originals:
                    self._originals[key] = weight.detach().clone()
                weight.copy_(value)
        self.active = {name: float(w) for name, w in weights.items()}
        _refuse_stale_fusions(modules)

    def unload(self, modules: dict[str, nn.Module]) -> None:
        """Copy every original weight back and forget all adapters."""
        with torch.no_grad():
            for key, original in self._originals.items():
                _weight(modules, key).copy_(original)
        self._originals.clear()
        self.adapters.clear()
        self.active = {}
        _refuse_stale_fusions(modules)


def _weight(modules: dict[str, nn.Module], key: tuple[str, str]) -> Tensor:
    component, name = key
    return modules[component].get_submodule(name).weight


def _refuse_stale_fusions(modules: dict[str, nn.Module]) -> None:
    """Rebuild the fused q/k/v weights (ldm/optimize.py) of attention layers whose projections changed."""
    for module in modules.values():
        for layer in module.modules():
            if getattr(layer, "fused_weight", None) is not None:
                layer.fuse_projections()


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's `<lora:name:0.8>` tags: (the prompt without them, [(name, weight)]); the weight defaults to 1.

    `<lora:name:0.8:...>` (A1111's extra per-part weights) reads the first weight only.
    """
    found: list[tuple[str, float]] = []
    for m in _TAG.finditer(prompt):
        name, weight = m.group(1).strip(), m.group(2)
        try:
            value = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            raise ValueError(f"<lora:{name}:{weight}>: the weight {weight!r} is not a number") from None
        found.append((name, value))
    return _TAG.sub("", prompt), found
