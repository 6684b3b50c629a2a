"""Prompt encoding: prompts -> token chunks -> the text context the UNet reads, with emphasis `(word:1.3)`,
`(word)`, `[word]` and prompts longer than 77 tokens as AUTOMATIC1111's web UI reads them. Every pipeline call
encodes through `encode_prompt` / `encode_prompt_pair`; ldm/research builds its word maps on the same layout.

Reference: AUTOMATIC1111/stable-diffusion-webui, `modules/prompt_parser.py` (`parse_prompt_attention`) and
`modules/sd_hijack_clip.py` (`FrozenCLIPEmbedderWithCustomWordsBase`: 75-token chunks, `process_tokens`' emphasis).

The syntax (nesting multiplies the weights):
    (text)      weight x 1.1              [text]      weight / 1.1
    (text:1.3)  weight x 1.3              \\( \\) \\[ \\] \\\\   the literal character
Malformed input has one reading, never a crash (A1111's, except where A1111 raises):
    an unclosed `(` or `[` weights the rest of the prompt (x1.1 or /1.1); a stray `)` or `]` is literal text;
    `(text:abc)` has no number, so `:abc` is literal text and the bracket is a plain `(...)` (x1.1);
    `(text:1.2.3)` looks like a weight but is not a number: ValueError naming it (A1111 crashes there).
Not supported: A1111's `BREAK` keyword and its comma back-tracking at chunk ends (a chunk is always 75 tokens).

Encoding (`encode_prompt`): the prompt's tokens (each fragment tokenized on its own, A1111's way) are cut into
chunks of 75, each wrapped as [bos, 75 tokens, eos] and padded with the tokenizer's pad id to 77, encoded by the
text encoder as separate sequences and concatenated along the sequence axis: (B, 77*k, D). Emphasis then scales
each token's hidden state by its weight and multiplies the chunk by `original_mean / new_mean`, so the chunk's mean
is unchanged. Difference from A1111: the mean is taken per prompt and per chunk, not over the whole batch of prompts
(A1111's `z.mean()`), so an image does not depend on the other prompts of its batch; for one prompt they agree.
A prompt without emphasis that fits 75 tokens gives exactly the ids of `tokenizer([prompt])`, one chunk, and no
scaling: a context bit-identical to plain encoding, so parity with diffusers holds. `weighting=False` reads the
prompt literally (brackets are text) but still chunks long prompts (diffusers would truncate them at 77).

Shapes: B prompts, k chunks, S = 77*k context tokens, D text width (768 SD1, 1024 SD2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

CHUNK = 75  # prompt tokens per chunk; with bos and eos a chunk is the text encoder's 77 positions
ROUND = 1.1  # A1111's weight of (text)
SQUARE = 1 / 1.1  # A1111's weight of [text]

_SYNTAX = re.compile(r"""
      \\[\\()\[\]]              # an escaped bracket or backslash: the literal character
    | \\                        # a lone backslash: literal
    | \(                        # open a round bracket
    | \[                        # open a square bracket
    | :\s*([+-]?[.\d]+)\s*\)    # ':1.3)' closes a round bracket with an explicit weight
    | \)
    | \]
    | [^\\()\[\]:]+             # plain text
    | :                         # a colon that starts no weight: literal
""", re.X)


class Tokenizer(Protocol):
    """What this module needs of ldm.tokenizer.CLIPTokenizer."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) pairs, adjacent fragments of equal weight merged.

    parse_prompt_weights("a (red:1.5) [cat]") == [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1/1.1)]
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt_weights: text must be a str, got {type(text).__name__}")
    fragments: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # index into `fragments` where each open bracket started
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for m in _SYNTAX.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            fragments.append([piece[1:] or "\\", 1.0])
        elif piece == "(":
            round_open.append(len(fragments))
        elif piece == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:
            fragments.append([piece, 1.0])  # text, or a stray bracket / ':w)' read literally
    for start in round_open:  # unclosed brackets weight the rest of the prompt
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for piece, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def _weight(number: str, text: str) -> float:
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"prompt weight {number!r} in {text!r} is not a number; write e.g. (word:1.3), "
                         f"or escape the brackets as \\( \\) to mean them literally") from None
    return value


