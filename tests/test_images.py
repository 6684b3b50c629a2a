"""ldm/images.py: the pipeline's output conversion, the A1111 `parameters` text, atomic PNG writing, model hashes.

Reading images and masks (image_to_tensor, mask_to_tensor) is exercised with the pipeline in tests/test_pipeline.py
(test_image_inputs_are_equivalent, test_bad_image_arguments), where their layouts meet the VAE.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.images import (SAMPLER_NAMES, a1111_parameters, model_hash, parse_parameters, read_parameters, save_png,
                        to_numpy, to_pil)


def test_to_numpy_and_to_pil_follow_diffusers_postprocess() -> None:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) in [0, 1], clamped; PIL rounds x * 255 as numpy_to_pil does."""
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 3, 1, 2)
    arr = to_numpy(x)
    assert arr.shape == (1, 1, 2, 3) and arr.dtype == np.float32
    assert np.array_equal(arr[0, 0, :, 0], [0.0, 0.0])  # channel 0: -2 and -1 clamp/map to 0
    assert np.array_equal(arr[0, 0, :, 2], [1.0, 1.0])  # channel 2: 1 and 3 map/clamp to 1
    pil = to_pil(np.array([[[[0.5, 0.0, 1.0]]]], dtype=np.float32))
    assert len(pil) == 1 and pil[0].size == (1, 1) and pil[0].getpixel((0, 0)) == (128, 0, 255)


def test_parameters_round_trip_with_quoting() -> None:
    text = a1111_parameters("a cat, on a mat", negative_prompt="blurry", steps=20, sampler="euler-a",
                            guidance_scale=7.5, seed=42, width=512, height=768, model_name="m", model_hash="0123456789",
                            extra={"Note": 'say "hi": ok'})
    lines = text.split("\n")
    assert lines[0] == "a cat, on a mat" and lines[1] == "Negative prompt: blurry"
    assert "Sampler: Euler a" in lines[2] and "Size: 512x768" in lines[2]
    parsed = parse_parameters(text)
    assert parsed == {"Prompt": "a cat, on a mat", "Negative prompt": "blurry", "Steps": "20", "Sampler": "Euler a",
                      "CFG scale": "7.5", "Seed": "42", "Size": "512x768", "Model hash": "0123456789", "Model": "m",
                      "Note": 'say "hi": ok'}
    assert SAMPLER_NAMES["pndm"] == "PLMS"  # PNDM with skip_prk_steps is A1111's PLMS


def test_save_png_writes_parameters_atomically_and_never_clobbers(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 3), (10, 20, 30))
    out = save_png(image, tmp_path / "a.png", parameters="a dog\nSteps: 2")
    assert read_parameters(out) == "a dog\nSteps: 2"
    assert Image.open(out).getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 3)), out)
    assert Image.open(out).getpixel((0, 0)) == (10, 20, 30)  # the first file is untouched
    save_png(Image.new("RGB", (4, 3), (1, 2, 3)), out, overwrite=True)
    assert Image.open(out).getpixel((0, 0)) == (1, 2, 3) and read_parameters(out) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"], "no temporary file may be left behind"


def test_model_hash_is_a1111s_sha256_prefix(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not really weights")
    assert model_hash(f) == hashlib.sha256(b"not really weights").hexdigest()[:10]
    assert model_hash(tmp_path) is None and model_hash(tmp_path / "org" / "name") is None
