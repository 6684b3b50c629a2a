"""Prompt emphasis and long prompts (ldm/prompts.py): the parser, the chunk layout, the encoding.

The parser's expected values follow AUTOMATIC1111's `parse_prompt_attention` (its docstring's examples); encoding
runs on a tiny CLIP text model with trained-like weights and the real SD 1.5 / SD 2 tokenizers.
"""

from __future__ import annotations

import pytest
import torch

from ldm.clip import CLIPTextModel
from ldm.config import CLIPTextConfig
from ldm.pipeline import StableDiffusionPipeline
from ldm.prompts import (CHUNK, apply_emphasis, chunk_tokens, context_position, encode_prompt,
                                    encode_prompt_pair, parse_prompt_weights, plain_text, tokenize_weighted)
from ldm.tokenizer import CLIPTokenizer
from tests.helpers import TOKENIZER_DIR, trained_like_

R, Q = 1.1, 1 / 1.1


def approx(fragments: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(text, pytest.approx(weight, rel=1e-12)) for text, weight in fragments]


# ----------------------------------------------------------------------------------------------------------------
# Parser


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    # A1111's docstring example: the third "(" never closes, so it weights the rest of the prompt.
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[[nested square]]", [("nested square", Q * Q)]),
    ("(a:1.0)", [("a", 1.0)]),
    ("(a : 2 )", [("a ", 2.0)]),
    ("(neg:-0.5)", [("neg", -0.5)]),
    ("", [("", 1.0)]),
])
def test_parser_matches_a1111(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_weights(text) == approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("stray ) and ]", [("stray ) and ]", 1.0)]),  # a closing bracket with nothing open is text
    ("(word:abc)", [("word:abc", R)]),  # no number after the colon: literal, the bracket is a plain (...)
    ("a:b", [("a:b", 1.0)]),
    ("lone \\ backslash", [("lone \\ backslash", 1.0)]),
    ("escaped \\\\ backslash", [("escaped \\ backslash", 1.0)]),
    ("x:1.5) y", [("x:1.5) y", 1.0)]),  # a weight closing no bracket is text
    ("[open square", [("open square", Q)]),
])
def test_parser_reads_malformed_input_literally(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_weights(text) == approx(expected)


@pytest.mark.parametrize("text", ["(x:1.2.3)", "(x:.)", "(x:1..)"])
def test_parser_rejects_a_malformed_weight_with_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="is not a number"):
        parse_prompt_weights(text)


def test_parser_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        parse_prompt_weights(None)  # type: ignore[arg-type]


def test_parser_never_crashes_on_bracket_soup() -> None:
    soup = "([:)](]\\[(:1)(:x)]]:))((([[" * 3
    fragments = parse_prompt_weights(soup)
    assert all(isinstance(t, str) and isinstance(w, float) for t, w in fragments)
    assert "".join(t for t, _ in fragments).count("\\") == soup.count("\\") - soup.count("\\[")


def test_parser_fuzz_gives_fragments_or_the_number_error() -> None:
    import random

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("()[]:\\ a1.-+e") for _ in range(rng.randint(0, 14)))
        try:
            fragments = parse_prompt_weights(text)
        except ValueError as e:
            assert "is not a number" in str(e), text
            continue
        assert fragments and all(isinstance(t, str) and isinstance(w, float) for t, w in fragments), text


# ----------------------------------------------------------------------------------------------------------------
# Tokens and chunks


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def tok(request: pytest.FixtureRequest) -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(TOKENIZER_DIR / request.param)


def test_plain_prompt_lays_out_as_the_tokenizer(tok: CLIPTokenizer) -> None:
    for prompt in ["a photo of an astronaut riding a horse", "", "one, two; three!"]:
        ids, weights = tokenize_weighted(tok, prompt)
        laid, _ = chunk_tokens(ids, weights, tok, 1)
        assert laid == tok([prompt])[0].tolist()
        assert weights == [1.0] * len(ids)


def test_weights_follow_their_tokens(tok: CLIPTokenizer) -> None:
    ids, weights = tokenize_weighted(tok, "a (red:1.5) [cat] sat")
    assert ids == tok.encode("a red cat sat")
    assert weights == pytest.approx([1.0, 1.5, Q, 1.0])
    ids, weights = tokenize_weighted(tok, "a (red:1.5) cat", weighting=False)  # literal: brackets are text
    assert ids == tok.encode("a (red:1.5) cat") and set(weights) == {1.0}


