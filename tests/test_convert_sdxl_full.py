"""The full SDXL 1.0 base file: a synthetic `sd_xl_base_1.0.safetensors` with every official key, shape and dtype
(fp16, 6.9 GB, in a temporary folder), loaded by our converter and by diffusers' own single-file conversion (the
oracle), part by part. Slow; run under `flock /tmp/ldm-heavy.lock`.

Checked: every tensor of the UNet (2,567,463,684 parameters), the VAE, CLIP-L and bigG (with its transposed
projection) bit-identical to diffusers' fp16 conversion, key sets equal; the file loads to fp16 as views of the
mapped file and to bf16 in one cast, without an fp32 copy. Memory: our fp16 parts are the file's pages; diffusers'
parts are built and freed one at a time. (The refiner's layout is checked at full shape against diffusers' converter
in tests/test_convert_tables.py, in seconds; its tiny file in tests/test_convert_sdxl.py.)
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from tests.helpers import DIFFUSERS_CONFIGS, official_state
from tests.synth import write_synthetic_checkpoint
from weights_convert.load import load_components

pytestmark = pytest.mark.slow

COUNTS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def _diffusers_part(part: str, ckpt: Path, state: dict | None) -> torch.nn.Module:
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    kw = {"config": str(DIFFUSERS_CONFIGS / "sdxl-base"), "local_files_only": True, "torch_dtype": torch.float16}
    if part == "unet":
        return diffusers.UNet2DConditionModel.from_single_file(str(ckpt), subfolder="unet", **kw)
    if part == "vae":
        return diffusers.AutoencoderKL.from_single_file(str(ckpt), subfolder="vae", **kw)
    cls = transformers.CLIPTextModel if part == "text_encoder" else transformers.CLIPTextModelWithProjection
    return create_diffusers_clip_model_from_ldm(cls, state, subfolder=part, **kw)


def test_full_sdxl_base_file_matches_diffusers(tmp_path: Path) -> None:
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    ckpt = write_synthetic_checkpoint("sdxl_base", tmp_path / "sd_xl_base_1.0.safetensors", seed=11)
    try:
        ours = load_components(ckpt, dtype=None)  # fp16, the file's own dtype: views of the mapped file
        assert ours.family.name == "sdxl-base" and ours.text_encoder_2 is not None
        state = load_single_file_checkpoint(str(ckpt), local_files_only=True)  # memory-mapped by safetensors
        for part, count in COUNTS.items():
            module = getattr(ours, part)
            assert sum(p.numel() for p in module.parameters()) == count, part
            ref = _diffusers_part(part, ckpt, state)
            mine, theirs = module.state_dict(), official_state(ref.state_dict(), part)
            assert mine.keys() == theirs.keys(), f"{part}: {sorted(mine.keys() ^ theirs.keys())[:5]}"
            for key, value in theirs.items():
                assert mine[key].dtype == value.dtype == torch.float16, f"{part} {key}"
                assert torch.equal(mine[key], value), f"{part} {key}: values differ"
            del ref, mine, theirs
            gc.collect()
        del state, ours
        gc.collect()
        bf16 = load_components(ckpt, dtype=torch.bfloat16, vae=None)
        w = bf16.unet.add_embedding.linear_1.weight
        from weights_convert.safetensors_file import SafetensorsFile

        raw = SafetensorsFile(ckpt).tensor("model.diffusion_model.label_emb.0.0.weight")
        assert w.dtype == torch.bfloat16 and torch.equal(w, raw.to(torch.bfloat16))  # one rounding, no fp32 detour
        assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
        del bf16
    finally:
        gc.collect()
        ckpt.unlink()
