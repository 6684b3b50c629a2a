"""Bad files reach the user as a ValueError naming the file and the fault (issue #23), never a traceback from deep
inside: damaged safetensors headers, configs of the wrong type or absurd size, damaged tokenizer files, foreign
scheduler classes, non-finite weights and arguments, decompression bombs, prompts that are not text, and the
permissions and chunks of the PNGs we write. The commands' side (exit status 2, nothing written) is in
tests/test_reliability_cli.py.

The model is the packaged shapes model (ldm/data/shapes-model, 18 MB), copied and damaged per test.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ldm
from ldm.images import image_to_tensor, read_parameters, save_png
from ldm.train import DEFAULT_MODEL_DIR
from weights_convert.load import _empty_model
from weights_convert.safetensors_file import CheckpointError, SafetensorsFile

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tmp_path) -> Path:
    """A private copy of the packaged shapes model, free to damage."""
    return Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "shapes"))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# ----------------------------------------------------------------------------------------------------------------
# 1, 2: safetensors headers


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    """100,000 nested arrays make Python's JSON parser raise RecursionError; the reader says what it is."""
    path = raw_safetensors(tmp_path / "nested.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CheckpointError, match=r"nested.safetensors: corrupt safetensors header \(JSON nested"):
        SafetensorsFile(path)


@pytest.mark.parametrize("metadata", [["a", "b"], "text", 3, {"format": 1}, {"k": None}])
def test_metadata_that_is_not_an_object_of_strings(tmp_path, metadata):
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path = raw_safetensors(tmp_path / "meta.safetensors", header.encode(), b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"meta.safetensors: .*'__metadata__' must be an object of strings"):
        SafetensorsFile(path)


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [1], "data_offsets": [True, 4]}, "F32"])
def test_header_entries_must_be_integers(tmp_path, entry):
    path = raw_safetensors(tmp_path / "e.safetensors", json.dumps({"w": entry}).encode(), b"\0" * 4)
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry for 'w'"):
        SafetensorsFile(path)


# ----------------------------------------------------------------------------------------------------------------
# 4, 5, 6: configs and tokenizer files of a diffusers folder

# (component folder, config file, key, bad value, what the message must say)
BAD_CONFIG_VALUES = [
    ("vae", "config.json", "scaling_factor", "0.18215", "scaling_factor must be a finite number"),
    ("vae", "config.json", "scaling_factor", -1.0, "scaling_factor must be > 0"),
    ("vae", "config.json", "block_out_channels", "16,32,64", "block_out_channels must be a list"),
    ("vae", "config.json", "block_out_channels", [16, "32", 64], "block_out_channels must be a list of ints"),
    ("vae", "config.json", "force_upcast", "yes", "force_upcast must be true or false"),
    ("vae", "config.json", "latent_channels", 4.0, "latent_channels must be an int"),
    ("unet", "config.json", "norm_eps", "1e-5", "norm_eps must be a finite number"),
    ("unet", "config.json", "norm_eps", 0, "norm_eps must be > 0"),
    ("unet", "config.json", "dropout", 1.5, "dropout in [0, 1)"),
    ("unet", "config.json", "layers_per_block", True, "layers_per_block must be an int"),
    ("unet", "config.json", "use_linear_projection", "false", "use_linear_projection must be true or false"),
    ("unet", "config.json", "cross_attention_dim", None, "cross_attention_dim must be an int"),
    ("unet", "config.json", "sample_size", "16", "sample_size must be an int or null"),
    ("text_encoder", "config.json", "layer_norm_eps", "eps", "layer_norm_eps must be a finite number"),
    ("text_encoder", "config.json", "hidden_act", 3, "hidden_act must be a string"),
    ("text_encoder", "config.json", "vocab_size", [49408], "vocab_size must be an int"),
]


