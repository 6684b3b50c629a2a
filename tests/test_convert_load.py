"""Loading through the converter, at tiny sizes (seconds): single files, EMA, dtypes, a separate VAE, family
resolution, diffusers folders (written by diffusers' own save_pretrained), export round trips, the hub cache and
the command line. Bad files are in test_convert_errors.py; the full SD shapes in test_convert_full.py.

Parity: the diffusers folder test loads the same weights into diffusers/transformers and into ours; the outputs
must agree within 1e-5 relative (the components' fp32 contract; identical weights and kernels give ~1e-7).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import DIFFUSERS_CONFIGS, TINY_SD1, TINY_SD2, TINY_VAE, TOKENIZER_DIR, assert_rel, trained_like_
from tests.synth import ema_name, tiny_ldm_manifest, write_synthetic_checkpoint
from weights_convert.__main__ import main as cli
from weights_convert.export import export_diffusers
from weights_convert.load import load_components, load_vae, open_source
from weights_convert.safetensors_file import SafetensorsFile, save_file


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    return {
        "sd1": write_synthetic_checkpoint(tiny_ldm_manifest(TINY_SD1), d / "sd1.safetensors"),
        "sd1_fp16": write_synthetic_checkpoint(tiny_ldm_manifest(TINY_SD1), d / "sd1_fp16.safetensors",
                                               dtype=torch.float16),
        "sd1_ema": write_synthetic_checkpoint(tiny_ldm_manifest(TINY_SD1), d / "sd1_ema.safetensors", ema=True),
        "sd2": write_synthetic_checkpoint(tiny_ldm_manifest(TINY_SD2), d / "sd2.safetensors", seed=1),
    }


def _file_tensor(path: Path, key: str) -> torch.Tensor:
    return SafetensorsFile(path).tensor(key).clone()


def test_single_file_loads_every_weight(tiny_files: dict[str, Path]) -> None:
    parts = load_components(tiny_files["sd1"], family=TINY_SD1)
    assert parts.family.name == "sd15"
    f = tiny_files["sd1"]
    unet, vae, text = parts.unet.state_dict(), parts.vae.state_dict(), parts.text_encoder.state_dict()
    assert torch.equal(unet["conv_in.weight"], _file_tensor(f, "model.diffusion_model.input_blocks.0.0.weight"))
    assert torch.equal(vae["decoder.mid_block.attentions.0.to_q.weight"],
                       _file_tensor(f, "first_stage_model.decoder.mid.attn_1.q.weight")[:, :, 0, 0])
    assert torch.equal(text["text_model.final_layer_norm.weight"],
                       _file_tensor(f, "cond_stage_model.transformer.text_model.final_layer_norm.weight"))
    assert all(p.dtype == torch.float32 for p in parts.unet.parameters())
    assert type(parts.scheduler).__name__ == "PNDMScheduler" and parts.tokenizer.pad_id == 49407


def test_sd2_file_splits_qkv_and_drops_last_layer(tiny_files: dict[str, Path]) -> None:
    parts = load_components(tiny_files["sd2"], family=TINY_SD2)
    f = tiny_files["sd2"]
    fused = _file_tensor(f, "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight")
    text = parts.text_encoder.state_dict()
    for i, name in enumerate("qkv"):
        q_k_or_v = text[f"text_model.encoder.layers.1.self_attn.{name}_proj.weight"]
        assert torch.equal(q_k_or_v, fused[32 * i:32 * (i + 1)])
    assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in SafetensorsFile(f)  # dropped, not loaded
    assert len(parts.text_encoder.text_model.encoder.layers) == 2
    assert parts.tokenizer.pad_id == 0


@pytest.mark.parametrize("file_key, dtype", [("sd1_fp16", torch.float32), ("sd1", torch.float16),
                                             ("sd1_fp16", None), ("sd1", torch.bfloat16)])
def test_dtype_paths(tiny_files: dict[str, Path], file_key: str, dtype: torch.dtype | None) -> None:
    f = tiny_files[file_key]
    parts = load_components(f, family=TINY_SD1, dtype=dtype)
    want = dtype or torch.float16
    raw = SafetensorsFile(f).tensor("model.diffusion_model.out.2.weight")
    for model in (parts.unet, parts.vae, parts.text_encoder):
        assert all(p.dtype == want for p in model.parameters())
    assert torch.equal(parts.unet.state_dict()["conv_out.weight"], raw.to(want))  # a plain cast, no other change


def test_same_dtype_load_shares_the_mapped_file(tiny_files: dict[str, Path]) -> None:
    """No copy on the same-dtype path: the parameters are views of the memory-mapped file's pages."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc/self/maps")
    parts = load_components(tiny_files["sd1"], family=TINY_SD1, dtype=torch.float32)
    cast = load_components(tiny_files["sd1"], family=TINY_SD1, dtype=torch.float16)

    def file_backed(t: torch.Tensor) -> bool:
        for line in maps.read_text().splitlines():
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return len(fields) > 5 and fields[5] == str(tiny_files["sd1"])
        return False

    for model in (parts.unet, parts.vae, parts.text_encoder):
        assert all(file_backed(p) for p in model.parameters())
    assert not any(file_backed(p) for p in cast.unet.parameters())


