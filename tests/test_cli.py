"""The `ldm generate` command end to end: real PNGs with readable generation parameters, determinism, numbered
batches, no clobbering, and every bad input answered with one line and exit status 2, nothing written.

The model is a tiny random pipeline saved by diffusers as a model folder (the layout `ldm.load_pipeline` reads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.cli import main
from ldm.images import parse_parameters, read_parameters
from tests.helpers import assert_images_close, disc_mask, picture, save_tiny_model_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.x model saved in the diffusers folder layout."""
    return save_tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny-sd")


def generate(model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m ldm generate` in a subprocess (the installed `ldm` script runs the same main())."""
    cmd = [sys.executable, "-m", "ldm", "generate", "a photo of a cat", "--model", str(model_dir), "--out", str(out),
           "--steps", "2", "--threads", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_generate_writes_a_png_with_a1111_parameters(model_dir, tmp_path):
    out = tmp_path / "cat.png"
    done = generate(model_dir, out, "--height", "64", "--width", "48", "--seed", "7", "--negative-prompt",
                    "blurry, dark", "--scheduler", "ddim", "--guidance", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (48, 64) and image.mode == "RGB"
    params = parse_parameters(read_parameters(out))
    assert params == {"Prompt": "a photo of a cat", "Negative prompt": "blurry, dark", "Steps": "2",
                      "Sampler": "DDIM", "CFG scale": "5.0", "Seed": "7", "Size": "48x64", "Model": "tiny-sd"}
    # the pixels are the library's for the same arguments (the command ran on 1 thread: rounding may differ)
    pipe = ldm.load_pipeline(model_dir)
    ref = pipe("a photo of a cat", negative_prompt="blurry, dark", height=64, width=48, num_inference_steps=2,
               guidance_scale=5.0, seed=7, scheduler="ddim", output_type="np").images
    assert_images_close(np.asarray(image, dtype=np.float32)[None] / 255, ref)
    assert not [p for p in tmp_path.iterdir() if p.name != "cat.png"], "a temporary file was left behind"


def test_inspect_reads_a_save_pretrained_folder(model_dir, capsys):
    """`ldm inspect DIR` on diffusers' own save_pretrained folder (its tokenizer: tokenizer.json only)."""
    assert not (model_dir / "tokenizer" / "vocab.json").exists()
    assert main(["inspect", str(model_dir), "--size", "64", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    pipe = ldm.load_pipeline(model_dir)
    for part in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert f"Total params: {sum(p.numel() for p in part.parameters()):,}" in out


def test_same_seed_gives_byte_identical_pngs(model_dir, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        done = generate(model_dir, out, "--height", "64", "--width", "64", "--seed", "123")
        assert done.returncode == 0, done.stderr
    assert a.read_bytes() == b.read_bytes()
    assert parse_parameters(read_parameters(a))["Sampler"] == "PLMS", "the model's own scheduler (PNDM)"


def test_num_images_writes_numbered_files_seed_plus_i(model_dir, tmp_path):
    out = tmp_path / "batch.png"
    assert main(["generate", "a cat", "--model", str(model_dir), "--out", str(out), "--steps", "2", "--height",
                 "64", "--width", "64", "--seed", "40", "--num-images", "3", "--scheduler", "euler-a"]) == 0
    files = [tmp_path / f"batch-{i}.png" for i in range(3)]
    assert sorted(tmp_path.iterdir()) == files
    assert [parse_parameters(read_parameters(f))["Seed"] for f in files] == ["40", "41", "42"]
    single = tmp_path / "single.png"
    assert main(["generate", "a cat", "--model", str(model_dir), "--out", str(single), "--steps", "2", "--height",
                 "64", "--width", "64", "--seed", "42", "--scheduler", "euler-a"]) == 0
    as_float = [np.asarray(Image.open(f), dtype=np.float32)[None] / 255 for f in (files[2], single)]
    assert_images_close(*as_float)


def test_img2img_and_inpaint(model_dir, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture(0).save(init)
    disc_mask().save(mask)
    out = tmp_path / "i2i.png"
    assert main(["generate", "a cat", "--model", str(model_dir), "--out", str(out), "--steps", "4", "--seed", "1",
                 "--init-image", str(init), "--strength", "0.5"]) == 0
    params = parse_parameters(read_parameters(out))
    assert params["Denoising strength"] == "0.5" and params["Size"] == "64x64"
    pipe = ldm.load_pipeline(model_dir)
    ref = pipe.img2img("a cat", init, strength=0.5, num_inference_steps=4, seed=1).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))
    out = tmp_path / "inpaint.png"
    assert main(["generate", "a cat", "--model", str(model_dir), "--out", str(out), "--steps", "2", "--seed", "1",
                 "--init-image", str(init), "--mask", str(mask)]) == 0
    ref = pipe.inpaint("a cat", init, mask, num_inference_steps=2, seed=1).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))


def test_existing_output_is_kept_unless_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    args = ["generate", "a cat", "--model", str(model_dir), "--out", str(out), "--steps", "1", "--height", "64",
            "--width", "64", "--seed", "0"]
    assert main(args) == 2
    assert "exists; use --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(args + ["--overwrite"]) == 0
    assert Image.open(out).size == (64, 64)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written


@pytest.mark.parametrize("extra,message", [
    (["--height", "60"], "--height must be a positive multiple of 8"),
    (["--width", "0"], "--width must be a positive multiple of 8"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--guidance", "-1"], "--guidance must be >= 0"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--init-image", "{init}", "--strength", "0"], r"--strength must be in (0, 1]"),
    (["--init-image", "{init}", "--strength", "1.5"], r"--strength must be in (0, 1]"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "{init}", "--mask", "{small_mask}"], "--mask is 32x32 but --init-image is 64x64"),
    (["--init-image", "{garbage}"], "cannot read"),
    (["--init-image", "{missing}"], "no such file"),
    (["--init-image", "{odd}"], "must be multiples of 8"),
    (["--model", "{missing}"], "--model: no such file or folder"),
    (["--model", "./nowhere/model.safetensors"], "--model: no such file or folder"),
    (["--out", "{missing_dir}/x.png"], "does not exist"),
    (["--out", "{tmp}/x.jpg"], "must name a .png file"),
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs --device cuda"),
])
def test_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, capsys, extra, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    picture(0).save(inputs / "init.png")
    picture(0).resize((60, 64)).save(inputs / "odd.png")
    disc_mask(32).save(inputs / "small_mask.png")
    (inputs / "garbage.png").write_bytes(b"\x89PNG but not really")
    names = {"init": inputs / "init.png", "small_mask": inputs / "small_mask.png", "garbage": inputs / "garbage.png",
             "odd": inputs / "odd.png", "missing": tmp_path / "missing.png", "missing_dir": tmp_path / "no_dir",
             "tmp": tmp_path}
    extra = [e.format(**names) for e in extra]
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(model_dir), "--out", str(out), "--steps", "2", *extra]
    before = sorted(tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm generate: error:") and message in err and "\n" not in err, err
    assert sorted(tmp_path.rglob("*")) == before, "nothing may be written"


def test_argparse_errors_exit_2(model_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--model", str(model_dir), "--out", str(tmp_path / "x.png"), "--scheduler", "heun"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--out", str(tmp_path / "x.png"), "--steps", "many"])
    assert e.value.code == 2
    assert not list(tmp_path.iterdir())


def test_unloadable_model_exits_2(tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    assert main(["generate", "a cat", "--model", str(folder), "--out", str(tmp_path / "x.png"), "--steps", "1"]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_default_out_is_the_prompt_and_never_replaces_a_file(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "A cat, on a mat!", "--model", str(model_dir), "--steps", "1", "--height", "32", "--width",
            "32", "--seed", "3"]
    assert main(args) == 0
    assert main(args) == 0
    assert main([*args, "--num-images", "2"]) == 0
    written = capsys.readouterr().out.split()
    assert written == ["a-cat-on-a-mat.png", "a-cat-on-a-mat-1.png", "a-cat-on-a-mat-1-0.png",
                       "a-cat-on-a-mat-1-1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)
    first, second = (np.asarray(Image.open(tmp_path / name)) for name in written[:2])
    np.testing.assert_array_equal(first, second)  # the same seed: only the name differs


def test_without_model_and_without_the_packaged_one_exits_2(tmp_path, monkeypatch, capsys):
    import ldm.train

    monkeypatch.setattr(ldm.train, "DEFAULT_MODEL_DIR", tmp_path / "nowhere")
    assert main(["generate", "a cat", "--out", str(tmp_path / "x.png"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no --model given and the packaged model is missing" in err and "nowhere" in err
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# The memory switches from the command line (formerly tests/test_pipeline_memory.py): `--attention-chunk N` is
# checked before loading (N >= 1, exit 2, nothing written); `--vae-tiling --attention-chunk 64` writes a PNG with the
# usual parameters and nothing more; `load_pipeline(optimize=True)` pulls the levers.


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_attention_chunk_must_be_positive(model_dir, tmp_path, capsys, value):
    before = sorted(tmp_path.rglob("*"))
    code = main(["generate", "a cat", "--model", str(model_dir), "--out", str(tmp_path / "x.png"), "--steps", "2",
                 "--attention-chunk", value])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ldm generate: error: --attention-chunk must be >= 1, got {value}", err
    assert sorted(tmp_path.rglob("*")) == before, "nothing may be written"


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_cli_vae_tiling_and_attention_chunk_write_a_png(model_dir, tmp_path):
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


@pytest.mark.usefixtures("one_thread")  # tests/conftest.py
def test_load_pipeline_optimize(model_dir):
    pipe = ldm.load_pipeline(model_dir, optimize=True)
    assert pipe.levers is not None and not (pipe.levers.fuse or pipe.levers.compile)  # the CPU defaults: none
    assert ldm.load_pipeline(model_dir).levers is None
    with pytest.raises(TypeError, match="optimize must be a bool"):
        ldm.load_pipeline(model_dir, optimize="yes")
