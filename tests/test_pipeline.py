"""StableDiffusionPipeline against diffusers' pipelines on the same weights, seeds and schedulers.

Tiny random pipelines (trained-like weights on diffusers / transformers components, copied into ours with
strict=True) run in seconds; the full-shape SD 1.5 test (slow) runs a synthetic checkpoint at 64x64 px.
Tolerances are DESIGN.md's pipeline contract: final latents within 1e-4 relative (ours and diffusers' kernels
agree to ~1e-6 per component; a few steps of a sampler amplify that by at most ~10x), decoded uint8 images
differ by at most 1 level on at most 0.1% of pixels (a value on a rounding boundary may land either side).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
from tests.helpers import TOKENIZER_DIR, diffusers_config, rel_err, trained_like_

LATENT_TOL = 1e-4  # the contract for final latents (see the module docstring)
SIZE = 64  # px: 8x8 latents
PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]
NEGATIVES = ["blurry", "low quality, jpeg artefacts"]

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32)
VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE)
CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
            pad_token_id=1)


def assert_images_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """Float images in [0, 1] as uint8: at most 1 level apart, on at most 0.1% of the values."""
    a, b = (ours * 255).round().astype(np.int16), (ref * 255).round().astype(np.int16)
    assert a.shape == b.shape, f"image shapes differ: {a.shape} vs {b.shape}"
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, \
        f"images differ: max {diff.max()} levels, {(diff > 0).mean():.2e} of values differ"


def ref_scheduler(name: str, config: dict):
    import diffusers

    classes = {"ddim": "DDIMScheduler", "lms": "LMSDiscreteScheduler", "pndm": "PNDMScheduler",
               "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
               "dpm++2m": "DPMSolverMultistepScheduler", "dpm++2m-karras": "DPMSolverMultistepScheduler"}
    extra = {"use_karras_sigmas": True} if name == "dpm++2m-karras" else {}
    return getattr(diffusers, classes[name]).from_config(config, **extra)


@pytest.fixture(scope="module")
def tiny():
    """Tiny random components: the references, and ours holding the same weights (strict identity loads)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    def unet_pair(in_channels: int):
        kw = {**UNET, "in_channels": in_channels}
        ref = trained_like_(UNet2DConditionModel(**kw), seed=1).eval()
        ours = ldm.UNet2DConditionModel(UNetConfig.from_diffusers(kw)).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        return ref, ours

    ref_vae = trained_like_(AutoencoderKL(**VAE), seed=2).eval()
    vae = ldm.AutoencoderKL(VAEConfig.from_diffusers(VAE)).eval()
    vae.load_state_dict(ref_vae.state_dict(), strict=True)
    ref_text = trained_like_(CLIPTextModel(RefCLIPConfig(**CLIP)), seed=3).eval()
    text = ldm.CLIPTextModel(CLIPTextConfig.from_transformers(CLIP)).eval()
    text.load_state_dict(ref_text.state_dict(), strict=True)
    return SimpleNamespace(unet=unet_pair(4), unet9=unet_pair(9), vae=(ref_vae, vae), text=(ref_text, text),
                           tokenizer=(CLIPTokenizer.from_pretrained(TOKENIZER_DIR / "sd15"),
                                      ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15")),
                           scheduler_config=diffusers_config("sd15", "scheduler"))


def pipelines(tiny, scheduler: str = "pndm", inpainting: bool = False, kind: str = "txt2img"):
    """(diffusers pipeline, ours) on the tiny weights with the named scheduler."""
    import diffusers

    ref_unet, unet = tiny.unet9 if inpainting else tiny.unet
    config = tiny.scheduler_config
    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    ref = cls(unet=ref_unet, vae=tiny.vae[0], text_encoder=tiny.text[0], tokenizer=tiny.tokenizer[0],
              scheduler=ref_scheduler(scheduler, config), safety_checker=None, feature_extractor=None,
              requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    family = dataclasses.replace(ldm.SD15_INPAINT if inpainting else ldm.SD15, unet=unet.config,
                                 vae=tiny.vae[1].config, text=tiny.text[1].cfg, native_size=SIZE)
    ours = ldm.StableDiffusionPipeline(unet=unet, vae=tiny.vae[1], text_encoder=tiny.text[1],
                                       tokenizer=tiny.tokenizer[1],
                                       scheduler=ldm.schedulers.from_name(scheduler, config), family=family)
    return ref, ours


def run_ref(ref, *args, seed: int, n_images: int, **kw):
    """diffusers with seed S as generator=[manual_seed(S + i)]; returns (float images, final latents)."""
    captured = {}

    def keep(pipe, i, t, tensors):
        captured["latents"] = tensors["latents"]
        return tensors

    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n_images)]
    out = ref(*args, generator=gens, output_type="np", callback_on_step_end=keep, **kw)
    return out.images, captured["latents"]


