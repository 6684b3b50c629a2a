"""The attention kernel (ldm/attention.py) and the research hook, exercised through the UNet's attention layers.

What is proven here:
- the "math" and "sdpa" backends agree within 1e-6 relative per kernel call and 1e-5 through a whole UNet, in fp32:
  the two compute the same softmax with different summation orders, so they differ by float rounding only;
- both backends treat masks like torch's SDPA (bool True = attend, additive float);
- an identity processor leaves the UNet output bit-identical, and `set_attention_processor(model, None)` restores
  the default path bit for bit;
- a capturing processor on the cross-attention layers (`attn2`) sees every such layer by its named_modules() path,
  records maps of shape (B, heads, H*W, 77), and each map sums to 1 over the text axis;
- upcast_attention hands fp32 q, k, v to the kernel for fp16 / bf16 inputs (SD 2.1-768) and leaves fp32 alone;
- the mask argument is plumbed through the UNet's attention module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ldm.attention
from ldm.attention import (attention, attention_backend, attention_layers, attention_probs, set_attention_chunk,
                           set_attention_processor)
from ldm.config import UNetConfig, VAEConfig
from ldm.unet import Attention, UNet2DConditionModel
from ldm.vae import AutoencoderKL
from tests.helpers import assert_rel, trained_like_

BACKEND_TOL = 1e-6  # one kernel call, fp32, same math, different summation order: observed ~1e-7
# Through a whole UNet (14 attention calls, each feeding GroupNorms and residuals) the rounding differences grow to
# ~1e-6 (observed 1.07e-6); the parity contract's 1e-5 still catches any real error (those are ~1e-1).
UNET_BACKEND_TOL = 1e-5

_CFG = UNetConfig(block_out_channels=(32, 64), cross_attention_levels=(True, True), num_heads=(2, 4),
                  cross_attention_dim=32, layers_per_block=1, norm_num_groups=8, sample_size=None)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return trained_like_(UNet2DConditionModel(_CFG), seed=5).eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return torch.randn(2, 4, 8, 12, generator=g), torch.tensor([999.0, 20.0]), torch.randn(2, 77, 32, generator=g)


def run(model: UNet2DConditionModel, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# ---------------------------------------------------------------------------------------------------------------
# The kernel


def test_backends_agree_on_the_kernel_with_masks() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    k, v = k[:, :, :7], v[:, :, :7]
    bool_mask = torch.rand(2, 1, 10, 7, generator=g) > 0.3
    bool_mask[..., 0] = True  # every row attends somewhere
    float_mask = torch.randn(1, 3, 1, 7, generator=g)
    for mask in (None, bool_mask, float_mask):
        with attention_backend("math"):
            a = attention(q, k, v, mask)
        with attention_backend("sdpa"):
            b = attention(q, k, v, mask)
        assert a.shape == (2, 3, 10, 8)
        assert_rel(a, b, BACKEND_TOL, f"math vs sdpa, mask {None if mask is None else mask.dtype}")
    # the formula itself, written out in float64
    s = (q.double() @ k.double().transpose(-1, -2)) / 8 ** 0.5
    expected = s.masked_fill(~bool_mask, float("-inf")).softmax(-1) @ v.double()
    with attention_backend("math"):
        assert_rel(attention(q, k, v, bool_mask), expected, BACKEND_TOL, "math vs float64 formula")
    assert torch.allclose(attention_probs(q, k, bool_mask).sum(-1), torch.ones(2, 3, 10))


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'"):
        with attention_backend("flash"):
            pass


def test_backends_agree_on_the_unet(unet: UNet2DConditionModel, inputs: tuple) -> None:
    with attention_backend("math"):
        a = run(unet, inputs)
    with attention_backend("sdpa"):
        b = run(unet, inputs)
    assert_rel(a, b, UNET_BACKEND_TOL, "UNet math vs sdpa")


# ---------------------------------------------------------------------------------------------------------------
# The processor hook


def test_identity_processor_is_bit_identical_and_none_restores(unet: UNet2DConditionModel, inputs: tuple) -> None:
    baseline = run(unet, inputs)
    changed = set_attention_processor(unet, lambda q, k, v, *, name, mask: attention(q, k, v, mask))
    try:
        assert len(changed) == 2 * 7  # attn1 + attn2 in 7 transformers: 1 + 1 down, 1 mid, 2 + 2 up
        assert torch.equal(run(unet, inputs), baseline)
    finally:
        set_attention_processor(unet, None)
    assert all(layer.processor is None for layer in attention_layers(unet).values())
    assert torch.equal(run(unet, inputs), baseline)


class CaptureCrossAttention:
    """A research processor: keeps each layer's attention probabilities; its state lives on the object."""

    def __init__(self) -> None:
        self.maps: dict[str, list[torch.Tensor]] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str,
                 mask: torch.Tensor | None) -> torch.Tensor:
        probs = attention_probs(q, k, mask)  # (B, nh, L, S)
        self.maps.setdefault(name, []).append(probs)
        return (probs.to(v.dtype) @ v)


