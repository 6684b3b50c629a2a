"""Draw docs/images/learn_controlnet.png: a photo, its Canny edges, and the shipped shapes model's image under a
freshly initialised ControlNet (zero convolutions: the same image as without it). Run from the repository root:
`python scripts/learn_controlnet_picture.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import ldm
from ldm.canny import canny_image
from ldm.controlnet import ControlNetConfig, ControlNetModel

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    photo = Image.new("RGB", (64, 64), (135, 190, 235))
    draw = ImageDraw.Draw(photo)
    draw.rectangle([0, 45, 64, 64], fill=(80, 160, 60))
    draw.ellipse([20, 8, 44, 32], fill=(250, 220, 90))
    edges = canny_image(photo)
    plain_pipe = ldm.load_pipeline(ROOT / "ldm" / "data" / "shapes-model")
    torch.manual_seed(0)
    # the shapes model's VAE downsamples by 4, so the hint encoder has 3 levels (2 halvings), not 4
    net = ControlNetModel(ControlNetConfig(unet=plain_pipe.unet.config, hint_channels=(16, 32, 96))).eval()
    pipe = ldm.StableDiffusionControlNetPipeline(unet=plain_pipe.unet, vae=plain_pipe.vae,
                                                 text_encoder=plain_pipe.text_encoder, tokenizer=plain_pipe.tokenizer,
                                                 scheduler=plain_pipe.scheduler, family=plain_pipe.family,
                                                 controlnet=net)
    kw = dict(num_inference_steps=20, seed=4, height=64, width=64)
    controlled = pipe("a green triangle", control_image=edges, **kw).images[0]
    plain = plain_pipe("a green triangle", **kw).images[0]
    assert np.array_equal(np.array(controlled), np.array(plain)), "zero convolutions must change nothing"
    sheet = Image.new("RGB", (3 * 192 + 16, 192), "white")
    for k, img in enumerate((photo, edges, controlled)):
        sheet.paste(img.resize((192, 192), Image.NEAREST), (k * 200, 0))
    sheet.save(ROOT / "docs" / "images" / "learn_controlnet.png", optimize=True)


if __name__ == "__main__":
    main()
