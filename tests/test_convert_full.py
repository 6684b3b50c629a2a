"""The full Stable Diffusion files: a synthetic checkpoint with every official key, shape and dtype, loaded by our
converter and by diffusers' own `from_single_file` (the oracle), for all five families. Slow (a 4.3-5.2 GB file
written per family to a temporary folder, then deleted); run under `flock /tmp/ldm-heavy.lock`.

Checked per family, in one module-scoped fixture so each file is written once:
- the converted state dicts are bit-identical to diffusers' (every key, shape, dtype and value: a renaming and
  views cannot change a number);
- UNet, VAE (encode and decode) and text-encoder outputs on small inputs (latent 8x8, image 32x32, 8 tokens)
  agree within 1e-5 relative in fp32 (DESIGN.md's component contract; measured ~1e-7 here);
- an fp16 file (SD 1.5) loads as fp16 bit-identical to diffusers' fp16 load, and as fp32 equal to the upcast.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from tests.helpers import DIFFUSERS_CONFIGS, rel_err
from tests.synth import write_synthetic_checkpoint
from weights_convert.load import load_components

pytestmark = pytest.mark.slow

FAMILIES = {  # family -> (manifest, diffusers config folder)
    "sd15": ("sd15", "sd15"), "sd21-base": ("sd21base", "sd21base"), "sd21-v": ("sd21v", "sd21"),
    "sd15-inpaint": ("sd15_inpaint", "sd15-inpaint"), "sd2-inpaint": ("sd2_inpaint", "sd2-inpaint"),
}
TOL = 1e-5


def diffusers_components(ckpt: Path, config: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """diffusers' own single-file loading of the three components, offline (fixtures/README.md's recipe)."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint

    kw = {"config": str(config), "local_files_only": True, "torch_dtype": dtype}
    out = {"unet": diffusers.UNet2DConditionModel.from_single_file(str(ckpt), subfolder="unet", **kw),
           "vae": diffusers.AutoencoderKL.from_single_file(str(ckpt), subfolder="vae", **kw)}
    state = load_single_file_checkpoint(str(ckpt), local_files_only=True)
    out["text_encoder"] = create_diffusers_clip_model_from_ldm(transformers.CLIPTextModel, state,
                                                               subfolder="text_encoder", config=str(config),
                                                               local_files_only=True, torch_dtype=dtype)
    del state
    return {k: m.eval() for k, m in out.items()}


def assert_same_state(ours: torch.nn.Module, ref: torch.nn.Module, component: str) -> None:
    mine = ours.state_dict()
    theirs = ref.state_dict()
    if component == "text_encoder":  # transformers 5.x's CLIPTextModel has no `text_model.` level
        theirs = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in theirs.items()}
        theirs.pop("text_model.embeddings.position_ids", None)
    assert mine.keys() == theirs.keys(), f"{component}: key sets differ: {sorted(mine.keys() ^ theirs.keys())[:5]}"
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, f"{component} {key}"
        assert torch.equal(mine[key], value), f"{component} {key}: values differ"


@torch.no_grad()
def assert_same_outputs(ours, ref: dict[str, torch.nn.Module], family: str) -> None:
    g = torch.Generator().manual_seed(0)
    unet_cfg = ours.unet.config
    x = torch.randn(1, unet_cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 8, unet_cfg.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.tensor([[49406, 320, 1929, 3309, 3801, 49407, 49407, 49407]])
    mine, theirs = ours.text_encoder(ids), ref["text_encoder"](ids, output_hidden_states=True)
    errors = {
        "unet": rel_err(ours.unet(x, t, ctx), ref["unet"](x, t, ctx).sample),
        "vae encode": rel_err(ours.vae.encode(img).mean, ref["vae"].encode(img).latent_dist.mean),
        "vae decode": rel_err(ours.vae.decode(z), ref["vae"].decode(z).sample),
        "text last": rel_err(mine.last_hidden_state, theirs.last_hidden_state),
        "text penultimate": rel_err(mine.hidden_states[-2], theirs.hidden_states[-2]),
    }
    print(f"{family}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))  # shown with pytest -s
    for what, err in errors.items():
        assert err <= TOL, f"{family} {what}: relative error {err:.3e} > {TOL:.0e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_checkpoint_matches_diffusers(family: str, tmp_path: Path) -> None:
    manifest, config = FAMILIES[family]
    ckpt = write_synthetic_checkpoint(manifest, tmp_path / f"{manifest}.safetensors", seed=7)
    try:
        ours = load_components(ckpt, family=family)
        assert ours.family.name == family
        ref = diffusers_components(ckpt, DIFFUSERS_CONFIGS / config)
        for component in ("unet", "vae", "text_encoder"):
            assert_same_state(getattr(ours, component), ref[component], component)
        assert_same_outputs(ours, ref, family)
        del ours, ref
    finally:
        gc.collect()
        ckpt.unlink()


def test_fp16_file(tmp_path: Path) -> None:
    ckpt = write_synthetic_checkpoint("sd15", tmp_path / "sd15_fp16.safetensors", dtype=torch.float16, seed=3)
    try:
        half = load_components(ckpt, family="sd15", dtype=None)
        ref = diffusers_components(ckpt, DIFFUSERS_CONFIGS / "sd15", dtype=torch.float16)
        for component in ("unet", "vae", "text_encoder"):
            assert_same_state(getattr(half, component), ref[component], component)
        del ref
        gc.collect()
        full = load_components(ckpt, family="sd15", dtype=torch.float32)
        for component in ("unet", "vae", "text_encoder"):
            a, b = getattr(full, component).state_dict(), getattr(half, component).state_dict()
            assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k].float()) for k in a), component
        del half, full
    finally:
        gc.collect()
        ckpt.unlink()