def plain_text(text: str, weighting: bool = True) -> str:
    """The prompt as the text encoder reads it: the syntax removed (weighting=True) or the text as is."""
    return "".join(piece for piece, _ in parse_prompt_weights(text)) if weighting else text


# ----------------------------------------------------------------------------------------------------------------
# Tokens and chunks


def tokenize_weighted(tokenizer: Tokenizer, text: str, weighting: bool = True) -> tuple[list[int], list[float]]:
    """Token ids of the prompt without bos/eos and the weight of each (all 1.0 when weighting=False)."""
    fragments = parse_prompt_weights(text) if weighting else [(_check_text(text), 1.0)]
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in fragments:
        piece_ids = tokenizer.encode(piece) if piece else []
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    return text


def num_chunks(num_tokens: int) -> int:
    """Chunks of 75 needed for `num_tokens` prompt tokens (at least one, for the empty prompt)."""
    return max(1, math.ceil(num_tokens / CHUNK))


def context_position(token_index: int) -> int:
    """Where prompt token `token_index` (0-based, without specials) sits in the (77*k)-long context."""
    chunk, offset = divmod(token_index, CHUNK)
    return chunk * (CHUNK + 2) + 1 + offset


def chunk_tokens(
    ids: Sequence[int], weights: Sequence[float], tokenizer: Tokenizer, chunks: int
) -> tuple[list[int], list[float]]:
    """Lay `ids` out as `chunks` chunks of [bos, 75 tokens, eos, pad...]: 77*chunks ids and their weights (1.0 for
    the specials and pads)."""
    if chunks < num_chunks(len(ids)):
        raise ValueError(f"chunk_tokens: {len(ids)} tokens need {num_chunks(len(ids))} chunks, got chunks={chunks}")
    out_ids: list[int] = []
    out_weights: list[float] = []
    for c in range(chunks):
        part, part_w = list(ids[c * CHUNK:(c + 1) * CHUNK]), list(weights[c * CHUNK:(c + 1) * CHUNK])
        pad = CHUNK - len(part)
        out_ids += [tokenizer.bos_id] + part + [tokenizer.eos_id] + [tokenizer.pad_id] * pad
        out_weights += [1.0] + part_w + [1.0] + [1.0] * pad
    return out_ids, out_weights


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def apply_emphasis(z: Tensor, weights: Tensor, restore_mean: bool = True) -> Tensor:
    """Scale each token's hidden state by its weight, then restore each chunk's mean (A1111's `process_tokens`).

    z: (N, 77, D) hidden states of N chunks, weights: (N, 77). Chunks whose weights are all 1 are returned
    untouched, bit for bit. The arithmetic runs in fp32 and is cast back to z's dtype.
    """
    if weights.shape != z.shape[:2]:
        raise ValueError(f"apply_emphasis: weights must have shape {tuple(z.shape[:2])}, got {tuple(weights.shape)}")
    weighted = (weights != 1).any(dim=1)  # (N,)
    if not weighted.any():
        return z
    z32 = z[weighted].float()  # (n, 77, D)
    w = weights[weighted].to(device=z.device, dtype=torch.float32)  # (n, 77)
    original_mean = z32.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
    scaled = z32 * w[..., None]  # (n, 77, D)
    if restore_mean:
        scaled = scaled * (original_mean / scaled.mean(dim=(1, 2), keepdim=True))
    out = z.clone()
    out[weighted] = scaled.to(z.dtype)
    return out


