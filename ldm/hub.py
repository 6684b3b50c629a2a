"""Where a model lives: a local file, a local diffusers folder, or a Hugging Face hub id in huggingface_hub's cache.

    resolve("v1-5-pruned-emaonly.safetensors")          -> that file
    resolve("./stable-diffusion-v1-5")                  -> that folder
    resolve("stable-diffusion-v1-5/stable-diffusion-v1-5")  -> the cached snapshot folder (fetched if allowed)
    resolve("org/name/v1-5-pruned-emaonly.safetensors") -> one file of a hub repo

Only the files a pipeline needs are fetched (`needed_patterns`): the component configs, the tokenizer, and one set
of weights, safetensors only, the `variant` ones ("fp16") when asked for; a repo that holds only variant weights
is retried with them. `HF_HUB_OFFLINE=1` is honoured (nothing leaves the machine; the cache must hold the files),
and `HF_HUB_CACHE` is read at call time. Resolution only: reading the weights is weights_convert's job.
"""

from __future__ import annotations

import os
from pathlib import Path

# The one list of weight-file names: a diffusers folder's component (= subfolder) -> its weights file stem, and the
# suffixes of single-file checkpoints (weights_convert reads and writes these; the CLI tells files from hub ids).
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}  # text_encoder_2: SDXL's second encoder (the refiner's only one)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def needed_patterns(variant: str | None = None) -> list[str]:
    """allow_patterns for snapshot_download: configs, tokenizer, and the safetensors weights of one variant."""
    mid = f".{variant}" if variant else ""
    patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
                "low_res_scheduler/scheduler_config.json"]  # the x4 upscaler's image-noising schedule
    for sub, stem in WEIGHT_FILES.items():
        patterns += [f"{sub}/config.json", f"{sub}/{stem}{mid}.safetensors",
                     f"{sub}/{stem}.safetensors.index{mid}.json", f"{sub}/{stem}{mid}.safetensors.index.json",
                     f"{sub}/{stem}-*-of-*{mid}.safetensors"]
    return patterns


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _has_weights(folder: Path, variant: str | None) -> bool:
    """Weights for every component the snapshot has a config for (an SD repo has no text_encoder_2/, the SDXL
    refiner's no text_encoder/)."""
    mid = f".{variant}" if variant else ""
    subs = [(sub, stem) for sub, stem in WEIGHT_FILES.items() if (folder / sub / "config.json").is_file()]
    return bool(subs) and all(any((folder / sub).glob(f"{stem}*{mid}.safetensors")) for sub, stem in subs)


def resolve(path_or_id: str | os.PathLike, *, variant: str | None = None, cache_dir: str | os.PathLike | None = None,
            revision: str | None = None) -> Path:
    """A local path for `path_or_id`: the path itself when it exists, else the hub cache's copy of the repo."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"path_or_id must be a path or a hub id string, got {type(path_or_id).__name__}")
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    parts = text.split("/")
    looks_like_id = len(parts) >= 2 and all(parts) and not text.startswith((".", "/", "~")) and "\\" not in text
    if len(parts) == 2 and text.endswith(SINGLE_FILE_SUFFIXES):
        looks_like_id = False  # "dir/model.safetensors": a local path, not a repo
    if not looks_like_id:
        raise FileNotFoundError(f"{text}: no such file or folder (and not a hub id of the form 'org/name')")
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    repo_id = "/".join(parts[:2])
    offline = _offline()
    try:
        if len(parts) > 2:  # a single file inside a repo
            filename = "/".join(parts[2:])
            if not filename.endswith(SINGLE_FILE_SUFFIXES):
                raise FileNotFoundError(f"{text}: a hub path must name a weights file "
                                        f"({', '.join(SINGLE_FILE_SUFFIXES)})")
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, revision=revision,
                                                        local_files_only=offline))
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=needed_patterns(variant),
                                                        cache_dir=cache_dir, revision=revision,
                                                        local_files_only=offline))
        if variant is None and not _has_weights(folder, None):  # a repo with only variant weights (fp16)
            folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=needed_patterns("fp16"),
                                                            cache_dir=cache_dir, revision=revision,
                                                            local_files_only=offline))
        return folder
    except LocalEntryNotFoundError as e:
        where = "HF_HUB_OFFLINE=1 is set and " if offline else ""
        raise FileNotFoundError(f"{text}: not a local path, and {where}the hub cache "
                                f"({cache_dir or 'default'}) does not hold it: {e}") from None
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise FileNotFoundError(f"{text}: not a local path, and not found on the hub: {e}") from None
