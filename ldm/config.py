"""Frozen configs for every component, and the named presets of the Stable Diffusion families.

Each config is built either from a preset (`SD15.unet`) or from the reference's own `config.json` dict
(`UNetConfig.from_diffusers(d)`, `VAEConfig.from_diffusers(d)`, `CLIPTextConfig.from_transformers(d)`).
The `from_*` readers follow one rule: every key the reference class accepts is accepted, `_`-prefixed
bookkeeping keys are ignored, an unknown key is a `ValueError`, and a non-default value of a feature we do not
implement is a `ValueError` naming the key. Fields carry their true meaning; where the reference's name differs,
the comment says so. Derive variants with `dataclasses.replace`, never by mutation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# ----------------------------------------------------------------------------------------------------------------
# Reading reference config dicts


def _read(d: dict[str, Any], owner: str, accepted: set[str], fixed: dict[str, Any]) -> dict[str, Any]:
    """Check a reference config dict and return the keys we use.

    accepted: every key the reference class accepts. fixed: keys whose value must equal the given default because
    we implement only that (a non-default value is a feature we do not have).
    """
    if not isinstance(d, dict):
        raise ValueError(f"{owner}: a config must be a JSON object (a dict), got {type(d).__name__}")
    out = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue  # bookkeeping: _class_name, _diffusers_version, _name_or_path, ...
        if key not in accepted and key not in fixed:
            raise ValueError(f"{owner}: unknown config key {key!r}")
        if key in fixed:
            expected = fixed[key]
            if _normalise(value) != _normalise(expected):
                raise ValueError(
                    f"{owner}: config key {key!r} = {value!r} is not supported (only {expected!r} is implemented)"
                )
            continue
        out[key] = value
    return out


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The field types of the configs below -> (the check, what the message says). Tuples may arrive as JSON lists.
_TYPES = {
    "int": (_is_int, "an int"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "int | None": (lambda v: v is None or _is_int(v), "an int or null"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "tuple[int, ...]": (lambda v: isinstance(v, (tuple, list)) and all(map(_is_int, v)), "a list of ints"),
    "tuple[bool, ...]": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, bool) for x in v),
                         "a list of true/false"),
}


def _check_types(config: Any, owner: str, **also: str) -> None:
    """Every field of a config has its annotated type (a str where a float belongs is an error here, not a
    TypeError in the middle of a run). `also`: field -> another accepted type (num_heads may be one int)."""
    for f in fields(config):
        value = getattr(config, f.name)
        kind = str(f.type)  # a union such as "bool | tuple[bool, ...]" accepts each of its parts
        kinds = ([kind] if kind in _TYPES else kind.split(" | ")) + ([also[f.name]] if f.name in also else [])
        if not any(_TYPES[k][0](value) for k in kinds):
            raise ValueError(f"{owner}: {f.name} must be {' or '.join(_TYPES[k][1] for k in kinds)}, "
                             f"got {value!r:.80}")


def _lists(owner: str, kw: dict[str, Any], *names: str) -> None:
    """Keys whose value must be a JSON list, checked before anything takes their length."""
    for name in names:
        if name in kw and not isinstance(kw[name], (list, tuple)):
            raise ValueError(f"{owner}: {name} must be a list, got {kw[name]!r:.80}")


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


DIFFUSERS_VERSION = "0.42.1"  # the reference whose config.json layout the to_diffusers() methods write

# ----------------------------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per resolution level
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents are multiplied by this before the UNet sees them
    sample_size: int = 512  # the training image size; recorded, not used
    force_upcast: bool = True  # diffusers' hint that fp16 decoding may overflow: decode in fp32
    use_quant_conv: bool = True  # the 1x1 conv after the encoder (key `quant_conv`)
    use_post_quant_conv: bool = True  # the 1x1 conv before the decoder (key `post_quant_conv`)
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        owner = "VAEConfig"
        _check_types(self, owner)
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.scaling_factor > 0:
            raise ValueError(f"{owner}: scaling_factor must be > 0, got {self.scaling_factor!r}")
        _positive(owner, in_channels=self.in_channels, out_channels=self.out_channels,
                  latent_channels=self.latent_channels, layers_per_block=self.layers_per_block,
                  norm_num_groups=self.norm_num_groups)
        if not self.block_out_channels:
            raise ValueError(f"{owner}: block_out_channels must not be empty")
        for width in self.block_out_channels:
            _positive(owner, block_out_channels=width)
            if width % self.norm_num_groups:
                raise ValueError(
                    f"{owner}: block_out_channels entry {width} is not divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "VAEConfig":
        owner = "VAEConfig"
        accepted = {f for f in cls.__dataclass_fields__} | {"down_block_types", "up_block_types"}
        fixed = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}
        kw = _read(d, owner, accepted, fixed)
        _lists(owner, kw, "block_out_channels", "down_block_types", "up_block_types")
        n = len(kw.get("block_out_channels", (64,)))  # diffusers' default is one level of 64
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(kw.pop(key, (block,)))
            if types != (block,) * n:
                raise ValueError(f"{owner}: config key {key!r} = {list(types)} is not supported "
                                 f"(only {n} x {block!r}, one per block_out_channels entry)")
        defaults = {"block_out_channels": (64,), "layers_per_block": 1, "sample_size": 32}  # diffusers' defaults
        return cls(**{**defaults, **{k: _normalise(v) for k, v in kw.items()}})

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers AutoencoderKL config.json for this config (from_diffusers' inverse)."""
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **asdict(self),
                "block_out_channels": list(self.block_out_channels), "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder: transformers CLIPTextModel

