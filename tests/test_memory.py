"""Memory for large images: chunked attention (ldm/attention.py) and VAE tiling (ldm/vae.py).

What is proven here, on CPU in fp32:
- Chunked attention computes the same thing as one kernel call. Every query row's softmax is independent of the
  other rows, so splitting the query axis changes no arithmetic, only which BLAS kernel runs a piece: with pieces
  whose row count is a multiple of 8 the "math" backend is bit-identical (asserted; x86 BLAS picks the same
  micro-kernel), and for any chunk (1, 3, 7: tiny pieces use other kernels and summation orders) both backends
  stay within CHUNK_TOL = 1e-6 relative (observed <= 3e-7); masks with and without a query axis are cut correctly.
  No kernel call ever sees more than `chunk` query rows (a spy on the kernel checks it).
- `set_attention_chunk` is per layer, validated, restorable, and yields to an installed processor.
- VAE tiling is diffusers' tiled_encode / tiled_decode: with the mid attention off our tiled output is
  bit-identical to diffusers' (the tiling arithmetic, tile grid and blend are the same operations); with it on,
  within TILED_TOL = 1e-5 relative (the parity contract; observed ~1.3e-6, the untiled attention's own rounding).
- Tiling off, or an input that fits in one tile, runs the one-pass path unchanged (bit-identical).
- The seams are blended: with a tile-local stand-in decoder (nearest upsampling plus a per-tile offset) the overlap
  is exactly diffusers' linear cross-fade and the image is continuous across it (no jump larger than one step of
  the ramp), while overlap 0 leaves the full jump; a position-independent decoder tiles to the untiled image.

Not asserted: how close tiled is to untiled with real weights. With trained-like *random* weights a tiny VAE is
very sensitive to GroupNorm statistics computed per tile (tiled vs untiled differ by 20-100% relative at 4-16
latent-pixel tiles), so no honest fidelity bound exists without trained weights; docs/vae.md says so.
"""

from __future__ import annotations

import dataclasses
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as RefAutoencoderKL

import ldm.attention
from ldm.attention import attention, attention_backend, attention_layers, set_attention_chunk, \
    set_attention_processor
from ldm.config import VAEConfig
from ldm.vae import AutoencoderKL
from tests.helpers import assert_rel, trained_like_
from tests.test_vae import reference_kwargs

CHUNK_TOL = 1e-6  # fp32, same formula per row, different summation orders in tiny BLAS pieces: observed <= 3e-7
TILED_TOL = 1e-5  # the parity contract for VAE components; observed ~1.3e-6 (mid attention's summation order)

# Four levels (f = 8, as SD), small widths: 32 px tiles are 4x4 latents, so an 80x96 image makes a grid of
# 4 x 4 tiles with 12 seams.
VAE_CFG = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def qkv(L: int, S: int, seed: int = 0, B: int = 2, heads: int = 3, hd: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, heads, L, hd, generator=g), torch.randn(B, heads, S, hd, generator=g),
            torch.randn(B, heads, S, hd, generator=g))


def make_vae_pair(cfg: VAEConfig = VAE_CFG, seed: int = 0) -> tuple[AutoencoderKL, RefAutoencoderKL]:
    ref = trained_like_(RefAutoencoderKL(**reference_kwargs(cfg)), seed=seed).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def set_reference_tiling(ref: RefAutoencoderKL, tile: int, overlap: float) -> None:
    """diffusers' enable_tiling() takes no sizes; its attributes are set by hand (its documented knobs)."""
    ref.enable_tiling()
    ref.tile_sample_min_size = tile
    ref.tile_latent_min_size = tile // (2 ** (len(ref.config.block_out_channels) - 1))
    ref.tile_overlap_factor = overlap


def images(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# Chunked attention: the kernel


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


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True, "8"])
def test_bad_chunks_are_rejected(chunk: object) -> None:
    q, k, v = qkv(L=8, S=8)
    with pytest.raises(ValueError, match=r"attention: chunk must be a positive int .* got"):
        attention(q, k, v, chunk=chunk)
    with pytest.raises(ValueError, match=r"set_attention_chunk: chunk must be a positive int"):
        set_attention_chunk(AutoencoderKL(VAE_CFG), chunk)


def test_a_mask_whose_query_axis_is_not_L_is_rejected() -> None:
    q, k, v = qkv(L=8, S=5)
    with pytest.raises(ValueError, match=r"mask \(2, 1, 6, 5\) has a query axis of 6, but q has L = 8"):
        attention(q, k, v, torch.zeros(2, 1, 6, 5), chunk=4)


# ---------------------------------------------------------------------------------------------------------------
# Chunked attention: per layer, in the VAE's mid block


