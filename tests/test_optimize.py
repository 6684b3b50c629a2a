"""The speed levers of ldm/optimize.py: each keeps the numbers (within the rounding it is allowed) and the state dict,
stays correct when the model changes under it, and the GPU benchmark script runs.

CPU tests use tiny models in fp32 and bf16. Tolerances: a lever that only reorders the same arithmetic (fused
projections, channels_last) is held to 1e-5 relative in fp32, the component parity contract, and 1e-2 in bf16
(8 mantissa bits: a different summation order moves results by a few bf16 ulps, ~4e-3 each). The compiled UNet
(inductor's own kernels, fused reductions) is held to 1e-4 in fp32. GPU tests (`cuda` marker) compare the optimized
pipeline in fp16 and bf16 with diffusers fp16 on the same weights: components within 1e-2 relative, images PSNR
>= 35 dB (issue 8's contract).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm
from ldm import optimize as opt
from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
from ldm.unet import Attention, UNet2DConditionModel
from tests.helpers import TOKENIZER_DIR, diffusers_config, rel_err, save_tiny_model_folder, trained_like_

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
# Tiny UNet: two levels (cross-attention on the first), SD 1-style conv projections.
UNET = UNetConfig(block_out_channels=(32, 64), cross_attention_levels=(True, False), num_heads=(2, 2),
                  layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, sample_size=8)
UNET_SD2 = dataclasses.replace(UNET, use_linear_projection=True, upcast_attention=True)
VAE = VAEConfig.from_diffusers(dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                    norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE))
CLIP = CLIPTextConfig.from_transformers(dict(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=77, hidden_act="quick_gelu",
                                             projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1))
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def tiny_unet(cfg: UNetConfig = UNET, seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    return trained_like_(UNet2DConditionModel(cfg), seed=seed).eval().to(dtype)


def unet_inputs(dtype: torch.dtype = torch.float32, cfg: UNetConfig = UNET) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(dtype)
    return x, torch.tensor(421), context


def tiny_pipeline(dtype: torch.dtype = torch.float32) -> ldm.StableDiffusionPipeline:
    family = dataclasses.replace(ldm.SD15, unet=UNET, vae=VAE, text=CLIP, native_size=SIZE)
    pipe = ldm.StableDiffusionPipeline(
        unet=tiny_unet(seed=1), vae=trained_like_(ldm.AutoencoderKL(VAE), seed=2).eval(),
        text_encoder=trained_like_(ldm.CLIPTextModel(CLIP), seed=3).eval(),
        tokenizer=ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15"),
        scheduler=ldm.schedulers.from_name("ddim", diffusers_config("sd15", "scheduler")), family=family)
    return pipe.to(dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Fused projections


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [UNET, UNET_SD2], ids=["sd1", "sd2-upcast"])
def test_fused_projections_keep_outputs_and_state_dict(dtype, cfg):
    unet = tiny_unet(cfg, dtype=dtype)
    inputs = unet_inputs(dtype, cfg)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        ref = unet(*inputs)
        assert opt.fuse_projections(unet) == 4 * 2  # transformers: 1 down, 1 mid, 2 up; x (attn1, attn2)
        out = unet(*inputs)
    assert rel_err(out, ref) <= TOL[dtype]
    after = unet.state_dict()
    assert list(after) == list(before), "fusing must not add, drop or reorder state-dict keys"
    assert all(after[k].shape == before[k].shape and torch.equal(after[k], before[k]) for k in before)
    unet.load_state_dict(before, strict=True)  # a diffusers-shaped dict still loads strictly into a fused model


def test_fused_weight_is_what_runs():
    """Corrupting the fused buffer (and only it) changes the output: the fused matmul is the one used."""
    unet = tiny_unet()
    inputs = unet_inputs()
    opt.fuse_projections(unet)
    with torch.no_grad():
        ref = unet(*inputs)
        for layer in unet.modules():
            if isinstance(layer, Attention):
                layer.fused_weight.mul_(0.5)
        assert rel_err(unet(*inputs), ref) > 1e-3
        opt.unfuse_projections(unet)
        assert all(getattr(m, "fused_weight", None) is None for m in unet.modules() if isinstance(m, Attention))
        assert rel_err(unet(*inputs), ref) <= TOL[torch.float32]


def test_fused_weight_follows_load_to_and_in_place_writes():
    unet, other = tiny_unet(seed=0), tiny_unet(seed=5)
    inputs = unet_inputs()
    opt.fuse_projections(unet)
    with torch.no_grad():
        # load_state_dict on the whole model: the post-hook rebuilds each fused weight
        unet.load_state_dict(other.state_dict(), strict=True)
        assert rel_err(unet(*inputs), other(*inputs)) <= TOL[torch.float32]
        # an in-place write to one projection (as an optimizer step does): eager forward sees the new version
        layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        ref_layer = other.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        layer.to_k.weight.mul_(1.5)
        ref_layer.to_k.weight.mul_(1.5)
        assert rel_err(unet(*inputs), other(*inputs)) <= TOL[torch.float32]
        # .to(dtype): the buffer is converted with the parameters
        unet.to(torch.bfloat16)
        other.to(torch.bfloat16)
        assert layer.fused_weight.dtype == torch.bfloat16
        bf16 = unet_inputs(torch.bfloat16)
        assert rel_err(unet(*bf16), other(*bf16)) <= TOL[torch.bfloat16]


def test_fused_model_still_trains_its_own_parameters():
    """With autograd on, forward uses to_q / to_k / to_v, so their gradients are there."""
    unet = tiny_unet()
    opt.fuse_projections(unet)
    unet(*unet_inputs()).square().mean().backward()
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert layer.to_q.weight.grad is not None and layer.to_q.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# channels_last, GroupNorm precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_keeps_outputs_and_runs_nhwc(dtype):
    unet = tiny_unet(dtype=dtype)
    inputs = unet_inputs(dtype)
    with torch.no_grad():
        ref = unet(*inputs)
        opt.to_channels_last(unet)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = unet(*inputs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_in_half_precision_already_uses_fp32_statistics(dtype):
    """Why there is no "GroupNorm in fp32" lever: F.group_norm on half inputs computes its mean and variance in
    fp32 (checked here on the CPU; the CUDA kernel uses acc_type = float). Its result is the fp32 result rounded
    (within one ulp), and far from a norm whose statistics are computed in the half type, on activations with a
    large mean as deep UNet features have."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 16, 16, generator=g) * 3 + 100).to(dtype)
    w, b = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype), (0.1 * torch.randn(64, generator=g)).to(dtype)
    exact = F.group_norm(x.float(), 8, w.float(), b.float(), 1e-5)
    out = F.group_norm(x, 8, w, b, 1e-5).float()
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(1)
    assert ((out - exact).abs() <= ulp).all()
    xr = x.view(2, 8, -1)
    mean = xr.mean(-1, keepdim=True, dtype=dtype)
    naive = ((xr - mean) / ((xr - mean).square().mean(-1, keepdim=True) + 1e-5).sqrt()).view_as(x)
    naive = naive * w[:, None, None] + b[:, None, None]
    assert (naive.float() - exact).abs().max() > 4 * (out - exact).abs().max()


# ----------------------------------------------------------------------------------------------------------------
# The switch, the prompt cache, the VAE fallback


def test_optimize_cpu_defaults_and_bad_combinations():
    pipe = tiny_pipeline()
    eager = pipe("a red circle", seed=3, num_inference_steps=2, output_type="np").images
    assert pipe.optimize() is pipe
    assert pipe.levers == opt.default_levers("cpu")
    assert not (pipe.levers.fuse or pipe.levers.compile or pipe.levers.cuda_graphs or pipe.levers.channels_last)
    assert "network" not in vars(pipe.unet)  # not compiled: the class's own network runs
    fast = pipe("a red circle", seed=3, num_inference_steps=2, output_type="np").images
    assert np.abs(fast - eager).max() <= 1e-4
    with pytest.raises(ValueError, match="cuda_graphs=True needs the pipeline on a CUDA device"):
        opt.resolve_levers("cpu", compile=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs compile=True"):
        opt.resolve_levers("cuda", compile=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        opt.resolve_levers("cpu", compile=True, compile_mode="fastest")
    assert opt.resolve_levers("cuda", compile=False).cuda_graphs is False  # compile=False alone drops the graphs
    assert opt.default_levers("cuda") == opt.Levers(True, True, True, True, "reduce-overhead", True)


def test_prompt_cache_skips_the_text_encoder_and_gives_identical_images():
    pipe = tiny_pipeline()
    calls = []
    pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    kw = dict(negative_prompt="blurry", seed=4, num_inference_steps=2, output_type="np")
    first = pipe("a blue square", **kw).images
    n = len(calls)
    assert n > 0
    second = pipe("a blue square", **kw).images
    assert len(calls) == n, "the same prompt must not run the text encoder again"
    assert np.array_equal(first, second)
    pipe("a blue square", clip_skip=2, **kw)  # another clip_skip is another key
    assert len(calls) > n
    n = len(calls)
    with torch.no_grad():  # a changed text encoder (in-place write bumps the version counter) re-encodes
        pipe.text_encoder.text_model.final_layer_norm.weight.mul_(2)
    changed = pipe("a blue square", **kw).images
    assert len(calls) > n and not np.array_equal(changed, first)
    n = len(calls)
    pipe.prompt_cache_size = 0
    pipe("a blue square", **kw)
    assert len(calls) > n and len(pipe._prompt_cache) <= 8


def test_vae_fp16_overflow_decodes_again_in_fp32_and_warns_once():
    """A real fp16 overflow on the CPU (fp16 convolutions run there in torch 2.13): a decoder whose last conv
    is scaled up gives values above 65504 in fp16, finite ones in fp32."""
    pipe = tiny_pipeline(torch.float16)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(1e5)  # |w| up to ~2e4, outputs past 65504
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    assert not torch.isfinite(pipe.vae.decode(latents / pipe.vae.config.scaling_factor)).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe.decode(latents)
        again = pipe.decode(latents)
    assert sum("decoding again in float32" in str(w.message) for w in caught) == 1
    assert images.dtype == torch.float32 and torch.isfinite(images).all() and torch.equal(images, again)
    assert next(pipe.vae.parameters()).dtype == torch.float16, "the VAE goes back to fp16 after the retry"
    with torch.no_grad():
        reference = pipe.vae.float().decode((latents / pipe.vae.config.scaling_factor).float())
    assert rel_err(images, reference) <= 1e-6


def test_cli_optimize_on_cpu_gives_the_same_image(tmp_path):
    from PIL import Image

    from ldm.cli import main

    folder = save_tiny_model_folder(tmp_path / "tiny-sd")
    outs = []
    for extra in ([], ["--optimize"]):
        out = tmp_path / f"img{len(outs)}.png"
        assert main(["generate", "a photo of a cat", "--model", str(folder), "--out", str(out), "--steps", "2",
                     "--seed", "1", "--device", "cpu", *extra]) == 0
        outs.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(outs[0] - outs[1]).max() <= 1  # fusing reorders float sums: at most one level on a boundary


# ----------------------------------------------------------------------------------------------------------------
# torch.compile and its cache (CPU, one tiny model, two processes)

_COMPILE_SCRIPT = """
import sys, torch
from ldm import optimize as opt
from ldm.config import UNetConfig
from ldm.unet import UNet2DConditionModel
cfg = UNetConfig(block_out_channels=(8,), cross_attention_levels=(True,), num_heads=(1,), layers_per_block=1,
                 cross_attention_dim=8, norm_num_groups=4, sample_size=None)
torch.manual_seed(0)
unet = UNet2DConditionModel(cfg).eval()
x, t, c = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 7, 8)
with torch.no_grad():
    eager = unet(x, t, c)
    opt.fuse_projections(unet)
    opt.compile_cache_dir(sys.argv[1])
    opt.compile_unet(unet)
    out = unet(x, t, c)
err = ((out - eager).norm() / eager.norm()).item()
counters = opt.compile_counters()
print(f"RESULT err={err:.3e} hit={counters['fxgraph_cache_hit']} miss={counters['fxgraph_cache_miss']}")
"""


@pytest.mark.slow  # two processes that each run inductor's C++ compiler: ~50 s on 2 busy cores
def test_compiled_unet_matches_eager_and_a_second_process_hits_the_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    results = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(tmp_path / "cache")], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
        results.append(dict(kv.split("=") for kv in line.split()[1:]))
    for r in results:
        assert float(r["err"]) <= 1e-4
    assert int(results[0]["miss"]) >= 1 and int(results[0]["hit"]) == 0
    assert int(results[1]["hit"]) >= 1 and int(results[1]["miss"]) == 0, "the second process must hit the cache"
    assert any((tmp_path / "cache").rglob("*")), "the cache lives in the folder given"


# ----------------------------------------------------------------------------------------------------------------
# The GPU benchmark script, in its CPU smoke mode


def test_bench_gpu_smoke_prints_the_table_and_writes_markdown(tmp_path):
    target = tmp_path / "perf.md"
    target.write_text("# Performance\n\nkept text\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--smoke", "--write", str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("diffusers eager", "ours eager", "+ fused projections", "ours optimize=True", "diffusers + compile"):
        assert f"| {row}" in proc.stdout
    assert "| diffusers eager | " in proc.stdout and "1.00x" in proc.stdout
    text = target.read_text()
    assert text.startswith("# Performance\n\nkept text\n") and "<!-- bench_gpu:smoke:start -->" in text
    assert "python scripts/bench_gpu.py --smoke" in text
    # a second write of the same family replaces its section and keeps the rest
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(REPO / "scripts"))
    bench_gpu.write_section(target, "smoke", "again", ["new body"])
    text = target.read_text()
    assert text.count("bench_gpu:smoke:start") == 1 and "new body" in text and "| ours eager" not in text
    assert text.startswith("# Performance\n\nkept text\n")


# ----------------------------------------------------------------------------------------------------------------
# GPU: the optimized pipeline against diffusers fp16 on the same weights


def _reference_pair(upcast: bool):
    """(diffusers pipeline, our pipeline) on the same tiny trained-like weights, fp32 on the CPU."""
    import diffusers
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from tests.helpers import CLIP as REF_CLIP
    from tests.helpers import UNET as REF_UNET
    from tests.helpers import VAE as REF_VAE

    unet_kw = {**REF_UNET, "upcast_attention": upcast, "use_linear_projection": upcast}
    ref_unet = trained_like_(diffusers.UNet2DConditionModel(**unet_kw), seed=1).eval()
    ref_vae = trained_like_(diffusers.AutoencoderKL(**REF_VAE), seed=2).eval()
    ref_text = trained_like_(CLIPTextModel(RefCLIPConfig(**REF_CLIP)), seed=3).eval()
    sched = {**diffusers_config("sd15", "scheduler"), **({"prediction_type": "v_prediction"} if upcast else {})}
    ref = diffusers.StableDiffusionPipeline(
        unet=ref_unet, vae=ref_vae, text_encoder=ref_text, tokenizer=CLIPTokenizer.from_pretrained(
            TOKENIZER_DIR / "sd15"), scheduler=diffusers.DDIMScheduler.from_config(sched), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(unet_kw)).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    vae = ldm.AutoencoderKL(VAEConfig.from_diffusers(REF_VAE)).eval()
    vae.load_state_dict(ref_vae.state_dict(), strict=True)
    text = ldm.CLIPTextModel(CLIPTextConfig.from_transformers(REF_CLIP)).eval()
    text.load_state_dict(ref_text.state_dict(), strict=True)
    family = dataclasses.replace(ldm.SD21_V if upcast else ldm.SD15, unet=unet.config, vae=vae.config, text=text.config,
                                 native_size=SIZE)
    ours = ldm.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text,
                                       tokenizer=ldm.CLIPTokenizer.from_dir(TOKENIZER_DIR / "sd15"),
                                       scheduler=ldm.schedulers.from_name("ddim", sched), family=family)
    return ref, ours


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1 / max(float(np.mean((a - b) ** 2)), 1e-12))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("upcast", [False, True], ids=["sd15-like", "sd21v-like-upcast"])
@pytest.mark.parametrize("levers", [dict(), dict(compile=False)], ids=["optimize", "no-compile"])
def test_cuda_optimized_pipeline_matches_diffusers_fp16(dtype, upcast, levers):
    ref, ours = _reference_pair(upcast)
    ref.to("cuda", torch.float16)
    ours.to("cuda", dtype).optimize(**levers)
    # the UNet alone, at the CFG batch
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).cuda()
    context = torch.randn(2, 77, ours.unet.config.cross_attention_dim, generator=g).cuda()
    t = torch.tensor(421)
    with torch.no_grad():
        expected = ref.unet(x.half(), t.cuda(), encoder_hidden_states=context.half()).sample
        for _ in range(3):  # the third call replays the CUDA graph
            out = ours.unet(x.to(dtype), t, context.to(dtype))
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), expected.float()) <= 1e-2
    # whole images, 5 DDIM steps with guidance
    gens = [torch.Generator("cpu").manual_seed(1)]
    ref_images = ref("a photo of a cat", negative_prompt="blurry", num_inference_steps=5, height=SIZE, width=SIZE,
                     generator=gens, output_type="np").images
    images = ours("a photo of a cat", negative_prompt="blurry", num_inference_steps=5, seed=1, output_type="np").images
    assert np.isfinite(images).all(), "NaN in the optimized pipeline's image"
    assert _psnr(images, ref_images) >= 35


@pytest.mark.cuda
def test_cuda_fused_projections_and_prompt_cache_keep_images_exact():
    """Eager fp16 on a GPU: fusing and the prompt cache change nothing beyond GEMM rounding."""
    _, ours = _reference_pair(False)
    ours.to("cuda", torch.float16)
    kw = dict(negative_prompt="blurry", num_inference_steps=4, seed=2, output_type="np")
    before = ours("a photo of a cat", **kw).images
    opt.fuse_projections(ours.unet)
    after = ours("a photo of a cat", **kw).images
    assert _psnr(after, before) >= 45
