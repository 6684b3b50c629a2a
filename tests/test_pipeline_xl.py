"""StableDiffusionXLPipeline against diffusers' SDXL pipelines on the same tiny random weights, fp32 CPU.

The tiny models have SDXL's layout (two text encoders, a plain first UNet level, mixed transformer depths, the
text_time added embedding; a refiner with bigG only and 5 time ids). Tolerances are DESIGN.md's contract: each
component within 1e-5 relative (kernels agree to ~1e-6), final latents within 1e-4 (a few Euler steps amplify the
per-step difference by at most ~10x), decoded uint8 images at most 1 level apart on at most 0.1% of the values.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import LATENT_TOL, NEGATIVES, PROMPTS, assert_images_close, disc_mask, picture, rel_err, run_ref
from tests.helpers_xl import SIZE, generators, ours_from, reference_pipelines

pytestmark = pytest.mark.usefixtures("one_thread")
COMPONENT_TOL = 1e-5


@pytest.fixture(scope="module")
def xl():
    """(reference base, reference refiner, our base, our refiner) on the same tiny weights."""
    base, refiner = reference_pipelines()
    return base, refiner, ours_from(base), ours_from(refiner)


# ----------------------------------------------------------------------------------------------------------------
# Prompt encoding


@pytest.mark.parametrize("negative", [None, NEGATIVES])
def test_encode_prompt_matches_diffusers(xl, negative):
    """Context (B, 77, 32 + 48) and pooled (B, 40), prompts and negatives, prompt_2 differing from prompt; without
    a negative prompt the base's unconditional inputs are zeros (force_zeros_for_empty_prompt)."""
    ref, _, ours, _ = xl
    prompts_2 = ["a watercolour", "a charcoal sketch"]
    want = ref.encode_prompt(PROMPTS, prompts_2, num_images_per_prompt=1, do_classifier_free_guidance=True,
                             negative_prompt=negative)
    context, added = ours._conditioning(PROMPTS, negative or ["", ""], 1, None, True, prompts_2=prompts_2,
                                        zeros=negative is None)
    assert context.shape == (4, 77, 80) and added["text_embeds"].shape == (4, 40)
    assert rel_err(context[2:], want[0]) <= COMPONENT_TOL
    assert rel_err(added["text_embeds"][2:], want[2]) <= COMPONENT_TOL
    if negative is None:
        assert not context[:2].any() and not added["text_embeds"][:2].any()
    else:
        assert rel_err(context[:2], want[1]) <= COMPONENT_TOL
        assert rel_err(added["text_embeds"][:2], want[3]) <= COMPONENT_TOL


def test_clip_skip_counts_from_sdxls_penultimate_layer(xl):
    """Ours clip_skip=n reads hidden_states[-(n + 1)], diffusers' clip_skip=n - 1 (no final layer norm)."""
    ref, _, ours, _ = xl
    want = ref.encode_prompt(PROMPTS[0], num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=1)
    context, pooled = ours.encode_prompt([PROMPTS[0]], clip_skip=2)
    assert rel_err(context, want[0]) <= COMPONENT_TOL and rel_err(pooled, want[2]) <= COMPONENT_TOL
    default, _ = ours.encode_prompt([PROMPTS[0]])
    assert rel_err(context, default) > 1e-3  # another layer


def test_emphasis_and_long_prompts_on_both_encoders(xl):
    """A1111's SDXL rules: emphasis weights each encoder's hidden states and restores each one's mean; a long prompt
    is encoded in 77-token chunks side by side, pooled from the first chunk; a plain short prompt is unchanged."""
    _, _, ours, _ = xl
    plain, pooled = ours.encode_prompt(["a red cat"])
    weighted, weighted_pooled = ours.encode_prompt(["a (red:1.5) cat"])
    assert torch.equal(pooled, weighted_pooled)  # pooled is unweighted (A1111)
    for part in (slice(0, 32), slice(32, 80)):  # CLIP-L's columns, bigG's columns
        assert abs(weighted[..., part].mean() - plain[..., part].mean()) < 1e-5  # mean restored per encoder
        assert rel_err(weighted[:, 2, part], plain[:, 2, part]) > 1e-2  # "red" (position 2) is scaled
    long_prompt = "a photo of " + "a very detailed cat, " * 20
    context, long_pooled = ours.encode_prompt([long_prompt])
    assert context.shape == (1, 154, 80)
    first = ours.tokenizer_2([long_prompt])  # the first chunk is the plain truncation
    assert torch.allclose(long_pooled, ours.text_encoder_2(first).text_embeds, atol=1e-6)


