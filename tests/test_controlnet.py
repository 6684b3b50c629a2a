"""ControlNetModel and the UNet's residual inputs: parity with diffusers 0.42.1, keys, parameter counts, config.

Parity method as in test_unet.py: diffusers' ControlNetModel with trained-like random weights (so the zero
convolutions are not zero and every path counts), its state dict loaded strictly into ours, same inputs.
Tolerance: the component contract, 1e-5 relative in fp32 (the same ops in the same order give ~1e-7; a wrong skip
order, scale or hint stride gives errors of order 1e-1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ControlNetModel as RefControlNet
from diffusers import UNet2DConditionModel as RefUNet

from ldm.config import UNetConfig
from ldm.controlnet import CONTROLNET_SD15, CONTROLNET_SD21, ControlNetConfig, ControlNetModel
from ldm.unet import UNet2DConditionModel
from tests.helpers import DIFFUSERS_CONFIGS, FIXTURES, assert_rel, load_json, trained_like_

TOL = 1e-5

TINY_UNET = UNetConfig(block_out_channels=(32, 64, 64), cross_attention_levels=(True, True, False),
                       num_heads=(2, 2, 2), cross_attention_dim=48, norm_num_groups=8, sample_size=None)
TINY = ControlNetConfig(unet=TINY_UNET, hint_channels=(8, 16, 16, 32))  # hint encoder: 8x down, as the official


def make_pair(cfg: ControlNetConfig, seed: int = 0) -> tuple[ControlNetModel, RefControlNet]:
    ref = trained_like_(RefControlNet(**_ref_kwargs(cfg)), seed=seed).eval()
    ours = ControlNetModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _ref_kwargs(cfg: ControlNetConfig) -> dict:
    """Our config as diffusers' ControlNetModel constructor arguments (through our own to_diffusers)."""
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_") and k != "sample_size"}


def _inputs(cfg: ControlNetConfig, batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.unet.in_channels, h, w, generator=g)
    ctx = torch.randn(batch, 77, cfg.unet.cross_attention_dim, generator=g)
    f = cfg.hint_factor
    hint = torch.rand(batch, cfg.conditioning_channels, h * f, w * f, generator=g)
    return x, ctx, hint


CASES = {
    # name: (config, batch, (H, W), timestep, scale, guess_mode)
    "sd1-conv-proj": (TINY, 2, (8, 8), 981, 1.0, False),
    "scale-and-float-t": (TINY, 1, (8, 16), torch.tensor(500.25), 0.7, False),
    "guess-mode": (TINY, 2, (16, 8), torch.tensor([10, 700]), 0.8, True),
    "sd2-linear-bgr": (dataclasses.replace(TINY, unet=dataclasses.replace(TINY_UNET, use_linear_projection=True),
                                           channel_order="bgr"), 1, (8, 8), 1, 1.0, False),
    "global-pool-shuffle": (dataclasses.replace(TINY, global_pool_conditions=True), 1, (8, 8), 250, 0.5, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_parity(case: str) -> None:
    cfg, batch, (h, w), t, scale, guess = CASES[case]
    ours, ref = make_pair(cfg)
    x, ctx, hint = _inputs(cfg, batch, h, w)
    with torch.no_grad():
        down, mid = ours(x, t, ctx, hint, conditioning_scale=scale, guess_mode=guess)
        ref_down, ref_mid = ref(x, t, ctx, hint, conditioning_scale=scale, guess_mode=guess, return_dict=False)
    assert len(down) == len(ref_down) == 1 + 3 * 2 + 2  # conv_in + levels x layers_per_block + 2 downsamplers
    for i, (a, b) in enumerate(zip(down, ref_down)):
        assert_rel(a, b, TOL, f"down residual {i}")
    assert_rel(mid, ref_mid, TOL, "mid residual")


def test_unet_takes_residuals_as_diffusers() -> None:
    """The UNet adds the ControlNet's residuals to its skips and middle output exactly as diffusers does."""
    ref_unet = trained_like_(RefUNet(**{k: v for k, v in TINY_UNET.to_diffusers().items()
                                        if not k.startswith("_")}), seed=3).eval()
    unet = UNet2DConditionModel(TINY_UNET).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    cn, _ = make_pair(TINY)
    x, ctx, hint = _inputs(TINY, 2, 8, 8)
    with torch.no_grad():
        down, mid = cn(x, 500, ctx, hint)
        ours = unet(x, 500, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        ref = ref_unet(x, 500, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = unet(x, 500, ctx)
    assert_rel(ours, ref, TOL, "UNet with residuals")
    assert (ours - plain).abs().max() > 1e-3  # the residuals did change the output
    with pytest.raises(ValueError, match="come together"):
        unet(x, 500, ctx, down_block_additional_residuals=down)
    with pytest.raises(ValueError, match="skip connections"):
        unet(x, 500, ctx, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


def test_zero_convs_at_init_add_nothing() -> None:
    """A freshly built ControlNet's residuals are exactly zero (zero convolutions), so the UNet is unchanged."""
    torch.manual_seed(0)
    cn = ControlNetModel(TINY).eval()
    x, ctx, hint = _inputs(TINY, 1, 8, 8)
    with torch.no_grad():
        down, mid = cn(x, 10, ctx, hint)
    assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
    assert torch.count_nonzero(cn.controlnet_cond_embedding.conv_out.weight) == 0


def test_config_from_diffusers_fixture_and_preset() -> None:
    d = load_json(DIFFUSERS_CONFIGS / "controlnet-sd15" / "config.json")
    cfg = ControlNetConfig.from_diffusers(d)
    assert cfg == CONTROLNET_SD15
    assert ControlNetConfig.from_diffusers(cfg.to_diffusers()) == cfg  # round trip
    with pytest.raises(ValueError, match="bogus"):
        ControlNetConfig.from_diffusers({**d, "bogus": 1})
    with pytest.raises(ValueError, match="channel_order"):
        ControlNetConfig(channel_order="rbg")


def test_parameter_count_and_keys_full_shape() -> None:
    """SD 1.5 ControlNet on the meta device: the manifest's 361,279,120 parameters and diffusers' exact keys/shapes."""
    manifest = load_json(FIXTURES / "controlnet11_sd15_keys.json")
    with torch.device("meta"):
        ours = ControlNetModel(CONTROLNET_SD15)
        ref = RefControlNet(**_ref_kwargs(CONTROLNET_SD15))
    assert sum(p.numel() for p in ours.parameters()) == manifest["param_counts"]["control_model."] == 361_279_120
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        sd21 = ControlNetModel(CONTROLNET_SD21)
    assert sum(p.numel() for p in sd21.parameters()) == 364_228_240  # the manifest's notes: community SD 2.1 files


def test_bad_inputs() -> None:
    cn = ControlNetModel(TINY)
    x, ctx, hint = _inputs(TINY, 1, 8, 8)
    with pytest.raises(ValueError, match="controlnet_cond must have shape"):
        cn(x, 1, ctx, hint[:, :, :32])
    with pytest.raises(TypeError, match="ControlNetConfig"):
        ControlNetModel(TINY_UNET)