@torch.no_grad()
def test_chunked_mid_attention_gives_the_same_decode() -> None:
    vae, _ = make_vae_pair()
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(7))  # mid attention over L = 192
    with attention_backend("math"):
        whole = vae.decode(z)
        changed = set_attention_chunk(vae, 64)
        try:
            assert changed == ["encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"]
            assert torch.equal(vae.decode(z), whole)  # pieces of 64 rows: bit-identical (see the module docstring)
        finally:
            assert set_attention_chunk(vae, None) == changed
    with attention_backend("sdpa"):
        whole = vae.decode(z)
        set_attention_chunk(vae, 5, where=lambda name: name.startswith("decoder"))
        try:
            assert_rel(vae.decode(z), whole, CHUNK_TOL, "sdpa decode with 5-row chunks")
        finally:
            set_attention_chunk(vae, None)
        assert torch.equal(vae.decode(z), whole)  # None restores the single call


def test_set_attention_chunk_is_per_layer_and_a_processor_takes_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    vae, _ = make_vae_pair()
    changed = set_attention_chunk(vae, 16, where=lambda name: name.startswith("decoder"))
    assert changed == ["decoder.mid_block.attentions.0"]
    assert {name: layer.chunk for name, layer in attention_layers(vae).items()} == {
        "encoder.mid_block.attentions.0": None, "decoder.mid_block.attentions.0": 16}
    assert set_attention_chunk(vae, 16, where=lambda name: name.startswith("nothing")) == []  # a typo shows

    rows_seen = []
    set_attention_processor(vae, lambda q, k, v, *, name, mask: rows_seen.append(q.shape[-2]) or attention(q, k, v))
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 6, 8))
    assert rows_seen == [48]  # the processor got the whole query axis, chunk notwithstanding


# ---------------------------------------------------------------------------------------------------------------
# VAE tiling: parity with diffusers


TILINGS = [  # (tile px, overlap, image shape, mid attention): 2x2 .. 5x5-latent tiles
    (32, 0.25, (2, 3, 80, 96), True),
    (32, 0.25, (2, 3, 80, 96), False),
    (16, 0.5, (1, 3, 80, 96), False),
    (40, 0.2, (1, 3, 80, 96), False),
    (32, 0.0, (1, 3, 80, 96), False),
    (16, 0.5, (1, 3, 80, 96), True),
    (32, 0.25, (1, 3, 104, 88), True),  # 13 x 11 latents: the last tiles are 1 and 2 latents thin
]


@pytest.mark.parametrize(("tile", "overlap", "shape", "mid_attention"), TILINGS,
                         ids=[f"{t}px_{o}_{s[2]}x{s[3]}{'_attn' * a}" for t, o, s, a in TILINGS])
@torch.no_grad()
def test_tiled_encode_and_decode_match_diffusers(tile: int, overlap: float, shape: tuple, mid_attention: bool) -> None:
    cfg = VAE_CFG if mid_attention else dataclasses.replace(VAE_CFG, mid_block_add_attention=False)
    ours, ref = make_vae_pair(cfg)
    ours.enable_tiling(tile, overlap)
    set_reference_tiling(ref, tile, overlap)
    x = images(shape)
    z = torch.randn(shape[0], 4, shape[2] // 8, shape[3] // 8, generator=torch.Generator().manual_seed(2))

    enc, enc_ref = ours.encode(x), ref.encode(x).latent_dist
    dec, dec_ref = ours.decode(z), ref.decode(z).sample
    assert enc.parameters.shape == enc_ref.parameters.shape and dec.shape == dec_ref.shape == x.shape
    if mid_attention:
        assert_rel(enc.parameters, enc_ref.parameters, TILED_TOL, "tiled encode")
        assert_rel(dec, dec_ref, TILED_TOL, "tiled decode")
    else:  # no attention: every remaining op is the same op on the same values, so the same bits
        assert torch.equal(enc.parameters, enc_ref.parameters)
        assert torch.equal(dec, dec_ref)


@torch.no_grad()
def test_untiled_path_is_unchanged_when_off_or_when_the_input_fits() -> None:
    vae, _ = make_vae_pair()
    x, z = images((1, 3, 32, 40)), torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(3))
    one_pass_z = vae.decoder(vae.post_quant_conv(z))  # the one-pass computation, written out
    one_pass_x = vae.quant_conv(vae.encoder(x))
    assert not vae.use_tiling
    assert torch.equal(vae.decode(z), one_pass_z) and torch.equal(vae.encode(x).parameters, one_pass_x)
    vae.enable_tiling(40, 0.2)  # the input fits in one 40 px tile: not tiled (diffusers tiles only larger inputs)
    assert torch.equal(vae.decode(z), one_pass_z) and torch.equal(vae.encode(x).parameters, one_pass_x)
    vae.enable_tiling(32)  # 40 px wide > 32: tiled, so different
    assert not torch.equal(vae.decode(z), one_pass_z)
    vae.disable_tiling()
    assert not vae.use_tiling and torch.equal(vae.decode(z), one_pass_z)


