"""ldm.vae.AutoencoderKL against diffusers.AutoencoderKL (0.42.1) on identical trained-like weights.

Every parity test fills the REFERENCE with `trained_like_` weights and loads its state dict into ours with
strict=True (an identity load), then compares on CPU in fp32.

Tolerance: the parity contract's 1e-5 relative error (||ours - ref|| / ||ref||). Both sides run the same
float32 kernels; the only differences are summation orders (attention on a transposed view), which give
0 .. ~1e-6 (measured: 0 to 1.3e-6; exactly 0 at the full SD 1.5 shape). A wrong padding, a missing residual
or a swapped norm gives > 1e-2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as RefDiagonalGaussian

import ldm
from ldm.attention import attention, attention_backend, attention_layers, set_attention_chunk, set_attention_processor
from ldm.config import VAEConfig
from ldm.vae import AutoencoderKL, DiagonalGaussianDistribution, GroupNorm
from tests.helpers import assert_rel, diffusers_config, reference_kwargs, rel_err, trained_like_

TOL = 1e-5  # the parity contract for components in fp32

# (config, image shape): non-square sides, batch > 1, 1..3 levels, different widths / depths / groups / channels,
# mid attention off, quant convs off.
TINY = {
    "two_levels_batch2": (VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32),
                          (2, 3, 24, 40)),
    "three_levels_groups8": (VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8),
                             (1, 3, 32, 16)),
    "no_mid_attention": (VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                   mid_block_add_attention=False), (2, 3, 16, 24)),
    "no_quant_convs": (VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=16,
                                 use_quant_conv=False, use_post_quant_conv=False), (1, 3, 8, 12)),
    "odd_channels": (VAEConfig(in_channels=4, out_channels=2, latent_channels=8, block_out_channels=(16, 24),
                               layers_per_block=3, norm_num_groups=8), (3, 4, 10, 6)),
    "one_level": (VAEConfig(block_out_channels=(32,), layers_per_block=2, norm_num_groups=16), (1, 3, 7, 5)),
}


def make_pair(cfg: VAEConfig, seed: int = 0) -> tuple[AutoencoderKL, RefAutoencoderKL]:
    ref = trained_like_(RefAutoencoderKL(**reference_kwargs(cfg)), seed=seed).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def image(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # in [-1, 1] like real images


def latent_shape(cfg: VAEConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    f = cfg.downsample_factor
    return (shape[0], cfg.latent_channels, shape[2] // f, shape[3] // f)


# ---------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_encode_decode_match_diffusers(name: str) -> None:
    cfg, shape = TINY[name]
    if name == "one_level":  # factor 1: any size goes
        assert cfg.downsample_factor == 1
    ours, ref = make_pair(cfg)
    x = image(shape)
    post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    assert post.mean.shape == latent_shape(cfg, shape)
    assert_rel(post.mean, ref_post.mean, TOL, f"{name} encode mean")
    assert_rel(post.logvar, ref_post.logvar, TOL, f"{name} encode logvar")
    assert_rel(post.std, ref_post.std, TOL, f"{name} std")
    assert_rel(post.kl(), ref_post.kl(), TOL, f"{name} kl")
    z = torch.randn(latent_shape(cfg, shape), generator=torch.Generator().manual_seed(2))
    out = ours.decode(z)
    assert out.shape == (shape[0], cfg.out_channels, *shape[2:])
    assert_rel(out, ref.decode(z).sample, TOL, f"{name} decode")
    assert_rel(ours(x), ref(x).sample, TOL, f"{name} reconstruction")


@torch.no_grad()
def test_math_backend_matches_diffusers() -> None:
    cfg, shape = TINY["two_levels_batch2"]
    ours, ref = make_pair(cfg, seed=3)
    x = image(shape)
    with attention_backend("math"):
        mean = ours.encode(x).mean
    assert_rel(mean, ref.encode(x).latent_dist.mean, TOL, "encode mean, math backend")


@torch.no_grad()
def test_state_dict_keys_equal_diffusers() -> None:
    for cfg, _ in TINY.values():
        ref = RefAutoencoderKL(**reference_kwargs(cfg))
        assert list(AutoencoderKL(cfg).state_dict()) == list(ref.state_dict())
    cfg = ldm.SD15.vae
    with torch.device("meta"):
        ours, ref = AutoencoderKL(cfg), RefAutoencoderKL(**reference_kwargs(cfg))
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "encoder.down_blocks.0.downsamplers.0.conv.weight" in ours.state_dict()
    assert "decoder.mid_block.attentions.0.to_out.0.weight" in ours.state_dict()


@pytest.mark.parametrize("preset", ["SD15", "SD21_BASE", "SD21_V"])
def test_parameter_count_of_the_sd_vae(preset: str) -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(getattr(ldm, preset).vae)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.scaling_factor == 0.18215
    with torch.device("meta"):  # the shapes of docs/vae.md, traced without computing anything
        posterior = vae.encode(torch.zeros(1, 3, 512, 512))
        assert posterior.mean.shape == posterior.sample().shape == (1, 4, 64, 64)
        assert vae.decode(posterior.mode()).shape == (1, 3, 512, 512)


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_shipped_diffusers_config_builds_the_same_vae(family: str) -> None:
    d = diffusers_config(family, "vae")
    cfg = VAEConfig.from_diffusers(d)
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = RefAutoencoderKL(**{k: v for k, v in d.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# The posterior and its sampling


@torch.no_grad()
def test_sample_draws_the_same_noise_as_diffusers() -> None:
    params = torch.randn(3, 8, 5, 7, generator=torch.Generator().manual_seed(4)) * 3  # some logvar beyond clamps
    params[:, 4:, 0, 0] = 40.0  # clamped to 20
    params[:, 4:, 0, 1] = -50.0  # clamped to -30
    ours, ref = DiagonalGaussianDistribution(params), RefDiagonalGaussian(params)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.logvar.max() == 20.0 and ours.logvar.min() == -30.0
    assert torch.equal(ours.mode(), ref.mode())
    assert torch.equal(ours.kl(), ref.kl())
    other = DiagonalGaussianDistribution(params.flip(0))
    assert torch.equal(ours.kl(other), ref.kl(RefDiagonalGaussian(params.flip(0))))
    # one generator; a list of one; a list of one per batch item (diffusers' per-image seeds)
    for make in (lambda: torch.Generator().manual_seed(7),
                 lambda: [torch.Generator().manual_seed(7)],
                 lambda: [torch.Generator().manual_seed(7 + i) for i in range(3)]):
        a, b = ours.sample(make()), ref.sample(make())
        assert torch.equal(a, b)
    assert not torch.equal(ours.sample(torch.Generator().manual_seed(7)), ours.sample(torch.Generator().manual_seed(8)))
    fp16 = params.half()
    assert torch.equal(DiagonalGaussianDistribution(fp16).sample(torch.Generator().manual_seed(9)),
                       RefDiagonalGaussian(fp16).sample(torch.Generator().manual_seed(9)))


def test_sample_rejects_bad_generators() -> None:
    dist = DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3))
    with pytest.raises(ValueError, match="list of 3 generators for a batch of 2"):
        dist.sample([torch.Generator().manual_seed(i) for i in range(3)])
    with pytest.raises(TypeError, match="generator must be a torch.Generator.*got int"):
        dist.sample(42)
    with pytest.raises(ValueError, match=r"parameters must be a \(B, 2\*latent_channels, h, w\).*\(2, 7, 3, 3\)"):
        DiagonalGaussianDistribution(torch.zeros(2, 7, 3, 3))


@torch.no_grad()
def test_model_sample_matches_diffusers_with_seeded_generator() -> None:
    cfg, shape = TINY["two_levels_batch2"]
    ours, ref = make_pair(cfg, seed=5)
    x = image(shape)
    a = ours.encode(x).sample(generator=torch.Generator().manual_seed(11))
    b = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(11))
    assert_rel(a, b, TOL, "posterior sample")
    a = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(12))
    b = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(12)).sample
    assert_rel(a, b, TOL, "reconstruction from a posterior sample")


@pytest.mark.slow
@torch.no_grad()
def test_sd15_vae_matches_diffusers_at_full_shape() -> None:
    """The real SD VAE (84M parameters) on a small 64x48 image: encode, sample and decode parity."""
    cfg = ldm.SD15.vae
    ours, ref = make_pair(cfg, seed=6)
    x = image((1, 3, 64, 48))
    post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    assert post.mean.shape == (1, 4, 8, 6)
    assert_rel(post.mean, ref_post.mean, TOL, "SD15 encode mean")
    assert_rel(post.logvar, ref_post.logvar, TOL, "SD15 encode logvar")
    a = post.sample(generator=torch.Generator().manual_seed(13))
    b = ref_post.sample(generator=torch.Generator().manual_seed(13))
    assert_rel(a, b, TOL, "SD15 posterior sample")
    # same noise bit for bit: the difference left is only the encoder's ~1e-7 rounding in mean and std
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(13))
    assert torch.equal(a, post.mean + post.std * noise)
    z = a * cfg.scaling_factor  # what img2img hands the UNet; decode gets it back unscaled
    assert_rel(ours.decode(z / cfg.scaling_factor), ref.decode(z / cfg.scaling_factor).sample, TOL, "SD15 decode")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _old_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state_dict.items():
        for new, old in new_to_old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = value
    return out


@torch.no_grad()
def test_old_attention_key_names_load_and_give_identical_output(tmp_path) -> None:
    """Old diffusers VAE files (query/key/value/proj_attn) load through the converter, the one place that knows
    checkpoint layouts; the model itself takes only its own names."""
    import json

    from safetensors.torch import save_file

    from weights_convert.load import load_vae

    cfg, shape = TINY["two_levels_batch2"]
    ours, ref = make_pair(cfg, seed=8)
    old = _old_names(ref.state_dict())
    assert "encoder.mid_block.attentions.0.query.weight" in old
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in old
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    # load_vae builds the model on the meta device and loads with assign=True (how a 4 GB checkpoint is read)
    fresh = load_vae(tmp_path).eval()
    x = image(shape)
    assert torch.equal(fresh(x), ours(x))
    with pytest.raises(RuntimeError, match="encoder.mid_block.attentions.0.query.weight"):
        AutoencoderKL(cfg).load_state_dict(old, strict=True)


def test_strict_load_names_unknown_and_ambiguous_keys() -> None:
    cfg = TINY["no_quant_convs"][0]
    ours = AutoencoderKL(cfg)
    sd = dict(ours.state_dict())
    with pytest.raises(RuntimeError, match="encoder.mid_block.attentions.0.bogus.weight"):
        ours.load_state_dict({**sd, "encoder.mid_block.attentions.0.bogus.weight": torch.zeros(1)}, strict=True)
    with pytest.raises(RuntimeError, match="quant_conv.weight"):  # this config has no quant_conv
        ours.load_state_dict({**sd, "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, strict=True)
    both = {**sd, "encoder.mid_block.attentions.0.query.weight": sd["encoder.mid_block.attentions.0.to_q.weight"]}
    with pytest.raises(RuntimeError, match="encoder.mid_block.attentions.0.query.weight"):
        ours.load_state_dict(both, strict=True)  # old and new name together: ambiguous, left for strict to report
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(RuntimeError, match="decoder.conv_out.bias"):
        ours.load_state_dict(missing, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_bad_inputs_raise_clear_errors() -> None:
    vae = AutoencoderKL(TINY["three_levels_groups8"][0])  # factor 4
    with pytest.raises(ValueError, match="divisible by 4 .*got 18x16"):
        vae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="divisible by 4 .*got 16x10"):
        vae.encode(torch.zeros(1, 3, 16, 10))
    with pytest.raises(ValueError, match="x must have 3 channels .*in_channels.*got 4"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"x must be 4-D .*got shape \(3, 16, 16\)"):
        vae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="z must have 4 channels .*latent_channels.*got 3"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"z must be 4-D .*got shape \(1, 1, 4, 4, 4\)"):
        vae.decode(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        vae.encode([[0.0]])
    with pytest.raises(TypeError, match="floating-point tensor, got torch.uint8"):
        vae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="dtype torch.float16 but the model's weights are torch.float32"):
        vae.decode(torch.zeros(1, 4, 4, 4, dtype=torch.float16))
    with pytest.raises(TypeError, match="cfg must be an ldm.VAEConfig, got dict"):
        AutoencoderKL({"latent_channels": 4})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast mixed dtypes are fine
        assert vae.decode(torch.zeros(1, 4, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Reduced precision and the attention hook


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@torch.no_grad()
def test_half_precision_on_cpu_stays_close_to_fp32(dtype: torch.dtype, tol: float) -> None:
    """fp16 / bf16 on CPU at a tiny size. Tolerances: fp16 has a 2^-11 ~ 5e-4 unit roundoff, bf16 2^-8 ~ 4e-3;
    a dozen conv/norm layers accumulate a few units (measured: fp16 2.3e-3, bf16 1.8e-2). A real bug (wrong
    dtype path, overflow) gives O(1) errors or NaN, far above these bounds."""
    cfg, shape = TINY["three_levels_groups8"]
    ours, _ = make_pair(cfg, seed=9)
    x = image(shape)
    z = torch.randn(latent_shape(cfg, shape), generator=torch.Generator().manual_seed(10))
    mean32, out32 = ours.encode(x).mean, ours.decode(z)
    half = AutoencoderKL(cfg).eval()
    half.load_state_dict(ours.state_dict())
    half.to(dtype)
    post = half.encode(x.to(dtype))
    out = half.decode(z.to(dtype))
    assert post.mean.dtype == out.dtype == dtype
    assert_rel(post.mean, mean32, tol, f"{dtype} encode mean")
    assert_rel(out, out32, tol, f"{dtype} decode")


def test_group_norm_upcasts_half_inputs() -> None:
    norm = trained_like_(GroupNorm(4, 16, eps=1e-6))
    x = torch.randn(2, 16, 5, 3) * 300 + 1000  # large values: fp16 statistics would lose the small variance
    ref = norm(x)
    out = norm.half()(x.half())
    assert out.dtype == torch.float16
    assert_rel(out, ref, 1e-3, "fp16 group norm")  # only the final rounding to fp16 (unit roundoff 4.9e-4)


@torch.no_grad()
def test_mid_attention_uses_the_processor_hook() -> None:
    cfg, shape = TINY["two_levels_batch2"]
    ours, _ = make_pair(cfg, seed=11)
    x = image(shape)
    before = ours(x)
    calls: list[tuple[str, tuple[int, ...]]] = []

    def recorder(q, k, v, *, name, mask):
        calls.append((name, tuple(q.shape)))
        return attention(q, k, v, mask)

    names = set_attention_processor(ours, recorder)
    assert names == ["encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"]
    assert torch.equal(ours(x), before)
    assert calls == [("encoder.mid_block.attentions.0", (2, 1, 12 * 20, 64)),
                     ("decoder.mid_block.attentions.0", (2, 1, 12 * 20, 64))]
    set_attention_processor(ours, lambda q, k, v, *, name, mask: torch.zeros_like(q))
    assert rel_err(ours(x), before) > 1e-3  # the hook really replaces the kernel
    set_attention_processor(ours, None)
    assert torch.equal(ours(x), before)


def test_no_mid_attention_has_no_attention_layers() -> None:
    vae = AutoencoderKL(dataclasses.replace(TINY["two_levels_batch2"][0], mid_block_add_attention=False))
    assert set_attention_processor(vae, None) == []
    assert not any("attentions" in key for key in vae.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# GPU


def fp16_parity(cfg: VAEConfig, shape: tuple[int, ...], device: str) -> dict[str, float]:
    """Relative errors of our fp16 VAE against diffusers' fp16 VAE on the same weights and inputs."""
    ours, ref = make_pair(cfg, seed=14)
    ours, ref = ours.to(device, torch.float16), ref.to(device, torch.float16)
    x = image(shape).to(device, torch.float16)
    z = torch.randn(latent_shape(cfg, shape), generator=torch.Generator().manual_seed(15)).to(device, torch.float16)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        return {"mean": rel_err(post.mean, ref_post.mean), "logvar": rel_err(post.logvar, ref_post.logvar),
                "decode": rel_err(ours.decode(z), ref.decode(z).sample)}