def test_capture_processor_on_cross_attention(unet: UNet2DConditionModel, inputs: tuple) -> None:
    store = CaptureCrossAttention()
    baseline = run(unet, inputs)
    changed = set_attention_processor(unet, store, where=lambda name: name.endswith("attn2"))
    try:
        out = run(unet, inputs)
    finally:
        set_attention_processor(unet, None)
    assert_rel(out, baseline, UNET_BACKEND_TOL, "UNet with the capturing processor")
    expected_names = {n for n in attention_layers(unet) if n.endswith("attn2")}
    assert set(changed) == expected_names == set(store.maps)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in store.maps
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in store.maps
    x = inputs[0]
    for name, (probs,) in store.maps.items():
        level = int(name.split(".")[1]) if name.startswith(("down", "up")) else len(_CFG.block_out_channels) - 1
        if name.startswith("up"):
            level = len(_CFG.block_out_channels) - 1 - level  # up_blocks run from the lowest resolution up
        f = 2 ** level
        heads = _CFG.num_heads[level]
        assert probs.shape == (x.shape[0], heads, (x.shape[2] // f) * (x.shape[3] // f), 77), name
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5), name


def test_processor_with_wrong_output_shape_is_reported(unet: UNet2DConditionModel, inputs: tuple) -> None:
    set_attention_processor(unet, lambda q, k, v, *, name, mask: q[..., :1], where=lambda n: n.endswith("attn1"))
    try:
        with pytest.raises(ValueError, match=r"processor on 'down_blocks.0.attentions.0.transformer_blocks.0.attn1'"
                                             r" returned shape"):
            run(unet, inputs)
    finally:
        set_attention_processor(unet, None)


def test_where_that_matches_nothing_returns_empty_and_non_callable_is_rejected(unet: UNet2DConditionModel) -> None:
    assert set_attention_processor(unet, lambda *a, **k: None, where=lambda n: n.endswith("attn3")) == []
    with pytest.raises(TypeError, match="processor must be callable or None, got int"):
        set_attention_processor(unet, 3)  # type: ignore[arg-type]


def test_processor_can_edit_attention(unet: UNet2DConditionModel, inputs: tuple) -> None:
    """A processor that changes the result changes the output: the hook is really on the computation path."""
    baseline = run(unet, inputs)
    set_attention_processor(unet, lambda q, k, v, *, name, mask: torch.zeros_like(q), where=lambda n: "mid" in n)
    try:
        edited = run(unet, inputs)
    finally:
        set_attention_processor(unet, None)
    assert not torch.allclose(edited, baseline)


# ---------------------------------------------------------------------------------------------------------------
# upcast_attention and the mask argument on the UNet's Attention module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_attention_computes_low_precision_in_fp32(dtype: torch.dtype, upcast: bool) -> None:
    layer = trained_like_(Attention(16, heads=2, context_dim=8, upcast=upcast)).to(dtype)
    seen: list[torch.dtype] = []

    def spy(q, k, v, *, name, mask):
        seen.append(q.dtype)
        return attention(q, k, v, mask)

    set_attention_processor(layer, spy)
    x, ctx = torch.randn(2, 6, 16, dtype=dtype), torch.randn(2, 5, 8, dtype=dtype)
    with torch.no_grad():
        out = layer(x, ctx)
    assert out.dtype == dtype and out.shape == (2, 6, 16)
    low = dtype != torch.float32
    assert seen == [torch.float32 if (upcast and low) else dtype]


def test_upcast_unet_matches_plain_in_fp32(unet: UNet2DConditionModel, inputs: tuple) -> None:
    upcast = UNet2DConditionModel(dataclasses.replace(_CFG, upcast_attention=True)).eval()
    upcast.load_state_dict(unet.state_dict(), strict=True)
    assert torch.equal(run(upcast, inputs), run(unet, inputs))


def test_mask_reaches_the_kernel() -> None:
    """Cross-attention with the last tokens masked out equals attention on the context without them."""
    layer = trained_like_(Attention(16, heads=2, context_dim=8)).eval()
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 5, 8)
    keep = torch.tensor([True, True, True, False, False])
    with torch.no_grad():
        masked = layer(x, ctx, mask=keep[None, None, None, :])  # (1, 1, 1, S), broadcast
        truncated = layer(x, ctx[:, :3])
        additive = layer(x, ctx, mask=torch.where(keep, 0.0, float("-inf"))[None, None, None, :])
    assert_rel(masked, truncated, BACKEND_TOL, "bool mask vs truncation")
    assert_rel(additive, truncated, BACKEND_TOL, "additive mask vs truncation")