def test_enable_tiling_defaults_to_the_config_sample_size() -> None:
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=256))
    vae.enable_tiling()
    assert (vae.use_tiling, vae.tile_sample_size, vae.tile_overlap) == (True, 256, 0.25)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tile_sample_size": 30}, r"tile_sample_size must be a positive multiple of the downsample factor 8, got 30"),
    ({"tile_sample_size": 0}, r"positive multiple .* got 0"),
    ({"tile_sample_size": 32.0}, r"positive multiple .* got 32.0"),
    ({"tile_sample_size": 32, "overlap": 1.0}, r"overlap must be a number in \[0, 1\), got 1.0"),
    ({"tile_sample_size": 32, "overlap": -0.25}, r"overlap must be a number in \[0, 1\), got -0.25"),
    ({"tile_sample_size": 32, "overlap": 0.3}, r"overlap 0.3 of a 32 px tile is 1.2 latent pixels; it must be a whole"),
])
def test_bad_tilings_are_rejected_and_change_nothing(kwargs: dict, match: str) -> None:
    vae = AutoencoderKL(VAE_CFG)
    with pytest.raises(ValueError, match=match):
        vae.enable_tiling(**kwargs)
    assert not vae.use_tiling and (vae.tile_sample_size, vae.tile_overlap) == (VAE_CFG.sample_size, 0.25)


# ---------------------------------------------------------------------------------------------------------------
# VAE tiling: the seams are blended


def tile_local_decoder(offsets: list[float]) -> object:
    """A stand-in for `_decode_one`: nearest x8 upsampling of channel 0 (position-independent) plus a constant
    that differs per call (per tile), so what tiling does at the seams is visible exactly."""

    def decode_one(z: torch.Tensor) -> torch.Tensor:
        offsets.append(float(len(offsets)))
        return F.interpolate(z[:, :1], scale_factor=8, mode="nearest") + offsets[-1]

    return decode_one


@torch.no_grad()
def test_seams_are_linear_cross_fades_and_continuous(monkeypatch: pytest.MonkeyPatch) -> None:
    vae = AutoencoderKL(VAE_CFG)
    z = torch.zeros(1, 4, 3, 7)  # one row of 4x4-latent tiles at columns 0, 3, 6; overlap 1 latent = 8 px
    vae.enable_tiling(32, 0.25)
    offsets: list[float] = []
    monkeypatch.setattr(vae, "_decode_one", tile_local_decoder(offsets))
    out = vae.decode(z)[0, 0, 0]  # (56,) one image row: tiles at px 0..31, 24..55 and 48..55
    assert offsets == [0.0, 1.0, 2.0]  # three tiles, the last one latent thin
    blend = torch.arange(8, dtype=torch.float64) / 8  # diffusers' weights y / blend_extent
    assert torch.equal(out[:24], torch.zeros(24))  # first tile alone
    assert torch.equal(out[24:32], (0.0 * (1 - blend) + 1.0 * blend).float())  # fades 0 -> 1 over the overlap
    assert torch.equal(out[32:48], torch.ones(16))  # second tile alone
    assert torch.equal(out[48:56], (1.0 * (1 - blend) + 2.0 * blend).float())  # the thin tile fades in too
    jumps = (out[1:] - out[:-1]).abs()
    assert jumps.max() <= 1 / 8 + 1e-7  # continuous: one ramp step at a time, never the whole offset of 1

    vae.enable_tiling(32, 0.0)  # no overlap: hard seams, the full jump appears
    offsets.clear()
    hard = vae.decode(z)[0, 0, 0]
    assert (hard[1:] - hard[:-1]).abs().max() == 1.0


@torch.no_grad()
def test_a_position_independent_decoder_tiles_to_the_untiled_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the decoder had no per-tile state, tiling would reproduce the untiled image: the tiles land where they
    belong and each cross-fade mixes two equal values (a * (1 - t) + a * t, exact up to one fp32 rounding)."""
    vae = AutoencoderKL(VAE_CFG)
    z = torch.randn(2, 4, 13, 11, generator=torch.Generator().manual_seed(4))
    # nearest upsampling: each output pixel depends on its own latent only (bilinear would look across a tile edge)
    monkeypatch.setattr(vae, "_decode_one", lambda t: F.interpolate(t, scale_factor=8, mode="nearest"))
    untiled = vae.decode(z)
    for tile, overlap in ((16, 0.5), (32, 0.25), (32, 0.0), (40, 0.2)):
        vae.enable_tiling(tile, overlap)
        torch.testing.assert_close(vae.decode(z), untiled, rtol=1e-6, atol=1e-6)