# Keys every transformers PretrainedConfig accepts (and old config.json files carry); they mean nothing here.
_PRETRAINED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "initializer_range", "initializer_factor", "tie_word_embeddings", "use_cache", "name_or_path",
    "is_decoder", "add_cross_attention", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "num_labels", "torchscript", "pruned_heads", "cross_attention_hidden_size",
    "tf_legacy_loss", "use_bfloat16", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "gradient_checkpointing",
}


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768  # D, the width of every token's hidden state
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # S, the context length
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD 1) or "gelu" (OpenCLIP, SD 2)
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # output width of CLIPTextModelWithProjection's text_projection (CLIPTextModel: unused)
    pad_token_id: int = 1  # recorded; padding is the tokenizer's business
    bos_token_id: int = 0
    # The pooled output is taken at the EOS token. transformers keeps a legacy rule: eos_token_id == 2 (as in the
    # official SD configs) means "the position of the highest id", which is EOS (49407) in the CLIP vocabulary.
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        owner = "CLIPTextConfig"
        _check_types(self, owner)
        if not self.layer_norm_eps > 0:
            raise ValueError(f"{owner}: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        _positive(owner, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                  num_attention_heads=self.num_attention_heads, max_position_embeddings=self.max_position_embeddings)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{owner}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"{owner}: hidden_act {self.hidden_act!r} is not supported (use 'quick_gelu' or 'gelu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> "CLIPTextConfig":
        accepted = set(cls.__dataclass_fields__) | _PRETRAINED_KEYS
        # dropout is training-only; a non-zero value would change nothing at inference but is not implemented.
        fixed = {"attention_dropout": 0.0, "dropout": 0.0}
        kw = _read(d, "CLIPTextConfig", accepted, fixed)
        defaults = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                    "projection_dim": 512, "bos_token_id": 49406, "eos_token_id": 49407}  # transformers' defaults
        kw = {**defaults, **kw}
        return cls(**{k: v for k, v in kw.items() if k in cls.__dataclass_fields__})

    def to_transformers(self, torch_dtype: str = "float32", architecture: str = "CLIPTextModel") -> dict[str, Any]:
        """The transformers config.json for this config (from_transformers' inverse); architecture: CLIPTextModel
        or CLIPTextModelWithProjection (SDXL's text_encoder_2)."""
        return {"architectures": [architecture], "model_type": "clip_text_model", **asdict(self),
                "attention_dropout": 0.0, "dropout": 0.0, "torch_dtype": torch_dtype}


# ----------------------------------------------------------------------------------------------------------------
# UNet: diffusers UNet2DConditionModel

_UNET_FIXED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 4 latents, or 9 for inpainting (latents + mask + masked-image latents)
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Which levels carry spatial transformers (diffusers: CrossAttnDownBlock2D vs DownBlock2D; the up path mirrors).
    cross_attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2  # ResNet blocks per down level (the up path has one more)
    # Attention heads per level, as a count. diffusers calls this `attention_head_dim` (a historical misnomer it
    # keeps for compatibility); SD 2 thinks in a head width of 64, which gives 5/10/20/20 heads.
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768  # width of the text context (D_text)
    use_linear_projection: bool = False  # proj_in / proj_out as Linear (SD 2) instead of 1x1 Conv (SD 1)
    upcast_attention: bool = False  # compute attention scores in fp32 (needed by SD 2.1-768 in fp16)
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0  # in the ResNet blocks, training only
    sample_size: int | None = 64  # latent size the model was trained at; recorded, not used
    # Class conditioning (the x4 upscaler: its noise level 0..999): an nn.Embedding of this many classes whose
    # vector is added to the time embedding (diffusers key `class_embedding`); None: no class input.
    num_class_embeds: int | None = None
    # Per level: the first attention of each transformer block (attn1) attends to the text context too, instead of
    # to the pixels (the x4 upscaler: (True, True, True, False)); a bool means every level. The mid block always
    # keeps self-attention (diffusers' UNetMidBlock2DCrossAttn has no such switch).
    only_cross_attention: bool | tuple[bool, ...] = False
    # Transformer blocks stacked in each spatial transformer, per level (SDXL base: 1/2/10), or one int for every
    # level (kept an int, also when given as equal entries, so a variant with another number of levels derives by
    # dataclasses.replace). `transformer_depths` reads it per level. The mid block takes the last level's depth,
    # the up path mirrors the down path.
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # SDXL's micro-conditioning (diffusers' addition_embed_type "text_time"): the pooled text embedding and the
    # sinusoids of the size/crop (and aesthetic score) `time_ids`, each of addition_time_embed_dim, concatenated to
    # projection_class_embeddings_input_dim values (base 1280 + 6 x 256 = 2816) and mapped by an MLP that is added to
    # the time embedding (keys `add_time_proj` (no weights), `add_embedding`). None: no added conditioning.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        owner = "UNetConfig"
        _check_types(self, owner, num_heads="int")
        if not self.norm_eps > 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"{owner}: norm_eps must be > 0 and dropout in [0, 1), got {self.norm_eps!r} and "
                             f"{self.dropout!r}")
        levels = len(self.block_out_channels)
        heads = self.num_heads
        heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
        object.__setattr__(self, "num_heads", heads)
        depth = self.transformer_layers_per_block
        if not isinstance(depth, int):
            depth = tuple(depth)
            if len(depth) != levels:
                raise ValueError(f"{owner}: transformer_layers_per_block has {len(depth)} entries, block_out_channels "
                                 f"has {levels}")
            depth = depth[0] if len(set(depth)) == 1 else depth  # one depth everywhere: an int
        object.__setattr__(self, "transformer_layers_per_block", depth)
        self._check_addition(owner)
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "cross_attention_levels", tuple(bool(x) for x in self.cross_attention_levels))
        only = self.only_cross_attention
        only = (only,) * levels if isinstance(only, bool) else tuple(only)
        object.__setattr__(self, "only_cross_attention", only)
        if not all(isinstance(x, bool) for x in only):
            raise ValueError(f"{owner}: only_cross_attention must hold bools, got {only!r}")
        if self.num_class_embeds is not None:
            _positive(owner, num_class_embeds=self.num_class_embeds)
        _positive(owner, in_channels=self.in_channels, out_channels=self.out_channels,
                  layers_per_block=self.layers_per_block, cross_attention_dim=self.cross_attention_dim,
                  norm_num_groups=self.norm_num_groups)
        if levels == 0:
            raise ValueError(f"{owner}: block_out_channels must not be empty")
        for name in ("cross_attention_levels", "num_heads", "only_cross_attention"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{owner}: {name} has {len(getattr(self, name))} entries, block_out_channels has "
                                 f"{levels}")
        for width, nh in zip(self.block_out_channels, heads):
            _positive(owner, block_out_channels=width, num_heads=nh)
            if width % self.norm_num_groups:
                raise ValueError(f"{owner}: block_out_channels entry {width} is not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")
            if width % nh:
                raise ValueError(f"{owner}: block_out_channels entry {width} is not divisible by its num_heads {nh}")
        for d in self.transformer_depths:
            _positive(owner, transformer_layers_per_block=d)

    @property
    def transformer_depths(self) -> tuple[int, ...]:
        """Transformer blocks per spatial transformer at each level (transformer_layers_per_block, per level)."""
        depth = self.transformer_layers_per_block
        return (depth,) * len(self.block_out_channels) if isinstance(depth, int) else depth

    def _check_addition(self, owner: str) -> None:
        """addition_embed_type None or "text_time"; its two widths exactly when it is "text_time"."""
        dims = {"addition_time_embed_dim": self.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim}
        if self.addition_embed_type is None:
            for name, value in dims.items():
                if value is not None:
                    raise ValueError(f"{owner}: {name} = {value!r} is only used with addition_embed_type "
                                     f"'text_time' (addition_embed_type is None)")
            return
        if self.addition_embed_type != "text_time":
            raise ValueError(f"{owner}: addition_embed_type {self.addition_embed_type!r} is not supported (only "
                             f"None or 'text_time', SDXL's micro-conditioning)")
        _positive(owner, **dims)

    @classmethod
    def with_head_dim(cls, head_dim: int, **kw: Any) -> "UNetConfig":
        """Build with a head width instead of a head count per level (SD 2: head_dim=64 gives 5/10/20/20)."""
        widths = tuple(kw.get("block_out_channels", cls.block_out_channels))
        for width in widths:
            if width % head_dim:
                raise ValueError(f"UNetConfig: block_out_channels entry {width} is not divisible by head_dim {head_dim}")
        return cls(num_heads=tuple(w // head_dim for w in widths), **kw)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "UNetConfig":
        owner = "UNetConfig"
        accepted = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                    "use_linear_projection", "upcast_attention", "flip_sin_to_cos", "freq_shift", "norm_num_groups",
                    "norm_eps", "dropout", "sample_size", "down_block_types", "up_block_types",
                    "attention_head_dim", "num_attention_heads", "num_class_embeds", "only_cross_attention",
                    "mid_block_only_cross_attention", "transformer_layers_per_block", "addition_embed_type",
                    "addition_time_embed_dim", "projection_class_embeddings_input_dim"}
        kw = _read(d, owner, accepted, _UNET_FIXED)
        _lists(owner, kw, "block_out_channels", "down_block_types", "up_block_types")
        # Read by diffusers' UNetMidBlock2DCrossAttn never (only the "simple" mid block takes it): no effect here.
        kw.pop("mid_block_only_cross_attention", None)
        # diffusers' defaults where they differ from ours
        widths = tuple(kw.pop("block_out_channels", (320, 640, 1280, 1280)))
        kw.setdefault("cross_attention_dim", 1280)
        kw.setdefault("sample_size", None)
        down = tuple(kw.pop("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        up = tuple(kw.pop("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        names = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
        if any(t not in names for t in down) or len(down) != len(widths):
            raise ValueError(f"{owner}: config key 'down_block_types' = {list(down)} is not supported (one of "
                             f"CrossAttnDownBlock2D / DownBlock2D per block_out_channels entry)")
        levels = tuple(names[t] for t in down)
        mirrored = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(levels))
        if up != mirrored:
            raise ValueError(f"{owner}: config key 'up_block_types' = {list(up)} is not supported (the up path must "
                             f"mirror the down path: {list(mirrored)})")
        # diffusers: `num_attention_heads or attention_head_dim` is the head count (the misnomer kept for compat).
        heads = kw.pop("num_attention_heads", None)
        head_key = kw.pop("attention_head_dim", 8)
        heads = head_key if heads is None else heads
        return cls(block_out_channels=widths, cross_attention_levels=levels, num_heads=_normalise(heads),
                   **{k: _normalise(v) for k, v in kw.items()})

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers UNet2DConditionModel config.json (from_diffusers' inverse; heads go to the misnamed
        `attention_head_dim`)."""
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention_levels]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.cross_attention_levels)]
        d = {k: v for k, v in asdict(self).items() if k not in ("num_heads", "cross_attention_levels")}
        only = self.only_cross_attention
        return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, **d,
                "only_cross_attention": only[0] if len(set(only)) == 1 else list(only),
                "transformer_layers_per_block": self.transformer_layers_per_block if isinstance(
                    self.transformer_layers_per_block, int) else list(self.transformer_layers_per_block),
                "block_out_channels": list(self.block_out_channels), "down_block_types": down, "up_block_types": up,
                "attention_head_dim": list(self.num_heads), "act_fn": "silu", "center_input_sample": False,
                "downsample_padding": 1, "mid_block_scale_factor": 1}


# ----------------------------------------------------------------------------------------------------------------
# The model families

# The noise schedule all SD 1.x / 2.x checkpoints were trained with (diffusers scheduler_config.json keys).
_SCHEDULE = (("num_train_timesteps", 1000), ("beta_start", 0.00085), ("beta_end", 0.012),
             ("beta_schedule", "scaled_linear"), ("trained_betas", None), ("steps_offset", 1),
             ("set_alpha_to_one", False), ("clip_sample", False))


@dataclass(frozen=True)
class FamilyPreset:
    name: str  # "sd15", "sd21-base", "sd21-v", "sd15-inpaint", "sd2-inpaint", "x4-upscaler", "sdxl-base", ...
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig | None  # the (first) text encoder; None for the SDXL refiner, which has only the second
    prediction_type: str  # "epsilon" or "v_prediction"
    scheduler_class: str  # the diffusers class name of the family's default scheduler
    pad_token: str  # the (first) tokenizer's padding token: "<|endoftext|>" (SD 1) or "!" (SD 2)
    native_size: int  # default image height and width in pixels
    scheduler_overrides: tuple[tuple[str, Any], ...] = field(default=(), repr=False)  # keys beyond _SCHEDULE
    # SDXL's second text encoder (OpenCLIP bigG, a CLIPTextModelWithProjection; diffusers' `text_encoder_2`) and its
    # tokenizer's padding token ("!"); None for the single-encoder families.
    text_encoder_2: CLIPTextConfig | None = None
    pad_token_2: str | None = None

    @property
    def scheduler(self) -> dict[str, Any]:
        """The family's default scheduler_config.json as a fresh dict (diffusers-style keys)."""
        return {"_class_name": self.scheduler_class, **dict(_SCHEDULE), "prediction_type": self.prediction_type,
                **dict(self.scheduler_overrides)}


_VAE = VAEConfig()
_CLIP_L = CLIPTextConfig()  # OpenAI CLIP ViT-L/14 text tower
_OPENCLIP_H = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, hidden_act="gelu",
                             num_hidden_layers=23,  # OpenCLIP has 24; SD 2 reads the penultimate, diffusers keeps 23
                             projection_dim=512)
_UNET_SD1 = UNetConfig()
_UNET_SD2 = replace(UNetConfig.with_head_dim(64), cross_attention_dim=1024, use_linear_projection=True)

SD15 = FamilyPreset("sd15", _UNET_SD1, _VAE, _CLIP_L, "epsilon", "PNDMScheduler", "<|endoftext|>", 512,
                    (("skip_prk_steps", True),))
SD21_BASE = FamilyPreset("sd21-base", _UNET_SD2, _VAE, _OPENCLIP_H, "epsilon", "PNDMScheduler", "!", 512,
                         (("skip_prk_steps", True),))
SD21_V = FamilyPreset("sd21-v", replace(_UNET_SD2, upcast_attention=True, sample_size=96), replace(_VAE, sample_size=768),
                      _OPENCLIP_H, "v_prediction", "DDIMScheduler", "!", 768)
SD15_INPAINT = replace(SD15, name="sd15-inpaint", unet=replace(_UNET_SD1, in_channels=9))
SD2_INPAINT = replace(SD21_BASE, name="sd2-inpaint", unet=replace(_UNET_SD2, in_channels=9))

# The SD x4 upscaler (stabilityai/stable-diffusion-x4-upscaler): its UNet sees 7 channels (4 noisy latents + the
# noise-augmented low-resolution RGB image), is told the augmentation level through 1000 class embeddings, has no
# attention at its first (highest resolution) level and only cross-attention at the next three; its VAE has three
# levels (f = 4, so a 128x128 input gives 128x128 latents and a 512x512 output). v-prediction, DDIM, trained with
# the linear-in-sqrt schedule from 0.0001 to 0.02. The low-resolution image's own noise schedule and maximum level
# (350) belong to the pipeline (ldm/upscale.py).
_UNET_X4 = UNetConfig(in_channels=7, block_out_channels=(256, 512, 512, 1024),
                      cross_attention_levels=(False, True, True, True), num_heads=8, cross_attention_dim=1024,
                      use_linear_projection=True, num_class_embeds=1000, only_cross_attention=(True, True, True, False),
                      sample_size=128)
_VAE_X4 = VAEConfig(block_out_channels=(128, 256, 512), scaling_factor=0.08333, sample_size=512)
X4_UPSCALER = FamilyPreset("x4-upscaler", _UNET_X4, _VAE_X4, _OPENCLIP_H, "v_prediction", "DDIMScheduler", "!", 512,
                           (("beta_start", 0.0001), ("beta_end", 0.02), ("skip_prk_steps", True)))

# SDXL 1.0 (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0): the base UNet has three levels, no
# attention at the first, 1/2/10 transformer blocks per level, a context of CLIP-L's and OpenCLIP-bigG's penultimate
# hidden states side by side (768 + 1280 = 2048) and micro-conditioning on bigG's projected pooled output (1280) and
# six size/crop numbers (1280 + 6 x 256 = 2816). The refiner: four levels 384..1536, attention in the middle two,
# 4 blocks each, bigG alone (1280), and five numbers (sizes and an aesthetic score: 1280 + 5 x 256 = 2560). Both
# share the VAE, whose latents are scaled by 0.13025 and whose fp16 decoder overflows (force_upcast), and diffusers'
# Euler default with "leading" timestep spacing.
_OPENCLIP_BIGG = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                num_hidden_layers=32, hidden_act="gelu", projection_dim=1280)
_VAE_XL = VAEConfig(scaling_factor=0.13025, sample_size=1024, force_upcast=True)
_XL_SCHEDULE = (("skip_prk_steps", True), ("timestep_spacing", "leading"), ("interpolation_type", "linear"),
                ("use_karras_sigmas", False), ("sample_max_value", 1.0))
