"""The CLIP text encoder of Stable Diffusion: token ids (B, S) -> one hidden state per token (B, S, D).

Paper: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), the
text tower is a GPT-2-style pre-LN transformer with a causal mask (Radford et al. 2019).
Reference: transformers `models/clip/modeling_clip.py` (CLIPTextEmbeddings, CLIPAttention, CLIPMLP,
CLIPEncoderLayer, CLIPEncoder, CLIPTextModel), transformers 5.23.0.

Two towers share this code, chosen by `CLIPTextConfig`:
- SD 1.x: OpenAI CLIP ViT-L/14, 12 layers, D = 768, quick_gelu (`ldm.SD15.text`).
- SD 2.x: OpenCLIP ViT-H/14 text as diffusers ships it, 23 of its 24 layers, D = 1024, gelu (`ldm.SD21_V.text`).
- SDXL's second encoder: OpenCLIP ViT-bigG/14 text, 32 layers, D = 1280, gelu, with the projection head
  (`CLIPTextModelWithProjection`, `ldm.SDXL_BASE.text_encoder_2`): its pooled output through `text_projection`
  is the `text_embeds` SDXL's UNet is conditioned on.

The UNet reads `last_hidden_state` (after `final_layer_norm`). `hidden_states` holds the input of every layer and
the output of the last one (before the final norm), so clip_skip is `final_layer_norm(hidden_states[-1 - k])`.

State-dict keys are those of the official `text_encoder/model.safetensors` (transformers 4.x layout, prefix
`text_model.`). transformers 5.x drops that prefix and old files carry a `position_ids` buffer: both load, see
`CLIPTextModel._accept_layouts`.

Shapes: B batch, S tokens (<= max_position_embeddings = 77), D width (hidden_size), nh heads, hd head width (D / nh),
F MLP width (intermediate_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.attention import AttentionLayer
from ldm.config import CLIPTextConfig

# The prefix of the official checkpoints (transformers 4.x); transformers 5.x's CLIPTextModel has none.
PREFIX = "text_model."
_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")  # the roots of the unprefixed layout


@dataclass
class CLIPTextOutput:
    last_hidden_state: Tensor  # (B, S, D), after final_layer_norm: what the UNet attends to
    pooler_output: Tensor  # (B, D), last_hidden_state at the EOS token
    hidden_states: tuple[Tensor, ...]  # num_hidden_layers + 1 tensors (B, S, D): embeddings, then each layer
    text_embeds: Tensor | None = None  # (B, projection_dim): text_projection(pooler_output); WithProjection only


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # transformers keeps a `position_ids` buffer (arange); positions are always 0..S-1, so we slice the table.

    def forward(self, input_ids: Tensor, inputs_embeds: Tensor | None = None) -> Tensor:
        """(B, S) int -> (B, S, D). inputs_embeds (B, S, D): token embeddings to use instead of the table's
        (transformers' name; textual inversion splices its vectors there, ldm/embeddings.py)."""
        S = input_ids.shape[1]
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, D)
        return tokens + self.position_embedding.weight[:S]  # (B, S, D)


class CLIPAttention(AttentionLayer):
    """Multi-head self-attention; the kernel (and any research processor) runs through `self.attend`."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, S, D), mask bool (S, S) or (B, 1, S, S), True = attend -> (B, S, D)."""
        B, S, D = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        v = self.v_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        out = self.attend(q, k, v, mask)  # (B, nh, S, hd), scale 1/sqrt(hd) as in CLIP
        return self.out_proj(out.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        # transformers' "gelu" is the exact (erf) GELU; "quick_gelu" is OpenAI's approximation.
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, S, D) -> (B, S, F) -> (B, S, D)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))  # (B, S, D)


