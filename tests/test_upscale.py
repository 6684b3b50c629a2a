"""The SD x4 upscaler: its UNet/VAE options, preset, converter and pipeline against diffusers (fp32, CPU).

Parity contract (DESIGN.md): final latents within 1e-4 relative of diffusers' StableDiffusionUpscalePipeline on the
same weights and generators; uint8 images at most 1 level apart on at most 0.1% of the values (the decoded floats
agree to ~1e-6, so a value sitting on a rounding boundary may round the other way). Tiny random components by
default; the full official shapes (a synthetic 3.5 GB single file) in the `slow` tier.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ldm
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
from tests.helpers import DIFFUSERS_CONFIGS, FIXTURES, TOKENIZER_DIR, assert_images_close, diffusers_config, \
    load_json, rel_err, tiny_x4_manifest, trained_like_
from tests.helpers import X4_CLIP as CLIP
from tests.helpers import X4_UNET as UNET
from tests.helpers import X4_VAE as VAE
from tests.helpers import x4_low_res_picture as low_res_picture

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT_TOL = 1e-4
X4_CONFIGS = DIFFUSERS_CONFIGS / "x4-upscaler"
LOW_RES = load_json(X4_CONFIGS / "low_res_scheduler" / "scheduler_config.json")
SIZE = 16  # input px: 16x16 latents, a 64x64 output



@pytest.fixture(scope="module")
def tiny():
    """(diffusers' upscale pipeline, ours) on the same tiny random weights."""
    import diffusers
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    ref_unet = trained_like_(diffusers.UNet2DConditionModel(**UNET), seed=1).eval()
    unet = ldm.UNet2DConditionModel(UNetConfig.from_diffusers(UNET)).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ref_vae = trained_like_(diffusers.AutoencoderKL(**VAE), seed=2).eval()
    vae = ldm.AutoencoderKL(VAEConfig.from_diffusers(VAE)).eval()
    vae.load_state_dict(ref_vae.state_dict(), strict=True)
    ref_text = trained_like_(CLIPTextModel(RefCLIPConfig(**CLIP)), seed=3).eval()
    text = ldm.CLIPTextModel(CLIPTextConfig.from_transformers(CLIP)).eval()
    text.load_state_dict(ref_text.state_dict(), strict=True)
    sched = diffusers_config("x4-upscaler", "scheduler")
    ref = diffusers.StableDiffusionUpscalePipeline(
        vae=ref_vae, text_encoder=ref_text, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR / "sd21"),
        unet=ref_unet, low_res_scheduler=diffusers.DDPMScheduler.from_config(LOW_RES),
        scheduler=diffusers.DDIMScheduler.from_config(sched), max_noise_level=350)
    ref.set_progress_bar_config(disable=True)
    family = dataclasses.replace(ldm.X4_UPSCALER, unet=unet.config, vae=vae.config, text=text.config)
    ours = ldm.StableDiffusionUpscalePipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd21"),
        scheduler=ldm.schedulers.DDIMScheduler.from_config(sched), family=family, max_noise_level=350,
        low_res_scheduler=LOW_RES)
    return SimpleNamespace(ref=ref, ours=ours, family=family)


def run_ref(ref, prompt, image, *, generator, **kw):
    """diffusers' output as float images, and its final latents (through its step callback)."""
    captured = {}

    def keep(i, t, latents):
        captured["latents"] = latents.clone()

    out = ref(prompt, image=image, generator=generator, output_type="np", callback=keep, **kw)
    return out.images, captured["latents"]


# ----------------------------------------------------------------------------------------------------------------
# Models: the options the upscaler needs, as general config options


def test_unet_class_embedding_and_only_cross_attention_match_diffusers(tiny):
    ref_unet, unet = tiny.ref.unet, tiny.ours.unet
    assert unet.class_embedding.weight.shape == (1000, 128)
    block = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    assert block.only_cross and block.attn1.to_k.in_features == 32  # attn1 reads the text context
    assert not unet.down_blocks[0].attentions  # the plain first level
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(3, 7, 16, 16, generator=g), torch.randn(3, 5, 32, generator=g)
    for labels in (torch.tensor([0, 20, 999]), torch.tensor([350]), 7):
        with torch.no_grad():
            want = ref_unet(x, 500, ctx, class_labels=torch.as_tensor(labels).reshape(-1)).sample
            got = unet(x, 500, ctx, class_labels=labels)
        assert rel_err(got, want) <= 1e-5  # the component contract
    with torch.no_grad():  # the label changes the output (the embedding is really added)
        assert rel_err(unet(x, 500, ctx, class_labels=0), unet(x, 500, ctx, class_labels=300)) > 1e-3


