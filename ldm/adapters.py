"""The adapter methods of the pipeline, in diffusers' words: textual inversion embeddings and LoRAs.

`StableDiffusionPipeline` inherits them (as diffusers' pipelines inherit `TextualInversionLoaderMixin` and
`StableDiffusionLoraLoaderMixin`). The work is elsewhere: the files are read and checked by the converter
(weights_convert/adapter_files.py, weights_convert/lora.py, imported on use as `ldm.load_pipeline` is), the
splicing in ldm/embeddings.py, the merging in ldm/lora.py. A file that fails any check leaves the pipeline
unchanged. docs/adapters.md explains the formats and the math. At the end: `ldm generate`'s --embedding / --lora /
--lora-dir options, which load files through these methods.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torch import nn

from ldm.embeddings import TextualInversion
from ldm.lora import LoRAMerger

__all__ = ["AdapterMixin", "LoRAMerger", "TextualInversion"]


class AdapterMixin:
    """Needs `unet`, `text_encoder`, `textual_inversion` (a TextualInversion) and `lora` (a LoRAMerger)."""

    unet: nn.Module
    text_encoder: nn.Module
    textual_inversion: TextualInversion
    lora: LoRAMerger

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Load a textual inversion embedding (A1111 .pt / .safetensors, kohya, diffusers learned_embeds) so that
        `token` in a prompt (default: the file's word, or its stem) stands for its vectors. Returns the word."""
        from weights_convert.adapter_files import read_embedding

        embedding = read_embedding(path, token)
        self.textual_inversion.add(embedding, self.text_encoder.config.hidden_size)
        return embedding.word

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Forget the named embedding words (None: all)."""
        for word in [tokens] if isinstance(tokens, str) else (tokens or [None]):
            self.textual_inversion.remove(word)

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, weight: float = 1.0) -> str:
        """Merge a LoRA file (kohya / A1111 or diffusers / PEFT) into the UNet and text encoder at `weight`, next
        to the LoRAs already active. Returns the adapter's name (default: the file stem)."""
        from weights_convert.lora import read_lora

        name = Path(path).stem if adapter_name is None else adapter_name
        adapter = read_lora(path, self.unet, self.text_encoder)
        self.lora.add(name, adapter, self._lora_modules(), weight)
        return name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Merge exactly these LoRAs with these weights (default 1.0 each); the others are taken out."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (list, tuple)):
            weights = list(adapter_weights)
        else:
            weights = [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} adapter_weights")
        self.lora.set_active(dict(zip(names, weights)), self._lora_modules())

    def unload_lora_weights(self) -> None:
        """Take every LoRA out: the original weights are copied back, bit for bit."""
        self.lora.unload(self._lora_modules())

    def _lora_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}


# ----------------------------------------------------------------------------------------------------------------
# `ldm generate --embedding FILE --lora FILE[:SCALE] --lora-dir DIR` (registered by ldm/cli.py)


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds): its word "
                        "(the file stem, or the diffusers file's token) in the prompts stands for its vectors; "
                        "repeatable")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA (kohya/A1111 or diffusers/PEFT) merged at SCALE (default 1); repeatable")
    g.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where A1111 prompt tags <lora:NAME:SCALE> find NAME.safetensors (or .pt, .bin)")


def check_args(args: argparse.Namespace) -> None:
    """--embedding, --lora and the prompt's <lora:NAME:SCALE> tags: files found and scales read, before any load.
    The tags leave the prompt the model sees (args.prompt); the PNG's parameters keep them (args.prompt_as_given).
    Sets args.loras: [(path, scale)], the --lora files then the tags'."""
    from ldm.cli import UsageError
    from ldm.lora import parse_lora_tags

    args.prompt_as_given = args.prompt
    try:
        args.prompt, tags = parse_lora_tags(args.prompt)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.loras = [_lora_arg(value) for value in args.lora]
    if tags and args.lora_dir is None:
        raise UsageError(f"the prompt names <lora:{tags[0][0]}:...>: give --lora-dir, the folder that holds it")
    for name, scale in tags:
        found = [Path(args.lora_dir) / f"{name}{suffix}" for suffix in (".safetensors", ".pt", ".bin", ".ckpt")]
        found = [path for path in found if path.is_file()]
        if not found:
            raise UsageError(f"<lora:{name}:...>: no {name}.safetensors (.pt, .bin, .ckpt) in --lora-dir "
                             f"{args.lora_dir!r}")
        args.loras.append((str(found[0]), scale))
    for path in args.embedding:
        if not os.path.isfile(path):
            raise UsageError(f"--embedding: no such file {path!r}")


def _lora_arg(value: str) -> tuple[str, float]:
    """PATH or PATH:SCALE (a path may hold colons itself: the tail is a scale only if it reads as a number)."""
    from ldm.cli import UsageError

    path, _, tail = value.rpartition(":")
    try:
        scale = float(tail) if path else None
    except ValueError:
        scale = None
    if scale is None:
        path, scale = value, 1.0
    if not os.path.isfile(path):
        raise UsageError(f"--lora: no such file {path!r}")
    return path, scale


def load_from_args(pipe: AdapterMixin, args: argparse.Namespace) -> None:
    """Load the --embedding files and merge the LoRAs (checked by check_args); a bad file is a usage error."""
    from ldm.cli import UsageError, _one_line

    try:
        for path in args.embedding:
            pipe.load_textual_inversion(path)
        for i, (path, scale) in enumerate(args.loras):
            pipe.load_lora_weights(path, adapter_name=f"{i}:{Path(path).stem}", weight=scale)
    except (ValueError, OSError) as e:
        raise UsageError(_one_line(e)) from None
