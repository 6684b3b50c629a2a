"""The attention kernel shared by every component, its backends, and the per-layer processor hook.

Weights live in the modules (the UNet's `Attention`, the VAE's mid-block attention, CLIP's self-attention); the
arithmetic lives here, in one function (flux `math.attention`, diffusers' `dispatch_attention_fn`):

    attention(q, k, v, mask) = softmax(q @ k^T / sqrt(hd) + mask) @ v      q: (B, nh, L, hd), k, v: (B, nh, S, hd)

Backends, chosen with `with attention_backend("math" | "sdpa"):`
- "sdpa" (default): torch.nn.functional.scaled_dot_product_attention, the fused kernel.
- "math": the formula above written out, softmax in fp32; for reading, for debugging fp16, and for tools that
  need the probabilities (`attention_probs`).

The research hook: every attention layer subclasses `AttentionLayer` and sends its projected q, k, v through
`self.attend(q, k, v, mask)`. `set_attention_processor(model, processor, where=...)` installs a callable
`processor(q, k, v, *, name, mask) -> (B, nh, L, hd)` on the layers whose `named_modules()` path satisfies `where`;
`None` restores the default kernel. State a processor needs (captured maps, edit weights) lives on the processor.

Query chunking, for memory: `attention(q, k, v, mask, chunk=n)` runs the kernel on `n` query rows at a time and
concatenates, so at most an (n, S) block of scores exists at once instead of the whole (L, S) matrix. Every query
row's softmax is independent of the others, so the result equals the unchunked one up to the summation order the
matrix-multiply kernels pick for a given number of rows: bit for bit with "math" when every piece has a multiple of
8 rows (x86 CPU BLAS, tested), within 1e-6 relative in fp32 otherwise, for both backends. It costs a Python loop of
ceil(L / n) kernel calls. It matters where the full score matrix would be materialised: the "math" backend (its fp32 scores are
4*L*S bytes per head: 1 GiB for the VAE's 1-head mid attention on a 1024 px image, L = S = 128*128, and the
softmax makes a second), SDPA's math fallback (for inputs its fused kernels do not take), and fp32-upcast layers.
SDPA's fused kernels (flash / memory-efficient on CUDA, flash on CPU) already never hold (L, S). Chunking is set per layer, like a processor:
`set_attention_chunk(model, n, where=...)` sets `AttentionLayer.chunk`, which `attend()` uses when no processor is
installed (a processor receives the whole q and decides for itself).

Shapes: B batch, nh heads, L query length, S key length, hd head width.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("sdpa", "math")
_backend = "sdpa"


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` ("sdpa" or "math") for every attention call inside the block."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def current_backend() -> str:
    """The backend attention calls use now (the memory estimate of ldm/limits.py depends on it)."""
    return _backend


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, heads, L, head_dim) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q @ k^T / sqrt(hd) + mask) in fp32: (B, nh, L, S). Rows sum to 1 over the key axis."""
    # fp32 scores and softmax: in fp16 the logits of long sequences overflow and the softmax loses the small
    # probabilities (the reason for CompVis' `_ATTN_PRECISION` and diffusers' upcast_attention).
    scores = q.float() @ k.float().transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, L, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # True = attend, as in SDPA
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)


def _check_chunk(chunk: object, who: str) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{who}: chunk must be a positive int (query rows per kernel call) or None, got {chunk!r}")


def _kernel(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """One call of the current backend: (B, nh, L, hd) -> (B, nh, L, hd)."""
    if _backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    probs = attention_probs(q, k, mask)  # (B, nh, L, S), fp32
    return (probs.to(v.dtype) @ v)  # (B, nh, L, hd)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """Scaled dot-product attention on (B, nh, L, hd) tensors with the current backend. Returns (B, nh, L, hd).

    `chunk`: run the backend on at most `chunk` query rows at a time (see the module docstring); None or
    chunk >= L is a single call.
    """
    _check(q, k, v)
    _check_chunk(chunk, "attention")
    L = q.shape[-2]
    if chunk is None or chunk >= L:
        return _kernel(q, k, v, mask)
    # A mask with a query axis of length L is cut along with q; one of length 1 (or no query axis) broadcasts
    # to every row and goes to each piece whole.
    mask_has_rows = mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1
    if mask_has_rows and mask.shape[-2] != L:
        raise ValueError(f"attention: mask {tuple(mask.shape)} has a query axis of {mask.shape[-2]}, "
                         f"but q has L = {L} rows (shape {tuple(q.shape)})")
    pieces = []
    for start in range(0, L, chunk):
        rows = slice(start, start + chunk)
        piece_mask = mask[..., rows, :] if mask_has_rows else mask
        pieces.append(_kernel(q[..., rows, :], k, v, piece_mask))  # (B, nh, <=chunk, hd)
    return torch.cat(pieces, dim=-2)  # (B, nh, L, hd)


class Processor(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, name: str, mask: Tensor | None) -> Tensor: ...


class AttentionLayer(nn.Module):
    """Base of every attention module: holds the processor slot and its own name for the hook.

    Subclasses project q, k, v with their own weights (whose names mirror the reference's keys) and call
    `self.attend(q, k, v, mask)` in place of the kernel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processor: Processor | None = None
        self.chunk: int | None = None  # query rows per kernel call (None: all), set by set_attention_chunk
        self.layer_name = ""  # its named_modules() path, set by set_attention_processor

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.processor is None:
            return attention(q, k, v, mask, chunk=self.chunk)
        out = self.processor(q, k, v, name=self.layer_name, mask=mask)
        if out.shape != q.shape[:-1] + v.shape[-1:]:
            raise ValueError(f"attention processor on {self.layer_name!r} returned shape {tuple(out.shape)}, "
                             f"expected {tuple(q.shape[:-1] + v.shape[-1:])}")
        return out


def attention_layers(model: nn.Module) -> dict[str, AttentionLayer]:
    """Every attention layer of `model` by its named_modules() path (e.g. 'down_blocks.0.attentions.0.
    transformer_blocks.0.attn2')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AttentionLayer)}


def set_attention_processor(
    model: nn.Module,
    processor: Processor | None,
    where: Callable[[str], bool] | None = None,
) -> list[str]:
    """Install `processor` on the attention layers whose path satisfies `where` (None: all of them).

    `processor=None` restores the default kernel. Returns the names of the layers changed, so a typo in `where`
    shows up as an empty list.
    """
    if processor is not None and not callable(processor):
        raise TypeError(f"processor must be callable or None, got {type(processor).__name__}")
    changed = []
    for name, layer in attention_layers(model).items():
        if where is None or where(name):
            layer.processor = processor
            layer.layer_name = name
            changed.append(name)
    return changed


def set_attention_chunk(model: nn.Module, chunk: int | None, where: Callable[[str], bool] | None = None) -> list[str]:
    """Make the attention layers whose path satisfies `where` (None: all) attend `chunk` query rows at a time.

    `chunk=None` restores the single kernel call. The output is unchanged (see `attention`); only the peak size
    of the score matrix shrinks, from (L, S) to (chunk, S) per head. Layers with a processor installed ignore it.
    Returns the names of the layers changed, as `set_attention_processor` does.
    """
    _check_chunk(chunk, "set_attention_chunk")
    changed = []
    for name, layer in attention_layers(model).items():
        if where is None or where(name):
            layer.chunk = chunk
            changed.append(name)
    return changed
