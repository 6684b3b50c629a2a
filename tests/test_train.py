"""Training: the shapes dataset and its pixel classifier, determinism, resume == uninterrupted, atomic checkpoints,
Ctrl-C, bad input, the loss curve and the exported model; and, once the default model is shipped, what it draws.

Runs train a tiny model (a few thousand parameters besides CLIP's embedding) for a handful of steps on one thread:
seconds each. Determinism is asserted bit for bit (torch.equal): the same code, seed and thread count on a CPU must
give the same weights, and a resumed run must give exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
from ldm.train import (COLOURS, DEFAULT_MODEL_DIR, HELD_OUT, SHAPES, CheckpointFormatError, ShapesDataset,
                       TrainConfig, Trainer, classify, load_state, lr_at)
from ldm.train import checkpoint as checkpoint_module
from ldm.train.plots import plot_losses
from ldm.train.shapes import caption_pairs, render
from ldm.train.trainer import EMA, History

TINY_VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                     mid_block_add_attention=False, sample_size=32, scaling_factor=1.0)
TINY_UNET = UNetConfig(block_out_channels=(16, 32), cross_attention_levels=(False, True), num_heads=(1, 2),
                       layers_per_block=1, cross_attention_dim=32, norm_num_groups=4, sample_size=16)
TINY_TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           projection_dim=32)


def tiny(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), image_size=32, vae_steps=3, unet_steps=3, vae_batch_size=2, batch_size=2,
                vae_crop=16, warmup_steps=2, checkpoint_every=1, sample_every=0, vae=TINY_VAE, unet=TINY_UNET,
                text=TINY_TEXT, sample_prompts=("a red circle", ""))
    return TrainConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor a run's future depends on: weights, EMA, AdamW moments, the RNG (as a checkpoint holds them)."""
    trainer.save_checkpoint()
    tensors, _ = load_state(trainer.checkpoint_path)
    return tensors


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# ------------------------------------------------------------------------------------------------------------------
# The dataset and the classifier


def test_dataset_is_deterministic_by_seed_and_index():
    a, b, c = ShapesDataset(64, seed=3), ShapesDataset(64, seed=3), ShapesDataset(64, seed=4)
    for i in (0, 1, 57):
        assert np.array_equal(a[i].image, b[i].image) and a[i].caption == b[i].caption
    assert any(not np.array_equal(a[i].image, c[i].image) for i in range(5))
    x, captions = a.batch(10, 4)
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert captions == [a[10 + i].caption for i in range(4)]
    assert torch.equal(x, a.batch(10, 4)[0])


def test_captions_objects_and_held_out_pairs():
    train, test = ShapesDataset(32, seed=0), ShapesDataset(32, seed=0, split="test")
    seen_train = set()
    for i in range(400):
        s = train[i]
        objects = s.scene.objects
        assert s.masks.shape == (len(objects), 32, 32) and all(m.any() for m in s.masks)
        words = s.caption.split()
        assert words[:3] == ["a", objects[0].colour, objects[0].shape]
        if len(objects) == 2:
            assert s.scene.relation in s.caption and s.caption.endswith(f"a {objects[1].colour} {objects[1].shape}")
            centre = [np.argwhere(m).mean(axis=0) for m in s.masks]  # (row, col) of each object
            axis, sign = {"above": (0, -1), "below": (0, 1), "left of": (1, -1), "right of": (1, 1)}[s.scene.relation]
            assert sign * (centre[0][axis] - centre[1][axis]) > 0, s.caption
        seen_train.update((o.colour, o.shape) for o in objects)
    assert not seen_train & HELD_OUT
    assert seen_train == set(caption_pairs("train"))
    seen_test = {(o.colour, o.shape) for i in range(400) for o in test.scene(i).objects}
    assert HELD_OUT <= seen_test


def test_classifier_reads_ground_truth_images():
    data = ShapesDataset(64, seed=1, split="test", two_objects=0.0)
    wrong = []
    for i in range(240):
        s = data[i]
        p, truth = classify(s.image), s.scene.objects[0]
        if p is None or (p.colour, p.shape) != (truth.colour, truth.shape):
            wrong.append((s.caption, p))
    assert not wrong, wrong[:5]


def test_classifier_every_pair_on_every_background():
    from ldm.train.shapes import BACKGROUNDS, Scene, Shape

    for background in BACKGROUNDS:
        for colour in COLOURS:
            for shape in SHAPES:
                image, _ = render(Scene(background, (Shape(colour, shape, 30.0, 34.0, 14.0),), None), 64)
                p = classify(image)
                assert (p.colour, p.shape) == (colour, shape), (background, colour, shape, p)