def picture(seed: int, size: int = SIZE) -> Image.Image:
    """A smooth random RGB picture (a photo-like input for img2img)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def disc_mask(size: int = SIZE) -> Image.Image:
    """White disc (repaint) on black (keep)."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2
    return Image.fromarray((inside * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# End to end against diffusers


def save_tiny_model_folder(folder: Path) -> Path:
    """The tiny SD 1.x model (random, trained-like weights) saved by diffusers in its model-folder layout: what
    `ldm.load_pipeline` and `ldm generate --model` read. With transformers 5 the tokenizer folder holds only
    tokenizer.json (no vocab.json / merges.txt), as fine-tunes saved by today's tools do."""
    import diffusers
    from transformers import CLIPTextConfig as RefCLIPTextConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = diffusers.StableDiffusionPipeline(
        unet=trained_like_(diffusers.UNet2DConditionModel(**UNET), seed=1),
        vae=trained_like_(diffusers.AutoencoderKL(**VAE), seed=2),
        text_encoder=trained_like_(CLIPTextModel(RefCLIPTextConfig(**CLIP)), seed=3),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR / "sd15"),
        scheduler=diffusers.PNDMScheduler.from_config(diffusers_config("sd15", "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    assert (folder / "tokenizer" / "tokenizer.json").is_file() and not (folder / "tokenizer" / "vocab.json").exists()
    return folder


def test_load_pipeline_reads_a_save_pretrained_folder(tmp_path):
    """diffusers' own save_pretrained folder (tokenizer.json only) loads; the tokenizer gives transformers' ids on
    the tokenizer tests' hard prompts and the pipeline diffusers' image."""
    import diffusers
    from transformers import CLIPTokenizer

    from tests.test_tokenizer import PROMPTS as HARD_PROMPTS

    folder = save_tiny_model_folder(tmp_path / "tiny-sd")
    pipe = ldm.load_pipeline(folder)
    ref_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    expected = ref_tok(HARD_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert pipe.tokenizer(HARD_PROMPTS).tolist() == expected.input_ids.tolist()
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=NEGATIVES[0], num_inference_steps=2, height=SIZE, width=SIZE)
    ref_images, ref_latents = run_ref(ref, HARD_PROMPTS[7], seed=3, n_images=1, **kw)
    out = pipe(HARD_PROMPTS[7], seed=3, output_type="np", weighting=False, **kw)  # its ((...)) read literally
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


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


@contextlib.contextmanager
def capturing(*pipes) -> Iterator[list[dict[str, list[torch.Tensor]]]]:
    """Record, per pipeline, every VAE posterior (the quant_conv output: the image latents' mean and logvar) and
    every UNet input `sample` of a run, ours or diffusers' (the modules have the same names)."""
    seen = [{"posterior": [], "unet": []} for _ in pipes]
    handles = []
    for pipe, record in zip(pipes, seen):
        handles.append(pipe.vae.quant_conv.register_forward_hook(
            lambda m, args, out, record=record: record["posterior"].append(out.clone())))
        handles.append(pipe.unet.register_forward_pre_hook(
            lambda m, args, kwargs, record=record: record["unet"].append(
                (args[0] if args else kwargs["sample"]).clone()), with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def image_as(kind: str, image: Image.Image):
    """(diffusers' input, ours): the same picture as each input type a user may pass, a tensor in each memory
    layout it may come in. diffusers reads an array as float in [0, 1]; ours also takes the uint8 array."""
    arr = np.array(image)
    nhwc = torch.from_numpy(arr[None].astype(np.float32) / 255.0)  # (1, H, W, 3)
    given = {"pil": image, "numpy": nhwc[0].numpy(), "tensor": nhwc.permute(0, 3, 1, 2).contiguous(),
             "tensor-3d": nhwc[0].permute(2, 0, 1).contiguous(),
             "tensor-channels-last": nhwc.permute(0, 3, 1, 2),  # a permuted view: channels-last strides
             "tensor-3d-hwc-view": nhwc[0].permute(2, 0, 1),
             "tensor-strided": torch.cat([nhwc, nhwc], dim=2).permute(0, 3, 1, 2)[..., ::2]}
    if kind == "numpy-uint8":
        return given["numpy"], arr
    return given[kind], given[kind]


@pytest.mark.parametrize("kind", ["pil", "numpy", "numpy-uint8", "tensor", "tensor-3d", "tensor-channels-last",
                                  "tensor-3d-hwc-view", "tensor-strided"])
def test_image_latents_bit_identical_to_diffusers(tiny, kind):
    """img2img: the image's posterior and the first UNet input equal diffusers' exactly, for every input type.

    diffusers turns a PIL image or array (H, W, 3) into (1, 3, H, W) by transposing, so its VAE sees channels-last
    strides, while a 3-D tensor is stacked into a contiguous one; the convolutions and GroupNorm take other kernels
    for each layout, which sum in another order (~1e-6 apart). Bit-identical latents need the same layout."""
    ref, ours = pipelines(tiny, "ddim", kind="img2img")
    ref_image, image = image_as(kind, picture(9))
    kw = dict(num_inference_steps=2, strength=0.5, guidance_scale=7.5, output_type="latent")  # one step
    with capturing(ref, ours) as (refs, seen):
        ref(PROMPTS[0], image=ref_image, generator=[torch.Generator().manual_seed(5)], **kw)
        ours.img2img(PROMPTS[0], image, seed=5, **kw)
    assert len(seen["posterior"]) == len(refs["posterior"]) == 1
    assert torch.equal(seen["posterior"][0], refs["posterior"][0]), \
        f"{kind}: posterior differs by {rel_err(seen['posterior'][0], refs['posterior'][0]):.2e} relative"
    assert torch.equal(seen["unet"][0], refs["unet"][0]), f"{kind}: the first UNet input differs"


@pytest.mark.parametrize("native", [True, False], ids=["9-channel", "blending"])
def test_inpaint_latents_bit_identical_to_diffusers(tiny, native):
    """Inpainting: the image's and the masked image's posteriors and the first UNet input equal diffusers'."""
    ref, ours = pipelines(tiny, "ddim", inpainting=native, kind="inpaint")
    kw = dict(num_inference_steps=2, strength=0.5, guidance_scale=7.5, output_type="latent")  # one step
    with capturing(ref, ours) as (refs, seen):
        ref(PROMPTS[1], image=picture(10), mask_image=disc_mask(), generator=[torch.Generator().manual_seed(6)],
            height=SIZE, width=SIZE, **kw)
        ours.inpaint(PROMPTS[1], picture(10), disc_mask(), seed=6, **kw)
    assert len(seen["posterior"]) == len(refs["posterior"]) == 2  # the image, then the masked image
    for i, (a, b) in enumerate(zip(seen["posterior"], refs["posterior"])):
        assert torch.equal(a, b), f"posterior {i} differs by {rel_err(a, b):.2e} relative"
    assert torch.equal(seen["unet"][0], refs["unet"][0]), "the first UNet input differs"


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
    """PIL, uint8 array and float array give the same img2img result bit for bit; a tensor the same up to the
    kernels' summation order (diffusers, too, stacks a 3-D tensor into a contiguous batch where an array becomes a
    channels-last one; see test_image_latents_bit_identical_to_diffusers)."""
    _, ours = pipelines(tiny, "ddim")
    image = picture(5)
    kw = dict(seed=2, num_inference_steps=2, strength=1.0, output_type="latent")
    ref = ours.img2img("x", image, **kw).latents
    arr = np.array(image)
    for given in (arr, arr.astype(np.float32) / 255.0):
        assert torch.equal(ours.img2img("x", given, **kw).latents, ref)
    for given in (torch.from_numpy(arr).permute(2, 0, 1), torch.from_numpy(arr).permute(2, 0, 1) / 255.0):
        assert rel_err(ours.img2img("x", given, **kw).latents, ref) <= 1e-5


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


FULL_SIZE = 192  # px: 24x24 latents; at 64 px the channels-last VAE input of diffusers went unnoticed


def gradient(size: int = FULL_SIZE) -> Image.Image:
    """A smooth RGB gradient: the kind of picture on which a 1e-6 latent difference moves uint8 levels."""
    yy, xx = np.mgrid[:size, :size]
    return Image.fromarray(np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 255 // (2 * size)],
                                    axis=-1).astype(np.uint8))


def assert_full_shape_parity(ref, ours, ref_call, our_call) -> None:
    """The image latents bit-identical, the final latents within LATENT_TOL, the images within the contract."""
    with capturing(ref, ours) as (refs, seen):
        ref_images, ref_latents = ref_call()
        out = our_call()
    assert len(seen["posterior"]) == len(refs["posterior"]) > 0
    for i, (a, b) in enumerate(zip(seen["posterior"], refs["posterior"])):
        assert torch.equal(a, b), f"posterior {i} differs by {rel_err(a, b):.2e} relative"
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def ddim_pipeline(ref, cls_name: str):
    """diffusers' pipeline `cls_name` on the components of `ref`, with DDIM."""
    import diffusers

    pipe = getattr(diffusers, cls_name)(**ref.components)
    pipe.scheduler = ref_scheduler("ddim", dict(ref.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_full_shape_sd15_img2img_matches_diffusers(sd15_full):
    """A PIL picture (the path users take) at 192 px, strength 0.6 of 5 steps."""
    ref, ours = sd15_full
    ref = ddim_pipeline(ref, "StableDiffusionImg2ImgPipeline")
    kw = dict(negative_prompt="blurry", num_inference_steps=5, strength=0.6, guidance_scale=7.5)
    assert_full_shape_parity(
        ref, ours, lambda: run_ref(ref, PROMPTS[1], image=gradient(), seed=8, n_images=1, **kw),
        lambda: ours.img2img(PROMPTS[1], gradient(), seed=8, scheduler="ddim", output_type="np", **kw))


@pytest.mark.slow
def test_full_shape_sd15_inpaint_blending_matches_diffusers(sd15_full):
    """Latent blending on the ordinary SD 1.5 checkpoint, at 192 px with a PIL picture and mask."""
    ref, ours = sd15_full
    ref = ddim_pipeline(ref, "StableDiffusionInpaintPipeline")
    assert_full_shape_inpaint_parity(ref, ours, seed=10)


def assert_full_shape_inpaint_parity(ref, ours, seed: int) -> None:
    """Inpainting a PIL gradient under a disc mask at 192 px, strength 0.6 of 5 DDIM steps, as diffusers."""
    kw = dict(negative_prompt="blurry", num_inference_steps=5, strength=0.6, guidance_scale=7.5)
    mask = disc_mask(FULL_SIZE)
    assert_full_shape_parity(
        ref, ours, lambda: run_ref(ref, PROMPTS[0], image=gradient(), mask_image=mask, seed=seed, n_images=1,
                                   height=FULL_SIZE, width=FULL_SIZE, **kw),
        lambda: ours.inpaint(PROMPTS[0], gradient(), mask, seed=seed, scheduler="ddim", output_type="np", **kw))


@pytest.mark.slow
def test_full_shape_sd15_inpainting_checkpoint_matches_diffusers(tmp_path_factory):
    """The 9-channel SD 1.5 inpainting layout, detected from the file's keys, at 192 px with a PIL picture."""
    path, ref, ours = full_shape_pipelines(tmp_path_factory, "sd15_inpaint", "inpaint")
    try:
        assert ours.family.name == "sd15-inpaint" and ours.unet.config.in_channels == 9
        assert_full_shape_inpaint_parity(ddim_pipeline(ref, "StableDiffusionInpaintPipeline"), ours, seed=9)
    finally:
        del ref, ours
        path.unlink()
