"""Attention editing in the style of Prompt-to-Prompt: word swap by cross-attention injection, and word re-weighting.

Reference: Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control" (arXiv:2208.01626;
google/prompt-to-prompt `prompt-to-prompt_stable.py`: `AttentionReplace`, `AttentionReweight`, and
`seq_aligner.py`'s `get_replacement_mapper`).

The idea: the layout of an image is decided early, in the cross-attention maps of the first steps. Generate a
source prompt and an edited prompt in one batch from the same initial noise; for the first `cross_fraction` of the
steps, the edit's cross-attention probabilities are replaced by the source's (mapped token to token), while its
values still come from its own text. The edit keeps the source's composition and changes what the swapped word
says. Optionally the self-attention maps of the small UNet levels are injected too (`self_fraction`), which also
keeps the source's shapes. Re-weighting multiplies the probabilities of chosen tokens, strengthening or weakening a
word's effect.

Processors (install with `use_processor(unet, processor, where)` or `set_attention_processor`):
- `PromptToPrompt(num_steps, ...)`: acts on the conditional batch [source, edit_1, ..., edit_n]; the unconditional
  half (guided=True) and every step outside the injection windows run the default kernel, untouched.
- `AttentionReweight(weights)`: an ordinary generation with some tokens' cross-attention scaled at every step.
`prompt_to_prompt(pipe, source, edit, seed=...)` runs the whole edit with a pipeline. Steps are counted as
ldm/research/hooks.py explains (one step = one UNet evaluation).

Shapes: n prompts of the conditional batch, nh heads, L query tokens, S key tokens (77), hd head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.attention import attention, attention_probs
from ldm.research.hooks import (StepCounter, conditional_half, conditional_mask, is_cross_attention, is_self_attention,
                                use_processor)
from ldm.research.store import AttentionStore, prompt_words
from ldm.prompts import CHUNK, Tokenizer, plain_text, tokenize_weighted

S_ONE_CHUNK = CHUNK + 2  # 77: Prompt-to-Prompt's token alignment works within one text chunk


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _active(step: int, fraction: float, num_steps: int) -> bool:
    """Whether UNet evaluation `step` lies in the first `fraction` of `num_steps` (all of them for fraction 1)."""
    return fraction >= 1.0 or step < int(fraction * num_steps)


class PromptToPrompt:
    """Inject the source's attention into the edits for the first fractions of the steps.

    num_steps: the UNet evaluations of the generation (num_inference_steps). cross_fraction / self_fraction: the
    fraction of them during which cross- / self-attention is injected. mapper: (S, S) or (n-1, S, S) token map from
    the source to each edit (`word_swap_mapper`); None means the token positions correspond one to one. reweight:
    (S,) or (n-1, S) multipliers on the edits' injected cross-attention (Prompt-to-Prompt's equalizer).
    self_max_tokens: self-attention is injected only on levels with at most this many positions (the paper's 16x16
    of 64x64 latents; larger maps cost L^2 memory). record: an AttentionStore that receives the conditional
    cross-attention probabilities actually used, at every step.
    """

    def __init__(
        self,
        num_steps: int,
        *,
        cross_fraction: float = 0.8,
        self_fraction: float = 0.0,
        mapper: Tensor | None = None,
        reweight: Tensor | None = None,
        guided: bool = True,
        self_max_tokens: int = 32 * 32,
        record: AttentionStore | None = None,
    ) -> None:
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"PromptToPrompt: num_steps must be an int >= 1, got {num_steps!r}")
        self.num_steps = num_steps
        self.cross_fraction = _check_fraction("PromptToPrompt: cross_fraction", cross_fraction)
        self.self_fraction = _check_fraction("PromptToPrompt: self_fraction", self_fraction)
        if mapper is not None and (mapper.ndim not in (2, 3) or mapper.shape[-1] != mapper.shape[-2]):
            raise ValueError(f"PromptToPrompt: mapper must be (S, S) or (edits, S, S), got {tuple(mapper.shape)}")
        if reweight is not None and reweight.ndim not in (1, 2):
            raise ValueError(f"PromptToPrompt: reweight must be (S,) or (edits, S), got {tuple(reweight.shape)}")
        self.mapper = mapper
        self.reweight = reweight
        self.guided = guided
        self.self_max_tokens = self_max_tokens
        self.record = record
        self.counter = StepCounter()

    def reset(self) -> None:
        self.counter.reset()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, name: str, mask: Tensor | None) -> Tensor:
        step = self.counter.observe(name)
        cross = is_cross_attention(name)
        if cross:
            active = _active(step, self.cross_fraction, self.num_steps)
        else:
            active = (is_self_attention(name) and q.shape[2] <= self.self_max_tokens
                      and _active(step, self.self_fraction, self.num_steps))
        out = attention(q, k, v, mask)  # the default kernel for the source and the unconditional half
        if not active and not (cross and self.record is not None):
            return out

        who = type(self).__name__
        probs = attention_probs(conditional_half(q, self.guided, who), conditional_half(k, self.guided, who),
                                conditional_mask(mask, q.shape[0], self.guided, who))  # (n, nh, L, S)
        n = probs.shape[0]
        if n < 2:
            raise ValueError(f"{who} expects the conditional batch [source, edit, ...] of at least 2 prompts, got {n}")
        if active:
            source = probs[:1]  # (1, nh, L, S)
            edits = self._edit_cross(source, probs.shape[-1]) if cross else source
            probs = torch.cat([source, edits.expand(n - 1, *probs.shape[1:])])  # (n, nh, L, S)
            first_edit = q.shape[0] - n + 1  # the rows of the edits in the whole batch
            out = out.clone()
            out[first_edit:] = probs[1:].to(v.dtype) @ v[first_edit:]  # (n-1, nh, L, hd)
        if cross and self.record is not None:
            self.record.record(name, probs)
        return out

    def _edit_cross(self, source: Tensor, S: int) -> Tensor:
        """The edits' cross-attention: the source's mapped onto each edit's tokens, times the re-weighting."""
        edits = source  # (1, nh, L, S)
        if self.mapper is not None:
            if self.mapper.shape[-1] != S:
                raise ValueError(f"PromptToPrompt: mapper is for {self.mapper.shape[-1]} tokens, the context has {S}")
            mapper = self.mapper.to(source.device, torch.float32)
            mapper = mapper[None] if mapper.ndim == 2 else mapper  # (edits, S, S)
            edits = torch.einsum("hls,est->ehlt", source[0], mapper)  # (edits, nh, L, S)
        if self.reweight is not None:
            if self.reweight.shape[-1] != S:
                raise ValueError(f"PromptToPrompt: reweight is for {self.reweight.shape[-1]} tokens, the context "
                                 f"has {S}")
            weights = self.reweight.to(source.device, torch.float32)
            weights = weights[None] if weights.ndim == 1 else weights  # (edits, S)
            edits = edits * weights[:, None, None, :]
        return edits


