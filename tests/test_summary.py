"""ldm.summary: layer tables on the meta device, against the published parameter counts and the posts' tables.

The expected numbers are the published totals (DESIGN.md's family table: VAE 83,653,863; CLIP text 123,060,480 /
340,387,840; UNet 859,520,964 / 865,910,724) and the per-block counts of the torchinfo tables in the seed posts
(SD 2.1, diffusers layout), typed here as the facts a learner compares against; every count must match exactly.
Shapes are those of a 512x512 image: latents 64x64, context (1, 77, D).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ldm
from ldm.summary import COMPONENTS, example_inputs, inspect_model, main, summarize

TOTALS = {
    "sd15": {"vae": 83_653_863, "text_encoder": 123_060_480, "unet": 859_520_964},
    "sd21-base": {"vae": 83_653_863, "text_encoder": 340_387_840, "unet": 865_910_724},
    "sd21-v": {"vae": 83_653_863, "text_encoder": 340_387_840, "unet": 865_910_724},
}

# The posts' torchinfo table of the SD 2.1 VAE (depth 4): module lists of the encoder and decoder levels.
VAE_BLOCKS = {
    "encoder.conv_in": 3_584,
    "encoder.down_blocks.0.resnets": 591_360, "encoder.down_blocks.0.downsamplers": 147_584,
    "encoder.down_blocks.1.resnets": 2_100_224, "encoder.down_blocks.1.downsamplers": 590_080,
    "encoder.down_blocks.2.resnets": 8_394_752, "encoder.down_blocks.2.downsamplers": 2_359_808,
    "encoder.down_blocks.3.resnets": 9_443_328,
    "encoder.mid_block.resnets.0": 4_721_664, "encoder.mid_block.attentions.0": 1_051_648,
    "encoder.conv_norm_out": 1_024, "encoder.conv_out": 36_872, "quant_conv": 72, "post_quant_conv": 20,
    "decoder.conv_in": 18_944,
    "decoder.up_blocks.0.resnets": 14_164_992, "decoder.up_blocks.0.upsamplers": 2_359_808,
    "decoder.up_blocks.1.resnets": 14_164_992, "decoder.up_blocks.1.upsamplers": 2_359_808,
    "decoder.up_blocks.2.resnets": 4_265_216, "decoder.up_blocks.2.upsamplers": 590_080,
    "decoder.up_blocks.3.resnets": 1_067_648,
    "decoder.conv_norm_out": 256, "decoder.conv_out": 3_459,
}
# The posts' table of the SD 2.1 UNet (depth 3; the mid block's members at depth 4 there and here).
UNET_BLOCKS = {
    "time_embedding.linear_1": 410_880, "time_embedding.linear_2": 1_639_680, "conv_in": 11_840,
    "down_blocks.0.downsamplers": 921_920, "down_blocks.1.downsamplers": 3_687_040,
    "down_blocks.2.downsamplers": 14_746_880, "down_blocks.3.resnets": 62_277_120,
    "mid_block.resnets.0": 31_138_560, "mid_block.attentions.0": 35_416_320, "mid_block.resnets.1": 31_138_560,
    "up_blocks.0.resnets": 147_494_400, "up_blocks.0.upsamplers": 14_746_880,
    "up_blocks.1.upsamplers": 14_746_880, "up_blocks.2.upsamplers": 3_687_040,
    "conv_norm_out": 640, "conv_out": 11_524,
}
# The posts' table of the SD 2.1 text encoder (depth 3).
TEXT_BLOCKS = {
    "text_model.embeddings.token_embedding": 50_593_792, "text_model.embeddings.position_embedding": 78_848,
    "text_model.encoder.layers": 289_713_152, "text_model.final_layer_norm": 2_048,
}


@pytest.fixture(scope="module")
def sd21() -> dict:
    return inspect_model("sd21-v", size=512, depth=4)


@pytest.mark.parametrize("family", sorted(TOTALS))
def test_totals_equal_the_published_counts(family: str) -> None:
    tables = inspect_model(family, depth=1)
    assert list(tables) == list(COMPONENTS)
    for component, expected in TOTALS[family].items():
        assert tables[component].total_params == expected, (family, component)
        assert tables[component].row("").params == expected
        assert f"Total params: {expected:,}" in str(tables[component])


def test_sd21_per_block_counts_equal_the_posts_tables(sd21: dict) -> None:
    for component, blocks in (("vae", VAE_BLOCKS), ("unet", UNET_BLOCKS), ("text_encoder", TEXT_BLOCKS)):
        table = sd21[component]
        for name, count in blocks.items():
            assert table.row(name).params == count, (component, name)
    text = str(sd21["vae"])
    for count in ("591,360", "2,100,224", "8,394,752", "9,443,328"):  # the example, as printed
        assert count in text


def test_sd21_shapes_at_512(sd21: dict) -> None:
    vae, unet, text = sd21["vae"], sd21["unet"], sd21["text_encoder"]
    assert vae.row("").input_shape == (1, 3, 512, 512) and vae.row("").output_shape == (1, 3, 512, 512)
    assert vae.row("encoder").output_shape == (1, 8, 64, 64)  # mean and log-variance
    assert vae.row("post_quant_conv").input_shape == (1, 4, 64, 64)  # the latent
    assert vae.row("encoder.down_blocks.2").output_shape == (1, 512, 64, 64)
    assert vae.row("decoder.up_blocks.2").output_shape == (1, 256, 512, 512)
    assert unet.row("").output_shape == (1, 4, 64, 64)
    assert unet.row("time_proj").output_shape == (1, 320) and unet.row("time_embedding").output_shape == (1, 1280)
    assert [unet.row(f"down_blocks.{i}").output_shape for i in range(4)] == [
        (1, 320, 32, 32), (1, 640, 16, 16), (1, 1280, 8, 8), (1, 1280, 8, 8)]
    assert [unet.row(f"up_blocks.{i}").output_shape for i in range(4)] == [
        (1, 1280, 16, 16), (1, 1280, 32, 32), (1, 640, 64, 64), (1, 320, 64, 64)]
    assert text.row("").input_shape == (1, 77) and text.row("").output_shape == (1, 77, 1024)
    assert unet.row("down_blocks.0.resnets").input_shape is None  # a ModuleList never runs itself


def test_native_size_and_sd15_context() -> None:
    tables = inspect_model("sd15", depth=0)
    assert tables["text_encoder"].row("").output_shape == (1, 77, 768)
    assert tables["unet"].row("").input_shape == (1, 4, 64, 64)
    v = inspect_model("sd21-v", depth=0, components=["unet"])
    assert list(v) == ["unet"] and v["unet"].row("").input_shape == (1, 4, 96, 96)  # 768 px
    inpaint = inspect_model("sd15-inpaint", depth=0, components=["unet"])
    assert inpaint["unet"].row("").input_shape == (1, 9, 64, 64)
    assert inpaint["unet"].total_params == 859_520_964 + 5 * 320 * 9  # conv_in takes 5 more channels


def test_depth_limits_rows() -> None:
    tables = inspect_model("sd15", depth=2, components=["unet"])
    depths = {r.depth for r in tables["unet"].rows}
    assert depths == {0, 1, 2}
    assert not any(r.name.endswith("downsamplers") for r in tables["unet"].rows)  # depth 3


def test_summarize_any_module_and_empty_containers_hidden() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 2)))
            self.extra = nn.ModuleList()  # empty: hidden

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            return self.body(x), [x]

    table = summarize(Net(), (torch.zeros(4, 3),), depth=2)
    assert [r.name for r in table.rows] == ["", "body", "body.0", "body.1", "body.2"]
    assert table.row("").output_shape == (4, 2)  # the first tensor of a (x, list) result
    assert table.row("body.0").output_shape == (4, 5) and table.row("body.2").input_shape == (4, 5)
    assert table.total_params == 3 * 5 + 5 + 5 * 2 + 2 and table.param_bytes == 4 * table.total_params
    with pytest.raises(KeyError, match="no row 'nope'"):
        table.row("nope")


def test_loaded_checkpoint_is_described(tmp_path) -> None:
    """A path goes through ldm.load_pipeline; counts come from the loaded modules' twin and are checked."""
    from tests.synth import tiny_ldm_manifest, write_synthetic_checkpoint
    from tests.helpers import TINY_SD1

    path = write_synthetic_checkpoint(tiny_ldm_manifest(TINY_SD1), tmp_path / "tiny.safetensors")
    tables = inspect_model(path, family=TINY_SD1, size=64, depth=1)
    pipe = ldm.load_pipeline(path, family=TINY_SD1)
    for component in COMPONENTS:
        module = getattr(pipe, component)
        assert tables[component].total_params == sum(p.numel() for p in module.parameters())


