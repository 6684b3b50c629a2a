"""The pipeline's memory switches for large images: attention chunking and VAE tiling, from Python and `ldm generate`.

On the tiny random pipeline of tests/test_pipeline.py (trained-like weights shared with diffusers' components):
- `enable_attention_chunking` reaches every attention layer of the UNet and the VAE, no kernel call sees more
  rows than the chunk, and the image is the one without chunking: final latents within CHUNK_TOL (each query row's
  softmax is the same arithmetic; only the BLAS summation order of a piece changes, <= 1e-6 relative per call
  (tests/test_memory.py), which a few sampler steps amplify by at most ~10x; observed 0 here), images by the
  pipeline contract.
- With `enable_vae_tiling` and a 32 px tile (4x4 latents, 1 latent pixel of overlap) a 64x80 image decodes as a
  3 x 4 grid of tiles; txt2img and img2img then match diffusers' pipelines with `vae.enable_tiling()` and the same
  tile settings by the pipeline contract (LATENT_TOL for latents, at most 1 uint8 level on at most 0.1% of values;
  the tiled VAE itself matches diffusers' within 1e-5, tests/test_memory.py; observed identical images). Tiling
  must change the image (else these tests could not tell it was on): with random weights per-tile GroupNorm
  statistics move it a lot (observed up to 205 levels, 27 on average, against the untiled image).
- img2img and inpainting encode through the tiled encoder (a spy on the per-tile encoder), and the fp16 -> fp32
  decode retry stays tiled.
- `ldm generate --attention-chunk N` is checked before loading (N >= 1, exit 2, nothing written); `--vae-tiling
  --attention-chunk 64` writes a PNG with the usual parameters and nothing more.
- `load_pipeline(optimize=True)` pulls the levers.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
import ldm.attention
from ldm.attention import attention_layers, set_attention_chunk
from ldm.cli import main
from ldm.images import parse_parameters, read_parameters
from tests.helpers import rel_err
from tests.test_cli import generate, model_dir  # noqa: F401  (model_dir is a fixture)
from tests.test_pipeline import (LATENT_TOL, NEGATIVES, PROMPTS, assert_images_close, disc_mask, picture, pipelines,
                                 run_ref, tiny)  # noqa: F401  (tiny is a fixture)

CHUNK_TOL = 1e-5  # final latents, chunked vs whole: <= 1e-6 per attention call, amplified <= ~10x by the steps
TILE = 32  # px: 4x4 latent tiles, overlap 0.25 = 1 latent pixel (8 px on the encoder side)
HEIGHT, WIDTH = 64, 80  # 8x10 latents: tiles start every 3 latent pixels -> a 3 x 4 grid


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def memory_off(tiny) -> Iterator[None]:
    """The tiny modules are shared by the module's tests: every test leaves tiling and chunking off."""
    yield
    tiny.vae[1].disable_tiling()
    tiny.vae[0].disable_tiling()
    for module in (tiny.vae[1], tiny.unet[1], tiny.unet9[1]):
        set_attention_chunk(module, None)


def reference_tiling(ref_vae, tile: int = TILE, overlap: float = 0.25) -> None:
    """diffusers' enable_tiling() takes no sizes; its documented attributes are set as tests/test_memory.py does."""
    ref_vae.enable_tiling()
    ref_vae.tile_sample_min_size = tile
    ref_vae.tile_latent_min_size = tile // (2 ** (len(ref_vae.config.block_out_channels) - 1))
    ref_vae.tile_overlap_factor = overlap


def spy(monkeypatch, vae, method: str) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """Record (dtype, shape) of every input the VAE's per-tile `_encode_one` / `_decode_one` receives."""
    calls: list[tuple[torch.dtype, tuple[int, ...]]] = []
    original = getattr(vae, method)

    def recording(x: torch.Tensor) -> torch.Tensor:
        calls.append((x.dtype, tuple(x.shape)))
        return original(x)

    monkeypatch.setattr(vae, method, recording)
    return calls


