"""The pictures and figures of docs/learn/10_new_word.md: teach the shapes model the word <orange>, then draw.

    python scripts/embedding_figures.py [--steps 300] [--out docs/images] [--threads 1]

Writes embedding_concept.png (the training images), embedding_samples.png (rows: "a red X", "a <orange> X" before
training (the vectors start at "red"), after training, "a yellow X"; 8 seeds each) and prints the measured hue
distances to the concept colour and the training time (the numbers the page quotes).
"""

from __future__ import annotations

import argparse
import colorsys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ldm
from ldm.train import DEFAULT_MODEL_DIR
from ldm.train.embedding import (ORANGE, EmbeddingConfig, concept_images, hue_distance, object_hue, save_embedding,
                                 train_embedding)

SEEDS = 8


def grid(rows: list[np.ndarray], scale: int = 2) -> Image.Image:
    """rows of (n, H, W, 3) uint8 images -> one picture, each image scaled up `scale` times."""
    picture = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    image = Image.fromarray(picture)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def draw(pipe, prompt: str) -> np.ndarray:
    images = pipe([prompt] * SEEDS, num_inference_steps=20, guidance_scale=5.0, seed=100, output_type="np").images
    return (images * 255).round().astype(np.uint8)  # (n, H, W, 3)


def distances(images: np.ndarray, target: float) -> list[float]:
    hues = [object_hue(image) for image in images]
    return [hue_distance(h, target) for h in hues if h is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=EmbeddingConfig.steps)
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cfg = EmbeddingConfig(steps=args.steps)
    pipe = ldm.load_pipeline(DEFAULT_MODEL_DIR)
    images, captions = concept_images(cfg, pipe.native_size)
    grid([images]).save(out / "embedding_concept.png", optimize=True)
    print("captions:", captions)

    start = cfg.init_word
    untrained = EmbeddingConfig(steps=1, lr=1e-12)  # one step at lr ~0: the vectors where training starts
    save_embedding(train_embedding(pipe, untrained), "/tmp/orange_untrained.safetensors")
    t0 = time.perf_counter()
    losses: list[float] = []
    embedding = train_embedding(pipe, cfg, log=lambda step, loss: losses.append(loss))
    seconds = time.perf_counter() - t0
    save_embedding(embedding, "/tmp/orange.safetensors")
    print(f"trained {cfg.steps} steps in {seconds:.0f} s; loss first 20 {np.mean(losses[:20]):.4f}, "
          f"last 20 {np.mean(losses[-20:]):.4f}")

    target = colorsys.rgb_to_hsv(*(c / 255 for c in ORANGE))[0] * 360
    rows = []
    for label, prompt, path in (("red", f"a {start} circle", None),
                                ("before", "a <orange> circle", "/tmp/orange_untrained.safetensors"),
                                ("after", "a <orange> circle", "/tmp/orange.safetensors"),
                                ("yellow", "a yellow circle", None)):
        if path:
            pipe.load_textual_inversion(path)
        row = draw(pipe, prompt)
        pipe.unload_textual_inversion()
        d = distances(row, target)
        print(f"{label:7s} {prompt!r}: mean hue distance to orange ({target:.0f} deg) {np.mean(d):.1f} deg "
              f"over {len(d)} images")
        rows.append(row)
    grid(rows).save(out / "embedding_samples.png", optimize=True)


if __name__ == "__main__":
    main()
