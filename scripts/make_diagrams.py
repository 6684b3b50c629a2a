"""Draw the pictures of docs/index.md and docs/learn/ from the package itself (Pillow and plain SVG, no matplotlib).

    python scripts/make_diagrams.py              # all of them
    python scripts/make_diagrams.py --only unet  # one: data_path, unet, latents, noise_levels, add_noise
    python scripts/make_diagrams.py --vae PATH   # the latent channels from a real VAE (a checkpoint or folder)

Writes into docs/images/:
- diagram_data_path.svg   prompt to pixels, every shape (from ldm.summary at 512 x 512, SD 1.5 and SD 2.x widths)
- diagram_unet.svg        the UNet's levels, channels and spatial sizes, skip connections (ldm.summary, SD 1.5)
- learn_vae_latents.png   the four latent channels of the drawn picture of docs/learn/03_vae.md (full-size VAE;
                          trained-like random weights unless --vae is given: say so where it is shown)
- learn_noise_levels.png  signal sqrt(alpha_bar), noise sqrt(1 - alpha_bar) and sigma over a 50-step DDIM run
- learn_add_noise.png     the drawn picture noised with DDIMScheduler.add_noise at steps 0, 10, 20, 30, 40, 49

Every number in the pictures is computed here from ldm (shapes from meta-device forward passes, the schedule from
the scheduler), none typed by hand. The VAE picture runs the 83M-parameter encoder on a 512 x 512 image: about a
minute on two CPU cores, under 1.5 GB of memory.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
import ldm  # noqa: E402
from ldm.images import image_to_tensor  # noqa: E402
from ldm.summary import inspect_model  # noqa: E402

OUT = ROOT / "docs" / "images"
BLUE, RED, GREEN, GREY = (31, 119, 180), (214, 39, 40), (44, 160, 44), (120, 120, 120)
STEPS = [0, 10, 20, 30, 40, 49]


# ----------------------------------------------------------------------------------------------------------------
# The drawn picture (the same drawing as docs/learn/03_vae.md)


def draw_picture(size: int = 512) -> Image.Image:
    """Sky, grass, sun, mountain: drawn at 512 x 512 and resized, as docs/learn/03_vae.md draws it."""
    picture = Image.new("RGB", (512, 512), (135, 190, 235))
    draw = ImageDraw.Draw(picture)
    draw.rectangle([0, 360, 512, 512], fill=(80, 160, 60))
    draw.ellipse([300, 60, 440, 200], fill=(250, 210, 60))
    draw.polygon([(80, 360), (200, 180), (320, 360)], fill=(150, 90, 60))
    return picture if size == 512 else picture.resize((size, size))


# ----------------------------------------------------------------------------------------------------------------
# SVG helpers


class Svg:
    """A minimal SVG writer: boxes with centred text lines, arrows, free text."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.items: list[str] = []

    def box(self, x: float, y: float, w: float, h: float, lines: Sequence[str], fill: str = "#eef4fb",
            stroke: str = "#1f77b4", bold_first: bool = True) -> None:
        self.items.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{fill}" stroke="{stroke}"/>')
        top = y + h / 2 - (len(lines) - 1) * 8
        for i, line in enumerate(lines):
            weight = "bold" if bold_first and i == 0 else "normal"
            self.text(x + w / 2, top + i * 16, line, size=12, weight=weight)

    def text(self, x: float, y: float, s: str, size: int = 13, weight: str = "normal", anchor: str = "middle",
             color: str = "#222") -> None:
        s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        self.items.append(f'<text x="{x}" y="{y + 4}" font-size="{size}" font-weight="{weight}" '
                          f'text-anchor="{anchor}" fill="{color}">{s}</text>')

    def arrow(self, points: Sequence[tuple[float, float]], color: str = "#444", dashed: bool = False,
              label: str | None = None) -> None:
        path = " ".join(f"{x},{y}" for x, y in points)
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        self.items.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"{dash} '
                          f'marker-end="url(#head)"/>')
        if label:
            (x0, y0), (x1, y1) = points[-2], points[-1]
            self.text((x0 + x1) / 2 + 6, (y0 + y1) / 2 - 6, label, size=11, anchor="start", color="#555")

    def write(self, path: Path) -> None:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="DejaVu Sans, Arial, sans-serif">\n'
                '<defs><marker id="head" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
                '<path d="M0,0 L10,4 L0,8 z" fill="#444"/></marker></defs>\n'
                f'<rect width="{self.width}" height="{self.height}" fill="white"/>\n')
        path.write_text(head + "\n".join(self.items) + "\n</svg>\n")


def _shape(shape: tuple[int, ...] | None) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if shape else "--"


# ----------------------------------------------------------------------------------------------------------------
# Diagrams