_UNET_XL = UNetConfig(block_out_channels=(320, 640, 1280), cross_attention_levels=(False, True, True),
                      num_heads=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816, sample_size=128)
_UNET_XL_REFINER = UNetConfig(block_out_channels=(384, 768, 1536, 1536), cross_attention_levels=(False, True, True,
                              False), num_heads=(6, 12, 24, 24), transformer_layers_per_block=4,
                              cross_attention_dim=1280, use_linear_projection=True, addition_embed_type="text_time",
                              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560, sample_size=128)
SDXL_BASE = FamilyPreset("sdxl-base", _UNET_XL, _VAE_XL, _CLIP_L, "epsilon", "EulerDiscreteScheduler",
                         "<|endoftext|>", 1024, _XL_SCHEDULE, text_encoder_2=_OPENCLIP_BIGG, pad_token_2="!")
SDXL_REFINER = FamilyPreset("sdxl-refiner", _UNET_XL_REFINER, _VAE_XL, None, "epsilon", "EulerDiscreteScheduler",
                            "!", 1024, _XL_SCHEDULE, text_encoder_2=_OPENCLIP_BIGG, pad_token_2="!")

FAMILIES: dict[str, FamilyPreset] = {p.name: p for p in (SD15, SD21_BASE, SD21_V, SD15_INPAINT, SD2_INPAINT,
                                                         X4_UPSCALER, SDXL_BASE, SDXL_REFINER)}


def family(name: str) -> FamilyPreset:
    """The preset for a family name, or a ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: family must be one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