def test_loaded_folder_without_family_is_described_from_its_parts() -> None:
    """The packaged shapes model is no family: the tables come from its parts' configs, titled with its folder's
    name, at its own native size (unet.sample_size 16 x the VAE's 4 = 64 px)."""
    from ldm.train import DEFAULT_MODEL_DIR

    tables = inspect_model(DEFAULT_MODEL_DIR, depth=0)
    pipe = ldm.load_pipeline(DEFAULT_MODEL_DIR)
    assert pipe.family is None
    for component in COMPONENTS:
        assert tables[component].title.startswith(f"shapes-model {component}:")
        assert tables[component].title.endswith("image 64x64")
        assert tables[component].total_params == sum(p.numel() for p in getattr(pipe, component).parameters())
    assert tables["unet"].rows[0].input_shape == (1, pipe.unet.config.in_channels, 16, 16)


@pytest.mark.parametrize("bad, match", [
    (dict(model="sd3"), "family name"), (dict(model="sd15", size=500), "multiple of 64"),
    (dict(model="sd15", components=["clip"]), "components"),
])
def test_bad_arguments(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        inspect_model(**bad)


def test_example_inputs_reject_unknown_component() -> None:
    with pytest.raises(ValueError, match="component must be one of"):
        example_inputs("safety_checker", ldm.SD15, 512)


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sd15", "--component", "vae", "--depth", "1", "--size", "256"]) == 0
    out = capsys.readouterr().out
    assert "sd15 vae: AutoencoderKL, image 256x256" in out and "Total params: 83,653,863" in out
    assert "[1, 8, 32, 32]" in out
    assert main(["no-such-model"]) == 2
    assert "ldm inspect: error: model must be a family name" in capsys.readouterr().err


def test_ldm_inspect_command(capsys):
    """`ldm inspect sd15` (the console command's own entry point) prints the published totals; errors exit 2."""
    from ldm.cli import main as ldm_main

    assert ldm_main(["inspect", "sd15", "--depth", "0"]) == 0
    out = capsys.readouterr().out
    for total in ("859,520,964", "123,060,480", "83,653,863"):
        assert total in out
    assert ldm_main(["inspect", "sd15", "--depth", "-1"]) == 2
    assert "--depth" in capsys.readouterr().err


def test_ldm_inspect_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from ldm.cli import main as ldm_main

    assert ldm_main(["inspect", "sd21-v", "--component", "text_encoder", "--depth", "3"]) == 0
    out = capsys.readouterr().out
    assert "text_model.encoder.layers (ModuleList)" in out and "289,713,152" in out
    assert "Total params: 340,387,840" in out
    assert ldm_main(["inspect", "sd15", "--size", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err


def test_default_depth_per_component_shows_the_posts_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --depth each table is as deep as the posts print it: the VAE at 4 (each encoder level's resnets),
    the text encoder and the UNet at 3; --depth N still sets one depth for all."""
    from ldm.cli import main as ldm_main
    from ldm.summary import DEFAULT_DEPTHS

    tables = inspect_model("sd21-v", size=512)
    for component, table in tables.items():
        assert table.depth == DEFAULT_DEPTHS[component] and max(r.depth for r in table.rows) == table.depth
    assert (DEFAULT_DEPTHS["vae"], DEFAULT_DEPTHS["unet"], DEFAULT_DEPTHS["text_encoder"]) == (4, 3, 3)
    assert [tables["vae"].row(f"encoder.down_blocks.{i}.resnets").params for i in range(4)] == [
        591_360, 2_100_224, 8_394_752, 9_443_328]
    assert tables["text_encoder"].row("text_model.encoder.layers").params == 289_713_152  # the posts' depth 3

    assert ldm_main(["inspect", "sd21-v", "--size", "512", "--component", "vae"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if ".resnets (ModuleList)" in line}
    assert [rows[f"encoder.down_blocks.{i}.resnets"] for i in range(4)] == [
        "591,360", "2,100,224", "8,394,752", "9,443,328"]
    assert ldm_main(["inspect", "sd21-v", "--size", "512", "--component", "vae", "--depth", "3"]) == 0
    assert "encoder.down_blocks.0.resnets" not in capsys.readouterr().out
