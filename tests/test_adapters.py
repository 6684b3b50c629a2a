"""Adapters: textual inversion embeddings and LoRAs against diffusers (load_textual_inversion, load_lora_weights +
fuse_lora) on the same weights, every file format, and every bad file refused with the pipeline unchanged.

Tolerances: prompt embeddings and merged weights within 1e-6 relative (the same fp32 arithmetic in another order;
splicing itself is exact), pipeline latents within the contract's 1e-4 (tests/test_pipeline.py says why).
The full-shape SD 1.5 cases (slow) use the official shapes with trained-like random weights.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ldm
from ldm.lora import parse_lora_tags
from ldm.prompts import apply_emphasis
from tests.helpers import LATENT_TOL, assert_rel, pipelines, rel_err, run_ref
from weights_convert.adapter_files import read_embedding
from weights_convert.lora import lora_module_table
from weights_convert.safetensors_file import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TOL = 1e-6  # embeddings and merged weights (see the module docstring)
WORD = "<cat-toy>"


@pytest.fixture
def pair(tiny):
    """(diffusers pipeline, ours) with private copies of the weights, so each test may change them."""
    ref, ours = pipelines(tiny)
    ref.unet, ref.text_encoder, ref.tokenizer = (copy.deepcopy(m) for m in (ref.unet, ref.text_encoder,
                                                                            ref.tokenizer))
    ours.unet, ours.text_encoder = copy.deepcopy(ours.unet), copy.deepcopy(ours.text_encoder)
    return ref, ours


def vectors(n: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Embedding vectors of the size learned ones have (norm ~ a token embedding's times a few)."""
    return 0.3 * torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def state(pipe) -> dict[str, torch.Tensor]:
    """Every weight of the UNet and the text encoder, copied."""
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).state_dict().items()}


def assert_unchanged(pipe, before: dict[str, torch.Tensor]) -> None:
    after = state(pipe)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights changed: {changed[:5]}"
    assert not pipe.textual_inversion.embeddings and not pipe.lora.adapters


# ----------------------------------------------------------------------------------------------------------------
# Textual inversion


def test_embedding_formats(tmp_path: Path, tiny) -> None:
    """Each format gives the same vectors; the word is the file stem (A1111, kohya) or the key (diffusers)."""
    _, ours = pipelines(tiny)
    v = vectors(2)
    files = {
        "a1111.pt": ({"string_to_param": {"*": v}, "name": "ignored", "string_to_token": {"*": 265},
                      "step": 100, "sd_checkpoint": "abc"}, "a1111"),
        "kohya.safetensors": ({"emb_params": v}, "kohya"),
        "flat.safetensors": ({"string_to_param.*": v}, "flat"),
        "learned_embeds.bin": ({"<mine>": v}, "<mine>"),
        "learned_embeds.safetensors": ({"<other>": v[:1]}, "<other>"),
        "single.bin": ({"<one>": v[0]}, "<one>"),  # diffusers' single vector (D,)
    }
    for name, (data, word) in files.items():
        path = tmp_path / name
        save_file(data, path) if name.endswith(".safetensors") else torch.save(data, path)
        assert ours.load_textual_inversion(path) == word
        got = ours.textual_inversion.embeddings[word].vectors
        torch.testing.assert_close(got, v[:len(got)], rtol=0, atol=0)
    assert ours.load_textual_inversion(tmp_path / "kohya.safetensors", token="shiny") == "shiny"
    ours.unload_textual_inversion("shiny")
    ours.unload_textual_inversion()
    assert not ours.textual_inversion.embeddings


@pytest.mark.parametrize("n", [1, 3])
def test_embedding_prompt_parity(tmp_path: Path, pair, n: int) -> None:
    """Our prompt embeddings equal diffusers' after load_textual_inversion (its prompt rewriting for n > 1).

    The word matches case-insensitively (the tokenizer lower-cases); diffusers' rewriting of multi-vector words is a
    case-sensitive str.replace, so "<CAT-TOY>" is compared for n = 1 only (diffusers puts 1 of the 3 vectors there).
    """
    ref, ours = pair
    save_file({WORD: vectors(n)}, tmp_path / "emb.safetensors")
    ref.load_textual_inversion(str(tmp_path / "emb.safetensors"))
    ours.load_textual_inversion(tmp_path / "emb.safetensors")
    prompts = ["a photo of <cat-toy>", "<cat-toy>, oil painting", "a <cat-toy> and a <cat-toy>dog", "a cat"]
    for prompt in prompts + (["a <CAT-TOY> dog"] if n == 1 else []):
        expected, _ = ref.encode_prompt(prompt, "cpu", 1, False)
        assert_rel(ours.encode_prompt([prompt]), expected, TOL, prompt)