def test_ema_weights(tiny_files: dict[str, Path]) -> None:
    f = tiny_files["sd1_ema"]
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    regular = load_components(f, family=TINY_SD1).unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"]
    ema = load_components(f, family=TINY_SD1, ema=True).unet.state_dict()["down_blocks.0.resnets.0.conv1.weight"]
    assert torch.equal(regular, _file_tensor(f, key))
    assert torch.equal(ema, _file_tensor(f, ema_name(key)))
    assert not torch.equal(regular, ema)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_components(tiny_files["sd1"], family=TINY_SD1, ema=True)


def test_separate_vae_file(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    """A fine-tuned VAE file in the original layout (no first_stage_model. prefix) replaces the checkpoint's."""
    other = SafetensorsFile(tiny_files["sd2"])
    vae_only = {k.removeprefix("first_stage_model."): other.tensor(k).clone() for k in other.keys()
                if k.startswith("first_stage_model.")}
    path = save_file(vae_only, tmp_path / "vae-ft.safetensors")
    parts = load_components(tiny_files["sd1"], family=TINY_SD1, vae=path)
    assert torch.equal(parts.vae.state_dict()["encoder.conv_in.weight"], vae_only["encoder.conv_in.weight"])
    assert not torch.equal(parts.vae.state_dict()["encoder.conv_in.weight"],
                           _file_tensor(tiny_files["sd1"], "first_stage_model.encoder.conv_in.weight"))
    alone = load_vae(path, config=TINY_VAE)
    assert torch.equal(alone.state_dict()["decoder.conv_out.bias"], vae_only["decoder.conv_out.bias"])


def test_sd2_family_resolution(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    import ldm.config

    f = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_files["sd2"], f)
    sd21_v = replace(ldm.config.SD21_V, unet=replace(TINY_SD2.unet, upcast_attention=True), vae=TINY_VAE,
                     text=TINY_SD2.text)
    # the default, with a warning, needs the registered presets: patch them to the tiny shapes for this test
    saved = dict(ldm.config.FAMILIES)
    ldm.config.FAMILIES.update({"sd21-v": sd21_v, "sd21-base": TINY_SD2})
    try:
        with pytest.warns(UserWarning, match="sd21-v"):
            assert load_components(f).family.name == "sd21-v"
        assert load_components(f, family="sd21-base").family.name == "sd21-base"
        f.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_components(f).family.name == "sd21-v"
        f.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
        assert load_components(f).family.name == "sd21-base"
    finally:
        ldm.config.FAMILIES.clear()
        ldm.config.FAMILIES.update(saved)
    with pytest.raises(ValueError, match="not the requested family 'sd15'"):
        load_components(f, family="sd15")


# ----------------------------------------------------------------------------------------------------------------
# The diffusers folder layout, written by diffusers and transformers themselves


def _diffusers_folder(folder: Path, variant: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    import diffusers
    import transformers

    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=32, norm_num_groups=8, sample_size=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                                  sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu"))
    refs = {}
    for i, (name, model) in enumerate((("unet", unet), ("vae", vae), ("text_encoder", text))):
        trained_like_(model, seed=i)
        model.to(dtype).save_pretrained(folder / name, variant=variant)
        refs[name] = model.float().eval()
    shutil.copytree(DIFFUSERS_CONFIGS / "sd15" / "scheduler", folder / "scheduler")
    shutil.copytree(TOKENIZER_DIR / "sd15", folder / "tokenizer")
    shutil.copyfile(DIFFUSERS_CONFIGS / "sd15" / "model_index.json", folder / "model_index.json")
    return refs


@torch.no_grad()
def _check_outputs(parts, refs: dict, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    img, ids = torch.randn(1, 3, 16, 16, generator=g), torch.tensor([[49406, 320, 1929, 49407, 49407]])
    assert_rel(parts.unet(x, 10, ctx), refs["unet"](x, 10, ctx).sample, tol, "unet")
    assert_rel(parts.vae.decode(x[:, :, :4, :4]), refs["vae"].decode(x[:, :, :4, :4]).sample, tol, "vae decode")
    assert_rel(parts.vae.encode(img).mean, refs["vae"].encode(img).latent_dist.mean, tol, "vae encode")
    assert_rel(parts.text_encoder(ids).last_hidden_state, refs["text_encoder"](ids).last_hidden_state, tol, "clip")


def test_diffusers_folder_loads_with_parity(tmp_path: Path) -> None:
    refs = _diffusers_folder(tmp_path / "model")
    parts = load_components(tmp_path / "model")
    assert parts.family is None and parts.unet.config.block_out_channels == (32, 64)  # tiny: no preset's configs
    _check_outputs(parts, refs, 1e-5)


@pytest.mark.parametrize(("folder", "name"), [("sd15", "sd15"), ("sd21base", "sd21-base"), ("sd21", "sd21-v"),
                                              ("sd15-inpaint", "sd15-inpaint"), ("sd2-inpaint", "sd2-inpaint"),
                                              ("x4-upscaler", "x4-upscaler")])
def test_folder_family_is_identity(folder: str, name: str) -> None:
    """A folder is a family only when its configs are that preset's: the official configs are; a fine-tune with
    another size of the same architecture, or another prediction type, is none (its parts keep their configs)."""
    import ldm
    from ldm.config import CLIPTextConfig, UNetConfig, VAEConfig
    from weights_convert.configs import read_json
    from weights_convert.load import _folder_family, _identity

    root = DIFFUSERS_CONFIGS / folder
    configs = {"unet": UNetConfig.from_diffusers(read_json(root / "unet" / "config.json")),
               "vae": VAEConfig.from_diffusers(read_json(root / "vae" / "config.json")),
               "text_encoder": CLIPTextConfig.from_transformers(read_json(root / "text_encoder" / "config.json"))}
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    prediction = scheduler.get("prediction_type", "epsilon")
    assert _folder_family(root, configs["unet"], configs["text_encoder"], scheduler, None) == name
    assert _identity(name, configs, prediction, None) is ldm.config.FAMILIES[name]
    smaller = {**configs, "unet": replace(configs["unet"], sample_size=32)}
    assert _identity(name, smaller, prediction, None) is None
    other = "epsilon" if prediction == "v_prediction" else "v_prediction"
    assert _identity(name, configs, other, None) is None


def test_packaged_model_has_no_family() -> None:
    """The packaged 8 M-parameter shapes model follows SD 1.x's architecture but is not SD 1.5."""
    import ldm
    from ldm.train import DEFAULT_MODEL_DIR

    pipe = ldm.load_pipeline(DEFAULT_MODEL_DIR)
    assert pipe.family is None and pipe.native_size == 64  # diffusers' rule: unet.sample_size 16 x the VAE's 4


def test_fp16_variant_found_by_itself_and_asked_for(tmp_path: Path) -> None:
    refs = _diffusers_folder(tmp_path / "model", variant="fp16", dtype=torch.float16)
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    for variant in (None, "fp16"):
        parts = load_components(tmp_path / "model", variant=variant)  # fp16 files, fp32 models
        assert parts.unet.conv_in.weight.dtype == torch.float32
        _check_outputs(parts, refs, 1e-5)  # refs hold the same fp16-rounded values, upcast


def test_export_round_trip_and_diffusers_reads_it(tmp_path: Path, tiny_files: dict[str, Path]) -> None:
    import diffusers

    parts = load_components(tiny_files["sd2"], family=TINY_SD2)
    out = export_diffusers(parts, tmp_path / "exported")
    again = load_components(out)
    assert again.family is None  # an SD 2 architecture at tiny sizes is not the sd21-base family
    assert load_components(out, family=TINY_SD2).family is TINY_SD2  # the preset its configs are
    for c in ("unet", "vae", "text_encoder"):
        a, b = getattr(parts, c).state_dict(), getattr(again, c).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), c
    ref = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    ref_sd = ref.state_dict()
    ours = parts.unet.state_dict()
    assert ref_sd.keys() == ours.keys() and all(torch.equal(ref_sd[k], ours[k]) for k in ours)
    half = export_diffusers(parts, tmp_path / "half", dtype=torch.float16, variant="fp16")
    assert (half / "text_encoder" / "model.fp16.safetensors").is_file()
    assert load_components(half, dtype=None).unet.conv_in.weight.dtype == torch.float16
    with pytest.raises(FileExistsError):
        export_diffusers(parts, out)


def test_pickle_checkpoint_with_opt_in(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    src = SafetensorsFile(tiny_files["sd1"])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: src.tensor(k).clone() for k in src.keys()}, "global_step": 1}, ckpt)
    parts = load_components(ckpt, family=TINY_SD1, allow_pickle=True)
    assert torch.equal(parts.unet.state_dict()["conv_in.weight"],
                       src.tensor("model.diffusion_model.input_blocks.0.0.weight"))
    assert isinstance(open_source(ckpt, allow_pickle=True).keys(), list)