def test_sdxl_textual_inversion_matches_diffusers(tmp_path):
    """An SDXL embedding file (clip_l (2, 32), clip_g (2, 48) here; 768 and 1280 in SDXL): each encoder reads its
    own vectors, as diffusers' load_textual_inversion once per encoder gives; unloading restores the plain prompt."""
    from safetensors.torch import save_file

    ref, _ = reference_pipelines()  # its own: diffusers adds the word to the tokenizers and embedding tables
    ours = ours_from(ref)
    g = torch.Generator().manual_seed(0)
    vectors = {"clip_l": 0.02 * torch.randn(2, 32, generator=g), "clip_g": 0.02 * torch.randn(2, 48, generator=g)}
    save_file(vectors, tmp_path / "toy.safetensors")
    plain = ours.encode_prompt(["a photo of toy on a table"])[0]
    assert ours.load_textual_inversion(tmp_path / "toy.safetensors", token="<toy>") == "<toy>"
    ref.load_textual_inversion(vectors["clip_l"], token="<toy>", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(vectors["clip_g"], token="<toy>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = "a photo of <toy> on a table, <toy>"
    want = ref.encode_prompt(prompt, num_images_per_prompt=1, do_classifier_free_guidance=False)
    context, pooled = ours.encode_prompt([prompt])
    assert rel_err(context, want[0]) <= COMPONENT_TOL and rel_err(pooled, want[2]) <= COMPONENT_TOL
    with pytest.raises(ValueError, match="already loaded"):  # both halves refused, nothing half-loaded
        ours.load_textual_inversion(tmp_path / "toy.safetensors", token="<toy>")
    ours.unload_textual_inversion("<toy>")
    assert not ours.textual_inversion.embeddings and not ours.textual_inversion_2.embeddings
    assert torch.equal(ours.encode_prompt(["a photo of toy on a table"])[0], plain)


KOHYA = {"unet": ("lora_unet_", 2.0), "text_encoder": ("lora_te1_", 8.0), "text_encoder_2": ("lora_te2_", 4.0)}


def lora_file(path, pipe, kind: str) -> None:
    """A kohya (lora_unet_ / lora_te1_ / lora_te2_, with alphas) or PEFT (unet. / text_encoder. / text_encoder_2.)
    LoRA of rank 4 for the UNet's attention layers and both text encoders' layers (updates ~10% of the weights)."""
    from safetensors.torch import save_file

    g, sd = torch.Generator().manual_seed(1), {}
    suffixes = (".lora_down.weight", ".lora_up.weight") if kind == "kohya" else (".lora_A.weight", ".lora_B.weight")
    for component, (prefix, alpha) in KOHYA.items():
        linears = [(n, m) for n, m in getattr(pipe, component).named_modules()
                   if isinstance(m, torch.nn.Linear) and ("attentions" in n or "layers" in n)]
        for name, m in linears:
            key = prefix + name.replace(".", "_") if kind == "kohya" else f"{component}.{name}"
            sd[key + suffixes[0]] = torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5  # (r, in)
            sd[key + suffixes[1]] = 0.1 * torch.randn(m.out_features, 4, generator=g)  # (out, r)
            if kind == "kohya":
                sd[key + ".alpha"] = torch.tensor(alpha)
    save_file(sd, path)


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sdxl_lora_matches_diffusers_fuse(tmp_path, kind):
    """A LoRA on the UNet and both text encoders merged at 0.7: the latents of diffusers' SDXL pipeline after
    load_lora_weights + fuse_lora(lora_scale=0.7); unloading restores the weights bit for bit."""
    ref, _ = reference_pipelines()  # its own: diffusers wraps the layers
    ours = ours_from(ref)
    before = {k: v.clone() for k, v in ours.text_encoder_2.state_dict().items()}
    lora_file(tmp_path / f"{kind}.safetensors", ours, kind)
    ref.load_lora_weights(str(tmp_path / f"{kind}.safetensors"), adapter_name="x")
    ref.fuse_lora(lora_scale=0.7)
    assert ours.load_lora_weights(tmp_path / f"{kind}.safetensors", weight=0.7) == kind
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, negative_prompt=NEGATIVES[0])
    want = ref(PROMPTS[0], generator=generators(3, 1), output_type="latent", **kw).images
    out = ours(PROMPTS[0], seed=3, output_type="latent", **kw)
    assert rel_err(out.latents, want) <= LATENT_TOL
    assert any(not torch.equal(v, before[k]) for k, v in ours.text_encoder_2.state_dict().items())
    ours.unload_lora_weights()
    assert all(torch.equal(v, before[k]) for k, v in ours.text_encoder_2.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# End to end


def test_txt2img_matches_diffusers(xl):
    """Two prompts x two images, prompt_2, negative prompts and negative_prompt_2, micro-conditioning that differs
    from the defaults (and a negative one), guidance 5: same latents and pixels as diffusers."""
    ref, _, ours, _ = xl
    kw = dict(prompt_2=["a watercolour", "a charcoal sketch"], negative_prompt=NEGATIVES,
              negative_prompt_2="oversaturated", num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2,
              height=SIZE, width=SIZE, original_size=(512, 384), crops_coords_top_left=(16, 32),
              target_size=(48, 80), negative_original_size=(256, 256), negative_target_size=(64, 32))
    ref_images, ref_latents = run_ref(ref, PROMPTS, seed=7, n_images=4, **kw)
    out = ours(PROMPTS, seed=7, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_txt2img_defaults_match_diffusers(xl, guidance):
    """No negative prompt (zeros with guidance, nothing without), default micro-conditioning, one generator."""
    ref, _, ours, _ = xl
    kw = dict(num_inference_steps=2, guidance_scale=guidance, height=SIZE, width=SIZE)
    want = ref(PROMPTS[0], generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    out = ours(PROMPTS[0], generator=torch.Generator().manual_seed(3), output_type="latent", **kw)
    assert rel_err(out.latents, want) <= LATENT_TOL


def test_img2img_matches_diffusers(xl):
    """The base's img2img from a picture: the posterior sample, then the noise, strength 0.6 of 4 steps."""
    ref, _, ours, _ = xl
    import diffusers

    ref_i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**ref.components)
    ref_i2i.set_progress_bar_config(disable=True)
    kw = dict(strength=0.6, negative_prompt=NEGATIVES[0], num_inference_steps=4, original_size=(96, 128),
              crops_coords_top_left=(8, 0), negative_crops_coords_top_left=(4, 4))
    ref_images, ref_latents = run_ref(ref_i2i, PROMPTS[1], image=picture(5), seed=11, n_images=2,
                                      num_images_per_prompt=2, **kw)
    out = ours.img2img(PROMPTS[1], picture(5), seed=11, num_images_per_prompt=2, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_base_and_refiner_hand_off_matches_diffusers(xl, guidance):
    """Ensemble of experts: the base stops at denoising_end=0.7 and returns latents; the refiner (bigG only, 5 time
    ids, aesthetic scores that differ from the defaults) starts there with denoising_start=0.7, no noise added."""
    ref, ref_refiner, ours, refiner = xl
    kw = dict(negative_prompt=NEGATIVES[1], num_inference_steps=5, guidance_scale=guidance)
    ref_latents = ref(PROMPTS[0], generator=generators(2, 1), height=SIZE, width=SIZE, denoising_end=0.7,
                      output_type="latent", **kw).images
    base_out = ours(PROMPTS[0], seed=2, height=SIZE, width=SIZE, denoising_end=0.7, output_type="latent", **kw)
    assert base_out.steps_run == 3  # Euler "leading" 5 steps: 801, 601, 401 are >= 300; 201, 1 are left
    assert rel_err(base_out.latents, ref_latents) <= LATENT_TOL
    refine = dict(denoising_start=0.7, aesthetic_score=7.5, negative_aesthetic_score=1.5, original_size=(80, 96),
                  crops_coords_top_left=(2, 4), **kw)
    ref_images, ref_final = run_ref(ref_refiner, PROMPTS[0], image=ref_latents, seed=2, n_images=1, **refine)
    out = refiner.img2img(PROMPTS[0], base_out.latents, seed=2, output_type="np", **refine)
    assert out.steps_run == 2
    assert rel_err(out.latents, ref_final) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def test_refiner_img2img_from_a_picture_matches_diffusers(xl):
    """The refiner on its own: a picture noised to strength 0.5, the empty negative prompt encoded (the refiner
    does not zero it), default aesthetic scores."""
    _, ref_refiner, _, refiner = xl
    kw = dict(strength=0.5, num_inference_steps=4)
    ref_images, ref_latents = run_ref(ref_refiner, PROMPTS[1], image=picture(8), seed=4, n_images=1, **kw)
    out = refiner.img2img(PROMPTS[1], picture(8), seed=4, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def test_inpaint_matches_diffusers(xl):
    """The base inpaints by blending (4-channel UNet): image latents, noise, masked-image latents drawn in
    diffusers' order, the known region noised to the next step after each step."""
    ref, _, ours, _ = xl
    import diffusers

    ref_inpaint = diffusers.StableDiffusionXLInpaintPipeline(**ref.components)
    ref_inpaint.set_progress_bar_config(disable=True)
    kw = dict(strength=0.8, negative_prompt=NEGATIVES[0], num_inference_steps=4, guidance_scale=6.0,
              target_size=(32, 48))
    ref_images, ref_latents = run_ref(ref_inpaint, PROMPTS[0], image=picture(6), mask_image=disc_mask(), seed=9,
                                      n_images=2, num_images_per_prompt=2, height=SIZE, width=SIZE, **kw)
    out = ours.inpaint(PROMPTS[0], picture(6), disc_mask(), seed=9, num_images_per_prompt=2, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


@pytest.fixture(scope="module")
def xl9():
    """diffusers' SDXL inpainting pipeline with a 9-channel UNet, and ours on the same weights."""
    import diffusers

    base9, _ = reference_pipelines(inpaint_channels=9)
    ref = diffusers.StableDiffusionXLInpaintPipeline(**base9.components)
    ref.set_progress_bar_config(disable=True)
    return ref, ours_from(base9)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_9_channel_matches_diffusers(xl9, strength):
    """An SDXL inpainting UNet (9 input channels) sees [x, mask, masked-image latents]; strength 1.0 starts from pure
    noise (no image latents drawn), 0.7 from the noised image."""
    ref, ours = xl9
    kw = dict(strength=strength, negative_prompt=NEGATIVES[1], num_inference_steps=3, crops_coords_top_left=(8, 8))
    ref_images, ref_latents = run_ref(ref, PROMPTS[1], image=picture(2), mask_image=disc_mask(), seed=5, n_images=1,
                                      height=SIZE, width=SIZE, **kw)
    out = ours.inpaint(PROMPTS[1], picture(2), disc_mask(), seed=5, output_type="np", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)
    with pytest.raises(ValueError, match="inpainting model"):
        ours(PROMPTS[1], height=SIZE, width=SIZE)


def test_warm_up_feeds_the_added_conditioning(xl):
    """ldm.optimize.warm_up (the compile warm-up of --optimize) runs an SDXL UNet with zero added conditioning of
    the right widths, base (6 time ids) and refiner (5)."""
    from ldm.optimize import warm_up

    _, _, ours, refiner = xl
    for pipe in (ours, refiner):
        assert warm_up(pipe, height=SIZE, width=SIZE, calls=1) > 0


def test_single_file_and_diffusers_folder_give_identical_outputs(tmp_path):
    """ldm.load_pipeline of a tiny SDXL base / refiner single file (the official layouts) and of the diffusers folder
    exported from it: StableDiffusionXLPipeline both ways, the same latents bit for bit, base and hand-off."""
    import ldm
    from tests.helpers import TINY_XL_BASE, TINY_XL_REFINER
    from tests.synth import tiny_ldm_manifest, write_synthetic_checkpoint
    from weights_convert.export import export_diffusers
    from weights_convert.load import load_components

    runs = []
    for how in ("file", "folder"):
        pipes = []
        for name, preset in (("base", TINY_XL_BASE), ("refiner", TINY_XL_REFINER)):
            path = write_synthetic_checkpoint(tiny_ldm_manifest(preset), tmp_path / f"{name}.safetensors", seed=5)
            if how == "folder":
                path = export_diffusers(load_components(path, family=preset), tmp_path / name)
            pipe = ldm.load_pipeline(path, family=preset if how == "file" else None)
            assert isinstance(pipe, ldm.StableDiffusionXLPipeline)
            pipes.append(pipe)
        base, refiner = pipes
        assert base.force_zeros_for_empty_prompt and not refiner.force_zeros_for_empty_prompt
        assert refiner.requires_aesthetics_score and not base.requires_aesthetics_score
        kw = dict(num_inference_steps=3, negative_prompt="fog", seed=1)
        latents = base(PROMPTS[0], height=16, width=16, denoising_end=0.6, output_type="latent", **kw).latents
        final = refiner.img2img(PROMPTS[0], latents, denoising_start=0.6, output_type="latent", **kw).latents
        runs.append((latents, final))
    assert torch.isfinite(runs[0][1]).all()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_fp16_vae_decodes_in_fp32_when_force_upcast(xl):
    """force_upcast: an fp16 VAE decodes in fp32 (diffusers' upcast) and is cast back; same pixels as fp32 decoding
    of the fp16-rounded weights."""
    _, _, ours, _ = xl
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        ours.vae.half()
        images = ours.decode(latents.half())
        assert next(ours.vae.parameters()).dtype == torch.float16
        ours.vae.float()
        want = ours.vae.decode(latents.half().float() / ours.vae.config.scaling_factor)
    finally:
        ours.vae.float()
    assert images.dtype == torch.float32 and rel_err(images, want) <= COMPONENT_TOL


# ----------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("call,match", [
    (lambda p, r: r("a cat", height=SIZE, width=SIZE), "aesthetic scores"),
    (lambda p, r: p("a cat", height=SIZE, width=SIZE, negative_original_size=(64, 64)), "both negative"),
    (lambda p, r: p("a cat", height=SIZE, width=SIZE, original_size=(64,)), "original_size must be a pair"),
    (lambda p, r: p("a cat", height=SIZE, width=SIZE, denoising_end=0.0), "denoising_end"),
    (lambda p, r: p("a cat", prompt_2=["a", "b"], height=SIZE, width=SIZE), "prompt_2 has 2 entries"),
    (lambda p, r: r.img2img("a cat", picture(1), denoising_start=0.8, denoising_end=0.5), "smaller than"),
    (lambda p, r: p.inpaint("a cat", picture(1), disc_mask(32)), "same size"),
])
def test_bad_arguments_name_the_problem(xl, call, match):
    _, _, ours, refiner = xl
    with pytest.raises(ValueError, match=match):
        call(ours, refiner)


def test_constructor_checks_the_parts(xl):
    """The parts must fit: a second encoder with a projection head, the encoders' widths summing to the UNet's text
    width, tokenizer and encoder together; an inpainting UNet refuses txt2img."""
    _, _, ours, refiner = xl
    parts = dict(unet=ours.unet, vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                 text_encoder_2=ours.text_encoder_2, tokenizer_2=ours.tokenizer_2, scheduler=ours.scheduler)
    with pytest.raises(TypeError, match="CLIPTextModelWithProjection"):
        type(ours)(**{**parts, "text_encoder_2": ours.text_encoder})
    with pytest.raises(ValueError, match="32 \\+ 48 .* cross_attention_dim 48"):
        type(ours)(**{**parts, "unet": refiner.unet})
    with pytest.raises(ValueError, match="go together"):
        type(ours)(**{**parts, "tokenizer": None})


# ----------------------------------------------------------------------------------------------------------------
# Full SDXL shapes (slow): synthetic official single files, one copy of the weights in memory


def shared_reference(ours, family: str):
    """diffusers' SDXL pipeline (base) or img2img pipeline (refiner) whose modules hold the very tensors ours loaded:
    built on the meta device from the shipped configs, then load_state_dict(strict=True, assign=True), so the 10 GB
    of fp32 weights exist once (the test compares the pipelines' code paths; the converter's full-shape tests
    compare the loading)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from tests.helpers import DIFFUSERS_CONFIGS, load_json

    folder = DIFFUSERS_CONFIGS / family
    parts = {}
    with init_empty_weights(include_buffers=False):
        parts["unet"] = diffusers.UNet2DConditionModel.from_config(load_json(folder / "unet" / "config.json"))
        parts["vae"] = diffusers.AutoencoderKL.from_config(load_json(folder / "vae" / "config.json"))
        for name, cls in (("text_encoder", transformers.CLIPTextModel),
                          ("text_encoder_2", transformers.CLIPTextModelWithProjection)):
            if getattr(ours, name) is not None:
                parts[name] = cls(transformers.CLIPTextConfig(**load_json(folder / name / "config.json")))
    for name, module in parts.items():
        state = getattr(ours, name).state_dict()
        if not any(k.startswith("text_model.") for k in module.state_dict()):  # transformers 5's CLIPTextModel
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.eval()
    tokenizers = {name: transformers.CLIPTokenizer.from_pretrained(folder / name)
                  for name in ("tokenizer", "tokenizer_2") if (folder / name).is_dir()}
    scheduler = diffusers.EulerDiscreteScheduler.from_config(load_json(folder / "scheduler" / "scheduler_config.json"))
    if "text_encoder" in parts:
        ref = diffusers.StableDiffusionXLPipeline(scheduler=scheduler, add_watermarker=False, **parts, **tokenizers)
    else:
        ref = diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False, **parts, **tokenizers)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.slow
def test_full_shape_sdxl_base_and_refiner_match_diffusers(tmp_path):
    """The official SDXL shapes from synthetic fp16 single files (base: 2,567,463,684-parameter UNet, CLIP-L + bigG;
    refiner: 2,259,526,660, bigG alone), loaded in fp32, at 128 px (16 x 16 latents), guidance 5, micro-conditioning
    and aesthetic scores off their defaults: the prompt encoding within 1e-5 of diffusers', the base's latents at
    denoising_end=0.5 of 4 steps and the refiner's from the same latents within 1e-4, the images within the
    contract. Base first, then the refiner: one model in memory at a time (~14 GB)."""
    import gc

    import ldm
    from tests.synth import write_synthetic_checkpoint

    kw = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, original_size=(1024, 768),
              crops_coords_top_left=(0, 64))
    handoff = None
    for manifest, family in (("sdxl_base", "sdxl-base"), ("sdxl_refiner", "sdxl-refiner")):
        path = write_synthetic_checkpoint(manifest, tmp_path / f"{manifest}.safetensors", dtype=torch.float16, seed=3)
        ours = ldm.load_pipeline(path)
        path.unlink()
        assert isinstance(ours, ldm.StableDiffusionXLPipeline) and ours.family.name == family
        ref = shared_reference(ours, family)
        want = ref.encode_prompt(PROMPTS[0], num_images_per_prompt=1, do_classifier_free_guidance=False)
        context, pooled = ours.encode_prompt([PROMPTS[0]])
        assert rel_err(context, want[0]) <= COMPONENT_TOL and rel_err(pooled, want[2]) <= COMPONENT_TOL
        if handoff is None:
            assert context.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
            want = ref(PROMPTS[0], generator=generators(2, 1), height=128, width=128, denoising_end=0.5,
                       output_type="latent", **kw).images
            out = ours(PROMPTS[0], seed=2, height=128, width=128, denoising_end=0.5, output_type="latent", **kw)
            handoff = out.latents
        else:
            refine = dict(denoising_start=0.5, aesthetic_score=7.0, negative_aesthetic_score=2.0, **kw)
            ref_images, want = run_ref(ref, PROMPTS[0], image=handoff, seed=2, n_images=1, **refine)
            out = ours.img2img(PROMPTS[0], handoff, seed=2, output_type="np", **refine)
            assert_images_close(out.images, ref_images)
        assert out.steps_run == 2 and rel_err(out.latents, want) <= LATENT_TOL
        del ours, ref, out
        gc.collect()