# ----------------------------------------------------------------------------------------------------------------
# Attention chunking


def test_attention_chunking_gives_the_same_image(tiny, monkeypatch, memory_off):
    _, ours = pipelines(tiny, "ddim")
    kw = dict(negative_prompt=NEGATIVES[0], num_inference_steps=3, guidance_scale=7.5, seed=5, output_type="np")
    whole = ours(PROMPTS[0], height=HEIGHT, width=WIDTH, **kw)

    chunk = 24  # pieces of 24, 24, 24, 8 rows over the UNet's 80 latent positions: mixed BLAS kernels
    ours.enable_attention_chunking(chunk)
    layers = {**attention_layers(ours.unet), **{f"vae.{k}": v for k, v in attention_layers(ours.vae).items()}}
    assert any(k.startswith("vae.") for k in layers) and len(layers) > 1
    assert all(layer.chunk == chunk for layer in layers.values())
    rows: list[int] = []
    kernel = ldm.attention._kernel

    def counting(q, k, v, mask):
        rows.append(q.shape[-2])
        return kernel(q, k, v, mask)

    monkeypatch.setattr(ldm.attention, "_kernel", counting)
    chunked = ours(PROMPTS[0], height=HEIGHT, width=WIDTH, **kw)
    assert max(rows) == chunk, f"a kernel call saw {max(rows)} query rows with chunk={chunk}"
    assert rel_err(chunked.latents, whole.latents) <= CHUNK_TOL
    assert_images_close(chunked.images, whole.images)

    ours.disable_attention_chunking()
    assert all(layer.chunk is None for layer in layers.values())
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        ours.enable_attention_chunking(0)
    assert all(layer.chunk is None for layer in layers.values()), "a rejected chunk must change nothing"


# ----------------------------------------------------------------------------------------------------------------
# VAE tiling


def test_txt2img_with_vae_tiling_matches_diffusers(tiny, monkeypatch, memory_off):
    ref, ours = pipelines(tiny, "ddim")
    kw = dict(negative_prompt=NEGATIVES[1], num_inference_steps=2, guidance_scale=7.5)
    untiled = ours(PROMPTS[1], seed=9, height=HEIGHT, width=WIDTH, output_type="np", **kw)

    reference_tiling(ref.vae)
    ours.enable_vae_tiling(TILE)
    assert ours.vae.use_tiling and ours.vae.tile_sample_size == TILE
    decoded = spy(monkeypatch, ours.vae, "_decode_one")
    ref_images, ref_latents = run_ref(ref, PROMPTS[1], seed=9, n_images=1, height=HEIGHT, width=WIDTH, **kw)
    out = ours(PROMPTS[1], seed=9, height=HEIGHT, width=WIDTH, output_type="np", **kw)
    assert len(decoded) == 3 * 4 and all(max(shape[-2:]) <= TILE // 8 for _, shape in decoded), decoded
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)
    assert torch.equal(out.latents, untiled.latents), "tiling is a VAE matter: the latents are the same"
    levels = np.abs((out.images * 255).round() - (untiled.images * 255).round())
    assert levels.max() > 1, "tiling did not change the image: the test cannot tell it was on"

    ours.disable_vae_tiling()
    again = ours(PROMPTS[1], seed=9, height=HEIGHT, width=WIDTH, output_type="np", **kw)
    np.testing.assert_array_equal(again.images, untiled.images)


