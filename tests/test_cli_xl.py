"""`ldm generate` with SDXL models: the base alone, the base + refiner hand-off (--refiner, --refiner-start), the
SDXL options, and their errors (one line, exit status 2, nothing written).

The models are the tiny SDXL base and refiner of tests/helpers_xl.py saved by diffusers as model folders.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ldm
from ldm.cli import main
from ldm.images import parse_parameters, read_parameters
from tests.helpers import assert_images_close, disc_mask, picture, save_tiny_model_folder
from tests.helpers_xl import save_tiny_sdxl_folders

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base folder, refiner folder) of the tiny SDXL models."""
    return save_tiny_sdxl_folders(tmp_path_factory.mktemp("sdxl"))


def generate(base, out, *extra: str) -> int:
    size = [] if "--init-image" in extra else ["--height", "64", "--width", "64"]
    return main(["generate", "a lighthouse at dusk", "--model", str(base), "--out", str(out), "--steps", "5",
                 "--seed", "3", *size, *extra])


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)[None] / 255


def test_base_and_refiner_hand_off(models, tmp_path):
    """--refiner runs the base to --refiner-start and the refiner from its latents: the library's hand-off, with
    the micro-conditioning and aesthetic options passed through; the PNG records the refiner."""
    base_dir, refiner_dir = models
    out = tmp_path / "refined.png"
    assert generate(base_dir, out, "--refiner", str(refiner_dir), "--refiner-start", "0.7", "--prompt-2",
                    "an oil painting", "--original-size", "96", "128", "--aesthetic-score", "7.5",
                    "--negative-prompt", "fog") == 0
    params = parse_parameters(read_parameters(out))
    assert params["Refiner"] == "tiny-sdxl-refiner" and params["Refiner switch at"] == "0.7"
    base, refiner = ldm.load_pipeline(base_dir), ldm.load_pipeline(refiner_dir)
    assert isinstance(base, ldm.StableDiffusionXLPipeline) and refiner.requires_aesthetics_score
    kw = dict(num_inference_steps=5, seed=3, guidance_scale=7.5, negative_prompt="fog", prompt_2="an oil painting",
              original_size=(96, 128))
    latents = base("a lighthouse at dusk", height=64, width=64, denoising_end=0.7, output_type="latent", **kw).latents
    want = refiner.img2img("a lighthouse at dusk", latents, denoising_start=0.7, aesthetic_score=7.5,
                           output_type="np", **kw).images
    assert_images_close(png(out), want)


def test_base_alone_and_inpainting_hand_off(models, tmp_path):
    """An SDXL --model without --refiner is the base's txt2img; with --init-image and --mask the base inpaints and
    the refiner finishes the inpainting from its latents."""
    base_dir, refiner_dir = models
    base, refiner = ldm.load_pipeline(base_dir), ldm.load_pipeline(refiner_dir)
    out = tmp_path / "base.png"
    assert generate(base_dir, out, "--crops-coords-top-left", "0", "32") == 0
    want = base("a lighthouse at dusk", height=64, width=64, num_inference_steps=5, seed=3, guidance_scale=7.5,
                crops_coords_top_left=(0, 32), output_type="np").images
    assert_images_close(png(out), want)

    picture(4).save(tmp_path / "in.png")
    disc_mask().save(tmp_path / "mask.png")
    out = tmp_path / "inpainted.png"
    assert generate(base_dir, out, "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                    "--strength", "0.9", "--refiner", str(refiner_dir)) == 0
    kw = dict(num_inference_steps=5, seed=3, guidance_scale=7.5, strength=0.9)
    latents = base.inpaint("a lighthouse at dusk", picture(4), disc_mask(), denoising_end=0.8, output_type="latent",
                           **kw).latents
    want = refiner.inpaint("a lighthouse at dusk", latents, disc_mask(), denoising_start=0.8, output_type="np",
                           **kw).images
    assert_images_close(png(out), want)


@pytest.mark.parametrize("extra,message", [
    (["--refiner-start", "0.5"], "--refiner-start needs --refiner"),
    (["--aesthetic-score", "7"], "--aesthetic-score conditions the SDXL refiner"),
    (["--hires-scale", "2"], "not supported with SDXL"),
    (["--prompts", "p.txt", "--outdir", "o", "--refiner", "r"], "--refiner is not available with --prompts"),
])
def test_bad_sdxl_options_exit_2(models, tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    assert generate(models[0], out, *extra) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_sdxl_options_on_other_models_and_the_refiner_alone_exit_2(models, tmp_path, capsys):
    out = tmp_path / "x.png"
    sd = save_tiny_model_folder(tmp_path / "tiny-sd")
    assert generate(sd, out, "--prompt-2", "a sketch") == 2
    assert "--prompt-2 need an SDXL --model" in capsys.readouterr().err
    assert generate(models[1], out) == 2  # the refiner has no txt2img
    assert "aesthetic scores (the SDXL refiner)" in capsys.readouterr().err
    assert generate(models[1], out, "--refiner", str(models[1])) == 2
    assert "is an SDXL refiner" in capsys.readouterr().err
    assert generate(models[0], out, "--refiner", str(sd)) == 2
    assert "is not an SDXL model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a fraction in (0, 1)
        generate(models[0], out, "--refiner", str(models[1]), "--refiner-start", "1.5")
    assert exit_info.value.code == 2 and not out.exists()
