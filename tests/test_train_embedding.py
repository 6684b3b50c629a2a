"""`ldm train-embedding` (ldm/train/embedding.py): textual inversion on the packaged shapes model learns a colour
the model never saw, and writes a file the loader reads.

The check uses the dataset's pixel measures (ldm/train/shapes.py: foreground, hue): images of "a <orange> X"
with the learned word have object hues near orange (30 degrees), where the same word before training (its vectors
start at "red") draws red (0 degrees). Measured (60 steps, batch 4, 6 images per prompt, 10 DDIM steps): mean hue
distance 12-18 degrees learned against ~28 degrees untrained; the test asks for under 21 and at least 7 better.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ldm
from ldm.cli import main
from ldm.train import DEFAULT_MODEL_DIR
from ldm.train.embedding import (ORANGE, EmbeddingConfig, concept_images, hue_distance, object_hue, save_embedding,
                                 train_embedding)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mean_distance(pipe, prompt: str, target: float) -> float:
    images = pipe([prompt] * 6, num_inference_steps=10, seed=100, guidance_scale=5.0, output_type="np").images
    hues = [object_hue((image * 255).round().astype(np.uint8)) for image in images]
    assert sum(h is not None for h in hues) >= 4, f"{prompt!r}: too few images with an object ({hues})"
    return float(np.mean([hue_distance(h, target) for h in hues if h is not None]))


def test_concept_images_are_the_new_colour() -> None:
    images, captions = concept_images(EmbeddingConfig(images=6), 64)
    assert images.shape == (6, 64, 64, 3) and captions[:3] == ["a <orange> circle", "a <orange> square",
                                                              "a <orange> triangle"]
    assert all(hue_distance(object_hue(image), 30.0) < 3 for image in images)


def test_learned_word_draws_the_concept(tmp_path: Path) -> None:
    pipe = ldm.load_pipeline(DEFAULT_MODEL_DIR)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = EmbeddingConfig(steps=60, batch_size=4, lr=0.04)
    embedding = train_embedding(pipe, cfg)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items()), "only the vectors train"
    start = EmbeddingConfig(steps=1, lr=1e-12)  # the vectors where training starts ("red")
    save_embedding(train_embedding(pipe, start), tmp_path / "start.safetensors")
    save_embedding(embedding, tmp_path / "orange.pt", cfg.steps)  # A1111's format
    target = 30.0  # ORANGE's hue in degrees
    assert abs(__import__("colorsys").rgb_to_hsv(*(c / 255 for c in ORANGE))[0] * 360 - target) < 1
    results = {}
    for name in ("start.safetensors", "orange.pt"):
        word = pipe.load_textual_inversion(tmp_path / name, token="<orange>")
        results[name] = np.mean([mean_distance(pipe, f"a {word} {shape}", target) for shape in ("circle", "square")])
        pipe.unload_textual_inversion()
    learned, untrained = results["orange.pt"], results["start.safetensors"]
    assert learned < 21 and learned < untrained - 7, f"hue distance learned {learned:.1f}, untrained {untrained:.1f}"


def test_cli_writes_a_loadable_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "word.safetensors"
    assert main(["train-embedding", "--out", str(out), "--steps", "2", "--batch-size", "2", "--images", "3",
                 "--word", "<w>", "--vectors", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    pipe = ldm.load_pipeline(DEFAULT_MODEL_DIR)
    assert pipe.load_textual_inversion(out) == "<w>"
    assert pipe.textual_inversion.embeddings["<w>"].vectors.shape == (2, 64)
    assert main(["train-embedding", "--out", str(out), "--steps", "2"]) == 2  # exists, no --overwrite
    assert main(["train-embedding", "--out", str(tmp_path / "w.txt")]) == 2
    assert main(["train-embedding", "--out", str(tmp_path / "w.pt"), "--colour", "1,2"]) == 2
    assert "colour must be" in capsys.readouterr().err