@pytest.mark.parametrize("labels, error, match", [
    (None, ValueError, "class_labels are required"),
    (torch.tensor([1000]), ValueError, r"\[0, 1000\)"),
    (torch.tensor([-1]), ValueError, r"\[0, 1000\)"),
    (torch.tensor([1.0]), TypeError, "integers"),
    (torch.tensor([1, 2]), ValueError, "shape"),
])
def test_unet_class_label_errors(tiny, labels, error, match):
    x, ctx = torch.zeros(3, 7, 16, 16), torch.zeros(3, 5, 32)
    with pytest.raises(error, match=match):
        tiny.ours.unet(x, 1, ctx, class_labels=labels)


def test_class_labels_for_a_model_without_classes_is_an_error():
    cfg = dataclasses.replace(UNetConfig.from_diffusers(UNET), num_class_embeds=None, in_channels=4)
    with pytest.raises(ValueError, match="no class embedding"):
        ldm.UNet2DConditionModel(cfg)(torch.zeros(1, 4, 16, 16), 1, torch.zeros(1, 5, 32), class_labels=3)


def test_x4_preset_equals_the_shipped_configs_and_the_reference_parameter_counts():
    manifest = load_json(FIXTURES / "x4_upscaler_ldm_keys.json")
    preset = ldm.X4_UPSCALER
    assert UNetConfig.from_diffusers(diffusers_config("x4-upscaler", "unet")) == preset.unet
    assert VAEConfig.from_diffusers(diffusers_config("x4-upscaler", "vae")) == preset.vae
    assert CLIPTextConfig.from_transformers(diffusers_config("x4-upscaler", "text_encoder")) == preset.text
    assert UNetConfig.from_diffusers(preset.unet.to_diffusers()) == preset.unet
    assert VAEConfig.from_diffusers(preset.vae.to_diffusers()) == preset.vae
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in model.parameters()) for name, model in (
            ("unet", ldm.UNet2DConditionModel(preset.unet)), ("vae", ldm.AutoencoderKL(preset.vae)),
            ("text", ldm.CLIPTextModel(preset.text)))}
    assert counts["unet"] == manifest["param_counts"]["model.diffusion_model."] == 473_398_020
    assert counts["vae"] == manifest["param_counts"]["first_stage_model."] == 55_325_927
    assert counts["text"] == 340_387_840  # diffusers' 23-layer CLIPTextModel (the fixture README)
    assert preset.vae.downsample_factor == 4 and preset.scheduler["beta_start"] == 0.0001


def test_full_size_state_dict_keys_match_diffusers_on_meta():
    import diffusers

    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_config("x4-upscaler", "unet"))
        ours = ldm.UNet2DConditionModel(ldm.X4_UPSCALER.unet)
        ref_vae = diffusers.AutoencoderKL(**diffusers_config("x4-upscaler", "vae"))
        vae = ldm.AutoencoderKL(ldm.X4_UPSCALER.vae)
    for a, b in ((ours, ref), (vae, ref_vae)):
        assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in b.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# The pipeline against diffusers


@pytest.mark.parametrize("kw", [
    dict(noise_level=20, guidance_scale=9.0),
    dict(noise_level=150, guidance_scale=1.0),  # no guidance: one UNet batch
    dict(noise_level=0, guidance_scale=5.0, negative_prompt="blurry, jpeg artefacts", num_images_per_prompt=2),
    dict(noise_level=350, guidance_scale=7.0, eta=0.5),  # the maximum level; DDIM's eta draws from the generators
])
def test_upscale_matches_diffusers(tiny, kw):
    steps, seed, n = 4, 11, kw.get("num_images_per_prompt", 1)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    ref_images, ref_latents = run_ref(tiny.ref, "a photo of a cat", low_res_picture(1), generator=gens,
                                      num_inference_steps=steps, **kw)
    out = tiny.ours("a photo of a cat", low_res_picture(1), seed=seed, num_inference_steps=steps,
                    output_type="np", **kw)
    assert out.images.shape == (n, 4 * SIZE, 4 * SIZE, 3)  # 4x the input's sides
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


