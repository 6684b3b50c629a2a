"""The research toolkit (ldm/research/): attention capture, heatmaps, Prompt-to-Prompt, re-weighting.

Processor logic is checked on synthetic q/k/v against the formulas; whole generations run a tiny pipeline (our own
modules with trained-like weights, the real SD 1.5 tokenizer, DDIM) at 16x16 pixels in a few seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.attention import attention, attention_layers, attention_probs, set_attention_processor
from ldm.pipeline import StableDiffusionPipeline
from ldm.research import (AttentionReweight, AttentionStore, PromptToPrompt, StepCounter, is_cross_attention,
                          overlay, prompt_to_prompt, prompt_words, save_attention_maps, token_weights, use_processor,
                          word_swap_mapper)
from ldm.prompts import encode_prompt
from ldm.tokenizer import CLIPTokenizer
from tests.helpers import TOKENIZER_DIR, rel_err, tiny_pipeline

CROSS = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def qkv(batch: int, heads: int = 2, L: int = 16, S: int = 77, hd: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, hd, generator=g) for n in (L, S, S))


# ----------------------------------------------------------------------------------------------------------------
# Processors on synthetic q, k, v


def test_store_returns_the_default_output_and_records_the_conditional_half() -> None:
    q, k, v = qkv(4)  # guided batch [uncond x2; cond x2]
    store = AttentionStore()
    out = store(q, k, v, name=CROSS, mask=None)
    assert torch.equal(out, attention(q, k, v))
    (probs,) = store.maps[CROSS]
    assert probs.shape == (2, 2, 16, 77) and probs.dtype == torch.float32
    assert torch.equal(probs, attention_probs(q[2:], k[2:]))
    unguided = AttentionStore(guided=False)
    unguided(q, k, v, name=CROSS, mask=None)
    assert unguided.maps[CROSS][0].shape == (4, 2, 16, 77)
    with pytest.raises(ValueError, match="guided=False"):
        store(*qkv(3), name=CROSS, mask=None)


def test_store_counts_steps_and_keeps_every_nth() -> None:
    names = ["a.attn2", "b.attn2", "c.attn2"]
    store = AttentionStore(every=2)
    for step in range(5):
        for name in names:
            store(*qkv(2, seed=step), name=name, mask=None)
    assert store.counter.step == 4
    assert {n: len(m) for n, m in store.maps.items()} == {n: 3 for n in names}  # steps 0, 2, 4
    assert torch.equal(store.maps["b.attn2"][1], attention_probs(*qkv(2, seed=2)[:2])[1:])
    assert store.recorded == 9
    store.reset()
    assert store.maps == {} and store.recorded == 0 and store.counter.step == 0
    with pytest.raises(ValueError, match="every must be"):
        AttentionStore(every=0)


def test_store_without_keep_still_averages() -> None:
    keep, lean = AttentionStore(), AttentionStore(keep=False)
    for seed in range(3):
        for L in (16, 4):
            for store in (keep, lean):
                store(*qkv(2, L=L, seed=seed), name=f"l{L}.attn2", mask=None)
    assert lean.maps == {} and lean.recorded == keep.recorded == 6
    heat = lean.heatmap((8, 8))
    assert heat.shape == (1, 77, 8, 8)
    torch.testing.assert_close(heat.sum(dim=1), torch.ones(1, 8, 8), rtol=0, atol=1e-5)  # still a distribution
    # The mean over layers and steps of the head-averaged maps, each upsampled to the image.
    manual = torch.stack([
        torch.nn.functional.interpolate(m.mean(1).transpose(1, 2).reshape(1, 77, L, L), size=(8, 8),
                                        mode="bilinear", align_corners=False)
        for name, maps in keep.maps.items() for m in maps for L in [int(m.shape[2] ** 0.5)]]).mean(0)
    torch.testing.assert_close(heat, manual, rtol=1e-5, atol=1e-7)


def test_store_keeps_self_attention_maps_out_of_the_heatmap() -> None:
    store = AttentionStore()
    store(*qkv(2, L=16, S=16), name="x.attn1", mask=None)
    store(*qkv(2), name="x.attn2", mask=None)
    assert store.maps["x.attn1"][0].shape == (1, 2, 16, 16)  # kept: (B, nh, L, L)
    assert store.recorded == 1  # but only the cross-attention map counts towards the word heatmaps
    assert store.heatmap((4, 4)).shape == (1, 77, 4, 4)


def test_step_counter_follows_the_first_layer() -> None:
    counter = StepCounter()
    assert [counter.observe(n) for n in ["x", "y", "x", "y", "x"]] == [0, 0, 1, 1, 2]


def test_prompt_to_prompt_processor_formulas() -> None:
    q, k, v = qkv(4, seed=1)  # [uncond src, uncond edit, cond src, cond edit]
    off = PromptToPrompt(10, cross_fraction=0.0)
    assert torch.equal(off(q, k, v, name=CROSS, mask=None), attention(q, k, v))

    on = PromptToPrompt(10, cross_fraction=0.5)
    probs = attention_probs(q[2:], k[2:])
    for step in range(10):
        out = on(q, k, v, name=CROSS, mask=None)
        assert torch.equal(out[:3], attention(q, k, v)[:3])  # uncond halves and the source: the default kernel
        if step < 5:
            assert torch.equal(out[3], probs[0] @ v[3])  # the source's maps with the edit's values
        else:
            assert torch.equal(out[3], attention(q, k, v)[3])

    reweight = torch.ones(77)
    reweight[3] = 2.0
    weighted = PromptToPrompt(10, cross_fraction=1.0, reweight=reweight)
    torch.testing.assert_close(weighted(q, k, v, name=CROSS, mask=None)[3], (probs[0] * reweight) @ v[3])

    self_on = PromptToPrompt(10, cross_fraction=0.0, self_fraction=1.0)
    qs, ks, vs = qkv(4, L=16, S=16, seed=2)
    self_probs = attention_probs(qs[2:], ks[2:])
    out = self_on(qs, ks, vs, name="mid_block.attentions.0.transformer_blocks.0.attn1", mask=None)
    assert torch.equal(out[3], self_probs[0] @ vs[3])

    with pytest.raises(ValueError, match="at least 2 prompts"):
        PromptToPrompt(3, cross_fraction=1.0)(*qkv(2), name=CROSS, mask=None)
    with pytest.raises(ValueError, match="cross_fraction"):
        PromptToPrompt(3, cross_fraction=1.5)


def test_reweight_processor() -> None:
    q, k, v = qkv(2, seed=4)
    ones = AttentionReweight(torch.ones(77))
    assert rel_err(ones(q, k, v, name=CROSS, mask=None), attention(q, k, v)) < 1e-6  # math vs sdpa kernel
    w = torch.ones(77)
    w[5] = 0.0
    out = AttentionReweight(w)(q, k, v, name=CROSS, mask=None)
    assert torch.equal(out[0], attention(q, k, v)[0])  # the unconditional half is untouched
    torch.testing.assert_close(out[1], (attention_probs(q[1:], k[1:])[0] * w) @ v[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="weights are for 10 tokens"):
        AttentionReweight(torch.ones(10))(q, k, v, name=CROSS, mask=None)


@pytest.mark.cuda
def test_processors_in_fp16_on_cuda() -> None:
    q, k, v = (t.to("cuda", torch.float16) for t in qkv(4))
    store = AttentionStore()
    assert torch.equal(store(q, k, v, name=CROSS, mask=None), attention(q, k, v))
    (probs,) = store.maps[CROSS]
    assert probs.dtype == torch.float32 and probs.device.type == "cuda"  # probabilities in fp32 (attention_probs)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), rtol=0, atol=1e-5)
    out = PromptToPrompt(2, cross_fraction=1.0)(q, k, v, name=CROSS, mask=None)
    assert out.dtype == torch.float16
    assert torch.equal(out[3], attention_probs(q[2:], k[2:])[0].half() @ v[3])


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15")


def test_word_swap_mapper(tok: CLIPTokenizer) -> None:
    same = word_swap_mapper(tok, "a photo of a cat", "a photo of a dog")
    assert torch.equal(same, torch.eye(77))  # one piece each: position to position
    # "cat" is one piece; "hippopotamus" is several: the cat's attention spreads evenly over them.
    n = len(tok.encode("hippopotamus"))
    assert n > 1
    spread = word_swap_mapper(tok, "a cat sleeps", "a hippopotamus sleeps")
    assert torch.equal(spread[2, 2:2 + n], torch.full((n,), 1 / n))
    assert spread[3, 2 + n] == 1.0  # "sleeps" follows, shifted
    torch.testing.assert_close(spread[:77 - n + 1].sum(dim=1), torch.ones(77 - n + 1))  # no mass lost
    with pytest.raises(ValueError, match="same number of words"):
        word_swap_mapper(tok, "a cat", "a big dog")


def test_prompt_words_and_token_weights(tok: CLIPTokenizer) -> None:
    words = prompt_words(tok, "A (red:1.2) hippopotamus, swimming!")
    n = len(tok.encode("hippopotamus"))
    assert [w for w, _ in words] == ["A", "red", "hippopotamus", "swimming"]
    assert words[2][1] == list(range(3, 3 + n))  # bos, a, red, then its pieces
    assert words[3][1] == [3 + n + 1]  # after the comma
    w = token_weights(tok, "a red cat", {"cat": 2.0})
    assert w[3] == 2.0 and w.sum() == 77 + 1.0
    with pytest.raises(ValueError, match="not a word of the prompt"):
        token_weights(tok, "a red cat", {"dog": 2.0})


# ----------------------------------------------------------------------------------------------------------------
# Whole generations with a tiny pipeline

SIZE = 16  # pixels; latents 8x8, UNet levels 8x8 and 4x4


@pytest.fixture(scope="module")
def pipe(tok: CLIPTokenizer) -> StableDiffusionPipeline:
    return tiny_pipeline(tok)


def generate(pipe: StableDiffusionPipeline, prompt: str | list[str], **kwargs: Any) -> Any:
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": 3, "seed": 0, **kwargs}
    return pipe(prompt, **kwargs)


PROMPT = "a photo of a cat, oil painting"


def test_capture_leaves_the_generation_bit_identical(pipe: StableDiffusionPipeline) -> None:
    plain = generate(pipe, PROMPT, output_type="np")
    store = AttentionStore()
    with use_processor(pipe.unet, store) as names:
        captured = generate(pipe, PROMPT, output_type="np")
    assert np.array_equal(captured.images, plain.images) and torch.equal(captured.latents, plain.latents)
    assert all(layer.processor is None for layer in attention_layers(pipe.unet).values())  # restored

    cross = [n for n in attention_layers(pipe.unet) if n.endswith("attn2")]
    assert names == cross and sorted(store.maps) == sorted(cross) and len(cross) == 11  # 2 + 2 down, 1 mid, 3 + 3 up
    for name, maps in store.maps.items():
        assert len(maps) == 3  # one per step
        level = name.split(".")[0], name.split(".")[1]
        L = 16 if level in {("down_blocks", "1"), ("mid_block", "attentions"), ("up_blocks", "0")} else 64
        for probs in maps:
            assert probs.shape == (1, 2, L, 77)  # (B, heads, H*W, 77) of the conditional half
            torch.testing.assert_close(probs.sum(dim=-1), torch.ones(1, 2, L), rtol=0, atol=1e-5)


def test_capture_without_guidance(pipe: StableDiffusionPipeline) -> None:
    store = AttentionStore(every=2, guided=False)
    with use_processor(pipe.unet, store):
        generate(pipe, [PROMPT, "a dog"], guidance_scale=1.0, num_inference_steps=4)
    assert {len(m) for m in store.maps.values()} == {2}  # steps 0 and 2
    assert {m[0].shape[0] for m in store.maps.values()} == {2}  # both prompts, no unconditional half


def test_heatmap_files_per_word(pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    store = AttentionStore(keep=False)
    with use_processor(pipe.unet, store):
        out = generate(pipe, PROMPT, num_images_per_prompt=2)
    written = save_attention_maps(store, pipe.tokenizer, PROMPT, out.images, tmp_path)
    words = ["a", "photo", "of", "a", "cat", "oil", "painting"]
    expected = [tmp_path / f"{i}-{w}.png" for i, w in enumerate(words)]
    expected += [tmp_path / "image1" / f"{i}-{w}.png" for i, w in enumerate(words)]
    assert written == expected
    for path in expected:
        with Image.open(path) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert not np.array_equal(np.asarray(Image.open(expected[1])), np.asarray(Image.open(expected[4])))


def test_overlay_validates_the_size() -> None:
    with pytest.raises(ValueError, match="heatmap is"):
        overlay(Image.new("RGB", (8, 8)), torch.zeros(4, 4))


def test_prompt_to_prompt_without_injection_is_a_plain_generation(pipe: StableDiffusionPipeline) -> None:
    edited = prompt_to_prompt(pipe, "a photo of a cat", "a photo of a dog", seed=0, cross_fraction=0.0,
                              num_inference_steps=3, height=SIZE, width=SIZE, output_type="np")
    # Bit-identical to the plain generation of the same batch [source, edit] from the same noise ...
    same_noise = [torch.Generator().manual_seed(0) for _ in range(2)]
    batch = generate(pipe, ["a photo of a cat", "a photo of a dog"], seed=None, generator=same_noise, output_type="np")
    assert torch.equal(edited.latents, batch.latents) and np.array_equal(edited.images, batch.images)
    # ... and, against the edited prompt generated alone, equal up to float rounding: CPU kernels round a batch of 2
    # differently from a batch of 1 (measured 2e-6 relative on the latents; allowed 1e-5).
    alone = generate(pipe, "a photo of a dog", output_type="np")
    assert rel_err(edited.latents[1:], alone.latents) <= 1e-5
    assert np.abs(edited.images[1] - alone.images[0]).max() <= 1e-4


def test_prompt_to_prompt_full_injection_copies_the_source_maps(pipe: StableDiffusionPipeline) -> None:
    record = AttentionStore()
    edited = prompt_to_prompt(pipe, "a photo of a cat", "a photo of a dog", seed=0, cross_fraction=1.0,
                              num_inference_steps=3, height=SIZE, width=SIZE, output_type="np", record=record)
    assert len(record.maps) == 11
    for maps in record.maps.values():
        assert len(maps) == 3
        for probs in maps:  # (2, nh, L, 77): [source, edit]
            assert torch.equal(probs[1], probs[0])
    free = prompt_to_prompt(pipe, "a photo of a cat", "a photo of a dog", seed=0, cross_fraction=0.0,
                            num_inference_steps=3, height=SIZE, width=SIZE, output_type="np")
    assert rel_err(edited.latents[1:], free.latents[1:]) > 1e-3  # the injection did change the edit
    assert torch.equal(edited.latents[:1], free.latents[:1])  # and left the source alone


def test_reweight_changes_the_image(pipe: StableDiffusionPipeline) -> None:
    plain = generate(pipe, PROMPT, output_type="np")
    weights = token_weights(pipe.tokenizer, PROMPT, {"cat": 3.0})
    with use_processor(pipe.unet, AttentionReweight(weights)):
        louder = generate(pipe, PROMPT, output_type="np")
    assert rel_err(louder.latents, plain.latents) > 1e-3


def test_long_context_through_the_unet_and_the_store(pipe: StableDiffusionPipeline) -> None:
    prompt = " ".join(["cat"] * 200)
    context = encode_prompt(pipe.tokenizer, pipe.text_encoder, ["", prompt])  # [uncond; cond], (2, 231, D)
    assert context.shape == (2, 3 * 77, 32)
    store = AttentionStore()
    with torch.no_grad(), use_processor(pipe.unet, store):
        out = pipe.unet(torch.randn(2, 4, 8, 8), 500, context)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert {m[0].shape[-1] for m in store.maps.values()} == {231}


def test_use_processor_rejects_an_empty_selection(pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match="selected no attention layer"):
        with use_processor(pipe.unet, AttentionStore(), where=lambda n: n.endswith("attn3")):
            pass
    assert set_attention_processor(pipe.unet, None) and is_cross_attention(CROSS)


# ----------------------------------------------------------------------------------------------------------------
# Through the pipeline and the command line


def test_pipeline_generates_from_a_200_token_prompt(pipe: StableDiffusionPipeline) -> None:
    words = ["cat", "dog", "tree", "house"] * 50
    prompt = " ".join(words)  # 200 tokens: 3 chunks of 77
    store = AttentionStore()
    with use_processor(pipe.unet, store):
        out = generate(pipe, prompt, negative_prompt="blurry", output_type="np")
    assert {m.shape[-1] for maps in store.maps.values() for m in maps} == {3 * 77}  # the UNet saw (2, 231, D)
    assert np.isfinite(out.images).all()
    first_chunk = generate(pipe, " ".join(words[:75]), negative_prompt="blurry", output_type="np")
    assert rel_err(out.latents, first_chunk.latents) > 1e-4  # the tokens beyond 75 did reach the image


def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               pipe: StableDiffusionPipeline) -> tuple[str, list[dict]]:
    """A --model path, with ldm.load_pipeline patched to give the tiny pipeline and record each call's kwargs."""
    import ldm

    calls: list[dict] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(pipe, name)

        def __call__(self, prompt: str, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return pipe(prompt, **kwargs)

    model = tmp_path / "tiny.safetensors"
    model.write_bytes(b"")
    monkeypatch.setattr(ldm, "load_pipeline", lambda *args, **kwargs: Recording())
    return str(model), calls


def test_cli_attention_maps_and_no_weighting(pipe: StableDiffusionPipeline, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from ldm.cli import main

    model, calls = fake_model(tmp_path, monkeypatch, pipe)
    maps = tmp_path / "maps"
    args = ["generate", "a (red:1.3) cat, sleeping", "--model", model, "--steps", "2", "--height", "16",
            "--width", "24", "--seed", "0"]
    assert main([*args, "--out", str(tmp_path / "a.png"), "--attention-maps", str(maps)]) == 0
    assert calls[-1]["weighting"] is True
    names = sorted(p.name for p in maps.iterdir())
    assert names == ["0-a.png", "1-red.png", "2-cat.png", "3-sleeping.png"]
    for name in names:
        with Image.open(maps / name) as im:
            assert im.size == (24, 16)  # the image's size
    assert str(maps / "2-cat.png") in capsys.readouterr().out

    assert main([*args, "--out", str(tmp_path / "b.png"), "--no-weighting"]) == 0
    assert calls[-1]["weighting"] is False
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # emphasis changed the image

    # the maps folder is not silently overwritten, and a file is no folder
    assert main([*args, "--out", str(tmp_path / "c.png"), "--attention-maps", str(maps)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c.png"), "--attention-maps", str(tmp_path / "a.png")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_attention_maps_without_guidance(pipe: StableDiffusionPipeline, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm.cli import main

    model, _ = fake_model(tmp_path, monkeypatch, pipe)
    assert main(["generate", "two cats", "--model", model, "--steps", "1", "--height", "16", "--width", "16",
                 "--guidance", "1", "--num-images", "2", "--out", str(tmp_path / "x.png"),
                 "--attention-maps", str(tmp_path / "m")]) == 0
    assert sorted(str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*.png")) == [
        "0-two.png", "1-cats.png", "image1/0-two.png", "image1/1-cats.png"]
