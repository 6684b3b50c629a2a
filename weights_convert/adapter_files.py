"""Reading the small files users bring next to a checkpoint: textual inversion embeddings (and the raw reading
LoRA files share, weights_convert/lora.py).

Files are `.safetensors` (our own header check names a truncated or damaged file) or pickles (`.pt`, `.bin`,
`.pth`, `.ckpt`) read with `torch.load(weights_only=True)` only: a pickle that needs code to rebuild (a class, a
function) is refused with the reason. Every tensor is copied out of the file, so nothing stays memory-mapped.

Embedding formats (one word per file, n >= 1 vectors of width D):
| writer | keys | word when `token` is not given |
|---|---|---|
| A1111 `.pt` | `string_to_param: {"*": (n, D)}`, `name`, `string_to_token`, `step`, ... | the file stem (A1111's) |
| A1111 / kohya `.safetensors` | `emb_params: (n, D)` or `string_to_param.*` | the file stem |
| diffusers `learned_embeds.bin` / `.safetensors` | `{"<word>": (D,) or (n, D)}` | the key (diffusers') |
| A1111 / kohya SDXL `.safetensors` | `clip_l: (n, 768)`, `clip_g: (n, 1280)` (`read_sdxl_embedding`) | the file stem |
An SDXL embedding given to `read_embedding` (an SD 1.x / 2.x pipeline) is refused with that reason.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.embeddings import Embedding
from weights_convert.safetensors_file import CheckpointError, SafetensorsFile

PICKLES = (".pt", ".bin", ".pth", ".ckpt")


def read_tensors_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(contents, safetensors metadata) of a small weights file; contents may nest dicts (A1111's `.pt`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (path.suffix.lower() not in PICKLES and head[8:9] == b"{"):
        st = SafetensorsFile(path)
        return {k: st.tensor(k).clone() for k in st.keys()}, dict(st.metadata)
    if path.suffix.lower() not in PICKLES:
        raise CheckpointError(f"{path}: unknown format (expected .safetensors, or a pickle: {', '.join(PICKLES)})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((line for line in first if "Unsupported" in line or "global" in line), first[0] if first else "")
        raise CheckpointError(f"{path}: this pickle needs code to load (torch.load(weights_only=True) refused it: "
                              f"{why.strip()}); only tensors, numbers, strings and containers are read. Convert "
                              f"it to .safetensors where you trust it") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, a wrong magic number, ...: torch raises many kinds
        raise CheckpointError(f"{path}: cannot read the pickle with torch.load(weights_only=True) (truncated or "
                              f"not a torch file?): {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a dict of tensors")
    return obj, {}


# ----------------------------------------------------------------------------------------------------------------
# Textual inversion


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """The word and vectors (n, D) float32 of a textual inversion file in any of the formats above."""
    path = Path(path)
    data, _ = read_tensors_file(path)
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"textual inversion: token must be a non-empty string, got {token!r}")
    word, vectors = _find_vectors(path, data)
    word = token if token is not None else (word or path.stem)
    if not isinstance(vectors, Tensor) or not vectors.is_floating_point():
        raise CheckpointError(f"{path}: the embedding is not a floating-point tensor ({type(vectors).__name__})")
    if vectors.ndim == 1:
        vectors = vectors[None]  # diffusers' single vector (D,) -> (1, D)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise CheckpointError(f"{path}: embedding vectors must be (n, D), got shape {tuple(vectors.shape)}")
    return Embedding(word, vectors.detach().to(torch.float32).clone(), str(path))


def read_sdxl_embedding(path: str | os.PathLike, token: str | None = None) -> tuple[Embedding, Embedding]:
    """An SDXL textual inversion file: the word's vectors for CLIP-L (`clip_l`, (n, 768)) and for OpenCLIP bigG
    (`clip_g`, (n, 1280)), float32, each named after its encoder in `source`."""
    path = Path(path)
    data, _ = read_tensors_file(path)
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"textual inversion: token must be a non-empty string, got {token!r}")
    if "clip_l" not in data or "clip_g" not in data:
        raise CheckpointError(f"{path}: not an SDXL textual inversion file: expected clip_l and clip_g tensors, "
                              f"found keys {sorted(data)[:8]}")
    out = []
    for key in ("clip_l", "clip_g"):
        vectors = data[key]
        if not isinstance(vectors, Tensor) or not vectors.is_floating_point() or vectors.ndim != 2 \
                or vectors.shape[0] == 0:
            got = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise CheckpointError(f"{path}: {key} must be floating-point vectors (n, D), got {got}")
        out.append(Embedding(token or path.stem, vectors.detach().to(torch.float32).clone(), f"{path} ({key})"))
    if out[0].vectors.shape[0] != out[1].vectors.shape[0]:
        raise CheckpointError(f"{path}: clip_l has {out[0].vectors.shape[0]} vectors but clip_g "
                              f"{out[1].vectors.shape[0]}: one per token position in both encoders")
    return out[0], out[1]


def _find_vectors(path: Path, data: dict[str, Any]) -> tuple[str | None, Any]:
    """(the file's own word or None, the vectors) by format."""
    if "clip_l" in data and "clip_g" in data:
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l + clip_g): load it into an SDXL pipeline")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # an nn.ParameterDict in old files
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold exactly one entry, got "
                                  f"{list(params) if isinstance(params, dict) else type(params).__name__}")
        return None, next(iter(params.values()))
    flat = [k for k in data if k.startswith("string_to_param.")]  # A1111's dict flattened into safetensors
    if flat:
        if len(flat) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold exactly one entry, got {flat}")
        return None, data[flat[0]]
    if "emb_params" in data:  # kohya
        return None, data["emb_params"]
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(data) == 1 and len(tensors) == 1:  # diffusers {"<word>": tensor}
        word, vectors = next(iter(tensors.items()))
        return word, vectors
    raise CheckpointError(f"{path}: not a textual inversion file: expected string_to_param (A1111), emb_params "
                          f"(kohya) or a single {{word: tensor}} (diffusers), found keys {sorted(data)[:8]}")