@pytest.mark.parametrize("n", [1, 2])  # n = 2: diffusers' pairing of tiled images with in-place repeated prompts
def test_batch_of_prompts_and_images_and_a_single_generator_match_diffusers(tiny, n):
    prompts, images = ["a cat", "a harbour at night"], [low_res_picture(2), low_res_picture(3)]
    ref_images, ref_latents = run_ref(tiny.ref, prompts, images, generator=torch.Generator().manual_seed(4),
                                      num_inference_steps=3, negative_prompt=["blurry", "noisy"],
                                      num_images_per_prompt=n)
    out = tiny.ours(prompts, images, generator=torch.Generator().manual_seed(4), num_inference_steps=3,
                    negative_prompt=["blurry", "noisy"], num_images_per_prompt=n, output_type="np")
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def test_image_inputs_and_output_types(tiny):
    pic = low_res_picture(5)
    kw = dict(num_inference_steps=2, seed=3)
    base = tiny.ours("x", pic, output_type="np", **kw)
    assert np.array_equal(tiny.ours("x", np.array(pic), output_type="np", **kw).images, base.images)
    pils = tiny.ours("x", pic, **kw).images
    assert pils[0].size == (4 * SIZE, 4 * SIZE)
    latents = tiny.ours("x", pic, output_type="latent", **kw).images
    assert latents.shape == (1, 4, SIZE, SIZE) and torch.equal(latents, base.latents)


def test_callback_sees_steps_and_can_stop(tiny):
    seen = []

    def stop(i, t, latents):
        seen.append(i)
        return i < 1

    out = tiny.ours("x", low_res_picture(6), num_inference_steps=5, seed=1, callback=stop, output_type="np")
    assert seen == [0, 1] and out.steps_run == 2


