"""Training checkpoints: the whole state of a run in one safetensors file, written atomically.

    save_state(path, tensors, meta)  -> writes `path` via a temporary file and os.replace (all or nothing)
    load_state(path)                 -> (tensors, meta), or CheckpointFormatError naming the file and the fault

Layout (our safetensors layout: model keys are diffusers' / transformers' keys, under the component's name):
    vae.<key>, unet.<key>, text_encoder.<key>             the live weights (fp32)
    ema.<component>.<key>                                  the exponential moving averages of the trained parts
    optimizer.<component>.<key>.{exp_avg,exp_avg_sq,step}  AdamW's moments, by parameter name (not by index)
    rng.torch                                              the training generator's state (uint8)
and the safetensors metadata (str -> str): format, version, step, config (JSON), losses (JSON).

Why one file and os.replace: a run stopped at any instant (Ctrl-C, a crash, a full disk) leaves either the previous
complete checkpoint or the new complete one, never a torn file; the temporary file is removed on failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm.fileio import plain_file_mode

FORMAT = "ldm-train-checkpoint"
VERSION = "1"
# The metadata every checkpoint written by the Trainer carries, with its JSON type.
REQUIRED_META = {"step": int, "stage": (str, type(None)), "config": dict, "scaling_factor": (int, float, type(None)),
                 "ema_updates": dict, "losses": dict}


class CheckpointFormatError(ValueError):
    """A file that is not a readable ldm training checkpoint; the message names the file and the fault."""


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors + JSON-able meta to `path` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    header = {"format": FORMAT, "version": VERSION, **{k: json.dumps(v) for k, v in meta.items()}}
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
        os.chmod(tmp, plain_file_mode())  # safetensors creates 0600; a checkpoint gets what the umask says
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave a half-written temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by save_state: (tensors, meta). Foreign or damaged files raise clearly."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: not a file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: not an ldm training checkpoint (metadata format "
                                    f"{header.get('format')!r}, expected {FORMAT!r}); to start from a model's "
                                    f"weights, train from scratch or load them with ldm.load_pipeline")
    if header.get("version") != VERSION:
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: format version {header.get('version')!r}, this "
                                    f"code reads version {VERSION!r}")
    try:
        meta = {k: json.loads(v) for k, v in header.items() if k not in ("format", "version")}
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"checkpoint {str(path)!r}: damaged metadata ({e})") from None
    for key, kind in REQUIRED_META.items():
        if key not in meta:
            raise CheckpointFormatError(f"checkpoint {str(path)!r}: incomplete metadata, no {key!r} (has "
                                        f"{', '.join(sorted(meta)) or 'nothing'}); the file was not written by "
                                        f"ldm train, or was edited")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointFormatError(f"checkpoint {str(path)!r}: metadata {key!r} has the wrong type "
                                        f"({type(meta[key]).__name__}: {meta[key]!r:.60})")
    return tensors, meta


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