class AttentionReweight:
    """Scale chosen tokens' cross-attention probabilities at every step of an ordinary generation.

    weights: (S,) or (n, S) multipliers, 1 for untouched tokens (`token_weights` builds them from words). The rows
    are not renormalised, as in Prompt-to-Prompt: a weight of 2 doubles that token's share of the output.
    """

    def __init__(self, weights: Tensor, *, guided: bool = True) -> None:
        if not isinstance(weights, Tensor) or weights.ndim not in (1, 2):
            raise ValueError(f"AttentionReweight: weights must be a (S,) or (n, S) tensor, got {weights!r}")
        self.weights = weights
        self.guided = guided

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, name: str, mask: Tensor | None) -> Tensor:
        who = type(self).__name__
        if self.weights.shape[-1] != k.shape[-2]:
            raise ValueError(f"{who}: weights are for {self.weights.shape[-1]} tokens, layer {name!r} attends to "
                             f"{k.shape[-2]}")
        out = attention(q, k, v, mask)
        probs = attention_probs(conditional_half(q, self.guided, who), conditional_half(k, self.guided, who),
                                conditional_mask(mask, q.shape[0], self.guided, who))  # (n, nh, L, S)
        weights = self.weights.to(probs.device, torch.float32)
        probs = probs * (weights[:, None, None, :] if weights.ndim == 2 else weights)
        first = q.shape[0] - probs.shape[0]
        out = out.clone()
        out[first:] = probs.to(v.dtype) @ v[first:]  # (n, nh, L, hd)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Building the token maps from prompts