@pytest.mark.parametrize("kw, error, match", [
    (dict(noise_level=351), ValueError, r"noise_level must be an int in \[0, 350\]"),
    (dict(noise_level=-1), ValueError, "noise_level"),
    (dict(noise_level=2.5), ValueError, "noise_level"),
    (dict(prompt=["a", "b"]), ValueError, "prompt has 2 entries but 1 image"),
    (dict(image=[low_res_picture(1), low_res_picture(2)]), ValueError, "prompt has 1 entries but 2 image"),
    (dict(image=low_res_picture(1, 18)), ValueError, "multiples of 4"),  # the tiny UNet halves twice
    (dict(image=np.zeros((16, 16, 4), np.uint8)), ValueError, r"of shape \(H, W, 3\)"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either seed= or generator="),
    (dict(output_type="jpg"), ValueError, "output_type"),
])
def test_bad_arguments_are_clear_errors(tiny, kw, error, match):
    args = {"prompt": "x", "image": low_res_picture(1), "num_inference_steps": 1, **kw}
    with pytest.raises(error, match=match):
        tiny.ours(args.pop("prompt"), args.pop("image"), **args)


def test_not_an_img2img_pipeline(tiny):
    with pytest.raises(TypeError, match="pipe\\(prompt, image\\)"):
        tiny.ours.img2img("x", low_res_picture(1))
    with pytest.raises(ValueError, match="max_noise_level"):
        ldm.StableDiffusionUpscalePipeline(**{k: getattr(tiny.ours, k) for k in (
            "unet", "vae", "text_encoder", "tokenizer", "scheduler", "family")}, max_noise_level=1000)


def test_vae_tiling_and_attention_chunking_match_diffusers(tiny):
    """A 32x32 input gives a 128x128 output, larger than the tiny VAE's 64 px tile: decoded tile by tile."""
    ref, ours = tiny.ref, tiny.ours
    kw = dict(num_inference_steps=2, noise_level=30)
    ref.vae.enable_tiling()
    ours.enable_vae_tiling()
    try:
        ref_images, ref_latents = run_ref(ref, "x", low_res_picture(7, 32), generator=[torch.Generator().manual_seed(2)],
                                          **kw)
        tiled = ours("x", low_res_picture(7, 32), seed=2, output_type="np", **kw)
    finally:
        ref.vae.disable_tiling()
        ours.disable_vae_tiling()
    assert rel_err(tiled.latents, ref_latents) <= LATENT_TOL
    assert_images_close(tiled.images, ref_images)
    whole = ours("x", low_res_picture(7, 32), seed=2, output_type="np", **kw)
    assert np.abs(whole.images - tiled.images).max() > 0  # the tiles really ran
    ours.enable_attention_chunking(64)
    try:
        chunked = ours("x", low_res_picture(7, 32), seed=2, output_type="np", **kw)
    finally:
        ours.disable_attention_chunking()
    assert rel_err(chunked.latents, whole.latents) <= 1e-5  # the same softmax rows, another summation order


def test_vae_stays_fp32_when_the_pipeline_is_cast(tiny):
    import copy

    pipe = copy.deepcopy(tiny.ours).to(dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and next(pipe.vae.parameters()).dtype == torch.float32
    out = pipe("x", low_res_picture(1), seed=1, num_inference_steps=2, output_type="np")
    ref = tiny.ours("x", low_res_picture(1), seed=1, num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all() and np.abs(out.images - ref.images).mean() < 0.05


# ----------------------------------------------------------------------------------------------------------------
# Loading: the single file (LDM layout) and the diffusers folder, strictly




@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    from tests.synth import write_synthetic_checkpoint

    folder = tmp_path_factory.mktemp("x4")
    return write_synthetic_checkpoint(tiny_x4_manifest(tiny.family), folder / "x4-tiny.safetensors")


def test_single_file_and_exported_folder_give_identical_outputs_and_diffusers_agrees(tiny, tiny_file, tmp_path):
    import diffusers

    from weights_convert.export import export_diffusers
    from weights_convert.load import load_components

    pipe = ldm.load_pipeline(tiny_file, family=tiny.family)
    assert type(pipe).__name__ == "StableDiffusionUpscalePipeline" and pipe.max_noise_level == 350
    folder = export_diffusers(load_components(tiny_file, family=tiny.family), tmp_path / "x4-folder")
    index = load_json(folder / "model_index.json")
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    from_folder = ldm.load_pipeline(folder)
    # the pipeline class follows the UNet's structure; tiny sizes are not the x4-upscaler family's
    assert isinstance(from_folder, ldm.StableDiffusionUpscalePipeline) and from_folder.family is None
    kw = dict(num_inference_steps=3, noise_level=40, negative_prompt="blurry")
    a = pipe("a red fox", low_res_picture(8), seed=6, output_type="np", **kw)
    b = from_folder("a red fox", low_res_picture(8), seed=6, output_type="np", **kw)
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.images, b.images)
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref_images, ref_latents = run_ref(ref, "a red fox", low_res_picture(8),
                                      generator=[torch.Generator().manual_seed(6)], **kw)
    assert rel_err(a.latents, ref_latents) <= LATENT_TOL
    assert_images_close(a.images, ref_images)


def test_folder_max_noise_level_and_low_res_schedule_are_read(tiny, tiny_file, tmp_path):
    from weights_convert.export import export_diffusers
    from weights_convert.load import load_components
    from weights_convert.safetensors_file import CheckpointError

    folder = export_diffusers(load_components(tiny_file, family=tiny.family), tmp_path / "f")
    index = load_json(folder / "model_index.json")
    (folder / "model_index.json").write_text(json.dumps({**index, "max_noise_level": 100}))
    low_res = folder / "low_res_scheduler" / "scheduler_config.json"
    low_res.write_text(json.dumps({**load_json(low_res), "beta_end": 0.03}))
    pipe = ldm.load_pipeline(folder)
    assert pipe.max_noise_level == 100 and pipe.low_res_scheduler["beta_end"] == 0.03
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        pipe("x", low_res_picture(1), noise_level=101)
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "max_noise_level"}))
    with pytest.raises(CheckpointError, match="max_noise_level"):
        ldm.load_pipeline(folder)