def test_embedding_emphasis_and_long_prompts(tmp_path: Path, pair) -> None:
    """`(word:1.3)` weights the word's n positions (A1111's emphasis on diffusers' embeddings) and a word past
    token 75 lands in the second chunk, encoded as that chunk alone would be."""
    ref, ours = pair
    save_file({WORD: vectors(2)}, tmp_path / "emb.safetensors")
    ref.load_textual_inversion(str(tmp_path / "emb.safetensors"))
    ours.load_textual_inversion(tmp_path / "emb.safetensors")
    plain, _ = ref.encode_prompt("<cat-toy> dog", "cpu", 1, False)  # (1, 77, D): bos, v1, v2, dog, eos, ...
    weights = torch.ones(1, 77)
    weights[0, 1:3] = 1.3
    assert_rel(ours.encode_prompt(["(<cat-toy>:1.3) dog"]), apply_emphasis(plain, weights), TOL, "emphasis")

    long = ours.encode_prompt(["a " * 75 + "<cat-toy> dog"])  # 75 tokens fill chunk 1
    assert long.shape[1] == 154
    assert_rel(long[:, 77:], plain, TOL, "second chunk")


def test_embedding_image_parity_with_negative_prompt(tmp_path: Path, pair) -> None:
    """A multi-vector word in the prompt and in the negative prompt: the same latents as diffusers."""
    ref, ours = pair
    save_file({WORD: vectors(3, seed=1)}, tmp_path / "emb.safetensors")
    ref.load_textual_inversion(str(tmp_path / "emb.safetensors"))
    ours.load_textual_inversion(tmp_path / "emb.safetensors")
    kw = dict(num_inference_steps=3, guidance_scale=7.5, height=64, width=64)
    _, ref_latents = run_ref(ref, ["a painting of <cat-toy>"], negative_prompt=["blurry <cat-toy>"], seed=5,
                             n_images=1, **kw)
    out = ours(["a painting of <cat-toy>"], negative_prompt=["blurry <cat-toy>"], seed=5, output_type="latent",
               **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL


def test_embedding_unload_restores_plain_encoding(tmp_path: Path, pair) -> None:
    _, ours = pair
    before = ours.encode_prompt(["a photo of <cat-toy>"])
    save_file({WORD: vectors(2)}, tmp_path / "emb.safetensors")
    ours.load_textual_inversion(tmp_path / "emb.safetensors")
    assert rel_err(ours.encode_prompt(["a photo of <cat-toy>"]), before) > 1e-3  # the cache must not serve it
    ours.unload_textual_inversion()
    assert torch.equal(ours.encode_prompt(["a photo of <cat-toy>"]), before)


def test_embedding_bad_files(tmp_path: Path, pair) -> None:
    """Wrong width, a pickle needing code, a truncated file, a word loaded twice: a clear error, nothing loaded."""
    _, ours = pair
    before = state(ours)
    save_file({"<wide>": vectors(1, width=768)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"width 768 \(SD 1.x\).*width 32"):
        ours.load_textual_inversion(tmp_path / "wide.safetensors")
    with open(tmp_path / "code.pt", "wb") as f:
        torch.save({"string_to_param": {"*": vectors(1)}, "thing": Path("x")}, f)
    with pytest.raises(CheckpointError, match="needs code to load"):
        ours.load_textual_inversion(tmp_path / "code.pt")
    save_file({"emb_params": vectors(4)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        ours.load_textual_inversion(tmp_path / "cut.safetensors")
    torch.save({"string_to_param": {"*": vectors(1)}}, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        ours.load_textual_inversion(tmp_path / "cut.pt")
    assert_unchanged(ours, before)
    ours.load_textual_inversion(tmp_path / "whole.safetensors", token="w")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_textual_inversion(tmp_path / "whole.safetensors", token="W")


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def lora_layers(model: nn.Module, select, rank: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """Random (down, up) for the selected Linear / Conv2d modules, sized so the update is ~10% of the weight."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and select(name):
            w = m.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) / math.sqrt(w[0].numel())
            up = 0.1 * torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g)
            out[name] = (down, up)
    return out


def unet_select(name: str) -> bool:
    """Attention, projections, feed-forward and the resnets' 3x3 convolutions (LoCon) and time projections."""
    if "resnets" in name:
        return name.endswith(("conv1", "conv2", "time_emb_proj"))
    return "attentions" in name


def lora_file(path: Path, pipe, kind: str, seed: int = 0, unet: bool = True, text: bool = True) -> Path:
    """A kohya (with alphas) or PEFT (without) LoRA file for the pipeline's UNet and/or text encoder."""
    sd = {}
    parts = [("unet", pipe.unet, unet_select, "lora_unet_", 2.0)] if unet else []
    parts += [("text_encoder", pipe.text_encoder, lambda n: "layers" in n, "lora_te_", 8.0)] if text else []
    for component, model, select, prefix, alpha in parts:
        for name, (down, up) in lora_layers(model, select, seed=seed).items():
            if kind == "kohya":
                key = prefix + name.replace(".", "_")
                sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                       f"{key}.alpha": torch.tensor(alpha)}
            else:
                sd |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up}
    save_file(sd, path)
    return path


def ref_weights(ref) -> dict[str, torch.Tensor]:
    """diffusers' fused weights under our key names (peft's base_layer folded away, transformers 5's prefix added)."""
    out = {}
    for part, prefix in (("unet", ""), ("text_encoder", "text_model.")):
        for k, v in getattr(ref, part).state_dict().items():
            if "lora_" not in k:
                out[f"{part}.{prefix}{k.replace('.base_layer', '')}"] = v
    return out


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_lora_merge_matches_diffusers_fuse(tmp_path: Path, pair, kind: str) -> None:
    """UNet (linear, 1x1 and 3x3 conv) and text-encoder LoRA merged at 0.7: diffusers' fuse_lora(lora_scale=0.7)
    weights; then the same latents."""
    ref, ours = pair
    path = lora_file(tmp_path / f"{kind}.safetensors", ours, kind)
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.fuse_lora(lora_scale=0.7)
    assert ours.load_lora_weights(path, weight=0.7) == kind
    expected = ref_weights(ref)
    for key, value in state(ours).items():
        assert rel_err(value, expected[key]) <= TOL, key
    kw = dict(num_inference_steps=3, height=64, width=64)
    _, ref_latents = run_ref(ref, ["a photo of a cat"], seed=3, n_images=1, **kw)
    out = ours(["a photo of a cat"], seed=3, output_type="latent", **kw)
    assert rel_err(out.latents, ref_latents) <= LATENT_TOL


def test_lora_several_and_exact_removal(tmp_path: Path, pair) -> None:
    """Two LoRAs at their own weights are W + sum w_i * delta_i; dropping one and unloading restore bit for bit."""
    _, ours = pair
    before = state(ours)
    a = lora_file(tmp_path / "a.safetensors", ours, "kohya", seed=1)
    b = lora_file(tmp_path / "b.safetensors", ours, "peft", seed=2, text=False)
    ours.load_lora_weights(a, adapter_name="a")
    only_a = state(ours)
    ours.load_lora_weights(b, adapter_name="b")
    ours.set_adapters(["a", "b"], adapter_weights=[0.5, -0.8])
    key = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    expected = before["unet." + key[1] + ".weight"] + sum(
        w * ours.lora.adapters[n][key].delta(expected_shape := before["unet." + key[1] + ".weight"].shape)
        for n, w in (("a", 0.5), ("b", -0.8)))
    assert expected_shape == ours.unet.get_submodule(key[1]).weight.shape
    assert_rel(ours.unet.get_submodule(key[1]).weight, expected, TOL, "two LoRAs")
    ours.set_adapters("a")
    after = state(ours)
    assert all(torch.equal(after[k], only_a[k]) for k in after)
    ours.set_adapters([], [])
    assert all(torch.equal(v, before[k]) for k, v in state(ours).items())
    ours.set_adapters(["a", "b"], [1.0, 1.0])
    ours.unload_lora_weights()
    assert_unchanged(ours, before)


def test_lora_table_spellings(tmp_path: Path, pair) -> None:
    """kohya's diffusers and LDM spellings (lora_unet_input_blocks_1_1_proj_in), PEFT's and diffusers' old
    lora.down/up, each with an alpha: the same module, W + (alpha / r) B @ A."""
    _, ours = pair
    name = "down_blocks.0.attentions.0.proj_in"
    down, up = lora_layers(ours.unet, lambda n: n == name)[name]
    original = ours.unet.get_submodule(name).weight.detach().clone()
    alpha = torch.tensor(2.0)
    for layer, (a, b) in {"lora_unet_down_blocks_0_attentions_0_proj_in": ("lora_down", "lora_up"),
                          "lora_unet_input_blocks_1_1_proj_in": ("lora_down", "lora_up"),
                          f"unet.{name}": ("lora_A", "lora_B"),
                          f"unet.{name}.lora": ("down", "up")}.items():
        data = {f"{layer}.{a}.weight": down, f"{layer}.{b}.weight": up, f"{layer.removesuffix('.lora')}.alpha": alpha}
        save_file(data, tmp_path / "x.safetensors")
        ours.load_lora_weights(tmp_path / "x.safetensors")
        expected = original + (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).view(original.shape)
        assert_rel(ours.unet.get_submodule(name).weight, expected, TOL, layer)
        ours.unload_lora_weights()
    table = lora_module_table(ours.unet, ours.text_encoder)  # the text encoder's three spellings
    assert table["text_encoder.encoder.layers.0.self_attn.q_proj"] == table[
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] == table[
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == ("text_encoder",
                                                                   "text_model.encoder.layers.0.self_attn.q_proj")


def test_lora_bad_files(tmp_path: Path, pair) -> None:
    """Unmatched keys (listed), an SD 2 LoRA, a pickle needing code, a truncated file, a shape that does not fit:
    each a clear error and the pipeline unchanged."""
    _, ours = pair
    good = lora_file(tmp_path / "good.safetensors", ours, "kohya")
    ours.load_lora_weights(good, adapter_name="good")
    ours.unload_lora_weights()
    before = state(ours)
    data = load_file(good)
    save_file({**data, "lora_unet_nowhere.lora_down.weight": torch.zeros(4, 4),
               "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"2 of \d+ keys match no LoRA layer.*lora_unet_nowhere.*LoHa"):
        ours.load_lora_weights(tmp_path / "extra.safetensors")
    sd2 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
           torch.zeros(4, 1024), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up."
           "weight": torch.zeros(32, 4)}
    save_file(sd2, tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match=r"a LoRA for SD 2.x: .* reads 1024-wide text embeddings, this "
                                              r"model.s reads 32"):
        ours.load_lora_weights(tmp_path / "sd2.safetensors")
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1024)},
              tmp_path / "sd2_text.safetensors")  # a text-encoder-only LoRA for OpenCLIP-H
    with pytest.raises(CheckpointError, match=r"a LoRA for SD 2.x: .*self_attn_q_proj"):
        ours.load_lora_weights(tmp_path / "sd2_text.safetensors")
    torch.save({"x": torch.zeros(1), "y": Path("x")}, tmp_path / "code.bin")
    with pytest.raises(CheckpointError, match="needs code to load"):
        ours.load_lora_weights(tmp_path / "code.bin")
    raw = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        ours.load_lora_weights(tmp_path / "cut.safetensors")
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 7, 1, 1), f"{key}.lora_up.weight": torch.zeros(32, 4, 1, 1)},
              tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"do not fit 'down_blocks.0.attentions.0.proj_in'"):
        ours.load_lora_weights(tmp_path / "shape.safetensors")
    assert_unchanged(ours, before)


