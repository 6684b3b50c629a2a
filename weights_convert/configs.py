"""A diffusers folder's JSON files, read strictly, and its configs checked against its weights before any model
is built.

    read_json(path)                          -> dict, or CheckpointError naming the file (missing, not JSON, not an
                                                object, nested too deeply)
    read_config(path, UNetConfig.from_diffusers) -> the config, or CheckpointError naming the file and the key
    check_counts(component, config, source, where) -> CheckpointError where the config's levels, layers or main
                                                sizes differ from what the weights hold

Why before building: a config asking for 10^9 layers or 10^10 channels would otherwise make the process build
(or allocate) a model the size of the request before any shape check could say no (issue #23).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weights_convert.convert import Source
from weights_convert.safetensors_file import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a diffusers folder needs it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a config (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON object expected, got a {type(data).__name__}")
    return data


def read_config(path: Path, reader: Callable[[dict[str, Any]], Any]) -> Any:
    """A component config from its config.json; a bad value raises CheckpointError naming the file."""
    try:
        return reader(read_json(path))
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}") from None


# Where a config's counts show in the weights' keys: component -> [(field, key pattern whose group is an index)].
# Checked before a model is built, so that a config asking for 10^9 layers is refused at once.
_COUNTED = {
    "unet": [("block_out_channels", r"down_blocks\.(\d+)\."),
             ("layers_per_block", r"down_blocks\.0\.resnets\.(\d+)\.")],
    "vae": [("block_out_channels", r"encoder\.down_blocks\.(\d+)\."),
            ("layers_per_block", r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")],
    "text_encoder": [("num_hidden_layers", r"encoder\.layers\.(\d+)\.")],
}
_COUNTED["text_encoder_2"] = _COUNTED["text_encoder"]  # SDXL's bigG: the same keys, plus text_projection


# Where a config's sizes show in the weights' shapes: component -> [(field, entry or None, key, dim)].
_SIZED = {
    "unet": [("in_channels", None, "conv_in.weight", 1), ("block_out_channels", 0, "conv_in.weight", 0),
             ("out_channels", None, "conv_out.weight", 0),
             ("block_out_channels", -1, "mid_block.resnets.0.conv1.weight", 0)],
    "vae": [("in_channels", None, "encoder.conv_in.weight", 1),
            ("block_out_channels", 0, "encoder.conv_in.weight", 0),
            ("latent_channels", None, "decoder.conv_in.weight", 1),
            ("block_out_channels", -1, "decoder.conv_in.weight", 0),
            ("out_channels", None, "decoder.conv_out.weight", 0)],
    "text_encoder": [("vocab_size", None, "embeddings.token_embedding.weight", 0),
                     ("hidden_size", None, "embeddings.token_embedding.weight", 1),
                     ("max_position_embeddings", None, "embeddings.position_embedding.weight", 0),
                     ("intermediate_size", None, "encoder.layers.0.mlp.fc1.weight", 0)],
}
_SIZED["text_encoder_2"] = _SIZED["text_encoder"] + [("projection_dim", None, "text_projection.weight", 0)]


def check_counts(component: str, config: Any, source: Source, where: Path) -> None:
    """The level and layer counts and the main sizes of `config` against the keys and shapes of its weights
    (CheckpointError naming the field if they differ), before any model is built.

    Every other size is then checked by `verify` against a model built on the meta device, before any memory is
    allocated for it."""
    keys = source.keys()
    text = component in ("text_encoder", "text_encoder_2")
    prefix = "text_model." if text and any(k.startswith("text_model.") for k in keys) else ""
    for name, entry, key, dim in _SIZED[component]:
        value = getattr(config, name) if entry is None else getattr(config, name)[entry]
        # (the projection head, text_projection, sits beside text_model in every layout)
        full = key if key.startswith("text_projection") else prefix + key
        shape = source.shape(full) if full in keys else None
        if shape is not None and (len(shape) <= dim or shape[dim] != value):
            raise CheckpointError(f"{source.path}: shape mismatch for {full!r} -> {component} "
                                  f"{full!r}: the file has {list(shape)}, the config {where} says {name} = "
                                  f"{getattr(config, name)!r:.80}")
    for name, pattern in _COUNTED[component]:
        value = getattr(config, name)
        wanted = len(value) if isinstance(value, tuple) else value
        found = {int(m.group(1)) for k in keys if (m := re.match(rf"(?:text_model\.)?{pattern}", k))}
        if wanted != len(found):
            raise CheckpointError(f"{where}: config {name} = {value!r:.80} means {wanted:,} "
                                  f"{'levels' if isinstance(value, tuple) else 'layers'}, the weights "
                                  f"{source.path} hold {len(found)}")