def data_path(path: Path) -> None:
    sd1 = inspect_model("sd15", size=512, depth=1)
    sd2 = inspect_model("sd21-base", size=512, depth=0)
    ids = sd1["text_encoder"].row("").input_shape
    ctx1, ctx2 = sd1["text_encoder"].row("").output_shape, sd2["text_encoder"].row("").output_shape
    lat = sd1["unet"].row("").input_shape
    img = sd1["vae"].row("").output_shape
    post = sd1["vae"].row("encoder").output_shape
    pair = (2 * lat[0], *lat[1:])
    scale = ldm.SD15.vae.scaling_factor
    svg = Svg(1000, 520)
    svg.text(500, 22, "Stable Diffusion: from prompt to pixels (512 x 512, one image)", size=16, weight="bold")
    # the text branch
    svg.box(20, 50, 150, 56, ["prompt", '"a dog wearing hat"'], fill="#fff8e6", stroke="#c98b00")
    svg.box(210, 50, 180, 56, ["CLIPTokenizer", f"ids {_shape(ids)}", "ldm/tokenizer.py"])
    svg.box(430, 50, 200, 56, ["CLIPTextModel", f"{_shape(ctx1)} per prompt", "ldm/clip.py"])
    svg.box(670, 50, 310, 56, ["context [uncond; cond]", f"{_shape((2, *ctx1[1:]))}; SD 2: {_shape((2, *ctx2[1:]))}",
                               'the negative prompt (or "") first'], fill="#fff8e6", stroke="#c98b00")
    svg.arrow([(170, 78), (210, 78)])
    svg.arrow([(390, 78), (430, 78)])
    svg.arrow([(630, 78), (670, 78)])
    # the starting noise
    svg.box(20, 180, 150, 56, ["seed", "CPU generator"], fill="#fff8e6", stroke="#c98b00")
    svg.box(210, 180, 210, 56, ["x_T = randn x init_noise_sigma", _shape(lat)])
    svg.arrow([(170, 208), (210, 208)])
    # the loop
    svg.items.append('<rect x="450" y="150" width="530" height="240" rx="10" fill="none" stroke="#999" '
                     'stroke-dasharray="6,4"/>')
    svg.text(460, 140, "for t in scheduler.timesteps", size=12, weight="bold", anchor="start")
    svg.text(970, 378, "StableDiffusionPipeline.denoise, ldm/pipeline.py", size=11, anchor="end", color="#555")
    svg.box(470, 185, 240, 56, ["UNet2DConditionModel", f"[x; x] {_shape(pair)}, t, context", "ldm/unet.py"])
    svg.box(750, 185, 220, 56, ["classifier-free guidance", "eps = u + s x (c - u)", f"{_shape(pair)} -> {_shape(lat)}"])
    svg.box(600, 300, 240, 56, ["scheduler.step(eps, t, x)", f"less noisy x {_shape(lat)}", "ldm/schedulers/"])
    svg.arrow([(700, 106), (700, 185)], color="#c98b00")
    svg.arrow([(420, 208), (470, 208)])
    svg.arrow([(710, 213), (750, 213)])
    svg.arrow([(860, 241), (860, 328), (840, 328)])
    svg.arrow([(600, 328), (530, 328), (530, 241)], dashed=True, label="next t")
    # decoding
    svg.box(470, 440, 240, 56, ["AutoencoderKL.decode", f"x / {scale}", "ldm/vae.py"])
    svg.box(760, 440, 220, 56, ["image", f"{_shape(img)} in [-1, 1]", "-> PNG"], fill="#fff8e6", stroke="#c98b00")
    svg.arrow([(620, 356), (620, 440)])
    svg.arrow([(710, 468), (760, 468)])
    # image to image
    svg.box(20, 300, 170, 56, ["init image (img2img)", _shape(img)], fill="#fff8e6", stroke="#c98b00")
    svg.box(210, 300, 210, 56, ["AutoencoderKL.encode", f"{_shape(post)} -> sample", f"x {scale} = {_shape(lat)}"])
    svg.box(210, 410, 210, 56, ["scheduler.add_noise", "to the t that strength picks", "the loop runs from there"])
    svg.arrow([(190, 328), (210, 328)])
    svg.arrow([(315, 356), (315, 410)])
    svg.arrow([(420, 438), (440, 438), (440, 230), (470, 230)], dashed=True)
    svg.write(path)