class CLIPEncoder(nn.Module):
    """The stack of layers (key `encoder.layers.i`); CLIPTextModel.forward runs it and keeps each layer's output."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """The modules under the `text_model.` prefix; the forward pass lives in `CLIPTextModel.forward`."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text transformer: `model(input_ids)` -> `CLIPTextOutput`; keys as transformers' CLIPTextModel."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        if not isinstance(cfg, CLIPTextConfig):
            raise TypeError(f"CLIPTextModel: cfg must be a CLIPTextConfig, got {type(cfg).__name__}")
        self.config = cfg  # transformers' name
        self.text_model = CLIPTextTransformer(cfg)
        self.register_load_state_dict_pre_hook(_accept_layouts)

    @property
    def final_layer_norm(self) -> nn.LayerNorm:
        """The last norm, for clip_skip: `final_layer_norm(out.hidden_states[-1 - k])`."""
        return self.text_model.final_layer_norm

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> CLIPTextOutput:
        """input_ids (B, S) integer token ids -> CLIPTextOutput.

        attention_mask: optional (B, S) padding mask, 1 = real token, 0 = padding (as in transformers). Stable
        Diffusion passes none: padding tokens attend causally like any other token.
        inputs_embeds: optional (B, S, D) token embeddings used instead of looking input_ids up (textual
        inversion); input_ids still give the shape and the EOS position of the pooled output.
        """
        self._check_ids(input_ids)
        if inputs_embeds is not None and inputs_embeds.shape != (*input_ids.shape, self.config.hidden_size):
            raise ValueError(f"CLIPTextModel: inputs_embeds must have shape {(*input_ids.shape, self.config.hidden_size)}"
                             f", got {tuple(inputs_embeds.shape)}")
        B, S = input_ids.shape
        # The causal mask: token i sees tokens 0..i only (the tower was trained as a left-to-right model).
        mask = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()  # (S, S), True = attend
        if attention_mask is not None:
            self._check_mask(attention_mask, input_ids)
            mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, S, S): padded keys are hidden

        x = self.text_model.embeddings(input_ids, inputs_embeds)  # (B, S, D)
        hidden_states = [x]
        for layer in self.text_model.encoder.layers:
            x = layer(x, mask)  # (B, S, D)
            hidden_states.append(x)
        last = self.text_model.final_layer_norm(x)  # (B, S, D)
        return CLIPTextOutput(last, last[torch.arange(B, device=last.device), self.eos_positions(input_ids)],
                              tuple(hidden_states))

    def eos_positions(self, input_ids: Tensor) -> Tensor:
        """(B, S) -> (B,) index of the EOS token per row, with transformers' exact rule.

        eos_token_id == 2 (the official SD configs, written before transformers PR #24773): the position of the
        highest id, which is EOS = 49407 in the CLIP vocabulary. Otherwise: the first position equal to eos_token_id
        (position 0 when a row has none, as transformers' argmax gives).
        """
        ids = input_ids.to(torch.int)  # transformers casts to int32 before argmax (ONNX); ties resolve the same
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)

    def _check_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"CLIPTextModel: input_ids must be a torch.Tensor of token ids, got "
                            f"{type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"CLIPTextModel: input_ids must have an integer dtype (torch.long), got {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextModel: input_ids must be 2-D (batch, tokens), got shape "
                             f"{tuple(input_ids.shape)}")
        S, limit = input_ids.shape[1], self.config.max_position_embeddings
        if S == 0 or S > limit:
            raise ValueError(f"CLIPTextModel: input_ids has {S} tokens per row, expected 1 to "
                             f"max_position_embeddings = {limit}")
        # meta tensors (shape-only runs, `ldm inspect`) have no values to check
        if input_ids.numel() and input_ids.device.type != "meta" and (
                input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(f"CLIPTextModel: token id {bad} is out of range [0, vocab_size = {self.config.vocab_size})")

    @staticmethod
    def _check_mask(attention_mask: Tensor, input_ids: Tensor) -> None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"CLIPTextModel: attention_mask must be a tensor of the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {got}")


class CLIPTextModelWithProjection(CLIPTextModel):
    """The text tower plus CLIP's projection head (transformers' CLIPTextModelWithProjection, same keys: `text_model.*`
    and `text_projection.weight`, a Linear D -> projection_dim without bias). SDXL's OpenCLIP-bigG encoder."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> CLIPTextOutput:
        """As CLIPTextModel.forward, plus `text_embeds` (B, projection_dim) = text_projection(pooler_output)."""
        out = super().forward(input_ids, attention_mask, inputs_embeds)
        out.text_embeds = self.text_projection(out.pooler_output)  # (B, D) -> (B, projection_dim)
        return out


def _accept_layouts(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                    strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                    error_msgs: list[str]) -> None:
    """load_state_dict pre-hook: accept the two other layouts of the same weights, then load strictly.

    - `text_model.embeddings.position_ids` (files written by transformers < 4.31, e.g. SD 1.5's): an arange buffer,
      not a weight; dropped.
    - transformers 5.x's unprefixed keys (`embeddings.token_embedding.weight`, ...): given the `text_model.` prefix.
    Anything else unknown or missing is left to torch's strict check, which names the key.

    Kept in the model, unlike the VAE's old attention names (weights_convert/ maps those): both are layouts that
    transformers' own CLIPTextModel saves and loads, and the public contract (DESIGN.md, "Public entry points")
    promises that a transformers 5.x state dict loads into `ldm.CLIPTextModel` as it is. The converter's folder
    rules accept the same two layouts, so a file loads the same either way.
    """
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in (PREFIX + "embeddings.position_ids", "embeddings.position_ids"):
            del state_dict[key]
        elif rest.startswith(_TOP_LEVEL):
            target = prefix + PREFIX + rest
            if target in state_dict:
                raise ValueError(f"CLIPTextModel: state dict holds both {key!r} and {target!r}; use one layout")
            state_dict[target] = state_dict.pop(key)