# ----------------------------------------------------------------------------------------------------------------
# Chunked attention (set_attention_chunk; formerly tests/test_memory.py). Chunked attention computes the same thing
# as one kernel call: every query row's softmax is independent of the other rows, so splitting the query axis
# changes no arithmetic, only which BLAS kernel runs a piece. With pieces whose row count is a multiple of 8 the
# "math" backend is bit-identical (x86 BLAS picks the same micro-kernel); for any chunk (1, 3, 7: tiny pieces use
# other kernels and summation orders) both backends stay within CHUNK_TOL = 1e-6 relative (observed <= 3e-7);
# masks with and without a query axis are cut correctly; no kernel call sees more than `chunk` query rows.

CHUNK_TOL = 1e-6  # fp32, same formula per row, different summation orders in tiny BLAS pieces: observed <= 3e-7


def qkv(L: int, S: int, seed: int = 0, B: int = 2, heads: int = 3, hd: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, heads, L, hd, generator=g), torch.randn(B, heads, S, hd, generator=g),
            torch.randn(B, heads, S, hd, generator=g))


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_chunks_of_multiples_of_8_rows_are_bit_identical(backend: str) -> None:
    for S in (77, 256):  # cross-attention-like and self-attention-like
        q, k, v = qkv(L=256, S=S, seed=S)
        with attention_backend(backend):
            whole = attention(q, k, v)
            for chunk in (16, 64, 96, 128):
                out = attention(q, k, v, chunk=chunk)
                if backend == "math":
                    assert torch.equal(out, whole), f"math, S={S}, chunk={chunk}: not bit-identical"
                else:  # SDPA's CPU kernel may pick another path by length; rounding only
                    assert_rel(out, whole, CHUNK_TOL, f"sdpa, S={S}, chunk={chunk}")


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_any_chunk_matches_within_rounding_with_masks(backend: str) -> None:
    q, k, v = qkv(L=50, S=20, seed=4)
    g = torch.Generator().manual_seed(5)
    bool_rows = torch.rand(2, 1, 50, 20, generator=g) > 0.3  # a query axis: cut with q
    bool_rows[..., 0] = True  # every row attends somewhere
    masks = {
        "none": None,
        "bool (B, 1, L, S)": bool_rows,
        "float (1, nh, 1, S)": torch.randn(1, 3, 1, 20, generator=g),  # query axis 1: broadcast to every piece
        "float (L, S)": torch.randn(50, 20, generator=g),  # 2-D, query axis first
        "bool (B, 1, 1, S)": torch.rand(2, 1, 1, 20, generator=g) > 0.2,  # a padding mask, broadcast over rows
    }
    with attention_backend(backend):
        for what, mask in masks.items():
            whole = attention(q, k, v, mask)
            for chunk in (1, 3, 7, 49):
                assert_rel(attention(q, k, v, mask, chunk=chunk), whole, CHUNK_TOL, f"{what}, chunk {chunk}")
            for chunk in (50, 1000):  # chunk >= L: the single call itself
                assert torch.equal(attention(q, k, v, mask, chunk=chunk), whole)


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_no_kernel_call_sees_more_than_chunk_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int | None]] = []
    real = ldm.attention._kernel

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        seen.append((q.shape[-2], None if mask is None else mask.shape[-2]))
        return real(q, k, v, mask)

    monkeypatch.setattr(ldm.attention, "_kernel", spy)
    q, k, v = qkv(L=100, S=30)
    mask = torch.zeros(2, 1, 100, 30)
    attention(q, k, v, mask, chunk=32)
    assert seen == [(32, 32), (32, 32), (32, 32), (4, 4)]


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
@pytest.mark.parametrize("chunk", [0, -4, 2.5, True, "8"])
def test_bad_chunks_are_rejected(chunk: object) -> None:
    q, k, v = qkv(L=8, S=8)
    with pytest.raises(ValueError, match=r"attention: chunk must be a positive int .* got"):
        attention(q, k, v, chunk=chunk)
    with pytest.raises(ValueError, match=r"set_attention_chunk: chunk must be a positive int"):
        set_attention_chunk(AutoencoderKL(VAEConfig(block_out_channels=(16, 32), norm_num_groups=8)), chunk)


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_a_mask_whose_query_axis_is_not_L_is_rejected() -> None:
    q, k, v = qkv(L=8, S=5)
    with pytest.raises(ValueError, match=r"mask \(2, 1, 6, 5\) has a query axis of 6, but q has L = 8"):
        attention(q, k, v, torch.zeros(2, 1, 6, 5), chunk=4)