@pytest.mark.parametrize("component,file,key,value,message", BAD_CONFIG_VALUES)
def test_config_value_of_the_wrong_type(model, component, file, key, value, message):
    """Checked when the config is read, naming the file and the key (not a TypeError after the denoising loop)."""
    edit_json(model / component / file, **{key: value})
    with pytest.raises(CheckpointError) as e:
        ldm.load_pipeline(model)
    assert str(model / component / file) in str(e.value) and message in str(e.value), str(e.value)


# absurd sizes: each would ask the allocator for gigabytes to terabytes if the model were built for real
ABSURD_SIZES = [
    ("unet", "layers_per_block", 10**9, "layers_per_block = 1000000000 means 1,000,000,000 layers"),
    ("unet", "block_out_channels", [2**30, 2**31, 2**32], "block_out_channels"),
    ("unet", "cross_attention_dim", 10**9, "shape"),
    ("vae", "block_out_channels", [16 * 10**8, 32, 64], "shape"),
    ("vae", "latent_channels", 10**10, "shape"),
    ("text_encoder", "num_hidden_layers", 10**9, "num_hidden_layers = 1000000000 means"),
    ("text_encoder", "vocab_size", 10**10, "shape"),
    ("text_encoder", "max_position_embeddings", 10**9, "shape"),
    ("text_encoder", "hidden_size", 2**40, "shape"),
]


@pytest.mark.parametrize("component,key,value,message", ABSURD_SIZES)
def test_absurd_config_sizes_are_refused_before_building(model, component, key, value, message):
    edit_json(model / component / "config.json", **{key: value})
    if component == "unet" and key == "block_out_channels":  # keep the heads dividing the widths
        edit_json(model / component / "config.json", attention_head_dim=[1, 2, 4])
    with pytest.raises(CheckpointError) as e:
        ldm.load_pipeline(model)
    assert message in str(e.value), str(e.value)


def test_models_are_built_without_allocating(model):
    """A model whose weights would take 3 TB is built on the meta device: nothing is allocated before the weights
    file has been checked against it."""
    preset = ldm.SD15
    huge = replace(preset, text=replace(preset.text, vocab_size=10**9, hidden_size=768))
    text = _empty_model("text_encoder", huge.text)
    assert text.text_model.embeddings.token_embedding.weight.shape == (10**9, 768)
    assert all(p.device.type == "meta" for p in text.parameters())


def test_train_timesteps_bounded(model):
    edit_json(model / "scheduler" / "scheduler_config.json", num_train_timesteps=10**10)
    with pytest.raises(CheckpointError, match=r"scheduler_config.json: num_train_timesteps must be an int in"):
        ldm.load_pipeline(model)


@pytest.mark.parametrize("name", ["Scheduler", "SigmaScheduler", "from_name", "__class__", "os", "SCHEDULERS", 42,
                                  None, ["DDIMScheduler"], "FlaxDDIMScheduler"])
def test_scheduler_class_name_only_among_ours(model, name):
    """_class_name picks one of ldm.schedulers' classes by name, never any other attribute of the module."""
    edit_json(model / "scheduler" / "scheduler_config.json", _class_name=name)
    with pytest.raises(CheckpointError, match=r"scheduler_config.json: scheduler class .* is not implemented"):
        ldm.load_pipeline(model)


def test_scheduler_value_of_the_wrong_type(model):
    edit_json(model / "scheduler" / "scheduler_config.json", beta_start="small")
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        ldm.load_pipeline(model)


@pytest.mark.parametrize("path,content", [
    ("unet/config.json", "[1, 2, 3]"),
    ("vae/config.json", '"a string"'),
    ("text_encoder/config.json", "{"),
    ("scheduler/scheduler_config.json", "[" * 50_000),
    ("unet/config.json", b"\xff\xfe{}"),
])
def test_malformed_config_files(model, path, content):
    target = model / path
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError) as e:
        ldm.load_pipeline(model)
    assert str(target) in str(e.value)


