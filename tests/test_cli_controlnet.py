"""`ldm generate --controlnet ... --control-image ...`: the image equals the library's for the same arguments, the
Canny preprocessing runs, and bad ControlNet files or arguments are one line on stderr and exit status 2."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import diffusers
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import ldm
from ldm.canny import canny_image
from ldm.cli import main
from tests.helpers import UNET, assert_images_close, picture, save_tiny_model_folder, trained_like_
from weights_convert.controlnet import controlnet_rules

HINT = (8, 16, 16, 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny model folder, a matching ControlNet as a diffusers folder and as a 1.1-layout file, bad files."""
    root = tmp_path_factory.mktemp("cn-cli")
    kw = {k: UNET[k] for k in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
                               "cross_attention_dim", "attention_head_dim", "norm_num_groups")}
    ref = trained_like_(diffusers.ControlNetModel(**kw, conditioning_embedding_out_channels=HINT), seed=21)
    ref.save_pretrained(root / "cn")
    cfg = ldm.controlnet.ControlNetConfig.from_diffusers(dict(ref.config))
    sd = ref.state_dict()
    original = {r.source: sd[r.targets[0]].contiguous() for r in controlnet_rules(cfg)}
    save_file(original, root / "control_tiny.safetensors")
    save_file({k: v for k, v in original.items() if "zero_convs" not in k}, root / "nozero.safetensors")
    wide = trained_like_(diffusers.ControlNetModel(**{**kw, "cross_attention_dim": 64},
                                                   conditioning_embedding_out_channels=HINT), seed=22)
    wide_sd = wide.state_dict()
    wide_cfg = ldm.controlnet.ControlNetConfig.from_diffusers(dict(wide.config))
    save_file({r.source: wide_sd[r.targets[0]].contiguous() for r in controlnet_rules(wide_cfg)},
              root / "wide.safetensors")
    with open(root / "evil.pth", "wb") as f:
        pickle.dump({"x": warnings.WarningMessage("m", UserWarning, "f", 1)}, f)
    picture(5, size=64).save(root / "photo.png")
    return {"model": save_tiny_model_folder(root / "model"), "folder": root / "cn", "root": root}


def run(files, out: Path, *extra: str) -> int:
    return main(["generate", "a photo of a cat", "--model", str(files["model"]), "--out", str(out), "--steps", "2",
                 "--seed", "3", "--scheduler", "ddim", *extra])


def test_generate_with_canny_controlnet_matches_the_library(files, tmp_path) -> None:
    out = tmp_path / "cn.png"
    photo = files["root"] / "photo.png"
    assert run(files, out, "--controlnet", str(files["root"] / "control_tiny.safetensors"), "--control-image",
               str(photo), "--control-preprocess", "canny", "--canny-low", "50", "--canny-high", "120",
               "--control-scale", "0.6", "--control-end", "0.5") == 0
    pipe = ldm.load_pipeline(files["model"], controlnet=files["folder"])  # the same weights, diffusers layout
    edges = canny_image(Image.open(photo), 50, 120)
    ref = pipe("a photo of a cat", control_image=edges, controlnet_conditioning_scale=0.6, control_guidance_end=0.5,
               num_inference_steps=2, seed=3, scheduler="ddim", output_type="np").images
    image = np.asarray(Image.open(out), dtype=np.float32)[None] / 255
    assert image.shape[1:3] == (64, 64)  # the control image's size
    assert_images_close(image, ref)
    plain = pipe("a photo of a cat", control_image=edges, controlnet_conditioning_scale=0.0, num_inference_steps=2,
                 seed=3, scheduler="ddim", output_type="np").images
    assert np.abs(plain - ref).max() > 1 / 255  # the ControlNet did change the picture


def test_img2img_without_control_scale_takes_the_entry_points_default(files, tmp_path) -> None:
    # No --control-scale: the library's (diffusers') img2img default, 0.8, not txt2img's 1.0.
    out, photo = tmp_path / "cn-i2i.png", files["root"] / "photo.png"
    assert run(files, out, "--controlnet", str(files["folder"]), "--control-image", str(photo), "--init-image",
               str(photo), "--strength", "1.0") == 0
    pipe = ldm.load_pipeline(files["model"], controlnet=files["folder"])
    ref = pipe.img2img("a photo of a cat", Image.open(photo), strength=1.0, control_image=Image.open(photo),
                       num_inference_steps=2, seed=3, scheduler="ddim", output_type="np").images
    assert_images_close(np.asarray(Image.open(out), dtype=np.float32)[None] / 255, ref)
    full = pipe.img2img("a photo of a cat", Image.open(photo), strength=1.0, control_image=Image.open(photo),
                        controlnet_conditioning_scale=1.0, num_inference_steps=2, seed=3, scheduler="ddim",
                        output_type="np").images
    assert np.abs(full - ref).max() > 1 / 255  # the default matters: txt2img's 1.0 gives another picture


@pytest.mark.parametrize("name, extra, message", [
    ("nozero", ["--controlnet", "{root}/nozero.safetensors", "--control-image", "{root}/photo.png"],
     "missing key"),
    ("wide", ["--controlnet", "{root}/wide.safetensors", "--control-image", "{root}/photo.png"], "cannot control"),
    ("evil", ["--controlnet", "{root}/evil.pth", "--control-image", "{root}/photo.png", "--allow-pickle"],
     "weights_only"),
    ("pickle-refused", ["--controlnet", "{root}/evil.pth", "--control-image", "{root}/photo.png"], "allow_pickle"),
    ("count", ["--controlnet", "{root}/cn", "--controlnet", "{root}/cn", "--control-image", "{root}/photo.png"],
     "give one each"),
    ("no-net", ["--control-image", "{root}/photo.png"], "needs --controlnet"),
    ("window", ["--controlnet", "{root}/cn", "--control-image", "{root}/photo.png", "--control-start", "0.9",
                "--control-end", "0.1"], "start < end"),
    ("no-image", ["--controlnet", "{root}/cn", "--control-image", "{root}/missing.png"], "no such file"),
])
def test_bad_controlnet_inputs_exit_2(files, tmp_path, capsys, name, extra, message) -> None:
    out = tmp_path / "x.png"
    args = [a.format(root=files["root"]) for a in extra]
    assert run(files, out, *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
