"""Pictures of a training run, drawn with Pillow alone: the loss curve, sample grids, VAE reconstructions and the
VAE's latent channels (for docs/training.md). No plotting library is needed.

Shapes: n images, H, W pixels, C latent channels, h, w latent size.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.train.shapes import ShapesDataset

_INK, _GRID, _PAPER = (30, 30, 30), (225, 225, 225), (255, 255, 255)
_STAGE_COLOURS = {"vae": (200, 80, 40), "unet": (40, 90, 200)}


def _smooth(values: list[float], window: int) -> list[float]:
    """Moving average over the last `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(history: Any, path: str | Path, width: int = 900, height: int = 360) -> Path:
    """One panel per stage (VAE, UNet): the raw loss (light) and its moving average, log-scaled y axis."""
    panels = [(name, getattr(history, name)) for name in ("vae", "unet") if getattr(history, name)]
    if not panels:
        raise ValueError("plot_losses: the history holds no losses yet")
    image = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(image)
    pw = width // len(panels)
    for i, (name, losses) in enumerate(panels):
        x0, y0, x1, y1 = i * pw + 60, 30, (i + 1) * pw - 20, height - 40
        values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1.0
        for decade in range(math.floor(lo), math.ceil(hi) + 1):  # grid lines at powers of ten
            y = y1 - (decade - lo) / (hi - lo) * (y1 - y0)
            if y0 <= y <= y1:
                draw.line((x0, y, x1, y), fill=_GRID)
                draw.text((x0 - 50, y - 6), f"1e{decade}", fill=_INK)

        def points(v: np.ndarray) -> list[tuple[float, float]]:
            n = max(1, len(v) - 1)
            return [(x0 + j / n * (x1 - x0), y1 - (float(val) - lo) / (hi - lo) * (y1 - y0)) for j, val in enumerate(v)]

        colour = _STAGE_COLOURS[name]
        light = tuple(int(c + (255 - c) * 0.7) for c in colour)
        if len(values) > 1:
            draw.line(points(values), fill=light, width=1)
            smooth = np.log10(np.maximum(_smooth(list(losses), max(1, len(losses) // 50)), 1e-12))
            draw.line(points(smooth), fill=colour, width=2)
        draw.rectangle((x0, y0, x1, y1), outline=_INK)
        title = "VAE: L1 + edges + KL" if name == "vae" else "UNet: noise-prediction MSE"
        draw.text((x0, 10), f"{title}  (final {np.mean(losses[-max(1, len(losses) // 20):]):.4f})", fill=_INK)
        draw.text((x0, y1 + 8), "step 0", fill=_INK)
        draw.text((x1 - 60, y1 + 8), f"step {len(losses)}", fill=_INK)
    path = Path(path)
    image.save(path)
    return path


def image_grid(images: np.ndarray, labels: list[str], title: str = "", scale: int = 2) -> Image.Image:
    """Images (n, H, W, 3) in [0, 1] side by side, upscaled `scale` times, each with its caption underneath."""
    n, h, w, _ = images.shape
    cell, label_h, title_h = w * scale, 28, 18 if title else 0
    grid = Image.new("RGB", (n * (cell + 4) + 4, h * scale + label_h + title_h + 4), _PAPER)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill=_INK)
    for i, (img, label) in enumerate(zip(images, labels)):
        tile = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).resize((cell, h * scale),
                                                                                          Image.NEAREST)
        x = 4 + i * (cell + 4)
        grid.paste(tile, (x, title_h + 2))
        lines = textwrap.wrap(label or "(empty prompt)", width=max(4, cell // 6))  # about 6 px per character
        draw.text((x, title_h + h * scale + 4), "\n".join(lines[:2]), fill=_INK)
    return grid


@torch.no_grad()
def save_reconstructions(vae: torch.nn.Module, data: ShapesDataset, path: str | Path, n: int = 8) -> Path:
    """Top row: dataset images; bottom row: the VAE's reconstructions (decode of the posterior mean)."""
    x, captions = data.batch(0, n)  # (n, 3, H, W)
    recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)  # (n, 3, H, W)
    both = torch.cat([x, recon]).permute(0, 2, 3, 1).numpy() / 2 + 0.5  # (2n, H, W, 3)
    top = image_grid(both[:n], captions, "dataset images")
    bottom = image_grid(both[n:], ["reconstruction"] * n, "VAE reconstructions")
    grid = Image.new("RGB", (top.width, top.height + bottom.height), _PAPER)
    grid.paste(top, (0, 0))
    grid.paste(bottom, (0, top.height))
    path = Path(path)
    grid.save(path)
    return path


@torch.no_grad()
def save_latent_channels(vae: torch.nn.Module, data: ShapesDataset, scaling_factor: float, path: str | Path,
                         n: int = 4, scale: int = 4) -> Path:
    """Each row: an image, then its C scaled latent channels as grey maps (h x w, mid-grey = 0, range +-3)."""
    x, _ = data.batch(0, n)  # (n, 3, H, W)
    z = vae.encode(x).mode() * scaling_factor  # (n, C, h, w)
    c, h = z.shape[1], z.shape[2]
    size = h * scale
    grid = Image.new("RGB", ((c + 1) * (size + 4) + 4, n * (size + 4) + 22), _PAPER)
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), f"image, then latent channels 0..{c - 1} (x{scaling_factor:.3f}; black -3, white +3)",
              fill=_INK)
    for i in range(n):
        y = 22 + i * (size + 4)
        img = ((x[i].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)
        grid.paste(Image.fromarray(img).resize((size, size), Image.BILINEAR), (4, y))
        for j in range(c):
            grey = ((z[i, j].numpy() / 6 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)  # (h, w)
            grid.paste(Image.fromarray(grey).resize((size, size), Image.NEAREST).convert("RGB"),
                       (4 + (j + 1) * (size + 4), y))
    path = Path(path)
    grid.save(path)
    return path