@pytest.mark.parametrize("name,content", [
    ("vocab.json", None),  # truncated: the first half of the file
    ("vocab.json", "[1, 2]"),
    ("merges.txt", "#version: 0.2\nthis-is-not a-merge-of-known-pieces\n"),
    ("tokenizer_config.json", "[]"),
    ("special_tokens_map.json", '{"pad_token": 7}'),
])
def test_damaged_tokenizer_files(model, name, content):
    target = model / "tokenizer" / name
    text = target.read_text()
    target.write_text(text[: len(text) // 2] if content is None else content)
    with pytest.raises(CheckpointError, match=r"tokenizer: cannot read the tokenizer"):
        ldm.load_pipeline(model)


# ----------------------------------------------------------------------------------------------------------------
# 3: non-finite weights and arguments


@pytest.mark.parametrize("component,file", [("vae", "diffusion_pytorch_model.safetensors"),
                                            ("unet", "diffusion_pytorch_model.safetensors")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error_not_a_black_image(model, component, file, bad):
    path = model / component / file
    state = load_file(path)
    key = "decoder.conv_out.bias" if component == "vae" else "conv_out.bias"
    state[key] = torch.full_like(state[key], bad)
    save_file(state, path, metadata={"format": "pt"})
    pipe = ldm.load_pipeline(model)
    what = "decoded images" if component == "vae" else "latents after denoising"
    with pytest.raises(ValueError, match=f"the {what} hold NaN or inf values"):
        pipe("a red circle", num_inference_steps=2, seed=0)


@pytest.mark.parametrize("kw,message", [
    (dict(guidance_scale=float("inf")), "guidance_scale must be a number >= 0 and finite"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a number >= 0 and finite"),
    (dict(eta=float("inf")), "eta must be a number >= 0 and finite"),
])
def test_non_finite_arguments(kw, message):
    pipe = ldm.load_pipeline(DEFAULT_MODEL_DIR)
    with pytest.raises(ValueError, match=message):
        pipe("a red circle", num_inference_steps=2, seed=0, **kw)


# ----------------------------------------------------------------------------------------------------------------
# 8, 9: images and prompts


@pytest.mark.parametrize("limit", [1000, 3000])  # 4096 pixels: above twice the limit (Pillow's error), above it
def test_decompression_bomb_is_a_value_error(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError, match=r"--init-image: '.*bomb.png' is too large to open safely"):
        image_to_tensor(path, "--init-image")


@pytest.mark.parametrize("prompt", ["a \udcff circle", "\ud800", ["ok", "bad \udc80"]])
def test_prompts_that_are_not_unicode_text(prompt):
    tokenizer = ldm.CLIPTokenizer.packaged()
    with pytest.raises(ValueError, match="is not valid Unicode text"):
        tokenizer(prompt)
    with pytest.raises(ValueError, match="is not valid Unicode text"):
        tokenizer.encode(prompt if isinstance(prompt, str) else prompt[1])


# ----------------------------------------------------------------------------------------------------------------
# 13, 14: what the PNGs look like on disk


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o000, 0o666)])
def test_png_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", parameters="p")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == mode


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()[8:]
    chunks = []
    while data:
        n, kind = struct.unpack(">I4s", data[:8])
        body = data[8:8 + n]
        assert struct.unpack(">I", data[8 + n:12 + n])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        data = data[12 + n:]
    return chunks


@pytest.mark.parametrize("text,chunk", [("a cat\nSteps: 2", b"tEXt"), ("a\x00cat\nSteps: 2", b"iTXt"),
                                        ("\u732b\nSteps: 2", b"iTXt"), ("caf\u00e9\nSteps: 2", b"tEXt")])
def test_parameters_chunk_is_valid_png(tmp_path, text, chunk):
    """tEXt (Latin-1 without NUL) where the format allows, iTXt otherwise; Pillow reads back the exact text."""
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "p.png", parameters=text)
    kinds = {kind: body for kind, body in png_chunks(path)}
    assert chunk in kinds and kinds[chunk].startswith(b"parameters\0")
    for kind, body in png_chunks(path):
        if kind == b"tEXt":
            assert body.count(b"\0") == 1, "a NUL inside a tEXt chunk's text"
    assert read_parameters(path) == text
