"""Draw the noise schedule figures of docs/schedulers.md from ldm.schedulers itself (Pillow only, no matplotlib).

    python scripts/plot_schedules.py            # writes docs/images/schedule_alphas_cumprod.png, schedule_sigmas.png

1. alpha_bar_t (the signal kept at training timestep t) for the three beta schedules, SD's `scaled_linear` first.
2. The sigmas a 20-step run visits (log scale): the SD schedule at evenly spaced timesteps vs Karras spacing.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ldm.config import SD15  # noqa: E402
from ldm.schedulers import DPMSolverMultistepScheduler, EulerDiscreteScheduler  # noqa: E402
from ldm.schedulers.common import make_betas  # noqa: E402

W, H, MARGIN = 900, 560, 80
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def plot(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str,
         path: Path, y_range: tuple[float, float], y_ticks: Sequence[tuple[float, str]],
         x_ticks: Sequence[float], markers: bool = False) -> None:
    """A line chart: series = [(label, xs, ys)] in data units; y_range / ticks in the same (possibly log) units."""
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x_min, x_max = min(min(xs) for _, xs, _ in series), max(max(xs) for _, xs, _ in series)
    y_min, y_max = y_range

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = MARGIN + (x - x_min) / (x_max - x_min) * (W - 2 * MARGIN)
        py = H - MARGIN - (y - y_min) / (y_max - y_min) * (H - 2 * MARGIN)
        return px, py

    for y, label in y_ticks:  # horizontal grid and labels
        _, py = to_px(x_min, y)
        draw.line([(MARGIN, py), (W - MARGIN, py)], fill=(225, 225, 225))
        draw.text((MARGIN - 8, py), label, fill="black", anchor="rm")
    for x in x_ticks:
        px, _ = to_px(x, y_min)
        draw.line([(px, MARGIN), (px, H - MARGIN)], fill=(225, 225, 225))
        draw.text((px, H - MARGIN + 8), f"{x:g}", fill="black", anchor="mt")
    draw.rectangle([MARGIN, MARGIN, W - MARGIN, H - MARGIN], outline="black")
    for k, (label, xs, ys) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        points = [to_px(x, y) for x, y in zip(xs, ys)]
        draw.line(points, fill=color, width=3)
        if markers:
            for px, py in points:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.line([(W - MARGIN - 250, MARGIN + 20 + 22 * k), (W - MARGIN - 220, MARGIN + 20 + 22 * k)],
                  fill=color, width=3)
        draw.text((W - MARGIN - 212, MARGIN + 20 + 22 * k), label, fill="black", anchor="lm")
    draw.text((W / 2, MARGIN / 2), title, fill="black", anchor="mm")
    draw.text((W / 2, H - MARGIN / 2 + 10), xlabel, fill="black", anchor="mm")
    draw.text((12, MARGIN / 2), ylabel, fill="black", anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    args = parser.parse_args()
    sd = SD15.scheduler  # the SD 1.x / 2.x training schedule

    # 1. alpha_bar_t for the three beta schedules
    series = []
    for label, cfg in [("scaled_linear (SD 1.x / 2.x)", sd),
                       ("linear, 1e-4 to 0.02 (DDPM)", {**sd, "beta_schedule": "linear", "beta_start": 1e-4,
                                                     "beta_end": 0.02}),
                       ("squaredcos_cap_v2 (cosine)", {**sd, "beta_schedule": "squaredcos_cap_v2"})]:
        alphas_cumprod = torch.cumprod(1 - make_betas(cfg), dim=0)
        series.append((label, list(range(len(alphas_cumprod))), alphas_cumprod.tolist()))
    plot(series, "alphas_cumprod: the signal fraction alpha_bar_t kept at training timestep t", "timestep t",
         "alpha_bar_t", args.out / "schedule_alphas_cumprod.png", (0.0, 1.0),
         [(v / 5, f"{v / 5:.1f}") for v in range(6)], [0, 200, 400, 600, 800, 999])

    # 2. the sigmas of a 20-step run, log10 scale
    n, series = 20, []
    for label, sched in [("evenly spaced t (Euler, LMS)", EulerDiscreteScheduler.from_config(sd)),
                         ("Karras sigmas (dpm++2m-karras)",
                          DPMSolverMultistepScheduler.from_config(sd, use_karras_sigmas=True))]:
        sched.set_timesteps(n)
        sigmas = sched.sigmas[:-1].tolist()  # the final 0 has no logarithm
        series.append((label, list(range(len(sigmas))), [math.log10(s) for s in sigmas]))
    plot(series, f"sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at each of {n} steps (log scale)", "step",
         "sigma", args.out / "schedule_sigmas.png", (-2.0, 1.5),
         [(e, f"{10 ** e:g}") for e in (-2, -1, 0, 1)], [0, 5, 10, 15, 19], markers=True)


if __name__ == "__main__":
    main()
