"""ldm.CLIPTokenizer against transformers.CLIPTokenizer (5.23.0) loaded from the official SD 1 / SD 2 tokenizer
folders. The contract is identical ids (no tolerance): the same prompts give the same (B, 77) tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import ldm
from ldm.tokenizer import CLIPTokenizer
from tests.helpers import HARD_PROMPTS, TOKENIZER_DIR

FAMILIES = {"sd15": ("<|endoftext|>", 49407), "sd21": ("!", 0)}

PROMPTS = HARD_PROMPTS


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request: pytest.FixtureRequest) -> tuple[str, transformers.CLIPTokenizer, CLIPTokenizer]:
    folder = TOKENIZER_DIR / request.param
    return request.param, transformers.CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_dir(folder)


def reference_ids(ref: transformers.CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    out = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out.input_ids


def test_ids_identical(pair: tuple[str, transformers.CLIPTokenizer, CLIPTokenizer]) -> None:
    family, ref, ours = pair
    ids = ours(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    expected = reference_ids(ref, PROMPTS)
    for i, prompt in enumerate(PROMPTS):  # one at a time, so a failure names the prompt
        assert ids[i].tolist() == expected[i].tolist(), f"{family}: prompt {prompt!r}"
    assert torch.equal(ours(PROMPTS[3]), reference_ids(ref, [PROMPTS[3]]))  # a single string is a batch of 1


def test_encode_tokenize_decode_identical(pair: tuple[str, transformers.CLIPTokenizer, CLIPTokenizer]) -> None:
    family, ref, ours = pair
    for prompt in PROMPTS:
        ids = ours.encode(prompt)
        assert ids == ref(prompt, add_special_tokens=False).input_ids, f"{family}: encode {prompt!r}"
        assert ours.tokenize(prompt) == ref.tokenize(prompt), f"{family}: tokenize {prompt!r}"
        padded = ours(prompt)[0].tolist()
        for skip in (False, True):
            assert ours.decode(padded, skip_special_tokens=skip) == ref.decode(padded, skip_special_tokens=skip), (
                f"{family}: decode {prompt!r} skip_special_tokens={skip}")
    assert ours.decode(torch.tensor([49406, 320, 1929, 49407])) == "<|startoftext|>a dog <|endoftext|>"


def test_long_prompts_encode_beyond_77(pair: tuple[str, transformers.CLIPTokenizer, CLIPTokenizer]) -> None:
    _, _, ours = pair
    long = "an extremely detailed " + "and very long prompt with many different words " * 12 + "END"
    ids = ours.encode(long)
    assert len(ids) == 3 + 8 * 12 + 1  # encode does not truncate
    row = ours(long)[0].tolist()
    assert row == [49406, *ids[:75], 49407]  # truncation keeps the first 75 and EOS stays last


def test_known_ids_and_padding() -> None:
    """The example of the brief, and each family's pad token."""
    for family, (pad, pad_id) in FAMILIES.items():
        tok = CLIPTokenizer.from_dir(TOKENIZER_DIR / family)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, pad_id)
        assert tok.special_tokens["pad_token"] == pad
        assert (tok.model_max_length, tok.vocab_size) == (77, 49408)
        row = tok(["a dog wearing hat"])[0].tolist()
        assert row == [49406, 320, 1929, 3309, 3801, 49407] + [pad_id] * 71
        assert tok([""])[0].tolist() == [49406, 49407] + [pad_id] * 75


