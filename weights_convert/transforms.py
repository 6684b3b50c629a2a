"""Named tensor transforms: the only places where the converter changes a tensor rather than renaming it.

Every rule of the mapping tables names one of these. A transform maps one source tensor to one or more target
tensors, knows the target shapes from the source shape alone (so a file is verified from its header before any
data is read), and has an inverse (used to write the original layout back, and tested as a round trip).

- `copy`: the tensor as is.
- `conv1x1_to_linear`: the original VAE's mid-block attention stores q, k, v and proj_out as 1x1 convolutions
  (O, I, 1, 1); diffusers uses Linear layers (O, I). Same numbers, a view.
- `split_qkv`: OpenCLIP's `nn.MultiheadAttention` stores q, k and v fused in `in_proj_weight` (3D, D) and
  `in_proj_bias` (3D,), in that order; the CLIP text model has separate q_proj, k_proj, v_proj. Row slices, views.
- `transpose`: OpenCLIP applies its `text_projection` (D, P) as `x @ proj`; transformers' CLIPTextModelWithProjection
  holds an nn.Linear whose weight is (P, D) (SDXL's bigG encoder). A transposed view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Transform:
    name: str
    arity: int  # number of target tensors per source tensor
    forward: Callable[[Tensor], tuple[Tensor, ...]]
    shapes: Callable[[Shape], tuple[Shape, ...] | None]  # None: the source shape is not acceptable
    inverse: Callable[[tuple[Tensor, ...]], Tensor]
    doc: str


def _conv1x1_shapes(shape: Shape) -> tuple[Shape, ...] | None:
    if len(shape) == 4 and shape[2:] == (1, 1):
        return (shape[:2],)
    return None


def _transpose_shapes(shape: Shape) -> tuple[Shape, ...] | None:
    return ((shape[1], shape[0]),) if len(shape) == 2 else None


def _split_shapes(shape: Shape) -> tuple[Shape, ...] | None:
    if len(shape) not in (1, 2) or shape[0] % 3:
        return None
    part = (shape[0] // 3, *shape[1:])
    return (part, part, part)


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("copy", 1, lambda x: (x,), lambda s: (s,), lambda ts: ts[0], "the tensor as is"),
        Transform("conv1x1_to_linear", 1, lambda x: (x[:, :, 0, 0],), _conv1x1_shapes,
                  lambda ts: ts[0][:, :, None, None], "(O, I, 1, 1) 1x1 conv weight -> (O, I) linear weight"),
        Transform("split_qkv", 3, lambda x: tuple(x.chunk(3, dim=0)), _split_shapes,
                  lambda ts: torch.cat(ts, dim=0), "fused (3D, ...) in_proj -> q, k, v (D, ...) each"),
        Transform("transpose", 1, lambda x: (x.t().contiguous(),), _transpose_shapes,
                  lambda ts: ts[0].t().contiguous(), "(D, P) matrix applied as x @ W -> (P, D) linear weight"),
    )
}


def target_shapes(transform: str, source_shape: Shape) -> tuple[Shape, ...] | None:
    """The shapes `transform` makes from a source of `source_shape`, or None if it cannot take that shape."""
    return TRANSFORMS[transform].shapes(tuple(source_shape))
