"""`ldm train`: train a latent diffusion model on captioned shapes, or continue a stopped run.

    ldm train --out runs/shapes [--vae-steps N --unet-steps N --batch-size N --seed S --threads T]
    ldm train --out runs/shapes --resume runs/shapes/checkpoint.safetensors

Errors (bad numbers, an --out that is a file or not writable, a corrupt or foreign --resume file, a batch that
cannot fit in memory, a full disk) print one line and exit with status 2. Ctrl-C stops the run; the last complete
checkpoint stays on disk and --resume continues from it. A run that fails before writing anything leaves no run
folder behind (only folders it created itself, and only while they hold nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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

    overrides = {k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps),
                                   ("batch_size", args.batch_size), ("seed", args.seed),
                                   ("checkpoint_every", args.checkpoint_every)) if v is not None}
    if args.threads is not None:
        if not 1 <= args.threads <= 1024:
            return _error(f"--threads must be a positive int up to 1024, got {args.threads}")
        torch.set_num_threads(args.threads)
    created, code = not os.path.exists(args.out), None
    try:
        code = _train(args, overrides)
        return code
    finally:
        if created and code != 0:  # a failed or refused run leaves no empty run folder
            _remove_empty(Path(args.out))


def _train(args: argparse.Namespace, overrides: dict[str, int]) -> int:
    from ldm.train import TrainConfig, Trainer

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
    except OSError as e:  # a full disk, a folder made read-only mid-run: the last complete checkpoint stays
        last = trainer.checkpoint_path if trainer.checkpoint_path.is_file() else "none was written"
        return _error(f"cannot write {e.filename or trainer.out}: {e.strerror or e} at step {trainer.step}; the "
                      f"last complete checkpoint: {last}")
    if model is not None:  # under torchrun, rank 0's (the other ranks write nothing)
        print(f"model written to {model}")
    return 0


def _remove_empty(folder: Path) -> None:
    """Remove `folder` and its subfolders where they hold no file (a run that wrote nothing leaves nothing)."""
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _error(message: str) -> int:
    print(f"ldm train: error: {message}", file=sys.stderr)
    return 2
