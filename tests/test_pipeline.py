"""StableDiffusionPipeline against diffusers' pipelines on the same weights, seeds and schedulers.

Tiny random pipelines (trained-like weights on diffusers / transformers components, copied into ours with
strict=True) run in seconds; the full-shape SD 1.5 test (slow) runs a synthetic checkpoint at 64x64 px.
Tolerances are DESIGN.md's pipeline contract: final latents within 1e-4 relative (ours and diffusers' kernels
agree to ~1e-6 per component; a few steps of a sampler amplify that by at most ~10x), decoded uint8 images
differ by at most 1 level on at most 0.1% of pixels (a value on a rounding boundary may land either side).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import ldm
from ldm.attention import attention_layers, set_attention_chunk
from tests.helpers import (LATENT_TOL, NEGATIVES, PROMPTS, SIZE, assert_images_close, disc_mask, picture, pipelines,
                           ref_scheduler, rel_err, run_ref)


# ----------------------------------------------------------------------------------------------------------------
# End to end against diffusers


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("lms", 0.0), ("ddim", 0.5)])
def test_txt2img_matches_diffusers(tiny, scheduler, eta):
    """Two prompts x two images, negative prompts, guidance 7.5: same latents and pixels as diffusers (eta > 0
    also draws DDIM's step noise from the per-image generators)."""
    ref, ours = pipelines(tiny, scheduler)
    kw = dict(negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=7.5, num_images_per_prompt=2,
              eta=eta)
    ref_images, ref_latents = run_ref(ref, PROMPTS, seed=11, n_images=4, height=SIZE, width=SIZE, **kw)
    out = ours(PROMPTS, seed=11, output_type="np", **kw)  # height/width: the family's native size (64 here)
    assert out.images.shape == (4, SIZE, SIZE, 3)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpm++2m-karras"])
def test_scheduler_by_name_and_no_guidance_match_diffusers(tiny, scheduler):
    """A scheduler given by name is that class from the model's config (diffusers' from_config swap); guidance
    1.0 runs the conditional batch only, as diffusers; Euler ancestral draws step noise from the generators."""
    ref, ours = pipelines(tiny, "pndm")
    ref.scheduler = ref_scheduler(scheduler, dict(ref.scheduler.config))
    kw = dict(num_inference_steps=3, guidance_scale=1.0)
    ref_images, ref_latents = run_ref(ref, PROMPTS[0], seed=3, n_images=1, height=SIZE, width=SIZE, **kw)
    out = ours(PROMPTS[0], seed=3, scheduler=scheduler, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)
    assert type(ours.scheduler).__name__ == "PNDMScheduler", "a per-call scheduler must not replace pipe.scheduler"


def test_clip_skip_is_a1111s_count(tiny):
    """clip_skip=n takes the n-th-from-last layer through the final layer norm, for the prompt and the negative
    prompt alike (A1111). diffusers' own clip_skip=n-1 would do that for the prompt only (and fails on
    transformers 5's CLIPTextModel), so the reference gets the same skipped embeddings as prompt_embeds."""
    ref, ours = pipelines(tiny, "ddim")
    ref_text, tok = tiny.text[0], tiny.tokenizer[0]

    def skipped(text: str) -> torch.Tensor:
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = ref_text(ids, output_hidden_states=True).hidden_states[-2]
            return ref_text.final_layer_norm(hidden)  # (1, S, D)

    kw = dict(num_inference_steps=2, guidance_scale=7.5)
    _, ref_latents = run_ref(ref, None, prompt_embeds=skipped(PROMPTS[0]), negative_prompt_embeds=skipped("blurry"),
                             seed=5, n_images=1, height=SIZE, width=SIZE, **kw)
    out = ours(PROMPTS[0], negative_prompt="blurry", seed=5, clip_skip=2, output_type="latent", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    plain = ours(PROMPTS[0], negative_prompt="blurry", seed=5, output_type="latent", **kw).latents
    one = ours(PROMPTS[0], negative_prompt="blurry", seed=5, clip_skip=1, output_type="latent", **kw).latents
    assert torch.equal(one, plain), "clip_skip=1 is the plain last layer"
    assert rel_err(out.latents, plain) > 1e-3, "clip_skip had no effect: the test cannot tell the layers apart"


@pytest.mark.parametrize("scheduler", ["ddim", "lms"])
def test_img2img_matches_diffusers(tiny, scheduler):
    """strength 0.6 of 5 steps runs the last 3, from the noised posterior sample, as diffusers."""
    ref, ours = pipelines(tiny, scheduler, kind="img2img")
    image = picture(0)
    kw = dict(negative_prompt=NEGATIVES[0], num_inference_steps=5, strength=0.6, guidance_scale=7.5,
              num_images_per_prompt=2)
    ref_images, ref_latents = run_ref(ref, PROMPTS[0], image=image, seed=21, n_images=2, **kw)
    steps = []
    out = ours.img2img(PROMPTS[0], image, seed=21, output_type="np", callback=lambda i, t, x: steps.append(i), **kw)
    assert steps == [0, 1, 2] and out.steps_run == 3
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def test_img2img_single_generator_matches_diffusers(tiny):
    """generator= one torch.Generator: one posterior sample for the batch, then the noise, as diffusers."""
    ref, ours = pipelines(tiny, "ddim", kind="img2img")
    kw = dict(num_inference_steps=4, strength=0.5, num_images_per_prompt=2)
    captured = {}
    ref_out = ref(PROMPTS[1], image=picture(1), generator=torch.Generator().manual_seed(4), output_type="latent",
                  **kw)
    captured["latents"] = ref_out.images
    out = ours.img2img(PROMPTS[1], picture(1), generator=torch.Generator().manual_seed(4), output_type="latent",
                       **kw)
    assert rel_err(out.images, captured["latents"]) <= LATENT_TOL


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpaint_9_channel_matches_diffusers(tiny, strength):
    """The inpainting UNet's [x, mask, masked-image latents] input; strength < 1 also encodes the image first."""
    ref, ours = pipelines(tiny, "ddim", inpainting=True, kind="inpaint")
    image, mask = picture(2), disc_mask()
    kw = dict(negative_prompt=NEGATIVES[1], num_inference_steps=4, strength=strength, num_images_per_prompt=2)
    ref_images, ref_latents = run_ref(ref, PROMPTS[1], image=image, mask_image=mask, seed=31, n_images=2,
                                      height=SIZE, width=SIZE, **kw)
    out = ours.inpaint(PROMPTS[1], image, mask, seed=31, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def test_inpaint_blending_matches_diffusers(tiny):
    """An ordinary 4-channel checkpoint: the known region is blended back after each step, as diffusers."""
    ref, ours = pipelines(tiny, "lms", kind="inpaint")
    image, mask = picture(3), disc_mask()
    kw = dict(num_inference_steps=4, strength=1.0)
    ref_images, ref_latents = run_ref(ref, PROMPTS[0], image=image, mask_image=mask, seed=41, n_images=1,
                                      height=SIZE, width=SIZE, **kw)
    out = ours.inpaint(PROMPTS[0], np.array(image), mask, seed=41, output_type="np", **kw)  # a uint8 array works
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


# ----------------------------------------------------------------------------------------------------------------
# Seeds, batches, callbacks, outputs


def test_batch_image_i_equals_single_run_with_seed_plus_i(tiny):
    _, ours = pipelines(tiny, "euler-a")
    kw = dict(negative_prompt="blurry", num_inference_steps=3)
    batch = ours(PROMPTS[0], seed=100, num_images_per_prompt=3, output_type="np", **kw)
    assert batch.seeds == [100, 101, 102]
    for i in range(3):
        single = ours(PROMPTS[0], seed=100 + i, output_type="np", **kw)
        assert_images_close(batch.images[i:i + 1], single.images)
    again = ours(PROMPTS[0], seed=100, num_images_per_prompt=3, output_type="np", **kw)
    assert np.array_equal(again.images, batch.images), "the same seed must give the same images"


def test_callback_sees_every_step_and_can_stop(tiny):
    _, ours = pipelines(tiny, "ddim")
    seen = []

    def stop_after_two(i, t, latents):
        seen.append((i, int(t), latents.clone()))
        return i < 1  # False at i == 1: stop

    out = ours(PROMPTS[0], seed=0, num_inference_steps=5, output_type="latent", callback=stop_after_two)
    assert [i for i, _, _ in seen] == [0, 1] and out.steps_run == 2
    assert [t for _, t, _ in seen] == ours.scheduler.timesteps[:2].tolist()
    assert torch.equal(out.latents, seen[-1][2])
    full = ours(PROMPTS[0], seed=0, num_inference_steps=5, output_type="latent")
    assert full.steps_run == 5 and not torch.equal(full.latents, out.latents)


def test_prompt_emphasis_and_long_prompts(tiny):
    """weighting=True reads A1111's emphasis; weight 1.0 is the plain prompt; long prompts run in 77-token chunks."""
    _, ours = pipelines(tiny, "ddim")
    kw = dict(seed=3, num_inference_steps=1, output_type="latent")
    plain = ours("a red cat", **kw).latents
    assert torch.equal(ours("a (red:1.0) cat", **kw).latents, plain)
    assert rel_err(ours("a (red:1.6) cat", **kw).latents, plain) > 1e-4
    assert not torch.equal(ours("a (red:1.0) cat", weighting=False, **kw).latents, plain), "brackets as text"
    long = ", ".join(["a red cat on a blue sofa"] * 12)  # 95 tokens: two chunks, the negative padded to two
    assert ours.encode_prompt([long]).shape == (1, 154, 32)
    assert torch.isfinite(ours(long, negative_prompt="blurry", **kw).latents).all()


def test_output_types(tiny):
    _, ours = pipelines(tiny, "ddim")
    kw = dict(seed=1, num_inference_steps=2, num_images_per_prompt=2, height=48, width=32)
    pil = ours(PROMPTS[0], output_type="pil", **kw).images
    arr = ours(PROMPTS[0], output_type="np", **kw).images
    lat = ours(PROMPTS[0], output_type="latent", **kw).images
    assert [im.size for im in pil] == [(32, 48)] * 2 and all(im.mode == "RGB" for im in pil)
    assert arr.shape == (2, 48, 32, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), (arr * 255).round().astype(np.uint8))
    assert lat.shape == (2, 4, 6, 4)


def test_image_inputs_are_equivalent(tiny):
    """PIL, path, uint8 array and tensor give the same img2img result."""
    _, ours = pipelines(tiny, "ddim")
    image = picture(5)
    kw = dict(seed=2, num_inference_steps=2, strength=1.0, output_type="latent")
    ref = ours.img2img("x", image, **kw).latents
    arr = np.array(image)
    for given in (arr, torch.from_numpy(arr).permute(2, 0, 1), torch.from_numpy(arr).permute(2, 0, 1) / 255.0):
        assert rel_err(ours.img2img("x", given, **kw).latents, ref) <= 1e-6


def test_image_path(tiny, tmp_path):
    _, ours = pipelines(tiny, "ddim")
    path = tmp_path / "in.png"
    picture(6).save(path)
    kw = dict(seed=2, num_inference_steps=2, strength=0.5, output_type="latent")
    assert torch.equal(ours.img2img("x", path, **kw).latents, ours.img2img("x", picture(6), **kw).latents)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        ours.img2img("x", tmp_path / "bad.png", **kw)
    with pytest.raises(ValueError, match="no such file"):
        ours.img2img("x", tmp_path / "missing.png", **kw)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kw,match", [
    (dict(height=60), "height must be a multiple of 8"),
    (dict(width=0), "width must be an int >= 8"),
    (dict(num_inference_steps=0), "num_inference_steps must be an int >= 1"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number >= 0"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(seed=1, generator=torch.Generator()), "either seed= or generator="),
    (dict(generator=[torch.Generator()] * 2), "one torch.Generator per image"),
    (dict(output_type="pt"), "output_type must be one of"),
    (dict(scheduler="heun"), "scheduler name must be one of"),
    (dict(eta=0.3, scheduler="lms"), "eta=0.3 needs a scheduler that takes it"),
    (dict(clip_skip=0), "clip_skip must be an int >= 1"),
    (dict(clip_skip=9), "clip_skip must be at most 3"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries but prompt has 1"),
])
def test_bad_arguments(tiny, kw, match):
    _, ours = pipelines(tiny, "ddim")
    with pytest.raises(ValueError, match=match):
        ours("a cat", **{"num_inference_steps": 1, **kw})


def test_bad_image_arguments(tiny):
    _, ours = pipelines(tiny, "ddim")
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        ours.img2img("x", picture(0), strength=0.0)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        ours.inpaint("x", picture(0), disc_mask(), strength=1.5)
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        ours.img2img("x", picture(0).resize((60, 64)))
    with pytest.raises(ValueError, match="mask_image is 32x32 .* but image is 64x64"):
        ours.inpaint("x", picture(0), disc_mask(32))
    with pytest.raises(ValueError, match="leaves no step"):
        ours.img2img("x", picture(0), strength=0.1, num_inference_steps=5)
    with pytest.raises(TypeError, match="prompt must be a str"):
        ours(3)
    _, inpainting = pipelines(tiny, "ddim", inpainting=True)
    with pytest.raises(ValueError, match="inpainting model"):
        inpainting("x")


# ----------------------------------------------------------------------------------------------------------------
# Precision


def test_bf16_on_cpu_runs_close_to_fp32(tiny):
    _, ours = pipelines(tiny, "ddim")
    fp32 = ours(PROMPTS[0], seed=9, num_inference_steps=3, output_type="np").images
    _, half = pipelines(tiny, "ddim")
    half = ldm.StableDiffusionPipeline(unet=_copy(half.unet).to(torch.bfloat16), vae=_copy(half.vae).to(torch.bfloat16),
                                       text_encoder=_copy(half.text_encoder).to(torch.bfloat16),
                                       tokenizer=half.tokenizer, scheduler=half.scheduler, family=half.family)
    assert half.dtype == torch.bfloat16
    out = half(PROMPTS[0], seed=9, num_inference_steps=3, output_type="np")
    assert out.latents.dtype == torch.bfloat16 and out.images.dtype == np.float32
    assert np.isfinite(out.images).all() and np.abs(out.images - fp32).mean() < 0.05


def test_vae_decode_retries_in_fp32_when_half_precision_overflows(tiny):
    """A decoder that gives inf in reduced precision: the pipeline says so and decodes again in fp32."""
    _, ours = pipelines(tiny, "ddim")
    vae = _copy(ours.vae).to(torch.bfloat16)
    real_decode = vae.decode

    def overflowing(z):
        out = real_decode(z)
        return out if out.dtype == torch.float32 else torch.full_like(out, math.inf)

    vae.decode = overflowing
    pipe = ldm.StableDiffusionPipeline(unet=_copy(ours.unet).to(torch.bfloat16), vae=vae,
                                       text_encoder=_copy(ours.text_encoder).to(torch.bfloat16),
                                       tokenizer=ours.tokenizer, scheduler=ours.scheduler, family=ours.family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(PROMPTS[0], seed=0, num_inference_steps=2, output_type="np")
    assert any("decoding again in float32" in str(w.message) for w in caught)
    assert np.isfinite(out.images).all() and out.images.std() > 0
    assert next(vae.parameters()).dtype == torch.bfloat16, "the VAE must go back to its dtype"


def test_pipeline_composed_from_parts_without_family(tiny):
    """As a diffusers user composes one: the parts alone, no family=. The image is the same as with the family,
    and the default size comes from the parts (diffusers' rule: unet.sample_size x the VAE's factor)."""
    _, ours = pipelines(tiny, "ddim")
    composed = ldm.StableDiffusionPipeline(unet=ours.unet, vae=ours.vae, text_encoder=ours.text_encoder,
                                           tokenizer=ours.tokenizer, scheduler=ours.scheduler)
    assert composed.family is None
    kw = dict(seed=5, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np")
    assert np.array_equal(composed(PROMPTS[0], **kw).images, ours(PROMPTS[0], **kw).images)
    assert composed.native_size == ours.unet.config.sample_size * ours.vae_scale_factor
    with pytest.raises(TypeError, match="family must be an ldm.config.FamilyPreset or None"):
        ldm.StableDiffusionPipeline(unet=ours.unet, vae=ours.vae, text_encoder=ours.text_encoder,
                                    tokenizer=ours.tokenizer, scheduler=ours.scheduler, family="sd15")


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


@pytest.mark.cuda
def test_cuda_fp16_matches_diffusers_fp16(tiny):
    """fp16 with SDPA on a GPU: images within PSNR >= 35 dB of diffusers fp16 on the same weights."""
    ref, ours = pipelines(tiny, "ddim")
    ref.to("cuda", torch.float16)
    ours = ldm.StableDiffusionPipeline(unet=_copy(ours.unet), vae=_copy(ours.vae),
                                       text_encoder=_copy(ours.text_encoder), tokenizer=ours.tokenizer,
                                       scheduler=ours.scheduler, family=ours.family).to("cuda", torch.float16)
    kw = dict(negative_prompt=NEGATIVES[0], num_inference_steps=5)
    ref_images, _ = run_ref(ref, PROMPTS[0], seed=1, n_images=2, height=SIZE, width=SIZE, num_images_per_prompt=2,
                            **kw)
    out = ours(PROMPTS[0], seed=1, num_images_per_prompt=2, output_type="np", **kw)
    mse = float(np.mean((out.images - ref_images) ** 2))
    assert 10 * math.log10(1 / max(mse, 1e-12)) >= 35


# ----------------------------------------------------------------------------------------------------------------
# Full SD 1.5 shapes: synthetic checkpoints, loaded by diffusers' from_single_file and by ldm.load_pipeline


def full_shape_pipelines(tmp_path_factory, manifest: str, kind: str):
    """(diffusers pipeline, ours) from one synthetic full-shape checkpoint (4.3 GB in a temporary folder)."""
    import diffusers

    from tests.helpers import DIFFUSERS_CONFIGS
    from tests.synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(manifest, tmp_path_factory.mktemp(manifest) / f"{manifest}.safetensors")
    config = DIFFUSERS_CONFIGS / ("sd15-inpaint" if "inpaint" in manifest else "sd15")
    cls = diffusers.StableDiffusionInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionPipeline
    ref = cls.from_single_file(str(path), config=str(config), local_files_only=True, safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = ldm.load_pipeline(path)
    return path, ref, ours


@pytest.fixture(scope="module")
def sd15_full(tmp_path_factory):
    path, ref, ours = full_shape_pipelines(tmp_path_factory, "sd15", "txt2img")
    yield ref, ours
    path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["ddim", "lms"])
def test_full_shape_sd15_txt2img_matches_diffusers(sd15_full, scheduler):
    """The whole SD 1.5 architecture (859M UNet, 123M CLIP, 84M VAE) at 64x64 px, 3 steps, guidance 7.5."""
    ref, ours = sd15_full
    assert ours.family.name == "sd15"
    ref.scheduler = ref_scheduler(scheduler, dict(ref.scheduler.config))
    kw = dict(negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5)
    ref_images, ref_latents = run_ref(ref, PROMPTS[0], seed=7, n_images=1, height=SIZE, width=SIZE, **kw)
    out = ours(PROMPTS[0], seed=7, height=SIZE, width=SIZE, scheduler=scheduler, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


@pytest.mark.slow
def test_full_shape_sd15_img2img_matches_diffusers(sd15_full):
    import diffusers

    ref, ours = sd15_full
    ref = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    ref.scheduler = ref_scheduler("ddim", dict(ref.scheduler.config))
    ref.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt="blurry", num_inference_steps=4, strength=0.75, guidance_scale=7.5)
    ref_images, ref_latents = run_ref(ref, PROMPTS[1], image=picture(7), seed=8, n_images=1, **kw)
    out = ours.img2img(PROMPTS[1], picture(7), seed=8, scheduler="ddim", output_type="np", **kw)
    assert out.steps_run == 3
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


@pytest.mark.slow
def test_full_shape_sd15_inpainting_checkpoint_matches_diffusers(tmp_path_factory):
    """The 9-channel SD 1.5 inpainting layout, detected from the file's keys."""
    path, ref, ours = full_shape_pipelines(tmp_path_factory, "sd15_inpaint", "inpaint")
    try:
        assert ours.family.name == "sd15-inpaint" and ours.unet.config.in_channels == 9
        ref.scheduler = ref_scheduler("ddim", dict(ref.scheduler.config))
        kw = dict(negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5)
        ref_images, ref_latents = run_ref(ref, PROMPTS[0], image=picture(8), mask_image=disc_mask(), seed=9,
                                          n_images=1, height=SIZE, width=SIZE, **kw)
        out = ours.inpaint(PROMPTS[0], picture(8), disc_mask(), seed=9, scheduler="ddim", output_type="np", **kw)
        assert rel_err(out.latents, ref_latents) <= LATENT_TOL
        assert_images_close(out.images, ref_images)
    finally:
        del ref, ours
        path.unlink()


# ----------------------------------------------------------------------------------------------------------------
# Memory for large images (formerly tests/test_pipeline_memory.py): `enable_attention_chunking` reaches every
# attention layer of the UNet and the VAE, no kernel call sees more rows than the chunk, and the image is the one
# without chunking (final latents within CHUNK_TOL: each query row's softmax is the same arithmetic, only the BLAS
# summation order of a piece changes, <= 1e-6 relative per call, which a few sampler steps amplify by at most ~10x;
# observed 0). With `enable_vae_tiling` and a 32 px tile (4x4 latents, 1 latent pixel of overlap) a 64x80 image
# decodes as a 3 x 4 grid of tiles; txt2img and img2img then match diffusers' pipelines with `vae.enable_tiling()`
# and the same tile settings by the pipeline contract. Tiling must change the image (else these tests could not tell
# it was on): with random weights per-tile GroupNorm statistics move it a lot. img2img and inpainting encode through
# the tiled encoder, and the fp16 -> fp32 decode retry stays tiled.


CHUNK_TOL = 1e-5  # final latents, chunked vs whole: <= 1e-6 per attention call, amplified <= ~10x by the steps


TILE = 32  # px: 4x4 latent tiles, overlap 0.25 = 1 latent pixel (8 px on the encoder side)


HEIGHT, WIDTH = 64, 80  # 8x10 latents: tiles start every 3 latent pixels -> a 3 x 4 grid


@pytest.fixture
def memory_off(tiny) -> Iterator[None]:
    """The tiny modules are shared by the module's tests: every test leaves tiling and chunking off."""
    yield
    tiny.vae[1].disable_tiling()
    tiny.vae[0].disable_tiling()
    for module in (tiny.vae[1], tiny.unet[1], tiny.unet9[1]):
        set_attention_chunk(module, None)


def reference_tiling(ref_vae, tile: int = TILE, overlap: float = 0.25) -> None:
    """diffusers' enable_tiling() takes no sizes; its documented attributes are set as tests/test_vae.py does."""
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_inpaint_encodes_both_images_through_the_tiled_encoder(tiny, monkeypatch, memory_off):
    """An ordinary checkpoint's inpainting encodes the image and the masked image: both tiled."""
    _, ours = pipelines(tiny, "ddim")
    ours.enable_vae_tiling(TILE)
    encoded = spy(monkeypatch, ours.vae, "_encode_one")
    out = ours.inpaint(PROMPTS[0], picture(4), disc_mask(), num_inference_steps=2, seed=1, output_type="latent")
    assert out.latents.shape == (1, 4, 8, 8)
    assert len(encoded) == 2 * 3 * 3 and all(max(shape[-2:]) <= TILE for _, shape in encoded), encoded


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
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
