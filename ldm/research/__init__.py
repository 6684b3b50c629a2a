"""Tools for researchers who change attention: capture cross-attention maps, edit them, weight prompt words.

Built on the processor hook of ldm/attention.py (`processor(q, k, v, *, name, mask) -> (B, nh, L, hd)`) and the
prompt encoding of ldm/prompts.py; see docs/attention.md for the tour with examples.

- store.py: `AttentionStore` (capture, per layer and step) and per-word heatmaps ("What the DAAM"), PNG overlays.
- p2p.py: Prompt-to-Prompt processors (`PromptToPrompt`, `AttentionReweight`) and `prompt_to_prompt(pipe, ...)`.
- hooks.py: layer predicates, `use_processor(model, processor, where)`, step counting.
Prompt emphasis `(word:1.3)` and chunked long prompts are core (ldm/prompts.py, every pipeline call uses them);
their functions are re-exported here for the research code written against `ldm.research`.
"""

from ldm.prompts import apply_emphasis, encode_prompt, encode_prompt_pair, parse_prompt_weights, tokenize_weighted
from ldm.research.hooks import StepCounter, is_cross_attention, is_self_attention, use_processor
from ldm.research.p2p import AttentionReweight, PromptToPrompt, prompt_to_prompt, token_weights, word_swap_mapper
from ldm.research.store import AttentionStore, overlay, prompt_words, save_attention_maps, word_heatmaps

__all__ = [
    "AttentionReweight", "AttentionStore", "PromptToPrompt", "StepCounter", "apply_emphasis", "encode_prompt",
    "encode_prompt_pair", "is_cross_attention", "is_self_attention", "overlay", "parse_prompt_weights",
    "prompt_to_prompt", "prompt_words", "save_attention_maps", "token_weights", "tokenize_weighted", "use_processor",
    "word_heatmaps", "word_swap_mapper",
]
