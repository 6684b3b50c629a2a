"""Write a small random-weight Stable Diffusion 1.x-layout model as a diffusers folder, with ldm's own code only.

    python scripts/make_demo_model.py out/demo-model

No real weights can be downloaded on every machine, so this gives `ldm generate` something to load: the SD 1.x
architecture at a small width (UNet, VAE, CLIP text encoder with the real tokenizer), with trained-like random
weights. Its pictures are structured noise, not art: it shows the whole path (loading through the converter,
tokenizer, text encoder, UNet, scheduler, VAE, PNG with metadata) runs, in seconds on a CPU. For real pictures
pass a real checkpoint to `--model`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldm  # noqa: E402
from ldm.schedulers import from_name  # noqa: E402
from weights_convert.export import export_diffusers  # noqa: E402
from weights_convert.load import Components  # noqa: E402


@torch.no_grad()
def trained_like_(module: torch.nn.Module, seed: int) -> None:
    """std 1/sqrt(fan_in) for weights, norms near 1, small biases and embeddings."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 1:
            p.copy_(1.0 + 0.05 * noise if "norm" in name and name.endswith("weight") else 0.02 * noise)
        elif "embedding" in name:
            p.copy_(0.02 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out_dir.exists():
        sys.exit(f"error: {args.out_dir} exists; choose a new folder")
    preset = replace(
        ldm.SD15, name="sd15",
        unet=replace(ldm.SD15.unet, block_out_channels=(64, 128), cross_attention_levels=(True, False),
                     num_heads=(4, 4), cross_attention_dim=128, layers_per_block=1, sample_size=8),
        vae=replace(ldm.SD15.vae, block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=64),
        text=replace(ldm.SD15.text, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4),
    )
    parts = [ldm.UNet2DConditionModel(preset.unet), ldm.AutoencoderKL(preset.vae), ldm.CLIPTextModel(preset.text)]
    for i, model in enumerate(parts):
        trained_like_(model, args.seed + i)
    unet, vae, text_encoder = parts
    components = Components(unet=unet, vae=vae, text_encoder=text_encoder,
                            tokenizer=ldm.CLIPTokenizer.packaged(pad_token=preset.pad_token),
                            scheduler=from_name("pndm", preset.scheduler), family=preset, source=args.out_dir)
    out = export_diffusers(components, args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