def token_weights(tokenizer: Tokenizer, prompt: str, words: Mapping[str, float], weighting: bool = True) -> Tensor:
    """(77,) multipliers: words[w] at every piece of each word w of the prompt (found by `prompt_words`), else 1."""
    found = prompt_words(tokenizer, prompt, weighting)
    weights = torch.ones(S_ONE_CHUNK)
    for word, factor in words.items():
        positions = [p for w, ps in found if w.lower() == word.lower() for p in ps]
        if not positions:
            raise ValueError(f"token_weights: {word!r} is not a word of the prompt {prompt!r} "
                             f"(its words: {[w for w, _ in found]})")
        if max(positions) >= S_ONE_CHUNK:
            raise ValueError(f"token_weights: {word!r} lies beyond the first {CHUNK} tokens of the prompt")
        weights[positions] = float(factor)
    return weights


def word_swap_mapper(tokenizer: Tokenizer, source: str, edit: str, weighting: bool = True) -> Tensor:
    """(77, 77) map M with edit_probs = source_probs @ M, for prompts with the same number of words.

    Equal words map piece to piece; a swapped word's pieces spread the source word's attention evenly over the edit
    word's pieces (Prompt-to-Prompt's `get_replacement_mapper`); bos, eos and padding map in order after the words.
    """
    src_words, edit_words = plain_text(source, weighting).split(), plain_text(edit, weighting).split()
    if len(src_words) != len(edit_words):
        raise ValueError(f"word_swap_mapper: a word swap needs the same number of words, got {len(src_words)} "
                         f"({source!r}) and {len(edit_words)} ({edit!r})")
    src_pieces = [tokenizer.encode(w) for w in src_words]
    edit_pieces = [tokenizer.encode(w) for w in edit_words]
    for prompt, pieces in ((source, src_pieces), (edit, edit_pieces)):
        ids = tokenize_weighted(tokenizer, prompt, weighting)[0]
        if [t for p in pieces for t in p] != ids:
            raise ValueError(f"word_swap_mapper: the tokens of {prompt!r} do not split at its words (emphasis syntax "
                             f"inside a word?); cannot align it")
        if len(ids) > CHUNK:
            raise ValueError(f"word_swap_mapper: {prompt!r} has {len(ids)} tokens; a word swap works within one "
                             f"chunk of {CHUNK}")

    mapper = torch.zeros(S_ONE_CHUNK, S_ONE_CHUNK)
    mapper[0, 0] = 1.0  # bos
    i = j = 1
    for a, b in zip(src_pieces, edit_pieces):
        if len(a) == len(b):
            for t in range(len(a)):
                mapper[i + t, j + t] = 1.0
        else:
            mapper[i:i + len(a), j:j + len(b)] = 1.0 / len(b)
        i, j = i + len(a), j + len(b)
    for t in range(S_ONE_CHUNK - max(i, j)):  # eos and padding, in order
        mapper[i + t, j + t] = 1.0
    return mapper


# ----------------------------------------------------------------------------------------------------------------
# The whole edit with a pipeline


def prompt_to_prompt(
    pipe: Any,
    source: str,
    edit: str,
    *,
    seed: int,
    cross_fraction: float = 0.8,
    self_fraction: float = 0.0,
    reweight: Mapping[str, float] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    record: AttentionStore | None = None,
    **pipe_kwargs: Any,
) -> Any:
    """Generate `source` and `edit` from the same noise with the source's attention injected into the edit.

    reweight: {word of the edit: multiplier} applied to the edit's injected cross-attention. Other keyword
    arguments go to the pipeline call. Returns the pipeline's output: images [source, edit].
    """
    weighting = pipe_kwargs.get("weighting", True)
    mapper = word_swap_mapper(pipe.tokenizer, source, edit, weighting)
    weights = token_weights(pipe.tokenizer, edit, reweight, weighting) if reweight else None
    processor = PromptToPrompt(num_inference_steps, cross_fraction=cross_fraction, self_fraction=self_fraction,
                               mapper=mapper, reweight=weights, guided=guidance_scale > 1, record=record)

    def where(name: str) -> bool:
        return is_cross_attention(name) or (self_fraction > 0 and is_self_attention(name))

    generator = [torch.Generator("cpu").manual_seed(seed) for _ in range(2)]  # the same noise for both
    with use_processor(pipe.unet, processor, where):
        return pipe([source, edit], generator=generator, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, **pipe_kwargs)