def test_sd2_pad_token_is_special_like_transformers() -> None:
    """transformers registers "!" as SD 2's pad (special) token, so "!" in a prompt becomes id 0, not BPE's "!</w>"."""
    sd1, sd2 = (CLIPTokenizer.from_dir(TOKENIZER_DIR / f) for f in ("sd15", "sd21"))
    assert sd1.tokenize("hi!!") == ["hi</w>", "!!</w>"] and 0 not in sd1.encode("hi!!")
    assert sd2.tokenize("hi!!") == ["hi</w>", "!", "!"] and sd2.encode("hi!!")[1:] == [0, 0]
    assert sd1.encode("hi!!")[0] == sd2.encode("hi!!")[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packaged_equals_folder(family: str) -> None:
    pad, _ = FAMILIES[family]
    packaged = CLIPTokenizer.packaged(pad_token=pad)
    folder = CLIPTokenizer.from_dir(TOKENIZER_DIR / family)
    assert torch.equal(packaged(PROMPTS), folder(PROMPTS))
    assert json.loads(packaged._tok.to_str()) == json.loads(folder._tok.to_str())  # same tokenizers pipeline
    preset = ldm.SD15 if family == "sd15" else ldm.SD21_V
    assert preset.pad_token == pad


def test_bare_folder_uses_transformers_defaults(tmp_path: Path) -> None:
    """vocab.json + merges.txt alone: transformers' defaults (pad "<|endoftext|>") on both sides."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / "sd15" / name, tmp_path / name)
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = CLIPTokenizer.from_dir(tmp_path)
    assert ours.pad_id == 49407
    assert ours(PROMPTS).tolist() == reference_ids(ref, PROMPTS).tolist()


def test_bad_input(tmp_path: Path) -> None:
    tok = CLIPTokenizer.packaged()
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        tok(["ok", 3])
    with pytest.raises(TypeError, match="list of str"):
        tok(None)
    with pytest.raises(TypeError, match="list of str"):
        tok(b"bytes")
    with pytest.raises(ValueError, match="empty list"):
        tok([])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(["a"])
    with pytest.raises(ValueError, match="49408"):
        tok.decode([320, 49408])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="'<pad>' is not in the vocabulary"):
        CLIPTokenizer.packaged(pad_token="<pad>")
    with pytest.raises(TypeError, match="pad_token must be a str"):
        CLIPTokenizer.packaged(pad_token=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        CLIPTokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="model_max_length"):
        CLIPTokenizer(TOKENIZER_DIR / "sd15" / "vocab.json", TOKENIZER_DIR / "sd15" / "merges.txt",
                      model_max_length=1)
    with pytest.raises(ValueError, match="sep_token"):
        CLIPTokenizer(TOKENIZER_DIR / "sd15" / "vocab.json", TOKENIZER_DIR / "sd15" / "merges.txt",
                      special_tokens={"sep_token": "!"})


def saved_by_transformers(family: str, folder: Path, extra_tokens: tuple[str, ...] = ()) -> Path:
    """The tokenizer folder transformers 5's save_pretrained writes (what diffusers' pipeline save writes too):
    tokenizer.json and tokenizer_config.json, no vocab.json / merges.txt."""
    ref = transformers.CLIPTokenizer.from_pretrained(TOKENIZER_DIR / family)
    if extra_tokens:
        ref.add_tokens(list(extra_tokens))
    ref.save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").exists()
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokenizer_json_folder_matches_transformers(family: str, tmp_path: Path) -> None:
    """A folder with only tokenizer.json loads, with transformers' ids, pieces, padding and truncation; the same
    tokenizer as the vocab.json + merges.txt form."""
    folder = saved_by_transformers(family, tmp_path)
    ref, ours = transformers.CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_dir(folder)
    assert ours.pad_id == FAMILIES[family][1] and ours.special_tokens["pad_token"] == FAMILIES[family][0]
    ids, expected = ours(PROMPTS), reference_ids(ref, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert ids[i].tolist() == expected[i].tolist(), f"{family}: prompt {prompt!r}"
        assert ours.tokenize(prompt) == ref.tokenize(prompt), f"{family}: tokenize {prompt!r}"
    classic = CLIPTokenizer.from_dir(TOKENIZER_DIR / family)
    assert json.loads(ours._tok.to_str()) == json.loads(classic._tok.to_str())
    from_file = CLIPTokenizer.from_tokenizer_json(folder / "tokenizer.json", {"pad_token": FAMILIES[family][0]})
    assert torch.equal(from_file(PROMPTS), ids)


def test_tokenizer_json_added_tokens_keep_their_ids(tmp_path: Path) -> None:
    """Words a fine-tune added (textual inversion) keep the ids transformers gives them."""
    folder = saved_by_transformers("sd15", tmp_path, extra_tokens=("<cat-toy>", "<my-style>"))
    ref, ours = transformers.CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_dir(folder)
    prompts = ["a <cat-toy> in <my-style>", "<MY-STYLE>, <cat-toy><cat-toy>", PROMPTS[3]]
    assert ours(prompts).tolist() == reference_ids(ref, prompts).tolist()
    assert ours.vocab_size == len(ref) == 49410 and ours.encode("<my-style>") == [49409]


def test_tokenizer_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer.json nor vocab.json \+ merges.txt"):
        CLIPTokenizer.from_dir(tmp_path)
    shutil.copy(TOKENIZER_DIR / "sd15" / "vocab.json", tmp_path / "vocab.json")  # merges.txt missing
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        CLIPTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(ValueError, match="must hold a BPE model"):
        CLIPTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON file"):
        CLIPTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}}')
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        CLIPTokenizer.from_dir(tmp_path)