@pytest.mark.parametrize("damage, key, match", [
    ("unknown", "low_scale_model.mystery", "unexpected key"),
    ("missing", "first_stage_model.decoder.up.1.upsample.conv.weight", "missing key"),
    ("missing", "model.diffusion_model.label_emb.weight", "noise-level embedding"),
    ("shape", "model.diffusion_model.label_emb.weight", "shape mismatch"),
])
def test_damaged_x4_file_is_a_clear_error(tiny, tiny_file, tmp_path, damage, key, match):
    from weights_convert.safetensors_file import CheckpointError, SafetensorsFile, save_file

    src = SafetensorsFile(tiny_file)
    tensors = {k: src.tensor(k).clone() for k in src.keys()}
    if damage == "unknown":
        tensors[key] = torch.zeros(3)
    elif damage == "missing":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(999, tensors[key].shape[1])
    bad = save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=match) as info:
        ldm.load_pipeline(bad, family=tiny.family)
    assert key in str(info.value)


def test_x4_layout_is_detected_from_the_full_manifest_keys():
    from weights_convert.checkpoint import checkpoint_rules, detect_layout, resolve_family

    keys = load_json(FIXTURES / "x4_upscaler_ldm_keys.json")["keys"]
    shapes = {k: tuple(v["shape"]) for k, v in keys.items()}
    layout = detect_layout(set(keys), shapes, "x4.safetensors")
    assert layout.upscaler and layout.candidates == ("x4-upscaler",)
    preset = resolve_family(layout, None, Path("x4.safetensors"))
    assert preset is ldm.X4_UPSCALER
    rules = {r.source: r for r in checkpoint_rules(preset, layout)}
    assert set(keys) <= set(rules)  # every key of the official file has a rule
    assert rules["model.diffusion_model.label_emb.weight"].targets == ("class_embedding.weight",)
    dropped = {k for k in keys if rules[k].dropped}
    assert {k for k in dropped if k.startswith("low_scale_model.")} == {k for k in keys if k.startswith("low_scale_")}
    assert not any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in dropped)


# ----------------------------------------------------------------------------------------------------------------
# Full official shapes: a synthetic x4-upscaler-ema.safetensors, loaded by diffusers' from_single_file and by ours


@pytest.fixture(scope="module")
def x4_full(tmp_path_factory):
    import diffusers

    from tests.synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint("x4_upscaler", tmp_path_factory.mktemp("x4full") / "x4-upscaler-ema.safetensors")
    ref = diffusers.StableDiffusionUpscalePipeline.from_single_file(str(path), config=str(X4_CONFIGS),
                                                                    local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = ldm.load_pipeline(path)
    yield ref, ours
    del ref, ours
    path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    dict(noise_level=20, guidance_scale=9.0, negative_prompt="blurry"),
    dict(noise_level=200, guidance_scale=1.0),
])
def test_full_shape_x4_upscaler_matches_diffusers(x4_full, kw):
    """The whole x4 upscaler (473M UNet, 340M OpenCLIP-H, 55M f=4 VAE): 32x32 -> 128x128, 2 DDIM steps."""
    ref, ours = x4_full
    assert isinstance(ours, ldm.StableDiffusionUpscalePipeline) and ours.family.name == "x4-upscaler"
    ref_images, ref_latents = run_ref(ref, "a photo of a lighthouse", low_res_picture(9, 32),
                                      generator=[torch.Generator().manual_seed(3)], num_inference_steps=2, **kw)
    out = ours("a photo of a lighthouse", low_res_picture(9, 32), seed=3, num_inference_steps=2, output_type="np",
               **kw)
    assert out.images.shape == (1, 128, 128, 3)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL
    assert_images_close(out.images, ref_images)


def test_low_res_schedule_equals_the_official_files_low_scale_model_buffers():
    """Our rebuild of the input-noising schedule equals the `low_scale_model.alphas_cumprod` the single file
    stores (and drops): the same augmentation as the original LatentUpscaleDiffusion."""
    from ldm.upscale import LOW_RES_SCHEDULER, low_res_alphas_cumprod

    stored = load_json(FIXTURES / "x4_upscaler_ldm_keys.json")["schedule_buffer_values_reference"]
    want = torch.tensor(stored["low_scale_model.alphas_cumprod"], dtype=torch.float64)
    for config in (LOW_RES_SCHEDULER, LOW_RES):
        assert rel_err(low_res_alphas_cumprod(config), want) <= 1e-6
