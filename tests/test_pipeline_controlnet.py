"""ControlNet pipelines: parity with diffusers' StableDiffusionControlNetPipeline and its img2img / inpaint siblings.

Same tiny weights (the `tiny` fixture plus tiny ControlNets with trained-like weights, so the zero convolutions
are not zero), same prompts and seeds; the contract's tolerances: final latents within 1e-4 relative, uint8
images at most 1 level apart on at most 0.1% of the values. The control image is deliberately not at the output
size, so the resize (Lanczos, as diffusers) is covered.
"""

from __future__ import annotations

import copy
import dataclasses

import diffusers
import pytest
import torch

import ldm
from ldm.controlnet import ControlNetConfig, ControlNetModel
from tests.helpers import (LATENT_TOL, SIZE, UNET, assert_images_close, assert_rel, disc_mask, picture,
                           pipelines, run_ref, trained_like_)

STEPS = 3
HINT = (8, 16, 16, 32)  # a 4-level hint encoder: 8x down, the VAE's factor


def controlnet_pair(seed: int) -> tuple[diffusers.ControlNetModel, ControlNetModel]:
    kw = {k: UNET[k] for k in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
                               "cross_attention_dim", "attention_head_dim", "norm_num_groups")}
    ref = trained_like_(diffusers.ControlNetModel(**kw, conditioning_embedding_out_channels=HINT), seed=seed).eval()
    ours = ControlNetModel(ControlNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def nets():
    return [controlnet_pair(11), controlnet_pair(12)]


def with_controlnets(plain: ldm.StableDiffusionPipeline, nets: list) -> ldm.StableDiffusionControlNetPipeline:
    """Our ControlNet pipeline from a plain one's parts, as a diffusers user composes one."""
    return ldm.StableDiffusionControlNetPipeline(unet=plain.unet, vae=plain.vae, text_encoder=plain.text_encoder,
                                                 tokenizer=plain.tokenizer, scheduler=plain.scheduler,
                                                 family=plain.family, controlnet=nets)


def controlled(tiny, nets, n: int, kind: str = "txt2img", inpainting: bool = False):
    """(diffusers ControlNet pipeline, ours) with the first n tiny ControlNets."""
    plain_ref, plain = pipelines(tiny, scheduler="ddim", inpainting=inpainting, kind=kind)
    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
    refs = [r for r, _ in nets[:n]]
    ref = cls(**{k: getattr(plain_ref, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
              controlnet=refs[0] if n == 1 else refs, safety_checker=None, feature_extractor=None,
              requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, with_controlnets(plain, [o for _, o in nets[:n]])


def compare(ref, ours, call: str, args: tuple, ref_kw: dict, our_kw: dict, seed: int = 7, n_images: int = 2):
    images, latents = run_ref(ref, *args, seed=seed, n_images=n_images, num_images_per_prompt=n_images,
                              num_inference_steps=STEPS, **ref_kw)
    fn = ours if call == "txt2img" else getattr(ours, call)
    out = fn(*args, seed=seed, num_images_per_prompt=n_images, num_inference_steps=STEPS, output_type="np",
             **our_kw)
    assert_rel(out.latents, latents, LATENT_TOL, "final latents")
    assert_images_close(out.images, images)
    return out


CONTROL = picture(3, size=SIZE + 32)  # 96x96 control image, resized to the 64x64 output


TXT2IMG_CASES = {
    # name: (number of ControlNets, the ControlNet keyword arguments (diffusers' names, ours too))
    "single": (1, dict(controlnet_conditioning_scale=0.8)),
    "single-window": (1, dict(control_guidance_start=0.3, control_guidance_end=0.7)),
    "guess-mode": (1, dict(guess_mode=True, controlnet_conditioning_scale=1.2)),
    "double": (2, dict(controlnet_conditioning_scale=[0.7, 1.1], control_guidance_start=[0.0, 0.4],
                       control_guidance_end=[0.6, 1.0])),
}


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_txt2img_parity(tiny, nets, case: str) -> None:
    n, kw = TXT2IMG_CASES[case]
    ref, ours = controlled(tiny, nets, n)
    images = [CONTROL, picture(4)][:n]
    ref_images = images[0] if n == 1 else images
    compare(ref, ours, "txt2img", ("a photo of a cat",),
            dict(image=ref_images, height=SIZE, width=SIZE, negative_prompt="blurry", **kw),
            dict(control_image=images, height=SIZE, width=SIZE, negative_prompt="blurry", **kw))


# the ControlNet arguments left out use each entry point's defaults, which differ in diffusers (scale 1.0 / 0.8 / 0.5)
@pytest.mark.parametrize("scale", [{"controlnet_conditioning_scale": 0.9}, {}], ids=["scale-0.9", "default-scale"])
def test_img2img_parity(tiny, nets, scale: dict) -> None:
    ref, ours = controlled(tiny, nets, 1, kind="img2img")
    kw = dict(strength=0.7, **scale)
    # diffusers resizes the control image to height/width, not to the init image, so give it the size
    compare(ref, ours, "img2img", ("a photo of a cat", picture(1)),
            dict(control_image=CONTROL, height=SIZE, width=SIZE, **kw), dict(control_image=CONTROL, **kw))


@pytest.mark.parametrize("inpainting, scale", [(False, {"controlnet_conditioning_scale": 0.9}), (True, {})],
                         ids=["blend-4ch", "inpaint-9ch-default-scale"])
def test_inpaint_parity(tiny, nets, inpainting: bool, scale: dict) -> None:
    ref, ours = controlled(tiny, nets, 1, kind="inpaint", inpainting=inpainting)
    kw = dict(strength=1.0, **scale)
    compare(ref, ours, "inpaint", ("a photo of a cat", picture(1), disc_mask()),
            dict(control_image=CONTROL, height=SIZE, width=SIZE, **kw), dict(control_image=CONTROL, **kw))


def test_scale_zero_equals_no_controlnet(tiny, nets) -> None:
    """Zero residuals are added exactly: scale 0 gives the plain pipeline's latents, bit for bit, on every entry
    point (no extra random draws either)."""
    _, plain = pipelines(tiny, scheduler="ddim")
    ours = with_controlnets(plain, [nets[0][1]])
    kw = dict(seed=3, num_inference_steps=STEPS, output_type="latent")
    zero = dict(control_image=CONTROL, controlnet_conditioning_scale=0.0)
    calls = {"txt2img": (("a photo of a cat",), dict(height=SIZE, width=SIZE)),
             "img2img": (("a photo of a cat", picture(1)), dict(strength=0.7)),
             "inpaint": (("a photo of a cat", picture(1), disc_mask()), {})}
    for call, (args, call_kw) in calls.items():
        controlled_fn, plain_fn = (ours, plain) if call == "txt2img" else (getattr(ours, call), getattr(plain, call))
        assert torch.equal(controlled_fn(*args, **zero, **call_kw, **kw).latents,
                           plain_fn(*args, **call_kw, **kw).latents), call


def test_argument_errors(tiny, nets) -> None:
    _, ours = controlled(tiny, nets, 2)
    kw = dict(num_inference_steps=1, height=SIZE, width=SIZE, output_type="latent")
    with pytest.raises(ValueError, match="one per ControlNet"):
        ours("x", control_image=CONTROL, **kw)
    with pytest.raises(ValueError, match="pass control_image"):
        ours("x", **kw)
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        ours("x", control_image=[CONTROL, CONTROL], control_guidance_start=0.8, control_guidance_end=0.2, **kw)
    with pytest.raises(ValueError, match="3 entries for 2"):
        ours("x", control_image=[CONTROL, CONTROL], controlnet_conditioning_scale=[1, 1, 1], **kw)
    with pytest.raises(ValueError, match="pass control_image"):  # every entry point checks, before any work
        ours.img2img("x", picture(1), **kw)
    with pytest.raises(TypeError, match="guess_mode must be a bool"):
        ours.inpaint("x", picture(1), disc_mask(), control_image=[CONTROL, CONTROL], guess_mode=1, **kw)
    # the plain pipeline takes no ControlNet arguments (as diffusers' StableDiffusionPipeline)
    _, plain = pipelines(tiny, scheduler="ddim")
    with pytest.raises(TypeError, match="control_image"):
        plain("x", control_image=CONTROL, **kw)


def test_construction_checks(tiny, nets) -> None:
    """The ControlNet pipeline needs ControlNets that fit its UNet, and moves them with .to()."""
    _, plain = pipelines(tiny, scheduler="ddim")
    with pytest.raises(ValueError, match="needs at least one ControlNet"):
        with_controlnets(plain, [])
    with pytest.raises(TypeError, match=r"controlnet\[1\] must be an ldm.controlnet.ControlNetModel"):
        with_controlnets(plain, [nets[0][1], plain.unet])
    wide_cfg = ControlNetConfig(unet=dataclasses.replace(nets[0][1].config.unet, cross_attention_dim=48),
                                hint_channels=HINT)
    with pytest.raises(ValueError, match="cross_attention_dim=48 but the UNet has 32: it cannot control"):
        with_controlnets(plain, ControlNetModel(wide_cfg))
    ours = with_controlnets(plain, copy.deepcopy(nets[0][1]))
    assert isinstance(ours, ldm.StableDiffusionPipeline) and len(ours.controlnet) == 1
    with pytest.raises(ValueError, match="with control_image="):  # the plain entry point alone never runs uncontrolled
        ldm.StableDiffusionPipeline.__call__(ours, "x", num_inference_steps=1, height=SIZE, width=SIZE,
                                             output_type="latent")
    ours.to(dtype=torch.bfloat16)
    assert next(ours.controlnet[0].parameters()).dtype == torch.bfloat16


def test_load_pipeline_with_controlnet(tmp_path, nets) -> None:
    """load_pipeline(model, controlnet=[folder, folder]) on the tiny model folder; a ControlNet of another width
    is refused naming the mismatch."""
    from tests.helpers import save_tiny_model_folder

    model = save_tiny_model_folder(tmp_path / "model")
    nets[0][0].save_pretrained(tmp_path / "cn0")
    pipe = ldm.load_pipeline(model, controlnet=[tmp_path / "cn0", tmp_path / "cn0"])
    assert isinstance(pipe, ldm.StableDiffusionControlNetPipeline) and len(pipe.controlnet) == 2
    assert type(ldm.load_pipeline(model)) is ldm.StableDiffusionPipeline  # without ControlNets, the plain class
    assert torch.equal(pipe.controlnet[0].controlnet_mid_block.weight, nets[0][1].controlnet_mid_block.weight)
    wide = diffusers.ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     attention_head_dim=(2, 4), norm_num_groups=32,
                                     conditioning_embedding_out_channels=HINT)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="cross_attention_dim=48"):
        ldm.load_pipeline(model, controlnet=tmp_path / "wide")
