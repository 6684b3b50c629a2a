"""Bad inputs: each one a clear error that names the file and the fault, raised before any model is returned.

Tiny checkpoints (tests/synth.py on a tiny SD 1 preset), damaged on purpose: truncated and corrupt safetensors, a
missing key, an unexpected key, a wrong shape, other model families, an empty folder, a path that does not exist,
a pickle without the opt-in.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_SD1
from tests.synth import tiny_ldm_manifest, write_synthetic_checkpoint
from weights_convert.load import load_components, load_pipeline
from weights_convert.safetensors_file import CheckpointError, SafetensorsFile, save_file

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_checkpoint(tiny_ldm_manifest(TINY_SD1), tmp_path_factory.mktemp("good") / "m.safetensors")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {k: f.tensor(k).clone() for k in f.keys()}


def _expect(path: Path, match: str, error: type[Exception] = CheckpointError, **kw: object) -> None:
    with pytest.raises(error) as info:
        load_components(path, family=kw.pop("family", TINY_SD1), **kw)
    assert str(path) in str(info.value) or str(path.name) in str(info.value), info.value
    assert match in str(info.value), info.value


def test_truncated_file(good: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect(bad, "truncated file")


def test_corrupt_header(good: Path, tmp_path: Path) -> None:
    data = bytearray(good.read_bytes())
    data[8:16] = b"#garbage"
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(data))
    _expect(bad, "not JSON")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _expect(tmp_path / "huge.safetensors", "corrupt safetensors header")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    _expect(tmp_path / "tiny.safetensors", "not a safetensors file")


def test_inconsistent_offsets(good: Path, tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    bad = tmp_path / "overlap.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    _expect(bad, "overlap")
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    _expect(bad, "has 12 bytes for shape [4]")


def test_missing_key(good: Path, tmp_path: Path) -> None:
    t = _tensors(good)
    del t["first_stage_model.decoder.conv_out.bias"]
    _expect(save_file(t, tmp_path / "missing.safetensors"), "missing key(s) for a sd15 checkpoint: "
                                                            "'first_stage_model.decoder.conv_out.bias'")


def test_unexpected_key(good: Path, tmp_path: Path) -> None:
    t = _tensors(good)
    t["model.diffusion_model.extra_lora.weight"] = torch.zeros(2, 2)
    _expect(save_file(t, tmp_path / "extra.safetensors"), "unexpected key(s) for a sd15 checkpoint: "
                                                          "'model.diffusion_model.extra_lora.weight'")


def test_wrong_shape(good: Path, tmp_path: Path) -> None:
    t = _tensors(good)
    key = "model.diffusion_model.out.2.weight"
    t[key] = torch.zeros(4, 16, 3, 3)  # 32 input channels expected
    _expect(save_file(t, tmp_path / "shape.safetensors"),
            f"shape mismatch for {key!r} -> unet 'conv_out.weight': the file has [4, 16, 3, 3] (giving "
            f"[4, 16, 3, 3]), the model expects [4, 32, 3, 3]")
    t = _tensors(good)
    t["first_stage_model.encoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)  # not a 1x1 conv
    _expect(save_file(t, tmp_path / "conv.safetensors"), "cannot take")


def test_integer_weights(good: Path, tmp_path: Path) -> None:
    t = _tensors(good)
    t["model.diffusion_model.out.2.bias"] = torch.zeros(4, dtype=torch.int32)
    _expect(save_file(t, tmp_path / "int.safetensors"), "weights must be floating point")


def test_other_model_families(good: Path, tmp_path: Path) -> None:
    _expect(good, "this checkpoint is sd15 (from its keys and shapes), not the requested family 'sd21-v'",
            family="sd21-v")
    _expect(good, "not the requested family 'sd15-inpaint'", family="sd15-inpaint")
    sdxl_like = {"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8),
                 "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                 "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 8)}
    _expect(save_file(sdxl_like, tmp_path / "xl.safetensors"), "no text encoder under")
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    _expect(save_file(lora, tmp_path / "lora.safetensors"), "not a Stable Diffusion 1.x/2.x single-file checkpoint")
    t = _tensors(good)
    t[CONV_IN] = torch.zeros(32, 8, 3, 3)
    _expect(save_file(t, tmp_path / "8ch.safetensors"), "take 4 channels (9 for inpainting, 7 for the x4 upscaler)")
    with pytest.raises(ValueError, match="family must be one of sd15, sd21-base"):
        load_components(good, family="sdxl")


def test_folders(tmp_path: Path, good: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(empty, "an empty folder")
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    _expect(partial, "no vae/ subfolder")


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_pipeline(tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pipeline("nowhere.safetensors")


def test_pickle_needs_opt_in(good: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": _tensors(good)}, ckpt)
    _expect(ckpt, "pickle checkpoint; unpickling can run arbitrary code, so it is refused")
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle at all")
    _expect(tmp_path / "junk.ckpt", "cannot read the pickle checkpoint", allow_pickle=True)
    (tmp_path / "weights.xyz").write_bytes(b"\x00" * 16)
    _expect(tmp_path / "weights.xyz", "unknown weights format")


def test_separate_vae_must_match(good: Path, tmp_path: Path) -> None:
    t = {k.removeprefix("first_stage_model."): v for k, v in _tensors(good).items() if k.startswith("first_stage")}
    del t["decoder.conv_in.bias"]
    vae = save_file(t, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="vae.safetensors: missing key.*decoder.conv_in.bias"):
        load_components(good, family=TINY_SD1, vae=vae)


def test_dtype_and_arguments(good: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be"):
        load_components(good, family=TINY_SD1, dtype=torch.int8)
    with pytest.raises(TypeError, match="ema must be a bool"):
        load_components(good, family=TINY_SD1, ema="yes")
    with pytest.raises(TypeError, match="path_or_id must be"):
        load_components(42)


def test_damaged_diffusers_folder(good: Path, tmp_path: Path) -> None:
    from weights_convert.export import export_diffusers

    folder = export_diffusers(load_components(good, family=TINY_SD1), tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    t = _tensors(weights)
    t["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    save_file(t, weights)
    match = r"diffusion_pytorch_model.safetensors: shape mismatch for 'conv_in.weight' -> unet 'conv_in.weight'"
    with pytest.raises(CheckpointError, match=match + r": the file has \[32, 5, 3, 3\]"):
        load_components(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="unet: no weights file diffusion_pytorch_model.safetensors"):
        load_components(folder)