def _hidden_states(text_encoder: nn.Module, ids: Tensor, clip_skip: int | None, tokenizer: object = None) -> Tensor:
    """The context the UNet reads, as the pipeline's `encode_prompt` computes it: the last hidden state, or with
    clip_skip=n >= 2 the final layer norm applied to the n-th-from-last layer's output (A1111's numbering: 1 is the
    last layer; diffusers' clip_skip=k is n = k + 1)."""
    # Textual inversion hook (ldm/embeddings.py): a tokenizer that splices embeddings turns its placeholder ids into
    # the loaded vectors (the text encoder's inputs_embeds); any other tokenizer leaves the ids to the encoder's table.
    splice = getattr(tokenizer, "splice", None)
    out = text_encoder(ids) if splice is None else text_encoder(**splice(text_encoder, ids))
    if clip_skip is None or clip_skip == 1:
        return out.last_hidden_state  # (N, 77, D)
    layers = len(out.hidden_states) - 1
    if clip_skip > layers:
        raise ValueError(f"clip_skip must be at most {layers} (the text encoder's layer count), got {clip_skip}")
    return text_encoder.final_layer_norm(out.hidden_states[-clip_skip])  # (N, 77, D)


def count_chunks(tokenizer: Tokenizer, prompts: Sequence[str], weighting: bool = True) -> int:
    """The number of chunks the longest of `prompts` needs."""
    return max(num_chunks(len(tokenize_weighted(tokenizer, p, weighting)[0])) for p in prompts)


def encode_prompt(
    tokenizer: Tokenizer,
    text_encoder: nn.Module,
    prompts: str | Sequence[str],
    clip_skip: int | None = None,
    weighting: bool = True,
    min_chunks: int = 1,
) -> Tensor:
    """Encode prompts into the UNet's context: (B, 77*k, D), k = max(min_chunks, chunks of the longest prompt).

    Every prompt of the batch is padded to k chunks with empty chunks [bos, eos, pad...] (A1111 pads the shorter of
    prompt and negative prompt the same way). The ids go to the text encoder's device.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompt: prompts must not be empty")
    for p in prompts:
        _check_text(p)
    if clip_skip is not None and (not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1):
        raise ValueError(f"encode_prompt: clip_skip must be None or an int >= 1, got {clip_skip!r}")
    if not isinstance(min_chunks, int) or min_chunks < 1:
        raise ValueError(f"encode_prompt: min_chunks must be an int >= 1, got {min_chunks!r}")

    tokenized = [tokenize_weighted(tokenizer, p, weighting) for p in prompts]
    k = max([min_chunks] + [num_chunks(len(ids)) for ids, _ in tokenized])
    laid_out = [chunk_tokens(ids, w, tokenizer, k) for ids, w in tokenized]
    device = next(text_encoder.parameters()).device
    B, S = len(prompts), k * (CHUNK + 2)
    ids = torch.tensor([i for i, _ in laid_out], dtype=torch.long, device=device)  # (B, S)
    weights = torch.tensor([w for _, w in laid_out], dtype=torch.float32)  # (B, S)

    z = _hidden_states(text_encoder, ids.view(B * k, CHUNK + 2), clip_skip, tokenizer)  # (B*k, 77, D)
    z = apply_emphasis(z, weights.view(B * k, CHUNK + 2))
    return z.reshape(B, S, z.shape[-1])  # (B, 77*k, D): chunks of a prompt side by side


def encode_prompt_pair(
    tokenizer: Tokenizer,
    text_encoder: nn.Module,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    clip_skip: int | None = None,
    weighting: bool = True,
) -> tuple[Tensor, Tensor]:
    """The conditional and unconditional contexts for classifier-free guidance, padded to the same number of chunks.

    negative_prompts None means the empty prompt for every prompt (diffusers' default). Returns (cond, uncond), each
    (B, 77*k, D).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    else:
        negative_prompts = list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"encode_prompt_pair: got {len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    k = max(count_chunks(tokenizer, prompts, weighting), count_chunks(tokenizer, negative_prompts, weighting))
    cond = encode_prompt(tokenizer, text_encoder, prompts, clip_skip, weighting, min_chunks=k)
    uncond = encode_prompt(tokenizer, text_encoder, negative_prompts, clip_skip, weighting, min_chunks=k)
    return cond, uncond
