"""`ldm train`: train a latent diffusion model on captioned shapes, or continue a stopped run.

    ldm train --out runs/shapes [--vae-steps N --unet-steps N --batch-size N --seed S --threads T]
    ldm train --out runs/shapes --resume runs/shapes/checkpoint.safetensors

Errors (bad numbers, an --out that is a file, a corrupt or foreign --resume file) print one line and exit with
status 2. Ctrl-C stops the run; the last complete checkpoint stays on disk and --resume continues from it.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the run folder: checkpoint, samples, loss curve, model/")
    p.add_argument("--resume", default=None, help="a checkpoint.safetensors of a stopped run to continue")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default 6000)")
    p.add_argument("--unet-steps", type=int, default=None, help="UNet + text encoder steps (default 4000)")
    p.add_argument("--batch-size", type=int, default=None, help="UNet-stage batch size (default 32)")
    p.add_argument("--seed", type=int, default=None, help="the run's seed (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 100)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from ldm.train import TrainConfig, Trainer

    overrides = {k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps),
                                   ("batch_size", args.batch_size), ("seed", args.seed),
                                   ("checkpoint_every", args.checkpoint_every)) if v is not None}
    if args.threads is not None:
        if args.threads < 1:
            return _error(f"--threads must be a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        cfg = None if args.resume and not overrides else TrainConfig(out_dir=args.out, **overrides)
        trainer = Trainer(cfg, resume=args.resume, progress=args.progress)
        if args.resume and cfg is None:  # continue in the folder asked for
            trainer = Trainer(TrainConfig.from_json({**trainer.cfg.to_json(), "out_dir": args.out}),
                              resume=args.resume, progress=args.progress)
    except (ValueError, TypeError, OSError) as e:
        return _error(str(e))
    try:
        model = trainer.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {trainer.step}; the last checkpoint is {trainer.checkpoint_path} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    if model is not None:  # under torchrun, rank 0's (the other ranks write nothing)
        print(f"model written to {model}")
    return 0


def _error(message: str) -> int:
    print(f"ldm train: error: {message}", file=sys.stderr)
    return 2
