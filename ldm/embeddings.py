"""Textual inversion: a new word's vectors spliced into the token embeddings of a prompt, the vocabulary unchanged.

Paper: Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual
Inversion" (arXiv:2208.01618): a concept is learned as n vectors v_1..v_n in the text encoder's input space,
everything else frozen; writing its word in a prompt puts those vectors where the word's token embeddings would be.
Reference for the splicing: AUTOMATIC1111/stable-diffusion-webui `modules/sd_hijack.py` (`EmbeddingsWithFixes`) and
`modules/textual_inversion/textual_inversion.py`; for the result: diffusers 0.42.1
`loaders/textual_inversion.py` (`load_textual_inversion`, `maybe_convert_prompt`), whose prompt embeddings ours
equal for the same vectors.

How it works here (no new token in the tokenizer, no row added to the embedding table):
1. `SplicingTokenizer.encode(text)` finds each loaded word in the text (case-insensitively, as the tokenizer
   lower-cases; a word that starts or ends with a letter or digit only where it is not glued to another one),
   tokenizes the text around it as usual and puts n placeholder ids there, one per vector. Placeholder ids are
   `PLACEHOLDER + row` (row of the table of all loaded vectors), far above any real vocabulary.
2. Everything that works on ids works unchanged: emphasis `(word:1.2)` weights the n positions, prompts longer than
   75 tokens are chunked, the negative prompt is read the same way.
3. `splice(text_encoder, ids)` (the hook in the prompt encoder) looks the real ids up in the text encoder's
   `token_embedding` and the placeholder ids in the table: the text encoder then runs on those token embeddings
   (transformers' `inputs_embeds`), position embeddings added as always.

diffusers adds tokens `<word>`, `<word>_1`, ... to its tokenizer and rewrites a multi-vector prompt to
`<word> <word>_1 ...`; both give the same n positions with the same vectors, so the same context.
Difference from A1111: a multi-vector word that straddles a 75-token chunk boundary is split across the two chunks
(A1111 moves it whole into the next chunk).

Shapes: n vectors of a word, D text width (768 SD 1.x, 1024 SD 2.x), N rows of all loaded words, B, S ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

PLACEHOLDER = 1 << 40  # placeholder id of table row r: PLACEHOLDER + r (no vocabulary comes near)


@dataclass(frozen=True)
class Embedding:
    """One loaded word: its vectors (n, D) in float32 on the CPU, and the file it came from."""

    word: str
    vectors: Tensor  # (n, D)
    source: str


class TextualInversion:
    """The embeddings loaded into a pipeline (`pipe.textual_inversion`), by word, in loading order."""

    def __init__(self) -> None:
        self.embeddings: dict[str, Embedding] = {}
        self._changes = 0  # counts add / remove, so a cache key never confuses two sets of words

    def add(self, embedding: Embedding, width: int) -> None:
        """Register a word; checked first, so a refused word changes nothing."""
        word, vectors = embedding.word, embedding.vectors
        if not isinstance(word, str) or not word.strip() or word != word.strip():
            raise ValueError(f"textual inversion: the word must be a non-empty string without surrounding spaces, "
                             f"got {word!r}")
        if word.lower() in {w.lower() for w in self.embeddings}:
            raise ValueError(f"textual inversion: the word {word!r} is already loaded (from "
                             f"{self.embeddings[_same(word, self.embeddings)].source}); unload it first or pass "
                             f"another token=")
        if vectors.ndim != 2 or vectors.shape[0] < 1:
            raise ValueError(f"textual inversion {word!r}: vectors must be (n, D) with n >= 1, got "
                             f"{tuple(vectors.shape)}")
        if vectors.shape[1] != width:
            raise ValueError(f"textual inversion {word!r} ({embedding.source}): vectors of width {vectors.shape[1]} "
                             f"({_family(vectors.shape[1])}), but this model's text encoder has width {width} "
                             f"({_family(width)})")
        if not torch.isfinite(vectors).all():
            raise ValueError(f"textual inversion {word!r} ({embedding.source}): the vectors hold inf or NaN")
        self.embeddings[word] = embedding
        self._changes += 1

    def remove(self, word: str | None = None) -> None:
        """Forget one word (None: all of them)."""
        self._changes += 1
        if word is None:
            self.embeddings.clear()
            return
        if word not in self.embeddings:
            raise ValueError(f"textual inversion: no word {word!r} is loaded (loaded: {sorted(self.embeddings)})")
        del self.embeddings[word]

    @property
    def state(self) -> tuple:
        """What the prompt cache must key on: the loaded words and their exact vectors."""
        return (self._changes, tuple(e.vectors._version for e in self.embeddings.values()))

    def wrap(self, tokenizer: Any) -> Any:
        """The tokenizer the prompt encoder should use: `tokenizer` itself when no word is loaded."""
        if not self.embeddings:
            return tokenizer
        return SplicingTokenizer(tokenizer, list(self.embeddings.values()))


def _same(word: str, words: dict[str, Embedding]) -> str:
    return next(w for w in words if w.lower() == word.lower())


def _family(width: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL's second encoder"}.get(width, "an unusual width")


class SplicingTokenizer:
    """A tokenizer whose `encode` puts placeholder ids where the loaded words are; the rest is the wrapped one's."""

    def __init__(self, tokenizer: Any, embeddings: list[Embedding]) -> None:
        self.tokenizer = tokenizer
        self.table = torch.cat([e.vectors for e in embeddings])  # (N, D)
        self._rows: dict[str, list[int]] = {}
        row = 0
        for e in embeddings:
            self._rows[e.word.lower()] = list(range(PLACEHOLDER + row, PLACEHOLDER + row + len(e.vectors)))
            row += len(e.vectors)
        # Longest word first, so a word that contains another wins (A1111 prefers the longest match too).
        words = sorted(self._rows, key=len, reverse=True)
        self._pattern = re.compile("|".join(_word_pattern(w) for w in words), re.IGNORECASE)

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)  # bos_id, eos_id, pad_id, decode, ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos), each loaded word replaced by its n placeholder ids."""
        ids: list[int] = []
        start = 0
        for m in self._pattern.finditer(text):
            ids += self._plain(text[start:m.start()])
            ids += self._rows[m.group(0).lower()]
            start = m.end()
        return ids + self._plain(text[start:])

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def splice(self, text_encoder: nn.Module, ids: Tensor) -> dict[str, Tensor]:
        """ids (B, S) with placeholders -> the text encoder's arguments: the ids with placeholders as 0 (the
        placeholder position's id only matters for the pooled output's EOS search, which 0 never wins) and the
        token embeddings (B, S, D) with the loaded vectors at the placeholders."""
        spliced = ids >= PLACEHOLDER  # (B, S)
        if not spliced.any():
            return {"input_ids": ids}
        input_ids = ids.masked_fill(spliced, 0)
        table = text_encoder.text_model.embeddings.token_embedding
        embeds = table(input_ids)  # (B, S, D)
        vectors = self.table.to(device=embeds.device, dtype=embeds.dtype)  # (N, D)
        embeds[spliced] = vectors[ids[spliced] - PLACEHOLDER]
        return {"input_ids": input_ids, "inputs_embeds": embeds}


def _word_pattern(word: str) -> str:
    """The regex of one word: literal, and not glued to a letter or digit on a side where it has one."""
    before = r"(?<![^\W_])" if word[0].isalnum() else ""
    after = r"(?![^\W_])" if word[-1].isalnum() else ""
    return before + re.escape(word) + after