def test_long_prompt_chunks_of_75(tok: CLIPTokenizer) -> None:
    ids = list(range(1000, 1200))  # 200 tokens
    laid, weights = chunk_tokens(ids, [2.0] * 200, tok, 3)
    assert len(laid) == 3 * 77 and len(weights) == 3 * 77
    for c in range(3):
        chunk = laid[77 * c:77 * (c + 1)]
        part = ids[75 * c:75 * (c + 1)]
        assert chunk == [tok.bos_id] + part + [tok.eos_id] + [tok.pad_id] * (75 - len(part))
    assert [laid[context_position(j)] for j in range(200)] == ids
    with pytest.raises(ValueError, match="need 3 chunks"):
        chunk_tokens(ids, [1.0] * 200, tok, 2)


# ----------------------------------------------------------------------------------------------------------------
# Encoding


@pytest.fixture(scope="module")
def encoder() -> CLIPTextModel:
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    return trained_like_(CLIPTextModel(cfg), seed=3).eval()


@pytest.fixture(scope="module")
def sd15_tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15")


PROMPTS = ["a photo of an astronaut riding a horse on mars", "a cat, oil painting"]


@torch.no_grad()
def test_plain_prompts_are_bit_identical_to_plain_encoding(tok: CLIPTokenizer, encoder: CLIPTextModel) -> None:
    # The parity promise: no emphasis, <= 75 tokens -> exactly what the plain path (tokenizer -> encoder) gives.
    plain = encoder(tok(PROMPTS)).last_hidden_state
    for weighting in (True, False):
        assert torch.equal(encode_prompt(tok, encoder, PROMPTS, weighting=weighting), plain)
    skip2 = encoder.final_layer_norm(encoder(tok(PROMPTS)).hidden_states[-2])
    assert torch.equal(encode_prompt(tok, encoder, PROMPTS, clip_skip=2), skip2)
    assert torch.equal(encode_prompt(tok, encoder, PROMPTS, clip_skip=1), plain)


