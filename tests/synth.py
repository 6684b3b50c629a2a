"""Synthetic Stable Diffusion checkpoints: every key, shape and dtype of an official file, seeded trained-like values.

    write_synthetic_checkpoint("sd15", tmp_path / "sd15.safetensors")           # the full SD 1.5 layout, 4.3 GB
    write_synthetic_checkpoint("sd21v", path, dtype=torch.float16)              # an fp16 file
    write_synthetic_checkpoint(tiny_ldm_manifest(preset), path, ema=True)       # a tiny file with EMA copies

`manifest`: a fixture name ("sd15", "sd21base", "sd21v", "sd15_inpaint", "sd2_inpaint"), a path to a
`*_ldm_keys.json`, or a dict of the same form ({"keys": {name: {"shape", "dtype"}}, optionally
"schedule_buffer_values_reference"}). Values (DESIGN.md's parity contract): weights N(0, 1/fan_in), embeddings
std 0.02, norm weights 1 + 0.05 N, biases 0.02 N; the noise-schedule buffers get their exact values from the
manifest; `position_ids` is 0..76. The file is written one tensor at a time (peak memory: one tensor), keys sorted
by name with metadata {"format": "pt"} as the official files. Never write these into the repository.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from tests.helpers import FIXTURES
from weights_convert.safetensors_file import write_streaming


def load_manifest(manifest: str | Path | dict) -> dict:
    if isinstance(manifest, dict):
        return manifest
    path = Path(manifest)
    if not path.is_file():
        path = FIXTURES / f"{manifest}_ldm_keys.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {manifest!r} (looked for {path})")
    return json.loads(path.read_text())


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def synthetic_tensor(name: str, shape: list[int], dtype: torch.dtype, seed: int,
                     buffers: dict[str, list[float]]) -> torch.Tensor:
    """The value of one key: exact where the real file's value is known, trained-like random otherwise."""
    if name in buffers:
        return torch.tensor(buffers[name], dtype=torch.float32).reshape(shape).to(dtype)
    if name.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).to(dtype).contiguous()
    if name == "model_ema.decay":
        return torch.tensor(0.9999, dtype=dtype).reshape(shape)
    if name == "model_ema.num_updates":
        return torch.tensor(470000, dtype=dtype).reshape(shape)
    if name.endswith("logit_scale"):
        return torch.tensor(math.log(100.0), dtype=dtype).reshape(shape)
    g = torch.Generator().manual_seed(_seed(seed, name))
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) == 1:
        value = 1.0 + 0.05 * noise if name.endswith("weight") else 0.02 * noise  # 1-D weights: norms only
    elif "embedding" in name:  # token_embedding, position_embedding, positional_embedding
        value = noise.mul_(0.02)
    else:
        value = noise.div_(math.sqrt(math.prod(shape[1:])))
    return value.to(dtype)


def ema_name(unet_key: str) -> str:
    """LitEma's key for a UNet weight (`model.diffusion_model.a.0.b` -> `model_ema.diffusion_modela0b`)."""
    return "model_ema." + unet_key.removeprefix("model.").replace(".", "")


def write_synthetic_checkpoint(manifest: str | Path | dict, out_path: str | Path, dtype: torch.dtype | None = None,
                               seed: int = 0, ema: bool = False) -> Path:
    """Write the checkpoint a manifest describes; returns its path.

    dtype: cast every floating tensor to it (None keeps the manifest's dtypes); integer buffers keep theirs.
    ema: also write LitEma copies of every UNet weight (a full, non-pruned file), with different values.
    """
    m = load_manifest(manifest)
    buffers = m.get("schedule_buffer_values_reference", {})
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name, entry in m["keys"].items():
        file_dtype = getattr(torch, entry["dtype"])
        if dtype is not None and file_dtype.is_floating_point:
            file_dtype = dtype
        entries.append((name, file_dtype, tuple(entry["shape"])))
        if ema and name.startswith("model.diffusion_model."):
            entries.append((ema_name(name), file_dtype, tuple(entry["shape"])))
    entries.sort(key=lambda e: e[0])

    def values():
        for name, file_dtype, shape in entries:
            yield synthetic_tensor(name, list(shape), file_dtype, seed, buffers)

    return write_streaming(out_path, entries, values(), metadata={"format": "pt"})


def tiny_ldm_manifest(preset) -> dict:  # preset: ldm.config.FamilyPreset
    """The original single-file layout of a (tiny) family preset: our tables run backwards from our models' shapes.

    For tests of the loading machinery at small sizes (errors, EMA, pickle, dtypes); the tables themselves are
    checked against diffusers' converter on the official manifests.
    """
    from weights_convert.checkpoint import SCHEDULE_BUFFERS, checkpoint_rules, official_layout
    from weights_convert.load import _empty_model, _expected, model_components

    layout = official_layout(preset)  # SDXL presets: the base's or the refiner's layout
    expected = {c: _expected(_empty_model(c, preset)) for c in model_components(preset)}
    keys: dict[str, dict] = {}
    suffix_shape: dict[str, list[int]] = {}
    for rule in checkpoint_rules(preset, layout):
        if rule.dropped:
            continue
        shapes = [expected[rule.component][t] for t in rule.targets]
        if rule.transform == "split_qkv":
            shape = [3 * shapes[0][0], *shapes[0][1:]]
        elif rule.transform == "conv1x1_to_linear":
            shape = [*shapes[0], 1, 1]
        elif rule.transform == "transpose":
            shape = list(shapes[0])[::-1]
        else:
            shape = list(shapes[0])
        keys[rule.source] = {"shape": shape, "dtype": "float32"}
        suffix_shape[rule.source.split("resblocks.0.")[-1]] = shape
    xl = layout.generation == 3
    for rule in checkpoint_rules(preset, layout):
        if not rule.dropped or rule.source.startswith("model_ema.diffusion") or rule.source == "lvlb_weights":
            continue
        name = rule.source
        if xl and (name in SCHEDULE_BUFFERS or name == "denoiser.sigmas"):
            continue  # not in the official SDXL files
        if "resblocks." in name:  # OpenCLIP's last layer: the shapes of layer 0
            shape = suffix_shape[name.split(f"resblocks.{preset.text.num_hidden_layers}.")[-1]]
        elif name.endswith("text_projection"):
            shape = [preset.text.hidden_size] * 2
        elif name.endswith("position_ids"):
            keys[name] = {"shape": [1, preset.text.max_position_embeddings], "dtype": "int64"}
            continue
        elif name in SCHEDULE_BUFFERS:
            shape = [1000]
        elif name == "model_ema.num_updates":
            keys[name] = {"shape": [], "dtype": "int32"}
            continue
        elif name.endswith("attn_mask"):
            continue  # not in the official files
        else:
            shape = []
        keys[name] = {"shape": shape, "dtype": "float32"}
    buffers = load_manifest("sd15")["schedule_buffer_values_reference"]
    return {"keys": dict(sorted(keys.items())), "schedule_buffer_values_reference": buffers}