def test_hub_id_from_an_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / ("a" * 40)
    refs = _diffusers_folder(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    parts = load_components("org/tiny-sd")
    _check_outputs(parts, refs, 1e-5)
    with pytest.raises(FileNotFoundError, match="org/missing"):
        load_components("org/missing")


def test_cli_table_inspect_export(tiny_files: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["table", "--family", "sd21-v"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1244  # every key of the official SD 2.1 file, plus the optional drops
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight  ->  text_model.encoder.layers.0." \
           "self_attn.q_proj.weight, text_model.encoder.layers.0.self_attn.k_proj.weight, text_model.encoder." \
           "layers.0.self_attn.v_proj.weight   [split_qkv]" in lines
    assert cli(["inspect", str(tiny_files["sd2"])]) == 0
    report = capsys.readouterr().out
    assert "family: sd21-v or sd21-base" in report and "text_encoder: " in report
    assert cli(["inspect", str(tmp_path / "nothing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli(["export", str(tiny_files["sd1"]), str(tmp_path / "out")]) == 2  # tiny: not the real SD 1.5 layout
    assert "unexpected key(s)" in capsys.readouterr().err


def test_key_mapping_doc_is_current() -> None:
    from weights_convert.__main__ import render_doc

    doc = (Path(__file__).parents[1] / "docs" / "key_mapping.md").read_text()
    assert doc == render_doc(), "docs/key_mapping.md is stale: run python -m weights_convert docs"


def test_load_pipeline_runs(tiny_files: dict[str, Path]) -> None:
    import ldm

    pipe = ldm.load_pipeline(tiny_files["sd1"], family=TINY_SD1)
    assert isinstance(pipe, ldm.StableDiffusionPipeline) and pipe.family.name == "sd15"
    out = pipe("a dog wearing a hat", height=16, width=16, num_inference_steps=2, seed=0, output_type="latent")
    assert out.latents.shape == (1, 4, 8, 8) and torch.isfinite(out.latents).all()


def test_legacy_clip_prefix(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    """Community SD 1 files written with old transformers: `cond_stage_model.transformer.*`, no `text_model.`."""
    src = SafetensorsFile(tiny_files["sd1"])
    new, old = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    legacy = save_file({k.replace(new, old): src.tensor(k).clone() for k in src.keys()}, tmp_path / "old.safetensors")
    a = load_components(tiny_files["sd1"], family=TINY_SD1).text_encoder.state_dict()
    b = load_components(legacy, family=TINY_SD1).text_encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_of_a_save_pretrained_folder_loads_in_diffusers_and_ours(tmp_path: Path) -> None:
    """A model loaded from diffusers' save_pretrained folder (tokenizer.json only) exports to a folder that
    diffusers / transformers and ldm read with the same tokenizer ids; added tokens the export cannot write are a
    clear error, with nothing written."""
    import diffusers
    import transformers

    from ldm.tokenizer import CLIPTokenizer
    from tests.helpers import HARD_PROMPTS as PROMPTS, save_tiny_model_folder

    parts = load_components(save_tiny_model_folder(tmp_path / "saved"))
    out = export_diffusers(parts, tmp_path / "exported")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)
    expected = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert load_components(out).tokenizer(PROMPTS).tolist() == expected.input_ids.tolist()
    assert parts.tokenizer(PROMPTS).tolist() == expected.input_ids.tolist()

    extended = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")
    extended.add_tokens(["<cat-toy>"])
    extended.save_pretrained(tmp_path / "extended")
    parts.tokenizer = CLIPTokenizer.from_dir(tmp_path / "extended")
    with pytest.raises(ValueError, match="49409 tokens.*drop the added tokens"):
        export_diffusers(parts, tmp_path / "lossy")
    assert not (tmp_path / "lossy").exists()