@torch.no_grad()
def test_weight_one_is_exactly_unweighted(sd15_tok: CLIPTokenizer, encoder: CLIPTextModel) -> None:
    ours = encode_prompt(sd15_tok, encoder, ["a photo of a (cat:1.0)", "(a:1.0) (b:1)"])
    ref = encode_prompt(sd15_tok, encoder, ["a photo of a cat", "a b"])
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_emphasis_scales_only_the_weighted_tokens_then_restores_the_mean(sd15_tok: CLIPTokenizer,
                                                                          encoder: CLIPTextModel) -> None:
    plain = encode_prompt(sd15_tok, encoder, "a red cat on a mat")
    weights = torch.ones(1, 77)
    ids, w = tokenize_weighted(sd15_tok, "a (red:1.5) cat on a [mat]")
    weights[0, 1:1 + len(w)] = torch.tensor(w)
    red, mat = 2, 6  # context positions: bos=0, a=1, red=2, cat=3, on=4, a=5, mat=6

    scaled = apply_emphasis(plain, weights, restore_mean=False)
    changed = (scaled != plain).any(dim=-1)[0]  # (77,)
    assert changed.nonzero().flatten().tolist() == [red, mat]
    torch.testing.assert_close(scaled[0, red], plain[0, red] * 1.5, rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled[0, mat], plain[0, mat] / 1.1, rtol=1e-6, atol=0)

    restored = encode_prompt(sd15_tok, encoder, "a (red:1.5) cat on a [mat]")
    # A1111: z * w, then z * (original_mean / new_mean): the chunk's mean is the unweighted one (fp32 rounding).
    assert abs(restored.mean().item() - plain.mean().item()) <= 1e-6 * plain.abs().mean().item()
    factor = plain.mean() / scaled.mean()
    torch.testing.assert_close(restored, scaled * factor, rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_emphasis_is_per_prompt(sd15_tok: CLIPTokenizer, encoder: CLIPTextModel) -> None:
    # One prompt's weights do not touch another prompt of the batch (A1111 takes the mean over the batch; we don't).
    batch = encode_prompt(sd15_tok, encoder, ["a (cat:1.8)", "a dog"])
    alone = encode_prompt(sd15_tok, encoder, ["a dog"])
    assert torch.equal(batch[1:], alone)
    assert not torch.equal(batch[:1], encode_prompt(sd15_tok, encoder, ["a cat"]))


@torch.no_grad()
def test_200_token_prompt_gives_three_chunks(tok: CLIPTokenizer, encoder: CLIPTextModel) -> None:
    words = ("red", "green", "blue", "cat", "dog", "house", "tree", "river")
    prompt = " ".join(words[i % len(words)] for i in range(200))
    ids, _ = tokenize_weighted(tok, prompt)
    assert len(ids) == 200
    z = encode_prompt(tok, encoder, prompt)
    assert z.shape == (1, 3 * 77, 32)
    for c in range(3):  # each chunk is the encoding of [bos, its 75 tokens, eos, pad...] on its own
        part = ids[75 * c:75 * (c + 1)]
        chunk_ids = torch.tensor([[tok.bos_id] + part + [tok.eos_id] + [tok.pad_id] * (75 - len(part))])
        assert torch.equal(z[:, 77 * c:77 * (c + 1)], encoder(chunk_ids).last_hidden_state)


@torch.no_grad()
def test_negative_prompt_padded_to_the_same_chunks(sd15_tok: CLIPTokenizer, encoder: CLIPTextModel) -> None:
    long = " ".join(["castle"] * 100)
    cond, uncond = encode_prompt_pair(sd15_tok, encoder, [long], None)
    assert cond.shape == uncond.shape == (1, 2 * 77, 32)
    empty = encoder(sd15_tok([""])).last_hidden_state  # (1, 77, D)
    assert torch.equal(uncond, torch.cat([empty, empty], dim=1))  # A1111 pads with encoded empty chunks
    cond, uncond = encode_prompt_pair(sd15_tok, encoder, ["short"], long)  # the negative is the long one
    assert cond.shape == uncond.shape == (1, 2 * 77, 32)
    assert torch.equal(cond[:, :77], encoder(sd15_tok(["short"])).last_hidden_state)


def test_encode_prompt_validates(sd15_tok: CLIPTokenizer, encoder: CLIPTextModel) -> None:
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompt(sd15_tok, encoder, "a", clip_skip=0)
    with pytest.raises(ValueError, match="at most 3"):
        encode_prompt(sd15_tok, encoder, "a", clip_skip=4)
    with pytest.raises(TypeError, match="must be a str"):
        encode_prompt(sd15_tok, encoder, [3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 prompts but 3 negative"):
        encode_prompt_pair(sd15_tok, encoder, ["a", "b"], ["x", "y", "z"])


def test_plain_text_removes_the_syntax() -> None:
    assert plain_text("a (red:1.5) [cat] \\(x\\)") == "a red cat (x)"
    assert plain_text("a (red:1.5)", weighting=False) == "a (red:1.5)"
    assert CHUNK == 75


# ----------------------------------------------------------------------------------------------------------------
# Through the pipeline


@pytest.fixture(scope="module")
def pipe(sd15_tok: CLIPTokenizer) -> StableDiffusionPipeline:
    from tests.helpers import tiny_pipeline  # our modules at tiny sizes, trained-like weights

    return tiny_pipeline(sd15_tok)


def test_pipeline_weighting_default_and_parity(pipe: StableDiffusionPipeline) -> None:
    kw = dict(height=16, width=16, num_inference_steps=2, seed=0, output_type="latent", negative_prompt="blurry")
    plain = pipe("a photo of a cat", weighting=False, **kw).latents
    assert torch.equal(pipe("a photo of a cat", **kw).latents, plain)  # no syntax: bit-identical
    assert torch.equal(pipe("a photo of a (cat:1.0)", **kw).latents, plain)
    louder = pipe("a photo of a (cat:1.5)", **kw).latents  # weighting=True is the default
    literal = pipe("a photo of a (cat:1.5)", weighting=False, **kw).latents
    assert not torch.equal(louder, plain) and not torch.equal(louder, literal)


def test_pipeline_pads_the_negative_prompt_to_the_prompt(pipe: StableDiffusionPipeline) -> None:
    kw = dict(height=16, width=16, num_inference_steps=1, seed=0, output_type="latent")
    long = " ".join(["castle"] * 100)  # 2 chunks
    for prompt, negative in ((long, "blurry"), ("a castle", long)):
        assert torch.isfinite(pipe(prompt, negative_prompt=negative, **kw).latents).all()
