"""`ldm upscale` and the hires fix (`ldm.hires.hires_fix`, `ldm generate --hires-*`) end to end: real PNGs with
their parameters read back, the library's pixels, and every bad input answered with exit status 2, nothing written.

Models: a tiny random x4 upscaler (tests/test_upscale.py's sizes) written as a synthetic single file, exported to a
diffusers folder; the packaged shapes model (ldm/data/shapes-model) for the hires fix, as on a fresh machine.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm
from ldm.cli import main
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
from ldm.hires import hires_fix
from ldm.images import parse_parameters, read_parameters
from ldm.train import DEFAULT_MODEL_DIR
from tests.helpers import X4_CLIP as CLIP
from tests.helpers import X4_UNET as UNET
from tests.helpers import X4_VAE as VAE
from tests.helpers import assert_images_close, tiny_x4_manifest
from tests.helpers import x4_low_res_picture as low_res_picture

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def x4_folder(tmp_path_factory) -> Path:
    """A tiny random x4 upscaler in the diffusers folder layout (what `--model` reads without more flags)."""
    from tests.synth import write_synthetic_checkpoint
    from weights_convert.export import export_diffusers
    from weights_convert.load import load_components

    family = dataclasses.replace(ldm.X4_UPSCALER, unet=UNetConfig.from_diffusers(UNET),
                                 vae=VAEConfig.from_diffusers(VAE), text=CLIPTextConfig.from_transformers(CLIP))
    root = tmp_path_factory.mktemp("x4cli")
    file = write_synthetic_checkpoint(tiny_x4_manifest(family), root / "tiny-x4.safetensors")
    return export_diffusers(load_components(file, family=family), root / "tiny-x4")


@pytest.fixture(scope="module")
def shapes():
    return ldm.load_pipeline(DEFAULT_MODEL_DIR)


def ldm_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m ldm ...` in a subprocess: the real command (the installed `ldm` script runs the same main())."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ldm", *args, "--threads", "1"], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture
def ldm_main(capsys):
    """main(argv) in this process (no interpreter start-up: the checks and short runs stay fast)."""
    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([*args, "--threads", "1"])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


# ----------------------------------------------------------------------------------------------------------------
# ldm upscale


def test_upscale_writes_a_4x_png_with_its_parameters(x4_folder, tmp_path):
    low_res_picture(3).save(tmp_path / "small.png")
    out = tmp_path / "big.png"
    done = ldm_cli("upscale", str(tmp_path / "small.png"), "--model", str(x4_folder), "--prompt", "a cat, sharp",
                   "--negative-prompt", "blurry", "--out", str(out), "--steps", "3", "--noise-level", "40",
                   "--guidance", "6", "--seed", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (64, 64)
    params = parse_parameters(read_parameters(out))
    assert params == {"Prompt": "a cat, sharp", "Negative prompt": "blurry", "Steps": "3", "Sampler": "DDIM",
                      "CFG scale": "6.0", "Seed": "5", "Size": "64x64", "Model": "tiny-x4", "Noise level": "40",
                      "Upscale": "4", "Source size": "16x16"}
    ref = ldm.load_pipeline(x4_folder)("a cat, sharp", low_res_picture(3), negative_prompt="blurry",
                                       num_inference_steps=3, noise_level=40, guidance_scale=6.0, seed=5,
                                       output_type="np").images
    assert_images_close(np.asarray(image, dtype=np.float32)[None] / 255, ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "small.png"]  # no temporary file left


def test_upscale_default_name_and_vae_tiling(x4_folder, tmp_path, ldm_main, monkeypatch):
    low_res_picture(4, 32).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    for expected in ("photo-x4.png", "photo-x4-1.png"):  # the automatic name never replaces a file
        done = ldm_main("upscale", "photo.png", "--model", str(x4_folder), "--steps", "1", "--vae-tiling",
                        "--seed", "1")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected and Image.open(tmp_path / expected).size == (128, 128)


@pytest.mark.parametrize("args, message", [
    (["--noise-level", "351"], "noise_level must be an int in [0, 350]"),  # the model's limit, after loading
    (["--noise-level", "-1"], "--noise-level must be >= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["IMAGE=odd"], "multiples of 8"),
    (["IMAGE=missing"], "no such file"),
    (["MODEL=shapes"], "not the x4 upscaler"),
    (["MODEL=missing"], "--model: no such file"),
    (["OUT=exists"], "exists; use --overwrite"),
    (["OUT=jpg"], "--out must name a .png"),
])
def test_upscale_bad_input_exits_2_and_writes_nothing(x4_folder, tmp_path, ldm_main, args, message):
    low_res_picture(1).save(tmp_path / "in.png")
    low_res_picture(1, 20).resize((20, 12)).save(tmp_path / "odd.png")
    (tmp_path / "old.png").write_bytes(b"keep me")
    image, model, out, rest = tmp_path / "in.png", str(x4_folder), tmp_path / "out.png", []
    for a in args:
        if a.startswith("IMAGE="):
            image = tmp_path / {"odd": "odd.png", "missing": "nope.png"}[a[6:]]
        elif a.startswith("MODEL="):
            model = {"shapes": str(DEFAULT_MODEL_DIR), "missing": str(tmp_path / "nope")}[a[6:]]
        elif a.startswith("OUT="):
            out = tmp_path / {"exists": "old.png", "jpg": "out.jpg"}[a[4:]]
        else:
            rest.append(a)
    before = sorted(p.name for p in tmp_path.iterdir())
    done = ldm_main("upscale", str(image), "--model", model, "--out", str(out), "--steps", "1", *rest)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and done.stderr.startswith("ldm upscale: error:"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "old.png").read_bytes() == b"keep me"


# ----------------------------------------------------------------------------------------------------------------
# The hires fix


def test_hires_fix_pixel_is_txt2img_then_img2img_on_the_enlarged_picture(shapes):
    """The recipe by hand: the base image, Lanczos-enlarged, through img2img with the same seed: the same pixels."""
    kw = dict(num_inference_steps=6, seed=4, guidance_scale=5.0)
    out = hires_fix(shapes, "a red circle", scale=2, strength=0.5, upscaler="pixel", output_type="np", **kw)
    base = shapes("a red circle", **kw).images[0]
    by_hand = shapes.img2img("a red circle", base.resize((128, 128), Image.LANCZOS), strength=0.5,
                             output_type="np", **kw)
    assert out.images.shape == (1, 128, 128, 3) and out.seeds == [4] and out.steps_run == 3
    assert np.array_equal(out.images, by_hand.images)


def test_hires_fix_latent_and_x4_model(shapes, x4_folder):
    kw = dict(num_inference_steps=4, seed=2, num_images_per_prompt=2)
    latent = hires_fix(shapes, "a blue square", scale=1.5, strength=0.6, hires_steps=5, output_type="np", **kw)
    assert latent.images.shape == (2, 96, 96, 3) and latent.steps_run == 3  # 64 * 1.5 = 96, int(5 * 0.6) steps
    assert not np.array_equal(latent.images[0], latent.images[1])  # image i has seed 2 + i in both passes
    x4 = ldm.load_pipeline(x4_folder)
    through = hires_fix(shapes, "a blue square", scale=2, upscaler=x4, upscaler_kwargs={"num_inference_steps": 2},
                        output_type="np", **kw)
    assert through.images.shape == (2, 128, 128, 3) and np.isfinite(through.images).all()
    with pytest.raises(ValueError, match="scale"):
        hires_fix(shapes, "x", scale=1.0)
    with pytest.raises(ValueError, match="upscaler"):
        hires_fix(shapes, "x", upscaler="esrgan")


def test_generate_hires_writes_the_large_png_with_a1111_fields(tmp_path, x4_folder, ldm_main):
    out = tmp_path / "hr.png"
    done = ldm_cli("generate", "a green triangle", "--out", str(out), "--steps", "4", "--seed", "3",
                   "--hires-scale", "2", "--hires-strength", "0.4", "--hires-steps", "5", "--hires-upscaler", "pixel")
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (128, 128)
    params = parse_parameters(read_parameters(out))
    assert {k: params[k] for k in ("Size", "Seed", "Denoising strength", "Hires upscale", "Hires steps",
                                   "Hires upscaler")} == {"Size": "64x64", "Seed": "3", "Denoising strength": "0.4",
                                                          "Hires upscale": "2.0", "Hires steps": "5",
                                                          "Hires upscaler": "Lanczos"}
    out2 = tmp_path / "hr-x4.png"
    done = ldm_main("generate", "a green triangle", "--out", str(out2), "--steps", "2", "--seed", "3",
                   "--hires-scale", "2", "--hires-model", str(x4_folder))
    assert done.returncode == 0, done.stderr
    assert Image.open(out2).size == (128, 128)
    assert parse_parameters(read_parameters(out2))["Hires upscaler"] == "tiny-x4"


@pytest.mark.parametrize("args, message", [
    (["--hires-scale", "1"], "--hires-scale must be in (1, 8]"),
    (["--hires-strength", "0.5"], "--hires-strength needs --hires-scale"),
    (["--hires-scale", "2", "--hires-strength", "0"], "--hires-strength must be in (0, 1]"),
    (["--hires-scale", "2", "--hires-steps", "0"], "--hires-steps must be >= 1"),
    (["--hires-scale", "2", "--hires-model", "nope/missing.safetensors"], "--hires-model: no such file"),
    (["--hires-scale", "2", "--hires-model", "SHAPES"], "not the x4 upscaler"),
    (["--model", "X4"], "is the x4 upscaler: use `ldm upscale"),
    (["--hires-scale", "2", "--controlnet", "cn.safetensors", "--control-image", "edges.png"],
     "--hires-scale does not take --controlnet"),
])
def test_generate_hires_bad_input_exits_2_and_writes_nothing(tmp_path, ldm_main, x4_folder, args, message):
    args = [{"SHAPES": str(DEFAULT_MODEL_DIR), "X4": str(x4_folder)}.get(a, a) for a in args]
    done = ldm_main("generate", "a red circle", "--out", str(tmp_path / "x.png"), "--steps", "1", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())