@pytest.mark.cuda
@pytest.mark.slow
def test_fp16_on_cuda_matches_diffusers_fp16() -> None:
    """The contract for fp16 on CUDA: within 1e-2 relative of diffusers fp16 (both round every layer to fp16;
    our GroupNorm statistics are fp32 by construction, CUDA's group_norm accumulates in fp32 too)."""
    for what, err in fp16_parity(ldm.SD15.vae, (1, 3, 128, 96), "cuda").items():
        assert err <= 1e-2, f"fp16 CUDA {what}: relative error {err:.3e} > 1e-2"


# ----------------------------------------------------------------------------------------------------------------
# Memory for large images (formerly tests/test_memory.py): chunked mid attention, and VAE tiling as diffusers'
# tiled_encode / tiled_decode. With the mid attention off our tiled output is bit-identical to diffusers' (the
# tiling arithmetic, tile grid and blend are the same operations); with it on, within TILED_TOL = 1e-5 relative (the
# parity contract; observed ~1.3e-6). Tiling off, or an input that fits in one tile, runs the one-pass path
# unchanged. The seams are blended: with a tile-local stand-in decoder the overlap is exactly diffusers' linear
# cross-fade and continuous, while overlap 0 leaves the full jump. Not asserted: how close tiled is to untiled with
# real weights (with trained-like random weights a tiny VAE is very sensitive to per-tile GroupNorm statistics, so
# no honest fidelity bound exists without trained weights; docs/vae.md says so).