def test_classifier_input_checks():
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert classify(blank) is None
    with pytest.raises(TypeError, match="uint8"):
        classify(blank.astype(np.float32))
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="validation")
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(size=8)


# ------------------------------------------------------------------------------------------------------------------
# Pieces of the loop


def test_learning_rate_warm_up_and_cosine_decay():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)  # halfway through the decay: 0.1 + 0.9 / 2
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_ema_averages_with_warm_up():
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # decay min(0.9, 1/10) = 0.1: shadow = 0.1 * 0 + 0.9 * 1
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    averaged = ema.copy_to(module)
    assert averaged.weight.item() == pytest.approx(0.9) and module.weight.item() == 1.0


# ------------------------------------------------------------------------------------------------------------------
# Determinism and resuming


def test_training_is_deterministic(tmp_path):
    a = Trainer(tiny(tmp_path / "a"), progress=False)
    a.run(finish=False)
    b = Trainer(tiny(tmp_path / "b"), progress=False)
    b.run(finish=False)
    sa, sb = state(a), state(b)
    assert_same(sa, sb)
    c = Trainer(tiny(tmp_path / "c", seed=1), progress=False)
    c.run(finish=False)
    assert not torch.equal(state(c)["unet.conv_in.weight"], sa["unet.conv_in.weight"])
    assert len(a.history.vae) == 3 and len(a.history.unet) == 3 and a.history.unet == b.history.unet


@pytest.mark.parametrize("stop", [2, 3, 4])  # inside the VAE stage, at the switch, inside the UNet stage
def test_resumed_run_equals_uninterrupted_run(tmp_path, stop):
    whole = Trainer(tiny(tmp_path / "whole"), progress=False)
    whole.run(finish=False)
    first = Trainer(tiny(tmp_path / "part"), progress=False)
    first.run(until=stop, finish=False)
    assert first.step == stop
    resumed = Trainer(resume=first.checkpoint_path, progress=False)
    assert resumed.step == stop
    resumed.run(finish=False)
    assert_same(state(resumed), state(whole))
    assert resumed.history.vae == whole.history.vae and resumed.history.unet == whole.history.unet


def test_ctrl_c_leaves_the_last_checkpoint(tmp_path):
    cfg = tiny(tmp_path / "run")

    def interrupt_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, callback=interrupt_at_5, progress=False).run()
    _, meta = load_state(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 4
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []
    resumed = Trainer(resume=tmp_path / "run" / "checkpoint.safetensors", progress=False)
    resumed.run(finish=False)
    whole = Trainer(tiny(tmp_path / "whole"), progress=False)
    whole.run(finish=False)
    assert_same(state(resumed), state(whole))


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path / "run"), progress=False)
    trainer.run(until=2, finish=False)
    before = trainer.checkpoint_path.read_bytes()

    def torn_write(tensors, filename, metadata=None):  # half a file, then Ctrl-C
        Path(filename).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(until=3, finish=False)
    assert trainer.checkpoint_path.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.safetensors", "train_log.jsonl"]
    _, meta = load_state(trainer.checkpoint_path)
    assert meta["step"] == 2


