"""Small pieces every research processor shares: which layers to hook, installing a processor for one block of code,
and knowing which denoising step an attention call belongs to.

Step counting. A processor sees `(q, k, v, name, mask)` and nothing else: no timestep, no step index is threaded
through the UNet's forward (STYLE.md rule 11). So the processors here count for themselves: one step is one UNet
evaluation, and an evaluation begins when the first hooked layer is called again. This needs no cooperation from
the pipeline (any loop, any scheduler) and matches the pipeline's step index `i` for the schedulers that evaluate
the UNet once per step (DDIM, LMS, Euler, Euler-a, DPM++ 2M). PNDM evaluates it `num_inference_steps + 1` times
(its first timestep twice, as in diffusers), so under PNDM evaluation `j` is pipeline step `j - 1` for `j >= 1`.
Call `reset()` on a processor before reusing it for another generation.

Shapes: B batch, nh heads, L query tokens (H*W of a UNet level), S key tokens (77 per text chunk), hd head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from ldm.attention import Processor, set_attention_processor


def is_cross_attention(name: str) -> bool:
    """True for the UNet's cross-attention layers (`...transformer_blocks.N.attn2`): queries from the image, keys
    and values from the text."""
    return name.endswith("attn2")


def is_self_attention(name: str) -> bool:
    """True for the UNet's spatial self-attention layers (`...transformer_blocks.N.attn1`)."""
    return name.endswith("attn1")


@contextlib.contextmanager
def use_processor(
    model: nn.Module,
    processor: Processor,
    where: Callable[[str], bool] | None = is_cross_attention,
) -> Iterator[list[str]]:
    """Install `processor` on the layers of `model` selected by `where` for the duration of the block.

    Yields the names of the hooked layers; restores the default kernel on exit, also after an exception. Raises
    ValueError when `where` selects no layer (a typo in a predicate should not silently record nothing).
    """
    names = set_attention_processor(model, processor, where)
    if not names:
        raise ValueError(f"use_processor: `where` selected no attention layer of {type(model).__name__}")
    try:
        yield names
    finally:
        set_attention_processor(model, None, where)


class StepCounter:
    """Counts UNet evaluations from the stream of attention calls (see the module docstring)."""

    def __init__(self) -> None:
        self.step = 0
        self._first: str | None = None

    def reset(self) -> None:
        self.step = 0
        self._first = None

    def observe(self, name: str) -> int:
        """Register a call of layer `name`; returns the index of the UNet evaluation it belongs to."""
        if self._first is None:
            self._first = name
        elif name == self._first:
            self.step += 1
        return self.step


def conditional_half(x: Tensor, guided: bool, who: str) -> Tensor:
    """The rows of the UNet batch that belong to the text prompts.

    With classifier-free guidance (guidance_scale > 1) the pipeline runs the batch [uncond; cond]: keep the second
    half. Without it (guidance_scale <= 1, `guided=False`) the whole batch is conditional.
    """
    if not guided:
        return x
    if x.shape[0] % 2:
        raise ValueError(f"{who}(guided=True) expects the classifier-free guidance batch [uncond; cond] of even size, "
                         f"got batch {x.shape[0]}; pass guided=False when guidance_scale <= 1")
    return x[x.shape[0] // 2:]


def conditional_mask(mask: Tensor | None, batch: int, guided: bool, who: str) -> Tensor | None:
    """The mask rows matching `conditional_half` (a mask broadcast over the batch is kept as is)."""
    if mask is None or mask.ndim < 4 or mask.shape[0] != batch:
        return mask
    return conditional_half(mask, guided, who)