CHUNK_TOL = 1e-6  # chunked vs whole attention, fp32: different summation orders in small BLAS pieces


# Four levels (f = 8, as SD), small widths: 32 px tiles are 4x4 latents, so an 80x96 image makes a grid of
# 4 x 4 tiles with 12 seams.
VAE_CFG = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


TILED_TOL = 1e-5  # the parity contract for VAE components; observed ~1.3e-6 (mid attention's summation order)


def set_reference_tiling(ref: RefAutoencoderKL, tile: int, overlap: float) -> None:
    """diffusers' enable_tiling() takes no sizes; its attributes are set by hand (its documented knobs)."""
    ref.enable_tiling()
    ref.tile_sample_min_size = tile
    ref.tile_latent_min_size = tile // (2 ** (len(ref.config.block_out_channels) - 1))
    ref.tile_overlap_factor = overlap


TILINGS = [  # (tile px, overlap, image shape, mid attention): 2x2 .. 5x5-latent tiles
    (32, 0.25, (2, 3, 80, 96), True),
    (32, 0.25, (2, 3, 80, 96), False),
    (16, 0.5, (1, 3, 80, 96), False),
    (40, 0.2, (1, 3, 80, 96), False),
    (32, 0.0, (1, 3, 80, 96), False),
    (16, 0.5, (1, 3, 80, 96), True),
    (32, 0.25, (1, 3, 104, 88), True),  # 13 x 11 latents: the last tiles are 1 and 2 latents thin
]


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
@torch.no_grad()
def test_chunked_mid_attention_gives_the_same_decode() -> None:
    vae, _ = make_pair(VAE_CFG)
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_set_attention_chunk_is_per_layer_and_a_processor_takes_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    vae, _ = make_pair(VAE_CFG)
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
@pytest.mark.parametrize(("tile", "overlap", "shape", "mid_attention"), TILINGS,
                         ids=[f"{t}px_{o}_{s[2]}x{s[3]}{'_attn' * a}" for t, o, s, a in TILINGS])
