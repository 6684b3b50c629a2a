"""The commands under bad input (issue #23): `ldm generate`, `ldm inspect`, `ldm train` and
`python -m weights_convert` answer one line on stderr and exit status 2 (Ctrl-C: 130), write nothing, leave no
partial file or empty folder, and show a traceback only with --debug or LDM_DEBUG=1. Also: the memory estimate
refuses what cannot fit and `--num-images` is generated in batches that fit.

Commands run in-process through their main() (the installed scripts call the same function); a full disk or an
unwritable folder is simulated where the machine cannot make one (the tests run as root).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm import fileio, limits
from ldm.cli import main
from ldm.images import parse_parameters, read_parameters
from ldm.train import DEFAULT_MODEL_DIR
from ldm.train.checkpoint import REQUIRED_META, CheckpointFormatError, load_state, save_state
from weights_convert.__main__ import main as convert_main

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = str(DEFAULT_MODEL_DIR)


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def run_generate(tmp_path: Path, *extra: str, prompt: str = "a red circle") -> int:
    return main(["generate", prompt, "--model", MODEL, "--steps", "2", "--seed", "1", *extra])


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ldm {command}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------------------
# ldm generate: arguments, prompts, memory


@pytest.mark.parametrize("extra,message", [
    (["--guidance", "inf"], "--guidance must be >= 0 and finite, got inf"),
    (["--guidance", "nan"], "--guidance must be >= 0 and finite, got nan"),
    (["--eta", "inf"], "--eta must be >= 0 and finite"),
    (["--strength", "nan", "--init-image", "x.png"], "--strength must be in (0, 1]"),
    (["--threads", "100000"], "--threads must be at most 1024"),
])
def test_non_finite_and_out_of_range_arguments_exit_2(tmp_path, capsys, extra, message):
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png"), *extra) == 2
    assert message in one_error_line(capsys, "generate")
    assert files(tmp_path) == []


@pytest.mark.parametrize("flag", ["prompt", "--negative-prompt"])
def test_prompt_that_is_not_utf8_exits_2(tmp_path, capsys, flag):
    """A shell hands undecodable bytes over as lone surrogates (os.fsdecode): refused before the model loads."""
    bad = os.fsdecode(b"a \xff circle")
    extra = ["--negative-prompt", bad] if flag != "prompt" else []
    code = run_generate(tmp_path, "--out", str(tmp_path / "o.png"), *extra, prompt=bad if flag == "prompt" else "x")
    assert code == 2
    assert f"{flag} is not valid UTF-8 text" in one_error_line(capsys, "generate")
    assert files(tmp_path) == []


def test_nul_in_the_prompt_is_kept_in_an_itxt_chunk(tmp_path):
    out = tmp_path / "nul.png"
    assert run_generate(tmp_path, "--out", str(out), prompt="a red\x00circle") == 0
    assert parse_parameters(read_parameters(out))["Prompt"] == "a red\x00circle"
    assert b"iTXtparameters" in out.read_bytes() and b"tEXtparameters" not in out.read_bytes()


@pytest.mark.parametrize("extra", [["--width", "1000000"], ["--height", "800000", "--width", "800000"],
                                   ["--num-images", "1", "--width", "65536", "--height", "65536"]])
def test_huge_sizes_are_refused_with_the_estimate(tmp_path, capsys, extra):
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png"), *extra) == 2
    err = one_error_line(capsys, "generate")
    assert "needs about" in err and "is free on cpu" in err, err
    assert files(tmp_path) == []


def test_huge_init_image_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch):
    image = tmp_path / "big.png"
    Image.new("RGB", (1024, 1024), "white").save(image)
    monkeypatch.setenv("LDM_MEMORY_LIMIT", "100MiB")
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png"), "--init-image", str(image)) == 2
    assert "needs about" in one_error_line(capsys, "generate")
    assert files(tmp_path) == [image]


def test_num_images_are_generated_in_batches_that_fit(tmp_path, monkeypatch):
    """With room for 2 images per batch, 5 images come in 3 batches, each image with seed S + i: the same images
    as one batch of 5 (up to 1 level of rounding where a batch's float sums differ)."""
    assert run_generate(tmp_path, "--out", str(tmp_path / "one.png"), "--num-images", "5") == 0
    pipe = ldm.load_pipeline(MODEL)
    one = limits.pipeline_estimate(pipe, 64, 64, 1, True).total
    monkeypatch.setenv("LDM_MEMORY_LIMIT", str(2 * one + one // 2))
    calls = []
    real = ldm.StableDiffusionPipeline.__call__

    def spy(self, *args, **kw):
        calls.append(kw["num_images_per_prompt"])
        return real(self, *args, **kw)

    monkeypatch.setattr(ldm.StableDiffusionPipeline, "__call__", spy)
    assert run_generate(tmp_path, "--out", str(tmp_path / "batched.png"), "--num-images", "5") == 0
    assert calls == [2, 2, 1]
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / f"one-{i}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / f"batched-{i}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
        assert parse_parameters(read_parameters(tmp_path / f"batched-{i}.png"))["Seed"] == str(1 + i)


def test_api_refuses_what_cannot_fit(monkeypatch):
    pipe = ldm.load_pipeline(MODEL)
    with pytest.raises(limits.MemoryLimitError, match=r"generating 1 image\(s\) of 8000x8000 needs about"):
        pipe("a red circle", height=8000, width=8000, num_inference_steps=2)
    monkeypatch.setenv("LDM_MEMORY_LIMIT", "1MiB")
    with pytest.raises(ValueError, match=r"needs about .* 1.0 MiB is free"):
        pipe("a red circle", num_inference_steps=2)


def test_estimate_follows_the_documented_arithmetic():
    """SD 1.5 at 512x512, batch 1 with guidance, fp32, "math" attention: the UNet term dominates (the scores of
    8 heads over 4,096 positions at level 0); twice the batch is twice the activations."""
    e1 = limits.generation_estimate(ldm.SD15.unet, ldm.SD15.vae, 512, 512, 1, True, 4)
    e2 = limits.generation_estimate(ldm.SD15.unet, ldm.SD15.vae, 512, 512, 2, True, 4)
    scores = 2 * 2 * 8 * 4096 * 4096 * 4  # (x2 guidance) x (scores + probabilities) x heads x L^2 x fp32
    assert scores < e1.unet < 1.5 * scores
    assert e2.unet == 2 * e1.unet and e2.vae == 2 * e1.vae
    fused = limits.generation_estimate(ldm.SD15.unet, ldm.SD15.vae, 512, 512, 1, True, 4, fused=True)
    assert fused.unet < e1.unet / 3  # a 256-row block of scores instead of all 4,096 rows


@pytest.mark.parametrize("value,parsed", [("8GiB", 8 * 1024**3), ("500M", 500 * 1024**2), ("1e9", 10**9),
                                          ("2 GB", 2 * 10**9), ("1024", 1024)])
def test_memory_limit_variable(value, parsed):
    assert limits.parse_bytes(value) == parsed


def test_bad_memory_limit_variable_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDM_MEMORY_LIMIT", "lots")
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png")) == 2
    assert "LDM_MEMORY_LIMIT: cannot read 'lots'" in one_error_line(capsys, "generate")


def test_inspect_size_bounded(capsys):
    assert main(["inspect", "sd15", "--size", "1000000000", "--component", "unet"]) == 2
    assert "size must be at most 65,536 pixels" in one_error_line(capsys, "inspect")


# ----------------------------------------------------------------------------------------------------------------
# Bad model files through the commands


def test_bad_model_files_exit_2_naming_the_file(tmp_path, capsys):
    model = Path(shutil.copytree(MODEL, tmp_path / "m"))
    header = b"[" * 100_000
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png"), "--model", str(model)) == 2
    assert "diffusion_pytorch_model.safetensors: corrupt safetensors header" in one_error_line(capsys, "generate")
    meta = json.dumps({"__metadata__": [1]}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(meta).to_bytes(8, "little") + meta)
    assert convert_main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(bad) in err and "'__metadata__' must be an object" in err
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# Write failures, interruptions, --debug


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def unwritable(folder, what):
    raise ValueError(f"{what}: cannot write in folder {str(folder)!r} (Permission denied)")


def test_full_disk_while_writing_a_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "fsync", enospc)
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png")) == 2
    err = one_error_line(capsys, "generate")
    assert "cannot write" in err and "o.png" in err and "No space left on device" in err, err
    assert files(tmp_path) == [], "a temporary file was left behind"


def test_unwritable_out_folder_is_found_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ldm.cli.check_writable", unwritable)
    monkeypatch.setattr(ldm, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png")) == 2
    assert "--out: cannot write in folder" in one_error_line(capsys, "generate")


def test_real_unwritable_folder(tmp_path):
    """fileio.check_writable really tries: a path that is a file, or a missing folder, is refused."""
    (tmp_path / "f").write_text("x")
    for folder in (tmp_path / "f", tmp_path / "missing"):
        with pytest.raises(ValueError, match="--out"):
            fileio.check_writable(folder, "--out")


def test_ctrl_c_exits_130_without_traceback(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ldm.cli._run", interrupted)
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert files(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ldm.cli._run", enospc)
    assert run_generate(tmp_path, "--out", str(tmp_path / "o.png")) == 2
    assert "No space left on device" in one_error_line(capsys, "generate")
    with pytest.raises(OSError):
        run_generate(tmp_path, "--out", str(tmp_path / "o.png"), "--debug")
    monkeypatch.setenv("LDM_DEBUG", "1")
    with pytest.raises(OSError):
        run_generate(tmp_path, "--out", str(tmp_path / "o.png"))


def test_export_checks_the_folder_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fileio, "check_writable", unwritable)
    monkeypatch.setattr("weights_convert.load.load_components", lambda *a, **k: pytest.fail("loaded"))
    assert convert_main(["export", MODEL, str(tmp_path / "out")]) == 2
    assert "export: cannot write in folder" in capsys.readouterr().err
    assert files(tmp_path) == []


def test_export_onto_a_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("weights_convert.export.write_streaming", enospc)
    assert convert_main(["export", MODEL, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: No space left on device", err
    assert files(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# ldm train: folders, memory, resume

TRAIN = ["--vae-steps", "1", "--unet-steps", "0", "--no-progress", "--threads", "1"]


def test_train_unwritable_out_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ldm.train.trainer.check_writable", unwritable)
    monkeypatch.setattr("ldm.train.Trainer.run", lambda self: pytest.fail("trained"))
    assert main(["train", "--out", str(tmp_path / "run"), *TRAIN]) == 2
    assert "cannot write in folder" in one_error_line(capsys, "train")
    assert files(tmp_path) == [], "an empty run folder was left"


def test_train_onto_a_full_disk_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ldm.train.checkpoint.save_file", enospc)
    assert main(["train", "--out", str(tmp_path / "run"), *TRAIN]) == 2
    err = one_error_line(capsys, "train")
    assert "No space left on device" in err and "the last complete checkpoint: none was written" in err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert not [p for p in files(tmp_path) if p.is_dir() and not any(p.iterdir())], "an empty folder was left"


def test_train_batch_that_cannot_fit(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--batch-size", "1000000", *TRAIN]) == 2
    assert "training with batch_size 1000000" in one_error_line(capsys, "train")
    assert files(tmp_path) == []


@pytest.mark.parametrize("key", sorted(REQUIRED_META))
def test_resume_with_incomplete_metadata(tmp_path, capsys, key):
    meta = {"step": 1, "stage": "vae", "config": {"out_dir": "x"}, "scaling_factor": None, "ema_updates": {},
            "losses": {"vae": [], "unet": [], "seconds": 0.0}}
    path = save_state(tmp_path / "ck.safetensors", {"rng.torch": torch.zeros(4, dtype=torch.uint8)},
                      {k: v for k, v in meta.items() if k != key})
    with pytest.raises(CheckpointFormatError, match=f"incomplete metadata, no {key!r}"):
        load_state(path)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", str(path), "--no-progress"]) == 2
    assert f"no {key!r}" in one_error_line(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_resume_with_a_damaged_config(tmp_path, capsys):
    meta = {"step": 1, "stage": "vae", "config": {"out_dir": "x", "vae": []}, "scaling_factor": None,
            "ema_updates": {}, "losses": {}}
    path = save_state(tmp_path / "ck.safetensors", {"rng.torch": torch.zeros(4, dtype=torch.uint8)}, meta)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", str(path), "--no-progress"]) == 2
    assert "holds a damaged config" in one_error_line(capsys, "train")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = save_state(tmp_path / "ck.safetensors", {"x": torch.zeros(2)}, {"step": 0})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode
