"""The ControlNet converter (weights_convert/controlnet.py) against diffusers' own loader on the same files.

Oracle: diffusers 0.42.1's `convert_controlnet_checkpoint` (tiny, original layout) and `ControlNetModel.
from_single_file` (full SD 1.5 shapes from the manifest, slow tier). Our table is inverted only to write a tiny file
in the original layout; diffusers' converter then reads that file independently, so a wrong rule in our table
shows as a mismatch. Tolerance: none, the tensors must be identical (a conversion only renames).
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings

import pytest
import torch
from diffusers import ControlNetModel as RefControlNet
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

from ldm.config import UNetConfig
from ldm.controlnet import CONTROLNET_SD15, ControlNetConfig
from tests.helpers import DIFFUSERS_CONFIGS, FIXTURES, load_json, trained_like_
from weights_convert.controlnet import PREFIX, controlnet_rules, load_controlnet
from weights_convert.safetensors_file import CheckpointError

TINY_UNET = UNetConfig(block_out_channels=(32, 64), cross_attention_levels=(True, False), num_heads=(2, 4),
                       layers_per_block=1, cross_attention_dim=32, norm_num_groups=32, sample_size=None)
# 4 hint widths as the official files: diffusers' converter numbers the hint convs for exactly that many
TINY = ControlNetConfig(unet=TINY_UNET, hint_channels=(8, 16, 16, 32))


def _ref_kwargs(cfg: ControlNetConfig) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny_original() -> tuple[dict, dict]:
    """(original-layout state dict with the control_model. prefix, diffusers' conversion of it)."""
    ref = trained_like_(RefControlNet(**_ref_kwargs(TINY)), seed=5)
    ours_sd = ref.state_dict()
    original = {}
    for rule in controlnet_rules(TINY):
        original[rule.source] = ours_sd[rule.targets[0]].clone()
    assert len(original) == len(ours_sd)  # the table covers every key once
    converted = convert_controlnet_checkpoint(dict(original), {"layers_per_block": 1})
    return original, converted


def _same(model, expected: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_v11_pth_and_safetensors_match_diffusers(tiny_original, tmp_path) -> None:
    original, converted = tiny_original
    pth = tmp_path / "control_tiny.pth"
    torch.save(original, pth)
    st = tmp_path / "control_tiny_fp16.safetensors"
    save_file({k: v.half() for k, v in original.items()}, st)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_controlnet(pth, config=TINY)
    _same(load_controlnet(pth, config=TINY, allow_pickle=True), converted)
    # the fp16 repack: the same tensors rounded to fp16, loaded as fp16 (dtype=None keeps the file's)
    model = load_controlnet(st, config=TINY, dtype=None)
    assert next(model.parameters()).dtype == torch.float16
    _same(model, {k: v.half() for k, v in converted.items()})
    # with the base UNet's config instead of config=: the same model (hint widths read from the file)
    _same(load_controlnet(pth, base=TINY_UNET, allow_pickle=True), converted)


def test_v10_whole_checkpoint_takes_the_controlnet_and_says_what_was_ignored(tiny_original, tmp_path) -> None:
    original, converted = tiny_original
    whole = {**original, "model.diffusion_model.conv_in.weight": torch.zeros(2), "first_stage_model.x": torch.zeros(1),
             "logvar": torch.zeros(1000)}
    path = tmp_path / "control_sd15_tiny.safetensors"
    save_file(whole, path)
    with pytest.warns(UserWarning, match=r"ignoring 3: first_stage_model\.\* \(1\), logvar\.\* \(1\), model\.\* \(1\)"):
        model = load_controlnet(path, config=TINY)
    _same(model, converted)


def test_unprefixed_and_diffusers_folder(tiny_original, tmp_path) -> None:
    original, converted = tiny_original
    path = tmp_path / "community.safetensors"
    save_file({k.removeprefix(PREFIX): v for k, v in original.items()}, path)
    _same(load_controlnet(path, config=TINY), converted)
    ref = RefControlNet(**_ref_kwargs(TINY))
    ref.load_state_dict(converted)
    ref.save_pretrained(tmp_path / "folder")
    _same(load_controlnet(tmp_path / "folder"), converted)  # its config.json is read


def test_bad_files(tiny_original, tmp_path) -> None:
    original, _ = tiny_original
    no_zero = {k: v for k, v in original.items() if "zero_convs.1." not in k}
    save_file(no_zero, tmp_path / "nozero.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*zero_convs\.1\.0\."):
        load_controlnet(tmp_path / "nozero.safetensors", config=TINY)
    # a ControlNet whose cross-attention is wider than the base UNet's (an SD 2 ControlNet on SD 1)
    save_file(original, tmp_path / "cn.safetensors")
    sd2_base = dataclasses.replace(TINY_UNET, cross_attention_dim=64)
    with pytest.raises(CheckpointError, match="cannot control"):
        load_controlnet(tmp_path / "cn.safetensors", base=sd2_base)
    # a pickle that needs code to load: refused by weights-only loading
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": warnings.WarningMessage("m", UserWarning, "f", 1)}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_controlnet(tmp_path / "evil.pth", allow_pickle=True)
    save_file({"a.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors")


def test_manifest_table_covers_the_official_file() -> None:
    """Our SD 1.5 table maps exactly the 340 keys of the official 1.1 files, with the manifest's shapes."""
    manifest = load_json(FIXTURES / "controlnet11_sd15_keys.json")["keys"]
    rules = controlnet_rules(CONTROLNET_SD15)
    assert {r.source for r in rules} == set(manifest) and len(manifest) == 340


@pytest.mark.slow
def test_full_shape_against_diffusers_from_single_file(tmp_path) -> None:
    """Full SD 1.5 ControlNet 1.1 shapes, a synthetic fp16 repack from the manifest; diffusers' from_single_file
    on the same file is the oracle. Run under the heavy lock (about 3 GB)."""
    from tests.synth import write_synthetic_checkpoint

    manifest = load_json(FIXTURES / "controlnet11_sd15_keys.json")
    path = write_synthetic_checkpoint({"keys": manifest["keys"]}, tmp_path / "control_v11p_sd15_canny_fp16.safetensors",
                                      dtype=torch.float16)
    ours = load_controlnet(path, dtype=None)
    ref = RefControlNet.from_single_file(str(path), config=str(DIFFUSERS_CONFIGS / "controlnet-sd15"),
                                         local_files_only=True, torch_dtype=torch.float16)
    ref_sd = ref.state_dict()
    got = ours.state_dict()
    assert set(got) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(got[k], v), k
    assert sum(p.numel() for p in ours.parameters()) == 361_279_120
    # the full-shape forward in fp32 on a small latent: the component contract, 1e-5 relative
    ours, ref = ours.float(), ref.float()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        down, mid = ours(x, 500, ctx, hint, conditioning_scale=0.8)
        ref_down, ref_mid = ref(x, 500, ctx, hint, conditioning_scale=0.8, return_dict=False)
    assert len(down) == len(ref_down) == 12
    for a, b in zip([*down, mid], [*ref_down, ref_mid]):
        assert (a - b).norm() / b.norm() <= 1e-5