@torch.no_grad()
def test_tiled_encode_and_decode_match_diffusers(tile: int, overlap: float, shape: tuple, mid_attention: bool) -> None:
    cfg = VAE_CFG if mid_attention else dataclasses.replace(VAE_CFG, mid_block_add_attention=False)
    ours, ref = make_pair(cfg)
    ours.enable_tiling(tile, overlap)
    set_reference_tiling(ref, tile, overlap)
    x = image(shape)
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
@torch.no_grad()
def test_untiled_path_is_unchanged_when_off_or_when_the_input_fits() -> None:
    vae, _ = make_pair(VAE_CFG)
    x, z = image((1, 3, 32, 40)), torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(3))
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_enable_tiling_defaults_to_the_config_sample_size() -> None:
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=256))
    vae.enable_tiling()
    assert (vae.use_tiling, vae.tile_sample_size, vae.tile_overlap) == (True, 256, 0.25)


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
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


def tile_local_decoder(offsets: list[float]) -> object:
    """A stand-in for `_decode_one`: nearest x8 upsampling of channel 0 (position-independent) plus a constant
    that differs per call (per tile), so what tiling does at the seams is visible exactly."""

    def decode_one(z: torch.Tensor) -> torch.Tensor:
        offsets.append(float(len(offsets)))
        return F.interpolate(z[:, :1], scale_factor=8, mode="nearest") + offsets[-1]

    return decode_one
