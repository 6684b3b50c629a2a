"""The adapter methods of the pipeline, in diffusers' words: textual inversion embeddings and LoRAs.

`StableDiffusionPipeline` inherits them (as diffusers' pipelines inherit `TextualInversionLoaderMixin` and
`StableDiffusionLoraLoaderMixin`). The work is elsewhere: the files are read and checked by the converter
(weights_convert/adapter_files.py, weights_convert/lora.py, imported on use as `ldm.load_pipeline` is), the
splicing in ldm/embeddings.py, the merging in ldm/lora.py. A file that fails any check leaves the pipeline
unchanged. docs/adapters.md explains the formats and the math.
"""

from __future__ import annotations

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