# ------------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_resume_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x12\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointFormatError, match="not a readable safetensors"):
        Trainer(resume=corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(CheckpointFormatError, match="not an ldm training checkpoint"):
        Trainer(resume=foreign)
    with pytest.raises(FileNotFoundError, match="no such file"):
        Trainer(resume=tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointFormatError, match="not a file"):
        Trainer(resume=tmp_path)


def test_resume_with_other_settings_or_truncated_file(tmp_path):
    trainer = Trainer(tiny(tmp_path / "run"), progress=False)
    trainer.run(until=1, finish=False)
    with pytest.raises(ValueError, match="differs in: batch_size"):
        Trainer(tiny(tmp_path / "run", batch_size=3), resume=trainer.checkpoint_path)
    data = trainer.checkpoint_path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError):
        Trainer(resume=truncated)
    tensors, meta = load_state(trainer.checkpoint_path)  # a checkpoint missing a weight
    del tensors["unet.conv_in.weight"]
    checkpoint_module.save_state(tmp_path / "holed.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="does not fit"):
        Trainer(resume=tmp_path / "holed.safetensors")


def test_extending_a_finished_run_with_more_unet_steps(tmp_path):
    first = Trainer(tiny(tmp_path / "run"), progress=False)
    assert first.run() is not None  # finished: 3 + 3 steps, model exported
    before = {k: v.clone() for k, v in first.unet.state_dict().items()}
    with pytest.raises(ValueError, match="differs in: unet_steps"):  # fewer steps is not an extension
        Trainer(tiny(tmp_path / "run", unet_steps=2), resume=first.checkpoint_path)
    with pytest.raises(ValueError, match="differs in: unet_steps, batch_size"):  # only unet_steps may grow
        Trainer(tiny(tmp_path / "run", unet_steps=5, batch_size=3), resume=first.checkpoint_path)
    longer = Trainer(tiny(tmp_path / "run", unet_steps=5), resume=first.checkpoint_path, progress=False)
    assert (longer.step, longer.cfg.total_steps) == (6, 8)
    assert longer.run() is not None
    assert len(longer.history.unet) == 5 and longer.history.unet[:3] == first.history.unet
    assert any(not torch.equal(before[k], v) for k, v in longer.unet.state_dict().items())
    _, meta = load_state(longer.checkpoint_path)
    assert meta["config"]["unet_steps"] == 5  # a later --resume continues the extended run


def test_bad_settings(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Trainer(tiny(a_file))
    for field, value in (("vae_steps", -1), ("unet_steps", -5), ("batch_size", 0), ("vae_batch_size", -2),
                         ("batch_size", 2.5)):
        with pytest.raises(ValueError, match=field):
            tiny(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="nothing to train"):
        tiny(tmp_path, vae_steps=0, unet_steps=0)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        tiny(tmp_path, text=dataclasses.replace(TINY_TEXT, hidden_size=16, num_attention_heads=2))
    with pytest.raises(ValueError, match="until"):
        Trainer(tiny(tmp_path / "run"), progress=False).run(until=-1)
    with pytest.raises(ValueError, match="Trainer: give a TrainConfig"):
        Trainer()


# ------------------------------------------------------------------------------------------------------------------
# The end of a run: loss curve, samples, the exported model


def test_finished_run_writes_curve_samples_and_a_loadable_model(tmp_path):
    trainer = Trainer(tiny(tmp_path / "run", sample_every=2), progress=False)
    model = trainer.run()
    out = tmp_path / "run"
    curve = Image.open(out / "loss_curve.png")
    assert curve.format == "PNG" and curve.size == (900, 360)
    assert np.asarray(curve.convert("L")).std() > 1.0  # something was drawn
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000005.png", "step-000006.png"]
    assert (out / "vae_reconstructions.png").is_file() and (out / "latent_channels.png").is_file()
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    pipe = ldm.load_pipeline(model)
    assert pipe.unet.config == TINY_UNET and pipe.text_encoder.config == TINY_TEXT
    assert pipe.vae.config.scaling_factor == pytest.approx(trainer.scaling_factor)
    ema_unet = trainer.ema["unet"].shadow
    for key, value in pipe.unet.state_dict().items():  # fp16 in the file: the EMA weights, rounded
        assert torch.equal(value, ema_unet[key].half().float()), key
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2, seed=0).images[0]
    assert image.size == (32, 32)


def test_plot_losses_needs_losses(tmp_path):
    with pytest.raises(ValueError, match="no losses"):
        plot_losses(History(), tmp_path / "x.png")
    path = plot_losses(History(vae=[1.0, 0.5, 0.25]), tmp_path / "x.png")
    assert Image.open(path).size == (900, 360)


# ------------------------------------------------------------------------------------------------------------------
# The shipped model (scripts/train_default.py): what it draws. Skipped until the model is in the package.

needs_model = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model_index.json").is_file(),
                                 reason=f"the default model is not trained yet ({DEFAULT_MODEL_DIR})")
SEEDS = 4  # images per prompt


@pytest.fixture(scope="module")
def shipped():
    return ldm.load_pipeline(DEFAULT_MODEL_DIR)


def generate(pipe, prompts: list[str], guidance: float = 5.0) -> np.ndarray:
    images = pipe(prompts, height=64, width=64, num_inference_steps=20, guidance_scale=guidance, seed=0,
                  num_images_per_prompt=SEEDS, output_type="np").images  # (n * SEEDS, 64, 64, 3)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.slow