def test_parse_lora_tags() -> None:
    assert parse_lora_tags("a cat <lora:pixel:0.8>, <lora:toy> high") == ("a cat ,  high", [("pixel", 0.8),
                                                                                           ("toy", 1.0)])
    assert parse_lora_tags("<lora:a:0.5:0.2>x") == ("x", [("a", 0.5)])
    with pytest.raises(ValueError, match="not a number"):
        parse_lora_tags("<lora:a:lots>")


def test_pipeline_of_packaged_model_has_adapter_methods() -> None:
    assert all(hasattr(ldm.StableDiffusionPipeline, m) for m in (
        "load_textual_inversion", "unload_textual_inversion", "load_lora_weights", "set_adapters",
        "unload_lora_weights"))


# ----------------------------------------------------------------------------------------------------------------
# The command line, on the packaged shapes model


@pytest.fixture(scope="module")
def shapes():
    from ldm.train import DEFAULT_MODEL_DIR

    return ldm.load_pipeline(DEFAULT_MODEL_DIR)


def test_cli_embedding_lora_and_prompt_tags(tmp_path: Path, shapes, capsys) -> None:
    """--embedding, --lora PATH:SCALE and <lora:NAME:SCALE> with --lora-dir: the library's image for the same
    adapters; the PNG's parameters keep the tag as written."""
    from ldm.cli import main
    from ldm.images import parse_parameters, read_parameters
    from tests.helpers import assert_images_close

    width = shapes.text_encoder.config.hidden_size
    save_file({"emb_params": vectors(2, width)}, tmp_path / "sparkle.safetensors")
    lora_file(tmp_path / "a.safetensors", shapes, "kohya", seed=1)
    (tmp_path / "loras").mkdir()
    lora_file(tmp_path / "loras" / "b.safetensors", shapes, "peft", seed=2)
    out = tmp_path / "x.png"
    code = main(["generate", "a sparkle circle <lora:b:0.8>", "--out", str(out), "--steps", "3", "--seed", "1",
                 "--embedding", str(tmp_path / "sparkle.safetensors"), "--lora", f"{tmp_path / 'a.safetensors'}:0.5",
                 "--lora-dir", str(tmp_path / "loras")])
    assert code == 0, capsys.readouterr().err
    assert parse_parameters(read_parameters(out))["Prompt"] == "a sparkle circle <lora:b:0.8>"
    before = state(shapes)
    shapes.load_textual_inversion(tmp_path / "sparkle.safetensors")
    shapes.load_lora_weights(tmp_path / "a.safetensors", weight=0.5)
    shapes.load_lora_weights(tmp_path / "loras" / "b.safetensors", weight=0.8)
    expected = shapes("a sparkle circle ", num_inference_steps=3, seed=1, output_type="np").images
    shapes.unload_lora_weights()
    shapes.unload_textual_inversion()
    assert_unchanged(shapes, before)
    from PIL import Image
    import numpy as np

    assert_images_close(np.asarray(Image.open(out), dtype=np.float32)[None] / 255, expected)