def test_img2img_encodes_through_the_tiled_encoder_as_diffusers(tiny, monkeypatch, memory_off):
    ref, ours = pipelines(tiny, "ddim", kind="img2img")
    image = picture(2, size=HEIGHT).resize((WIDTH, HEIGHT))
    reference_tiling(ref.vae)
    ours.enable_vae_tiling(TILE)
    encoded = spy(monkeypatch, ours.vae, "_encode_one")
    kw = dict(num_inference_steps=4, strength=0.5, guidance_scale=7.5)
    ref_images, ref_latents = run_ref(ref, PROMPTS[0], image=image, seed=3, n_images=1, **kw)
    out = ours.img2img(PROMPTS[0], image, seed=3, output_type="np", **kw)
    # encoder tiles are 32 px every 24 px: 3 rows x 4 columns over 64x80 px
    assert len(encoded) == 3 * 4 and all(max(shape[-2:]) <= TILE for _, shape in encoded), encoded
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def test_inpaint_encodes_both_images_through_the_tiled_encoder(tiny, monkeypatch, memory_off):
    """An ordinary checkpoint's inpainting encodes the image and the masked image: both tiled."""
    _, ours = pipelines(tiny, "ddim")
    ours.enable_vae_tiling(TILE)
    encoded = spy(monkeypatch, ours.vae, "_encode_one")
    out = ours.inpaint(PROMPTS[0], picture(4), disc_mask(), num_inference_steps=2, seed=1, output_type="latent")
    assert out.latents.shape == (1, 4, 8, 8)
    assert len(encoded) == 2 * 3 * 3 and all(max(shape[-2:]) <= TILE for _, shape in encoded), encoded


def test_fp16_decode_retry_stays_tiled(tiny, monkeypatch, memory_off):
    """The fp32 retry after an fp16 overflow (a real one: the decoder's last conv scaled up, as
    tests/test_optimize.py does) decodes tile by tile too, and the VAE comes back in fp16 with tiling on."""
    _, ours = pipelines(tiny, "ddim")
    vae = copy.deepcopy(ours.vae).half()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e5)
    pipe = ldm.StableDiffusionPipeline(unet=ours.unet, vae=vae, text_encoder=ours.text_encoder,
                                       tokenizer=ours.tokenizer, scheduler=ours.scheduler, family=ours.family)
    pipe.enable_vae_tiling(TILE)
    decoded = spy(monkeypatch, vae, "_decode_one")
    latents = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0)).half()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe.decode(latents)
    assert any("decoding again in float32" in str(w.message) for w in caught), "no overflow: nothing was retried"
    assert images.shape == (1, 3, HEIGHT, WIDTH) and torch.isfinite(images).all()
    dtypes = [dtype for dtype, _ in decoded]
    assert dtypes == [torch.float16] * 12 + [torch.float32] * 12, dtypes
    assert vae.use_tiling and next(vae.parameters()).dtype == torch.float16


# ----------------------------------------------------------------------------------------------------------------
# The command and the loader


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_attention_chunk_must_be_positive(model_dir, tmp_path, capsys, value):  # noqa: F811
    before = sorted(tmp_path.rglob("*"))
    code = main(["generate", "a cat", "--model", str(model_dir), "--out", str(tmp_path / "x.png"), "--steps", "2",
                 "--attention-chunk", value])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ldm generate: error: --attention-chunk must be >= 1, got {value}", err
    assert sorted(tmp_path.rglob("*")) == before, "nothing may be written"


def test_cli_vae_tiling_and_attention_chunk_write_a_png(model_dir, tmp_path):  # noqa: F811
    """96x80 px is larger than the model's 64 px VAE tile, so the decode is tiled; the PNG's parameters are the
    usual ones (the memory switches do not change what the image is meant to be, and are not recorded)."""
    out = tmp_path / "big.png"
    done = generate(model_dir, out, "--height", "96", "--width", "80", "--seed", "2", "--vae-tiling",
                    "--attention-chunk", "64")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (80, 96)
    params = parse_parameters(read_parameters(out))
    assert set(params) == {"Prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Model"}, params


def test_load_pipeline_optimize(model_dir):  # noqa: F811
    pipe = ldm.load_pipeline(model_dir, optimize=True)
    assert pipe.levers is not None and not (pipe.levers.fuse or pipe.levers.compile)  # the CPU defaults: none
    assert ldm.load_pipeline(model_dir).levers is None
    with pytest.raises(TypeError, match="optimize must be a bool"):
        ldm.load_pipeline(model_dir, optimize="yes")