def unet_diagram(path: Path) -> None:
    t = inspect_model("sd15", size=512, depth=2, components=["unet"])["unet"]
    cfg = ldm.SD15.unet
    levels = len(cfg.block_out_channels)
    svg = Svg(1000, 640)
    svg.text(500, 22, "SD 1.5 UNet at 512 x 512 (latents 64 x 64): channels x size after each block, parameters",
             size=15, weight="bold")
    row = t.row("conv_in")
    svg.box(20, 60, 210, 50, ["conv_in", f"{_shape(row.input_shape[1:])} -> {_shape(row.output_shape[1:])}"])
    svg.box(330, 44, 340, 42, ["timestep t -> sinusoid (320) -> MLP -> temb (1280)", "added in every ResNet block"],
            fill="#fff8e6", stroke="#c98b00")
    svg.box(330, 92, 340, 42, [f"context {_shape((1, 77, cfg.cross_attention_dim))}",
                               "keys and values of every cross-attention (attn2)"], fill="#fff8e6", stroke="#c98b00")
    x_down, x_up, w, h = 20, 770, 210, 62

    def contents(level: int) -> str:
        return "ResNet+Transformer" if cfg.cross_attention_levels[level] else "ResNet"

    for i in range(levels):
        y = 140 + i * 100
        r = t.row(f"down_blocks.{i}")
        svg.box(x_down, y, w, h, [f"down_blocks.{i}", f"{r.output_shape[1]} x {r.output_shape[2]}x{r.output_shape[3]}",
                                  f"{contents(i)}  {r.params / 1e6:.1f}M"])
        j = levels - 1 - i  # the up level drawn on this row
        u = t.row(f"up_blocks.{j}")
        svg.box(x_up, y, w, h, [f"up_blocks.{j}", f"{u.output_shape[1]} x {u.output_shape[2]}x{u.output_shape[3]}",
                                f"{contents(i)}  {u.params / 1e6:.1f}M"], fill="#f3fbef", stroke="#2ca02c")
        svg.arrow([(x_down + w, y + h / 2), (x_up, y + h / 2)], color="#999", dashed=True,
                  label="skip connections" if i == 0 else None)
        if i:
            svg.arrow([(x_down + w / 2, y - 38), (x_down + w / 2, y)])
            svg.arrow([(x_up + w / 2, y), (x_up + w / 2, y - 38)])
    svg.arrow([(x_down + w / 2, 110), (x_down + w / 2, 140)])
    m = t.row("mid_block")
    bottom = 140 + (levels - 1) * 100 + h
    svg.box(400, 535, 200, 62, ["mid_block", f"{m.output_shape[1]} x {m.output_shape[2]}x{m.output_shape[3]}",
                                f"ResNet, Transformer, ResNet  {m.params / 1e6:.1f}M"], fill="#fdf0ef",
            stroke="#d62728")
    svg.arrow([(x_down + w / 2, bottom), (x_down + w / 2, 566), (400, 566)])
    svg.arrow([(600, 566), (x_up + w / 2, 566), (x_up + w / 2, bottom)])
    o = t.row("conv_out")
    svg.box(770, 60, 210, 50, ["norm, SiLU, conv_out", f"-> {_shape(o.output_shape[1:])}"], fill="#f3fbef",
            stroke="#2ca02c")
    svg.arrow([(x_up + w / 2, 140), (x_up + w / 2, 110)])
    svg.text(500, 622, f"total {t.total_params:,} parameters; each up level has one ResNet more than its down "
                       f"level, and each of its ResNets reads [x, skip] concatenated", size=12, color="#555")
    svg.write(path)


# ----------------------------------------------------------------------------------------------------------------
# Pictures (Pillow)


