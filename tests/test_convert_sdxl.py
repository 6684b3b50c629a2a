"""SDXL single files and diffusers folders at tiny sizes: detection, the tables against diffusers' own single-file
conversion (tensor for tensor), single file vs diffusers folder, and the bad-file cases of the SD 1.x converter
(tests/test_convert_errors.py) on both SDXL layouts.

The files are the official layouts (`sd_xl_base_1.0.safetensors`: `model.diffusion_model.*`, `first_stage_model.*`,
CLIP-L at `conditioner.embedders.0.transformer.text_model.*`, bigG at `conditioner.embedders.1.model.*`; the
refiner's bigG alone at `conditioner.embedders.0.model.*`) written at tiny sizes by tests/synth.py from our tables
run backwards; diffusers' `from_single_file` with the tiny configs is the oracle for what each key becomes. The full
official shapes are tests/test_convert_sdxl_full.py (slow).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_XL_BASE, TINY_XL_REFINER, official_state, write_xl_configs
from tests.synth import tiny_ldm_manifest, write_synthetic_checkpoint
from weights_convert.checkpoint import detect_layout, official_layout
from weights_convert.load import load_components, load_pipeline
from weights_convert.safetensors_file import CheckpointError, SafetensorsFile, save_file

XL = {"base": TINY_XL_BASE, "refiner": TINY_XL_REFINER}
ENCODERS = {"base": ("text_encoder", "text_encoder_2"), "refiner": ("text_encoder_2",)}
BIGG = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("xl")
    out = {name: write_synthetic_checkpoint(tiny_ldm_manifest(p), d / f"{name}.safetensors", seed=5)
           for name, p in XL.items()}
    out["base_fp16"] = write_synthetic_checkpoint(tiny_ldm_manifest(TINY_XL_BASE), d / "base16.safetensors",
                                                  dtype=torch.float16, seed=6)
    for name, preset in XL.items():
        out[f"{name}_configs"] = write_xl_configs(preset, d / f"{name}_configs")
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {k: f.tensor(k).clone() for k in f.keys()}


def _state(module: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
    return official_state(module.state_dict(), part)


def _diffusers_parts(ckpt: Path, config: Path, encoders: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """diffusers' own single-file conversion of each part, offline (fixtures/README.md's recipe)."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint

    kw = {"config": str(config), "local_files_only": True}
    out = {"unet": diffusers.UNet2DConditionModel.from_single_file(str(ckpt), subfolder="unet", **kw),
           "vae": diffusers.AutoencoderKL.from_single_file(str(ckpt), subfolder="vae", **kw)}
    state = load_single_file_checkpoint(str(ckpt), local_files_only=True)
    classes = {"text_encoder": transformers.CLIPTextModel, "text_encoder_2": transformers.CLIPTextModelWithProjection}
    for c in encoders:
        out[c] = create_diffusers_clip_model_from_ldm(classes[c], state, subfolder=c, **kw)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("name", list(XL))
def test_layout_detected_from_keys(files: dict[str, Path], name: str) -> None:
    f = SafetensorsFile(files[name])
    shapes = {k: f.shape(k) for k in f.keys()}
    layout = detect_layout(set(shapes), shapes, files[name])
    assert layout == official_layout(XL[name]) and layout.candidates == (f"sdxl-{name}",)
    assert layout.clip2_prefix == BIGG[name]


@pytest.mark.parametrize("name", list(XL))
def test_matches_diffusers_single_file_conversion(files: dict[str, Path], name: str) -> None:
    """Every tensor of every part equal to diffusers' conversion of the same file (a renaming, a split and a
    transpose cannot change a number), and the same key sets."""
    ours = load_components(files[name], family=XL[name])
    assert ours.family.name == f"sdxl-{name}" and (ours.text_encoder is None) == (name == "refiner")
    assert ours.tokenizer_2.pad_id == 0 and (name == "refiner" or ours.tokenizer.pad_id == 49407)
    ref = _diffusers_parts(files[name], files[f"{name}_configs"], ENCODERS[name])
    for part, module in ref.items():
        mine, theirs = _state(getattr(ours, part), part), _state(module, part)
        assert mine.keys() == theirs.keys(), f"{part}: {sorted(mine.keys() ^ theirs.keys())[:5]}"
        for key, value in theirs.items():
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), f"{part} {key}"
    raw = SafetensorsFile(files[name]).tensor(BIGG[name] + "text_projection")
    assert torch.equal(ours.text_encoder_2.text_projection.weight, raw.t())  # (D, P) applied as x @ W


