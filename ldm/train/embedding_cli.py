"""`ldm train-embedding`: teach the shapes model a new word (textual inversion, ldm/train/embedding.py).

    ldm train-embedding --out orange.pt [--word "<orange>" --colour 240,130,20 --init-word red --vectors 1
                        --images 8 --steps 300 --batch-size 8 --lr 0.02 --seed 0 --threads 1 --model DIR]

Options left out take EmbeddingConfig's defaults. Errors print one line and exit with status 2; the file is
written atomically, and an existing one only with --overwrite. Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_CONFIG_OPTIONS = ("word", "init_word", "vectors", "images", "steps", "batch_size", "lr", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the embedding file: .pt (A1111) or .safetensors / .bin (diffusers)")
    p.add_argument("--model", default=None, help="a diffusers folder (default: the packaged shapes model)")
    p.add_argument("--word", default=None, help="the new word (default <orange>)")
    p.add_argument("--colour", default=None, metavar="R,G,B",
                   help="the concept: shapes drawn in this colour (default 240,130,20: orange)")
    p.add_argument("--init-word", default=None, help="the vectors start at this word's embedding (default red)")
    p.add_argument("--vectors", type=int, default=None, help="vectors for the word (default 1)")
    p.add_argument("--images", type=int, default=None, help="concept images (default 8)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 0.02)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 is fastest on a busy CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix not in (".pt", ".safetensors", ".bin"):
        return _error(f"--out must end in .pt, .safetensors or .bin, got {args.out!r}")
    if out.exists() and not args.overwrite:
        return _error(f"{args.out!r} exists; use --overwrite to replace it")
    if not out.parent.is_dir():
        return _error(f"--out: folder {str(out.parent)!r} does not exist")
    if args.threads is not None and args.threads < 1:
        return _error(f"--threads must be >= 1, got {args.threads}")
    import torch

    import ldm
    from ldm.train import DEFAULT_MODEL_DIR
    from ldm.train.embedding import EmbeddingConfig, save_embedding, train_embedding

    overrides = {k: getattr(args, k) for k in _CONFIG_OPTIONS if getattr(args, k) is not None}
    try:
        if args.colour is not None:
            overrides["colour"] = tuple(int(c) for c in args.colour.split(","))
        cfg = EmbeddingConfig(**overrides)
    except ValueError as e:
        return _error(f"--colour must be R,G,B integers, got {args.colour!r}" if "int()" in str(e) else str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        pipe = ldm.load_pipeline(args.model or DEFAULT_MODEL_DIR)
    except (ValueError, OSError) as e:
        return _error(f"cannot load model {args.model!r}: {e}")
    from tqdm import tqdm

    with tqdm(total=cfg.steps, desc="train-embedding", unit="step", file=sys.stderr, disable=None) as bar:
        def log(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        try:
            embedding = train_embedding(pipe, cfg, log=log)
        except ValueError as e:
            return _error(str(e))
    print(save_embedding(embedding, out, cfg.steps))
    return 0


def _error(message: str) -> int:
    print(f"ldm train-embedding: error: {message}", file=sys.stderr)
    return 2
