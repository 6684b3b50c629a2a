"""Capture cross-attention maps over a whole generation and turn them into one heatmap per prompt word.

Reference: Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention"
(arXiv:2210.04885; castorini/daam `daam/trace.py`, `daam/heatmap.py`): a word's heatmap is its tokens' cross-attention
probabilities, upsampled to the image, averaged over heads, layers and steps, the word's pieces joined.

`AttentionStore` is an attention processor (see ldm/attention.py). On each hooked layer it returns the default
kernel's output, untouched, and beside it computes the fp32 probabilities softmax(q k^T / sqrt(hd)) of the
conditional half of the batch, which it
  - keeps, when keep=True, in `.maps[name]`: one (B, nh, L, S) tensor per recorded step (every `every`-th UNet
    evaluation, counted as ldm/research/hooks.py explains), and
  - always folds the cross-attention layers' maps (`...attn2`) into running sums per resolution, (B, L, S)
    averaged over heads, from which `heatmap()` gives the DAAM average without keeping any step.
Memory of keep=True: every cross-attention layer of SD 1.5 at 512x512 (latent 64x64) holds L = 5*4096 + 5*1024 +
5*256 + 64 = 26,944 query rows x 8 heads x 77 tokens x 4 bytes = 66 MB per image per recorded step for the
conditional half (133 MB per step for a guided batch of one image, were both halves kept); a 50-step generation
keeps 3.3 GB. SD 2.x (5/10/20/20 heads) is 56 MB. Use `every=5`, or keep=False for heatmaps alone (~2 MB).
Which half is conditional: with classifier-free guidance the UNet batch is [uncond; cond] and the store keeps the
second half (guided=True, the default); with guidance_scale <= 1 the pipeline runs the conditional batch alone:
pass guided=False.

Shapes: B images, nh heads, L = h*w query tokens of a UNet level, S context tokens (77 per chunk), H, W image size.
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.attention import attention, attention_probs
from ldm.research.hooks import StepCounter, conditional_half, conditional_mask, is_cross_attention
from ldm.prompts import Tokenizer, context_position, parse_prompt_weights, tokenize_weighted


class AttentionStore:
    """A processor that records attention probabilities and leaves the output unchanged (module docstring)."""

    def __init__(self, every: int = 1, *, guided: bool = True, keep: bool = True) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"AttentionStore: every must be an int >= 1, got {every!r}")
        self.every = every
        self.guided = guided
        self.keep = keep
        self.counter = StepCounter()
        self.maps: dict[str, list[Tensor]] = {}  # layer name -> [(B, nh, L, S) per recorded step]
        self._sums: dict[int, Tensor] = {}  # L -> (B, L, S) sum over recorded (layer, step) of the head mean
        self._counts: dict[int, int] = {}  # L -> how many (layer, step) maps that sum holds

    def reset(self) -> None:
        """Forget everything recorded, and start counting steps from 0."""
        self.counter.reset()
        self.maps.clear()
        self._sums.clear()
        self._counts.clear()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, name: str, mask: Tensor | None) -> Tensor:
        out = attention(q, k, v, mask)  # the default kernel: the generation is unchanged
        if self.counter.observe(name) % self.every == 0:
            who = type(self).__name__
            probs = attention_probs(conditional_half(q, self.guided, who), conditional_half(k, self.guided, who),
                                    conditional_mask(mask, q.shape[0], self.guided, who))  # (B, nh, L, S)
            self.record(name, probs)
        return out

    def record(self, name: str, probs: Tensor) -> None:
        """Add one layer's probabilities (B, nh, L, S) for the current step: kept (keep=True) and summed.

        Other processors call this to record the probabilities they actually used (PromptToPrompt's `record=`).
        """
        probs = probs.detach()
        if self.keep:
            self.maps.setdefault(name, []).append(probs)
        if not is_cross_attention(name):
            return  # self-attention maps (S = L) are kept but have no words: no heatmap
        L = probs.shape[2]
        head_mean = probs.float().mean(dim=1)  # (B, L, S)
        if L in self._sums:
            if self._sums[L].shape != head_mean.shape:
                raise ValueError(f"AttentionStore: layer {name!r} gave maps {tuple(head_mean.shape)}, earlier layers "
                                 f"{tuple(self._sums[L].shape)}; call reset() between generations")
            self._sums[L] += head_mean
            self._counts[L] += 1
        else:
            self._sums[L] = head_mean.clone()
            self._counts[L] = 1

    @property
    def recorded(self) -> int:
        """How many (layer, step) maps have been recorded."""
        return sum(self._counts.values())

    def heatmap(self, size: tuple[int, int]) -> Tensor:
        """Token heatmaps at image size (H, W): (B, S, H, W), the head/layer/step mean of the recorded maps.

        Each resolution's sum is upsampled bilinearly (a linear map, so upsampling the sums equals averaging the
        upsampled maps) and the total divided by the number of maps.
        """
        if not self._sums:
            raise ValueError("AttentionStore.heatmap: nothing recorded; install the store on the UNet's "
                             "cross-attention layers (use_processor(unet, store)) and generate first")
        H, W = size
        total, count = None, 0
        for L, summed in self._sums.items():
            h, w = _grid(L, H, W)
            B, _, S = summed.shape
            grid = summed.transpose(1, 2).reshape(B, S, h, w)  # (B, S, h, w)
            up = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)  # (B, S, H, W)
            total = up if total is None else total + up
            count += self._counts[L]
        return total / count


def _grid(L: int, H: int, W: int) -> tuple[int, int]:
    """The (h, w) of a UNet level with L = h*w positions for an image of aspect H:W."""
    target = math.sqrt(L * H / W)
    candidates = [h for h in range(1, L + 1) if L % h == 0]
    h = min(candidates, key=lambda c: abs(c - target))
    if abs(h / (L // h) - H / W) > 0.5 * H / W:
        raise ValueError(f"AttentionStore: {L} query positions do not fit an image of {H}x{W}")
    return h, L // h


# ----------------------------------------------------------------------------------------------------------------
# Words and their tokens


def prompt_words(tokenizer: Tokenizer, prompt: str, weighting: bool = True) -> list[tuple[str, list[int]]]:
    """The words of a prompt with their positions in the context (B, S): [(word, [position, ...]), ...].

    Words are the prompt split on whitespace with leading and trailing punctuation stripped (empty ones dropped),
    after removing the emphasis syntax when weighting=True; a word's positions are those of its BPE pieces, found
    in order in the prompt's tokens. A word whose pieces cannot be found (a fragment boundary of the emphasis syntax
    inside it) keeps its place with no positions (an all-zero heatmap) and a warning.
    """
    text = "".join(piece for piece, _ in parse_prompt_weights(prompt)) if weighting else prompt
    ids, _ = tokenize_weighted(tokenizer, prompt, weighting)
    words = [w for w in (_strip_punctuation(raw) for raw in text.split()) if w]
    out, cursor = [], 0
    for word in words:
        pieces = tokenizer.encode(word)
        at = _find(ids, pieces, cursor)
        if at is None:
            warnings.warn(f"prompt_words: the tokens of {word!r} were not found in the prompt; no heatmap for it")
            out.append((word, []))
            continue
        out.append((word, [context_position(j) for j in range(at, at + len(pieces))]))
        cursor = at + len(pieces)
    return out


def _strip_punctuation(word: str) -> str:
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(word[end - 1]).startswith("P"):
        end -= 1
    return word[start:end]


def _find(ids: Sequence[int], pieces: Sequence[int], start: int) -> int | None:
    if not pieces:
        return None
    for i in range(start, len(ids) - len(pieces) + 1):
        if list(ids[i:i + len(pieces)]) == list(pieces):
            return i
    return None


def word_heatmaps(heat: Tensor, words: list[tuple[str, list[int]]]) -> list[tuple[str, Tensor]]:
    """Per word, the mean of its pieces' heatmaps: heat (S, H, W) -> [(word, (H, W)), ...] (DAAM joins pieces so).

    A word without positions (see `prompt_words`) gets an all-zero map.
    """
    out = []
    for word, positions in words:
        if not positions:
            out.append((word, heat.new_zeros(heat.shape[1:])))
            continue
        if max(positions) >= heat.shape[0]:
            raise ValueError(f"word_heatmaps: {word!r} sits at context positions {positions}, beyond the "
                             f"{heat.shape[0]} recorded tokens")
        out.append((word, heat[positions].mean(dim=0)))  # (H, W)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Pictures


def overlay(image: Image.Image, heat: Tensor, alpha: float = 0.5) -> Image.Image:
    """The image blended with a heatmap (H, W), min-max normalised and coloured blue (low) to red (high)."""
    if heat.shape != (image.height, image.width):
        raise ValueError(f"overlay: heatmap is {tuple(heat.shape)}, the image {image.height}x{image.width}")
    x = heat.detach().float().cpu()
    x = ((x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)).numpy()  # (H, W) in [0, 1]
    colour = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=-1)  # (H, W, 3), "jet"
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    blended = (1 - alpha) * base + alpha * colour
    return Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8))


def _file_word(word: str) -> str:
    return re.sub(r"[^\w]+", "_", word).strip("_") or "word"


def save_attention_maps(
    store: AttentionStore,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    images: Sequence[Image.Image],
    out_dir: str | Path,
    weighting: bool = True,
) -> list[Path]:
    """Write one heatmap overlay per prompt word: `out_dir/<index>-<word>.png`, the size of the image.

    index: the word's 0-based position among the prompt's words (`prompt_words`). images[i] goes with prompts[i]
    (one prompt for all images is repeated); the first image's maps go in out_dir, image n >= 1's in
    out_dir/image<n>/. Returns the paths written.
    """
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images) or not images:
        raise ValueError(f"save_attention_maps: got {len(images)} images for {len(prompts)} prompts")
    W, H = images[0].size
    heat = store.heatmap((H, W))  # (B, S, H, W)
    if heat.shape[0] != len(images):
        raise ValueError(f"save_attention_maps: the store recorded {heat.shape[0]} images, got {len(images)}; "
                         f"was guided= set to match guidance_scale?")
    out_dir = Path(out_dir)
    written = []
    for n, (prompt, image) in enumerate(zip(prompts, images)):
        folder = out_dir if n == 0 else out_dir / f"image{n}"
        folder.mkdir(parents=True, exist_ok=True)
        words = prompt_words(tokenizer, prompt, weighting)
        for index, (word, word_heat) in enumerate(word_heatmaps(heat[n], words)):
            path = folder / f"{index}-{_file_word(word)}.png"
            overlay(image, word_heat).save(path)
            written.append(path)
    return written