@needs_model
def test_shipped_model_draws_the_prompt(shipped):
    pairs = [(c, s) for c in COLOURS for s in SHAPES]  # the held-out pairs included
    images = generate(shipped, [f"a {c} {s}" for c, s in pairs])
    wanted = [p for p in pairs for _ in range(SEEDS)]
    found = [classify(img) for img in images]
    colour = np.mean([f is not None and f.colour == c for f, (c, _) in zip(found, wanted)])
    shape = np.mean([f is not None and f.shape == s for f, (_, s) in zip(found, wanted)])
    held = [f is not None and (f.colour, f.shape) == p for f, p in zip(found, wanted) if p in HELD_OUT]
    print(f"\ncolour agreement {colour:.1%}, shape agreement {shape:.1%}, held-out pairs exact {np.mean(held):.1%}")
    assert colour >= 0.9, f"colour agreement {colour:.1%} < 90%"
    assert shape >= 0.7, f"shape agreement {shape:.1%} < 70%"


@pytest.mark.slow
@needs_model
def test_shipped_model_two_objects_reported(shipped):
    prompts = ["a red circle above a blue square", "a green triangle left of a yellow circle",
               "a cyan square below a purple circle", "a blue triangle right of a red square"]
    images = generate(shipped, prompts)
    hits = 0
    for img, prompt in zip(images, [p for p in prompts for _ in range(SEEDS)]):
        words = prompt.split()
        found = {c for c in COLOURS if (np.abs(img.astype(int) - COLOURS[c]).sum(-1) < 90).sum() >= 20}
        hits += {words[1], words[-2]} <= found
    print(f"\ntwo-object prompts: both colours present in {hits}/{len(images)} images (reported, not required)")


@pytest.mark.slow
@needs_model
def test_shipped_model_without_prompt_colour_is_chance(shipped):
    colours = list(COLOURS)
    images = generate(shipped, [""] * len(colours))
    targets = [c for c in colours for _ in range(SEEDS)]  # the colour each image would have been asked for
    found = [classify(img) for img in images]
    agreement = np.mean([f is not None and f.colour == c for f, c in zip(found, targets)])
    print(f"\nempty caption: colour agreement {agreement:.1%} (chance {1 / len(colours):.1%})")
    assert agreement <= 0.4


@pytest.mark.slow
@needs_model
def test_shipped_model_img2img_keeps_layout_and_inpaint_stays_in_mask(shipped):
    from ldm.train.shapes import foreground

    sample = ShapesDataset(64, seed=7, split="test", two_objects=0.0)[0]
    init = Image.fromarray(sample.image)
    out = shipped.img2img(sample.caption, init, strength=0.3, num_inference_steps=20, guidance_scale=5.0, seed=0,
                          output_type="np").images[0]
    out = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    a, b = foreground(sample.image), foreground(out)
    iou = (a & b).sum() / max(1, (a | b).sum())
    assert iou >= 0.6, f"img2img at strength 0.3 moved the object: IoU {iou:.2f}"

    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    out = shipped.inpaint("a red circle", init, Image.fromarray(mask), num_inference_steps=20, guidance_scale=5.0,
                          seed=0, output_type="np").images[0]
    out = (np.clip(out, 0, 1) * 255).round().astype(np.int16)
    outside = np.abs(out[:, :24] - sample.image[:, :24].astype(np.int16)).mean()  # 8 px margin: latent blending
    inside = np.abs(out[:, 32:] - sample.image[:, 32:].astype(np.int16)).mean()  # is 4 px per latent pixel
    assert outside < 12, f"inpainting changed the unmasked left half by {outside:.1f} levels on average"
    assert inside > outside


@pytest.mark.slow
@needs_model
def test_ldm_generate_without_model_uses_the_shipped_one(tmp_path):
    """The README's main job: `ldm generate "a green triangle"` with no --model and no --out."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "ldm", "generate", "a green triangle", "--seed", "0", "--threads",
                           "2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["a-green-triangle.png"]
    image = Image.open(tmp_path / "a-green-triangle.png")
    assert image.size == (64, 64)  # the model's own size (unet.sample_size 16 x VAE factor 4), not SD's 512
    found = classify(np.asarray(image.convert("RGB")))
    assert found is not None and found.colour == "green", found


# ------------------------------------------------------------------------------------------------------------------
# The command line: ldm train


def test_cli_train_errors_and_resume(tmp_path, capsys):
    from ldm.cli import main

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["train", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--batch-size", "0"]) == 2
    assert "batch_size must be a positive int" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--unet-steps", "-3"]) == 2
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", str(a_file)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    first = Trainer(tiny(tmp_path / "run"), progress=False)
    first.run(until=4, finish=False)
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", str(first.checkpoint_path),
                 "--no-progress"]) == 0
    assert "model written to" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
    _, meta = load_state(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 6