@torch.no_grad()
def trained_like_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights that scale like trained ones (DESIGN.md): std 1/sqrt(fan_in), norms near 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 1:
            p.copy_(1.0 + 0.05 * noise if "norm" in name and name.endswith("weight") else 0.02 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def latents_picture(path: Path, vae_path: str | None) -> None:
    if vae_path is None:
        vae = trained_like_(ldm.AutoencoderKL(ldm.SD15.vae)).eval()
        note = "full-size VAE, trained-like random weights"
    else:
        from weights_convert.load import load_vae

        vae = load_vae(vae_path).eval()
        note = f"VAE from {Path(vae_path).name}"
    with torch.no_grad():
        z = vae.encode(image_to_tensor(draw_picture(512))).mean[0]  # (4, 64, 64)
    tile, gap, top = 192, 8, 28
    canvas = Image.new("RGB", (4 * tile + 3 * gap, tile + top + 22), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(4):
        a = z[c].numpy()
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
        img = Image.fromarray((a * 255).round().astype(np.uint8)).resize((tile, tile), Image.NEAREST)
        x = c * (tile + gap)
        canvas.paste(img, (x, top))
        draw.text((x + tile / 2, 8), f"channel {c}  ({z.shape[1]} x {z.shape[2]})", fill="black", anchor="mt")
    draw.text((canvas.width / 2, tile + top + 6), f"latent mean of the drawn 512 x 512 picture; {note}",
              fill=GREY, anchor="mt")
    canvas.save(path, optimize=True)


def _chart(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xs: Sequence[float],
           series: Sequence[tuple[str, Sequence[float], tuple[int, int, int]]], y_range: tuple[float, float],
           y_ticks: Sequence[tuple[float, str]], title: str, transform: Callable[[float], float] = float) -> None:
    """A line chart in `box` (left, top, right, bottom); ys pass through `transform` (e.g. log10)."""
    left, top, right, bottom = box
    y_min, y_max = y_range

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - xs[0]) / (xs[-1] - xs[0]) * (right - left),
                bottom - (transform(y) - y_min) / (y_max - y_min) * (bottom - top))

    draw.text(((left + right) / 2, top - 22), title, fill="black", anchor="mm")
    for y, label in y_ticks:
        _, py = px(xs[0], y)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((left - 8, py), label, fill="black", anchor="rm")
    for x in range(0, int(xs[-1]) + 1, 10):
        qx, _ = px(x, 1.0 if transform is float else 1.0)
        draw.line([(qx, top), (qx, bottom)], fill=(235, 235, 235))
        draw.text((qx, bottom + 8), str(x), fill="black", anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=GREY)
    for i, (label, ys, color) in enumerate(series):
        draw.line([px(x, y) for x, y in zip(xs, ys)], fill=color, width=3)
        draw.text(((left + right) / 2, top + 14 + 18 * i), label, fill=color, anchor="mm")
    draw.text(((left + right) / 2, bottom + 28), "step of a 50-step DDIM run", fill="black", anchor="mt")


def noise_levels(path: Path) -> None:
    scheduler = ldm.schedulers.DDIMScheduler.from_config(ldm.SD15.scheduler)
    scheduler.set_timesteps(50)
    a = scheduler.alphas_cumprod[scheduler.timesteps].double()
    steps = list(range(len(a)))
    signal, noise = a.sqrt().tolist(), (1 - a).sqrt().tolist()
    sigma = ((1 - a) / a).sqrt().tolist()
    img = Image.new("RGB", (1000, 430), "white")
    draw = ImageDraw.Draw(img)
    _chart(draw, (70, 50, 470, 360), steps,
           [("signal sqrt(alpha_bar)", signal, BLUE), ("noise sqrt(1 - alpha_bar)", noise, RED)], (0.0, 1.0),
           [(v / 5, f"{v / 5:.1f}") for v in range(6)], "what the latents hold at each step")
    _chart(draw, (570, 50, 970, 360), steps, [("sigma = noise / signal", sigma, GREEN)], (-2.0, 1.5),
           [(10.0 ** e, f"{10.0 ** e:g}") for e in (-2, -1, 0, 1)], "noise level sigma (log scale)",
           transform=math.log10)
    first, last = int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])
    draw.text((500, 415), f"timesteps {first} ... {last}; SD's scaled_linear schedule (beta 0.00085 to 0.012, "
                          f"1000 training steps)", fill=GREY, anchor="mm")
    img.save(path, optimize=True)


def add_noise_grid(path: Path) -> None:
    scheduler = ldm.schedulers.DDIMScheduler.from_config(ldm.SD15.scheduler)
    scheduler.set_timesteps(50)
    x = image_to_tensor(draw_picture(128))  # (1, 3, 128, 128) in [-1, 1]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    tile, gap, top = 128, 8, 24
    canvas = Image.new("RGB", (len(STEPS) * (tile + gap) - gap, tile + top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, step in enumerate(STEPS):
        t = scheduler.timesteps[step:step + 1]
        noisy = scheduler.add_noise(x, noise, t)[0]  # (3, 128, 128)
        pixels = ((noisy.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(pixels), (i * (tile + gap), top))
        draw.text((i * (tile + gap) + tile / 2, 6), f"step {step}, t = {int(t)}", fill="black", anchor="mt")
    # noise does not compress: 128 colours keep the file small and the picture faithful
    canvas.quantize(128, dither=Image.Dither.NONE).save(path, optimize=True)


JOBS = {"data_path": "diagram_data_path.svg", "unet": "diagram_unet.svg", "latents": "learn_vae_latents.png",
        "noise_levels": "learn_noise_levels.png", "add_noise": "learn_add_noise.png"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=tuple(JOBS), action="append", default=None)
    parser.add_argument("--vae", default=None, help="a VAE checkpoint or folder for the latent channels picture")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default docs/images)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for job in args.only or JOBS:
        path = args.out / JOBS[job]
        if job == "data_path":
            data_path(path)
        elif job == "unet":
            unet_diagram(path)
        elif job == "latents":
            latents_picture(path, args.vae)
        elif job == "noise_levels":
            noise_levels(path)
        else:
            add_noise_grid(path)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