def test_fp16_file_loads_to_bf16_and_fp16_without_fp32(files: dict[str, Path]) -> None:
    half = load_components(files["base_fp16"], family=TINY_XL_BASE, dtype=None)
    bf16 = load_components(files["base_fp16"], family=TINY_XL_BASE, dtype=torch.bfloat16)
    raw = _tensors(files["base_fp16"])
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(half, part).parameters()} == {torch.float16}, part
        assert {p.dtype for p in getattr(bf16, part).parameters()} == {torch.bfloat16}, part
    key = "model.diffusion_model.label_emb.0.0.weight"
    assert torch.equal(half.unet.add_embedding.linear_1.weight, raw[key])
    assert torch.equal(bf16.unet.add_embedding.linear_1.weight, raw[key].to(torch.bfloat16))  # one rounding


@pytest.mark.parametrize("name", list(XL))
def test_single_file_and_diffusers_folder_give_identical_tensors(files: dict[str, Path], name: str,
                                                                  tmp_path: Path) -> None:
    from weights_convert.export import export_diffusers

    single = load_components(files[name], family=XL[name])
    folder = export_diffusers(single, tmp_path / name)
    assert (folder / "text_encoder").is_dir() == (name == "base") and (folder / "tokenizer_2").is_dir()
    again = load_components(folder)
    assert again.family.name == f"sdxl-{name}" and again.family.native_size == 8 * 2  # sample_size x VAE factor
    assert again.force_zeros_for_empty_prompt == (name == "base")
    for part in ("unet", "vae") + ENCODERS[name]:
        a, b = getattr(single, part).state_dict(), getattr(again, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert again.tokenizer_2(["a dog"]).tolist() == single.tokenizer_2(["a dog"]).tolist()
    kwargs = again.pipeline_kwargs()
    assert kwargs["text_encoder_2"] is again.text_encoder_2
    assert kwargs["force_zeros_for_empty_prompt"] == (name == "base")


def test_diffusers_reads_our_exported_folder(files: dict[str, Path], tmp_path: Path) -> None:
    import diffusers

    from weights_convert.export import export_diffusers

    ours = load_components(files["base"], family=TINY_XL_BASE)
    folder = export_diffusers(ours, tmp_path / "base")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    theirs, mine = _state(pipe.text_encoder_2, "text_encoder_2"), _state(ours.text_encoder_2, "text_encoder_2")
    assert theirs.keys() == mine.keys() and all(torch.equal(v, mine[k]) for k, v in theirs.items())


def test_load_pipeline_picks_the_sdxl_class(files: dict[str, Path]) -> None:
    """load_pipeline returns ldm.pipeline_xl.StableDiffusionXLPipeline where it exists; a build without it says so."""
    if importlib.util.find_spec("ldm.pipeline_xl") is None:
        with pytest.raises(NotImplementedError, match="load_components"):
            load_pipeline(files["refiner"], family=TINY_XL_REFINER)
        return
    pipe = load_pipeline(files["refiner"], family=TINY_XL_REFINER)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.text_encoder_2 is not None


# ---------------------------------------------------------------------------------------------------------------
# Bad files: the SD 1.x converter's cases, on both SDXL layouts


def _bigg(name: str, rest: str) -> str:
    return BIGG[name] + rest


CASES = {
    # case: (damage(tensors, name) -> None, expected message (with {name} for the family))
    "missing key": (lambda t, n: t.pop(_bigg(n, "ln_final.bias")),
                    "missing key(s) for a sdxl-{name} checkpoint: '" + "{bigg}ln_final.bias'"),
    "unexpected key": (lambda t, n: t.__setitem__("model.diffusion_model.extra.weight", torch.zeros(2)),
                       "unexpected key(s) for a sdxl-{name} checkpoint: 'model.diffusion_model.extra.weight'"),
    "wrong shape": (lambda t, n: t.__setitem__("model.diffusion_model.label_emb.0.0.weight", torch.zeros(128, 70)),
                    "shape mismatch for 'model.diffusion_model.label_emb.0.0.weight' -> unet "
                    "'add_embedding.linear_1.weight': the file has [128, 70]"),
    "untransposable projection": (lambda t, n: t.__setitem__(_bigg(n, "text_projection"), torch.zeros(40)),
                                  "'{bigg}text_projection' has shape [40], which transform 'transpose' cannot take"),
    "fused qkv not divisible by 3": (
        lambda t, n: t.__setitem__(_bigg(n, "transformer.resblocks.0.attn.in_proj_weight"), torch.zeros(121, 40)),
        "cannot take"),
    "integer weights": (lambda t, n: t.__setitem__("first_stage_model.decoder.conv_out.bias",
                                                   torch.zeros(3, dtype=torch.int32)),
                        "weights must be floating point"),
    "a layer too few": (lambda t, n: [t.pop(k) for k in list(t) if ".resblocks.2." in k],
                        "missing key(s) for a sdxl-{name} checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(XL))
def test_bad_files_raise_naming_the_fault(files: dict[str, Path], tmp_path: Path, name: str, case: str) -> None:
    damage, message = CASES[case]
    t = _tensors(files[name])
    damage(t, name)
    bad = save_file(t, tmp_path / f"{case.replace(' ', '_')}.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_components(bad, family=XL[name])
    text = str(info.value)
    assert bad.name in text and message.format(name=name, bigg=BIGG[name]) in text, text


def test_family_and_layout_mismatches(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="this checkpoint is sdxl-base .*not the requested family 'sdxl-refiner'"):
        load_components(files["base"], family="sdxl-refiner")
    with pytest.raises(CheckpointError, match="not the requested family 'sd15'"):
        load_components(files["refiner"], family="sd15")
    t = _tensors(files["base"])  # the base without its CLIP-L: neither layout
    for k in [k for k in t if k.startswith("conditioner.embedders.0.")]:
        del t[k]
    bad = save_file(t, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match=r"SDXL-style checkpoint .*no text encoder under"):
        load_components(bad, family=TINY_XL_BASE)
    t = _tensors(files["refiner"])
    t["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(CheckpointError, match="SDXL inpainting is not supported"):
        load_components(save_file(t, tmp_path / "inpaint.safetensors"), family=TINY_XL_REFINER)


def test_damaged_sdxl_folders(files: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from weights_convert.export import export_diffusers

    folder = export_diffusers(load_components(files["base"], family=TINY_XL_BASE), tmp_path / "m")
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(CheckpointError, match="no tokenizer_2/ subfolder"):
        load_components(folder)
    folder = export_diffusers(load_components(files["base"], family=TINY_XL_BASE), tmp_path / "m2")
    weights = folder / "text_encoder_2" / "model.safetensors"
    t = _tensors(weights)
    t["text_projection.weight"] = torch.zeros(24, 32)
    save_file(t, weights)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'text_projection.weight'"):
        load_components(folder)
    shutil.rmtree(folder / "text_encoder_2")  # an SDXL UNet without its second encoder
    with pytest.raises(CheckpointError, match=r"addition_embed_type 'text_time' \(SDXL\), but the folder has no "
                                              r"text_encoder_2/"):
        load_components(folder)


def test_hub_id_of_an_sdxl_refiner_from_an_offline_cache(files: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path fetches and reads text_encoder_2/ and tokenizer_2/, and a refiner repo has no text_encoder/."""
    import huggingface_hub.constants

    from ldm.hub import needed_patterns
    from weights_convert.export import export_diffusers

    assert {"tokenizer_2/*", "text_encoder_2/config.json", "text_encoder_2/model.safetensors"} <= set(needed_patterns())
    snapshot = tmp_path / "hub" / "models--org--tiny-xl-refiner" / "snapshots" / ("b" * 40)
    single = load_components(files["refiner"], family=TINY_XL_REFINER)
    export_diffusers(single, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    parts = load_components("org/tiny-xl-refiner")
    assert parts.family.name == "sdxl-refiner" and parts.text_encoder is None and parts.tokenizer is None
    a, b = single.text_encoder_2.state_dict(), parts.text_encoder_2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# kohya-format SDXL LoRA key names (the mapping only; merging is ldm/lora.py's, the same for every family)


def test_kohya_sdxl_lora_keys_map_to_our_modules(tmp_path: Path) -> None:
    from ldm.clip import CLIPTextModel, CLIPTextModelWithProjection
    from ldm.unet import UNet2DConditionModel
    from weights_convert.lora import read_lora

    with torch.device("meta"):
        unet, te1 = UNet2DConditionModel(TINY_XL_BASE.unet), CLIPTextModel(TINY_XL_BASE.text)
        te2 = CLIPTextModelWithProjection(TINY_XL_BASE.text_encoder_2)
    # kohya sd-scripts' SDXL names: the original LDM UNet paths (1 block per level here: input_blocks.{2*i+j+1}),
    # te1, te2
    expected = {
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k":
            ("unet", "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k"),
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2":
            ("unet", "mid_block.attentions.0.transformer_blocks.1.ff.net.2"),
        "lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_out_0":
            ("unet", "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_out.0"),
        "lora_unet_label_emb_0_0": ("unet", "add_embedding.linear_1"),
        "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj":
            ("text_encoder", "text_model.encoder.layers.1.self_attn.q_proj"),
        "lora_te2_text_model_encoder_layers_2_mlp_fc1": ("text_encoder_2", "text_model.encoder.layers.2.mlp.fc1"),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj":  # diffusers / PEFT spelling
            ("text_encoder_2", "text_model.encoder.layers.0.self_attn.k_proj"),
    }
    modules = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    data = {}
    for name, (component, module_name) in expected.items():
        weight = modules[component].get_submodule(module_name).weight
        kernel = tuple(weight.shape[2:])
        down, up = (".lora_A.weight", ".lora_B.weight") if "." in name else (".lora_down.weight", ".lora_up.weight")
        data[name + down] = torch.randn(2, weight.shape[1], *kernel)
        data[name + up] = torch.randn(weight.shape[0], 2, *((1, 1) if kernel else ()))
        data[name + ".alpha"] = torch.tensor(1.0)
    path = save_file(data, tmp_path / "xl_lora.safetensors")
    adapter = read_lora(path, unet, te1, te2)
    assert set(adapter) == set(expected.values())
    assert all(layer.alpha == 1.0 and layer.down.shape[0] == 2 for layer in adapter.values())
    with pytest.raises(CheckpointError, match="a LoRA for SDXL .*second text encoder"):
        read_lora(path, unet, te1)  # a model without a second encoder
    with torch.device("meta"):
        refiner = UNet2DConditionModel(TINY_XL_REFINER.unet)
    with pytest.raises(CheckpointError, match="reads 72-wide text embeddings, this model's reads 40"):
        read_lora(path, refiner, None, te2)  # a base LoRA on the refiner (bigG's 40-wide context alone)
    te_only = save_file({k: v for k, v in data.items() if k.startswith("lora_te")}, tmp_path / "te.safetensors")
    with pytest.raises(CheckpointError, match="match no LoRA layer of this model .*lora_te1_"):
        read_lora(te_only, refiner, None, te2)  # the refiner has no first encoder
