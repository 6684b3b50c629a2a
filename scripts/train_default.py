"""Train the model the project ships (`ldm generate` without --model) and copy it into the package.

Run on an otherwise idle machine (2 CPU cores are enough; about 31 minutes in all, see docs/training.md):

    python scripts/train_default.py [--out runs/default] [--threads 2]
    python scripts/train_default.py --resume runs/default/checkpoint.safetensors --unet-steps 6000

The first command trains TrainConfig's defaults (VAE 6,000 steps at batch 16 on 32 px crops, then UNet + CLIP 4,000
steps at batch 32); the second extends the finished run to 6,000 UNet steps, as the shipped model was made. Each
prints a time estimate after the first steps of a stage, then copies the exported fp16 model folder to
ldm/data/shapes-model/ (checked to be <= 20 MB) and the pictures for docs/training.md to docs/images/train_*.
Stop it at any time (Ctrl-C, or SIGTERM) and continue with --resume: the result is the same model.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from ldm.train import DEFAULT_MODEL_DIR, TrainConfig, Trainer

LIMIT_BYTES = 20 * 1024 * 1024
DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/default", help="the run folder (checkpoint, samples, curve)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint")
    parser.add_argument("--unet-steps", type=int, default=None,
                        help="with --resume: extend the run to this many UNet steps (see docs/training.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def report(step: int, loss: float) -> None:
        cfg = trainer.cfg
        if step in (20, cfg.vae_steps + 20):
            per_step = trainer.history.seconds / max(1, step)
            print(f"\nstep {step}: {per_step:.2f} s/step so far; stage total estimate "
                  f"{per_step * (cfg.vae_steps if step < cfg.vae_steps else cfg.unet_steps) / 60:.1f} min")

    cfg = TrainConfig(out_dir=args.out, **({} if args.unet_steps is None else {"unet_steps": args.unet_steps}))
    trainer = Trainer(cfg, resume=args.resume, callback=report)
    model = trainer.run()
    size = sum(p.stat().st_size for p in model.rglob("*.safetensors"))
    print(f"trained in {(time.perf_counter() - started) / 60:.1f} min; weights {size / 2**20:.1f} MiB")
    if size > LIMIT_BYTES:
        raise SystemExit(f"the model is {size / 2**20:.1f} MiB, over the 20 MiB the package may ship")
    if DEFAULT_MODEL_DIR.exists():
        shutil.rmtree(DEFAULT_MODEL_DIR)
    shutil.copytree(model, DEFAULT_MODEL_DIR)
    out = trainer.out
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    for name in ("loss_curve.png", "vae_reconstructions.png", "latent_channels.png"):
        shutil.copyfile(out / name, DOCS_IMAGES / f"train_{name}")
    for sample in sorted((out / "samples").glob("step-*.png")):
        shutil.copyfile(sample, DOCS_IMAGES / f"train_samples_{sample.stem}.png")
    print(f"shipped: {DEFAULT_MODEL_DIR}; pictures: {DOCS_IMAGES}/train_*")


if __name__ == "__main__":
    main()