@pytest.mark.parametrize("case", ["width", "unmatched", "sd2", "code", "truncated", "missing", "no-dir"])
def test_cli_bad_adapters_exit_2(tmp_path: Path, shapes, capsys, case: str) -> None:
    from ldm.cli import main

    good = lora_file(tmp_path / "good.safetensors", shapes, "kohya")
    args = {"width": ["--embedding", str(tmp_path / "wide.safetensors")],
            "unmatched": ["--lora", str(tmp_path / "extra.safetensors")],
            "sd2": ["--lora", str(tmp_path / "sd2.safetensors") + ":0.5"],
            "code": ["--embedding", str(tmp_path / "code.pt")],
            "truncated": ["--lora", str(tmp_path / "cut.safetensors")],
            "missing": ["--lora", str(tmp_path / "nothing.safetensors")],
            "no-dir": []}[case]
    message = {"width": "width 768", "unmatched": "match no LoRA layer", "sd2": "a LoRA for SD 2.x",
               "code": "needs code", "truncated": "cut.safetensors", "missing": "no such file",
               "no-dir": "give --lora-dir"}[case]
    save_file({"emb_params": vectors(1, 768)}, tmp_path / "wide.safetensors")
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "extra.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.zeros(4, 1024)}, tmp_path / "sd2.safetensors")
    torch.save({"emb_params": vectors(1, 64), "x": Path("x")}, tmp_path / "code.pt")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    out = tmp_path / "x.png"
    prompt = "a red circle <lora:good>" if case == "no-dir" else "a red circle"
    assert main(["generate", prompt, "--out", str(out), "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("ldm generate: error:"), err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Full SD 1.5 shapes (slow): the official configs, trained-like random weights


def ref_pipeline(cls, text_encoder, tokenizer, unet=None):
    """A diffusers pipeline around full-size parts; the parts these tests do not run (VAE, maybe UNet) tiny."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from tests.helpers import UNET, VAE

    return cls(vae=AutoencoderKL(**VAE), text_encoder=text_encoder, tokenizer=tokenizer,
               unet=unet if unet is not None else UNet2DConditionModel(**UNET), scheduler=DDIMScheduler(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.slow
def test_full_shape_sd15_embedding_matches_diffusers(tmp_path: Path) -> None:
    """A 3-vector 768-wide embedding in CLIP ViT-L/14: the same prompt embeddings as diffusers' loader."""
    from diffusers import StableDiffusionPipeline as RefPipeline
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.config import CLIPTextConfig
    from tests.helpers import TOKENIZER_DIR, diffusers_config, trained_like_

    config = diffusers_config("sd15", "text_encoder")
    ref_text = trained_like_(CLIPTextModel(RefConfig(**config)), seed=4).eval()
    text = ldm.CLIPTextModel(CLIPTextConfig.from_transformers(config)).eval()
    text.load_state_dict(ref_text.state_dict(), strict=True)
    save_file({WORD: vectors(3, 768, seed=2)}, tmp_path / "emb.safetensors")
    ref = ref_pipeline(RefPipeline, ref_text, CLIPTokenizer.from_pretrained(TOKENIZER_DIR / "sd15"))
    ref.load_textual_inversion(str(tmp_path / "emb.safetensors"))
    from ldm.embeddings import TextualInversion
    from ldm.prompts import encode_prompt

    ti = TextualInversion()
    ti.add(read_embedding(tmp_path / "emb.safetensors"), 768)
    ours_tok = ti.wrap(ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15"))
    for prompt in ["a watercolour of <cat-toy> in the snow", "<cat-toy>, highly detailed"]:
        ids = ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer), padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = ref_text(ids).last_hidden_state
            assert_rel(encode_prompt(ours_tok, text, [prompt]), expected, 1e-5, prompt)


@pytest.mark.slow
def test_full_shape_sd15_lora_matches_diffusers(tmp_path: Path) -> None:
    """A kohya LoRA over every attention layer of the SD 1.5 UNet and CLIP, merged at 0.8: the same weights and
    UNet output as diffusers' load_lora_weights + fuse_lora(lora_scale=0.8)."""
    from diffusers import StableDiffusionPipeline as RefPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel

    from ldm.config import CLIPTextConfig, UNetConfig
    from tests.helpers import diffusers_config, trained_like_

    unet_config, text_config = diffusers_config("sd15", "unet"), diffusers_config("sd15", "text_encoder")
    ref_unet = trained_like_(UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")}),
                             seed=5).eval()
    ref_text = trained_like_(CLIPTextModel(RefConfig(**text_config)), seed=6).eval()

    class Parts:  # what lora_file needs of a pipeline
        unet = ldm.UNet2DConditionModel(UNetConfig.from_diffusers(unet_config)).eval()
        text_encoder = ldm.CLIPTextModel(CLIPTextConfig.from_transformers(text_config)).eval()

    Parts.unet.load_state_dict(ref_unet.state_dict(), strict=True)
    Parts.text_encoder.load_state_dict(ref_text.state_dict(), strict=True)
    path = lora_file(tmp_path / "full.safetensors", Parts, "kohya")
    ref = ref_pipeline(RefPipeline, ref_text, None, ref_unet)
    ref.load_lora_weights(str(path), adapter_name="full")
    ref.fuse_lora(lora_scale=0.8)
    from ldm.lora import LoRAMerger
    from weights_convert.lora import read_lora

    merger = LoRAMerger()
    merger.add("full", read_lora(path, Parts.unet, Parts.text_encoder),
               {"unet": Parts.unet, "text_encoder": Parts.text_encoder}, 0.8)
    expected = ref_weights(ref)
    for part in ("unet", "text_encoder"):
        for key, value in getattr(Parts, part).state_dict().items():
            assert rel_err(value, expected[f"{part}.{key}"]) <= TOL, key
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        assert_rel(Parts.unet(sample, 500, context), ref_unet(sample, 500, context).sample, 1e-5, "UNet")


def test_clip_inputs_embeds(tiny) -> None:
    """CLIPTextModel(ids, inputs_embeds=table(ids)) is the plain call, bit for bit; a wrong shape is refused."""
    text = tiny.text[1]
    ids = tiny.tokenizer[1](["a photo of a cat"])
    with torch.no_grad():
        plain = text(ids).last_hidden_state
        spliced = text(ids, inputs_embeds=text.text_model.embeddings.token_embedding(ids)).last_hidden_state
    assert torch.equal(plain, spliced)
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        text(ids, inputs_embeds=torch.zeros(1, 77, 8))
