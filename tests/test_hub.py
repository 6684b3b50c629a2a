"""ldm/hub.py: where a model lives. Local paths resolve to themselves; hub ids go through huggingface_hub's cache
(offline here: HF_HUB_OFFLINE=1 is set by conftest.py), fetching only the files a pipeline needs. Loading a model
from an offline hub cache end to end is tested with the converter (tests/test_convert_load.py,
test_hub_id_from_an_offline_cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.hub import needed_patterns, resolve


def test_local_paths_resolve_to_themselves(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    assert resolve(f) == f and resolve(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("missing", ["./nothing.safetensors", "dir/model.safetensors", "/abs/none", "plain"])
def test_a_missing_local_path_is_not_taken_for_a_hub_id(missing: str) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve(missing)


def test_bad_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match="path_or_id must be a path or a hub id string"):
        resolve(42)  # type: ignore[arg-type]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="a hub path must name a weights file"):
        resolve("org/name/readme.md")
    with pytest.raises(FileNotFoundError, match="org/absent"):
        resolve("org/absent")  # offline, and the (empty) cache does not hold it


def test_hub_fetches_only_the_needed_files() -> None:
    """The allow_patterns given to snapshot_download, applied to a typical SD repo listing the way the hub does."""
    from huggingface_hub.utils import filter_repo_objects

    listing = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "README.md",
               "safety_checker/config.json", "safety_checker/model.safetensors",
               "feature_extractor/preprocessor_config.json",
               "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
               "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        listing += [f"{sub}/config.json", f"{sub}/{stem}.safetensors", f"{sub}/{stem}.bin",
                    f"{sub}/{stem}.fp16.safetensors", f"{sub}/{stem}.fp16.bin", f"{sub}/{stem}.non_ema.safetensors"]
    plain = set(filter_repo_objects(listing, allow_patterns=needed_patterns()))
    assert plain == {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                     "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
                     "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                     "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors"}
    fp16 = set(filter_repo_objects(listing, allow_patterns=needed_patterns("fp16")))
    assert {f for f in fp16 if "safetensors" in f} == {"unet/diffusion_pytorch_model.fp16.safetensors",
                                                       "vae/diffusion_pytorch_model.fp16.safetensors",
                                                       "text_encoder/model.fp16.safetensors"}
