"""Teach the model a new word: textual inversion on the packaged shapes model (`ldm train-embedding`).

Paper: Gal et al. 2022, "An Image is Worth One Word" (arXiv:2208.01618), eq. (2): with the UNet, the VAE and the
text encoder frozen, find the word's vectors v* = argmin_v E[ || eps - eps_theta(z_t, t, c_theta(y(v))) ||^2 ]
over a handful of images of the concept, captioned with a template that holds the word ("a <orange> circle").
Only the n vectors receive gradients; they enter the text encoder where the word's token embeddings would be,
exactly as ldm/embeddings.py splices them at generation time, so what is learned is what is loaded.

The concept here is drawn by the dataset code (ldm/train/shapes.py) in a colour the model never saw (default:
orange, between its red and yellow), on the shapes it knows. The file written is A1111's `.pt`
(`string_to_param`) or diffusers' `{word: vectors}` (`.safetensors`, `.bin`), by suffix; `load_textual_inversion`
and `ldm generate --embedding` read both.

Shapes: n images, v vectors of width D, h, w latent size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.embeddings import PLACEHOLDER, Embedding, SplicingTokenizer
from ldm.train.shapes import SHAPES, Scene, Shape, ShapesDataset, render

ORANGE = (240, 130, 20)  # hue 28 degrees: between red (0) and yellow (53), a colour the shapes model never saw


@dataclass(frozen=True)
class EmbeddingConfig:
    word: str = "<orange>"  # the new word (A1111 would name the file after it)
    colour: tuple[int, int, int] = ORANGE  # the concept: shapes drawn in this colour
    init_word: str = "red"  # the vectors start at this word's token embedding (mean over its tokens)
    vectors: int = 1  # n vectors for the word
    images: int = 8  # the handful of concept images
    steps: int = 300
    batch_size: int = 8
    lr: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vectors", "images", "steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.colour, tuple) and len(self.colour) == 3 and all(0 <= c <= 255 for c in self.colour)):
            raise ValueError(f"colour must be an (r, g, b) tuple of ints in [0, 255], got {self.colour!r}")
        if not self.word.strip() or not self.init_word.strip():
            raise ValueError("word and init_word must be non-empty")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def concept_images(cfg: EmbeddingConfig, size: int) -> tuple[np.ndarray, list[str]]:
    """The concept: `cfg.images` single shapes in `cfg.colour` (n, H, W, 3) uint8, captioned "a <word> <shape>"."""
    scenes = ShapesDataset(size, cfg.seed, "test", two_objects=0.0)
    images, captions = [], []
    for i in range(cfg.images):
        obj = scenes.scene(i).objects[0]
        shape = SHAPES[i % len(SHAPES)]  # every shape, in turn
        scene = Scene(scenes.scene(i).background, (Shape(cfg.word, shape, obj.cx, obj.cy, obj.r),), None)
        images.append(render(scene, size, palette={cfg.word: cfg.colour})[0])
        captions.append(f"a {cfg.word} {shape}")
    return np.stack(images), captions


def _ids(tokenizer: SplicingTokenizer, captions: list[str]) -> Tensor:
    """[bos, tokens, eos, pad...] (n, 77) with the word as placeholder ids (ldm/embeddings.py)."""
    rows = []
    for caption in captions:
        ids = [tokenizer.bos_id] + tokenizer.encode(caption)[:75] + [tokenizer.eos_id]
        rows.append(ids + [tokenizer.pad_id] * (77 - len(ids)))
    return torch.tensor(rows)


def train_embedding(pipe, cfg: EmbeddingConfig, log=None) -> Embedding:
    """Learn the word's vectors on `pipe` (its weights are not changed). log(step, loss) is called every step."""
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    images, captions = concept_images(cfg, pipe.native_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 3, H, W)
    with torch.no_grad():
        posterior = pipe.vae.encode(x.to(pipe.device, pipe.dtype))  # over (n, C, h, w)
    table = pipe.text_encoder.text_model.embeddings.token_embedding
    init_ids = pipe.tokenizer.encode(cfg.init_word)
    if not init_ids:
        raise ValueError(f"init_word {cfg.init_word!r} has no tokens")
    start = table.weight[init_ids].detach().float().mean(0)  # (D,)
    vectors = torch.nn.Parameter(start.repeat(cfg.vectors, 1))  # (v, D): the only trainable tensor
    tokenizer = SplicingTokenizer(pipe.tokenizer, [Embedding(cfg.word, vectors.detach(), "training")])
    ids = _ids(tokenizer, captions).to(pipe.device)  # (n, 77), the word as placeholder ids
    word = ids >= PLACEHOLDER  # (n, 77) the word's positions
    input_ids = ids.masked_fill(word, 0)
    optimizer = torch.optim.AdamW([vectors], lr=cfg.lr, weight_decay=0.0)
    scheduler = pipe.scheduler
    for step in range(cfg.steps):
        pick = torch.randint(0, len(captions), (cfg.batch_size,), generator=g)  # (B,)
        z0 = posterior.sample(g)[pick] * pipe.vae.config.scaling_factor  # (B, C, h, w)
        t = torch.randint(0, scheduler.config["num_train_timesteps"], (cfg.batch_size,), generator=g)  # (B,)
        noise = torch.randn(z0.shape, generator=g)
        zt = scheduler.add_noise(z0, noise, t)  # (B, C, h, w)
        embeds = table(input_ids[pick])  # (B, 77, D): the frozen token embeddings
        embeds[word[pick]] = vectors[ids[pick][word[pick]] - PLACEHOLDER].to(embeds.dtype)  # the splice
        context = pipe.text_encoder(input_ids[pick], inputs_embeds=embeds).last_hidden_state  # (B, 77, D)
        loss = F.mse_loss(pipe.unet(zt, t, context).float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, float(loss.detach()))
    return Embedding(cfg.word, vectors.detach().float().cpu().clone(), "ldm train-embedding")


def save_embedding(embedding: Embedding, path: str | os.PathLike, steps: int = 0) -> Path:
    """Write A1111's .pt (`string_to_param`, by suffix .pt) or diffusers' {word: vectors} (.safetensors, .bin),
    atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".pt":
        torch.save({"string_to_param": {"*": embedding.vectors}, "name": embedding.word,
                    "string_to_token": {"*": 265}, "step": steps}, tmp)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({embedding.word: embedding.vectors.contiguous()}, tmp)
    elif path.suffix == ".bin":
        torch.save({embedding.word: embedding.vectors}, tmp)
    else:
        raise ValueError(f"{path}: the embedding file must end in .pt (A1111), .safetensors or .bin (diffusers)")
    os.replace(tmp, path)
    return path


def object_hue(image: np.ndarray) -> float | None:
    """The circular mean hue (degrees) of the saturated pixels of the object in `image` (H, W, 3) uint8."""
    from ldm.train.shapes import foreground, hue_saturation_value

    mask = foreground(image)
    hsv = hue_saturation_value(image[mask].astype(np.float32) / 255.0)  # (N, 3)
    hsv = hsv[(hsv[:, 1] >= 0.35) & (hsv[:, 2] >= 0.2)]
    if len(hsv) < 20:
        return None
    angle = np.deg2rad(hsv[:, 0])
    return float(np.rad2deg(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) % 360)


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)

