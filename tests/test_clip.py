"""ldm.CLIPTextModel against transformers.CLIPTextModel (5.23.0) on identical trained-like weights.

Tolerance: the parity contract's 1e-5 relative error (fp32, CPU). Both models run the same operations in the same
order (our kernel is torch's SDPA, as transformers' default), so the measured error is 0 or a few ulps; 1e-5 leaves
room for a different but equally valid summation order (the "math" backend) and nothing more.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

import ldm
from ldm.attention import attention_backend, set_attention_processor
from ldm.clip import CLIPTextModel
from tests.helpers import assert_rel, diffusers_config, rel_err, trained_like_

TOL = 1e-5
BOS, EOS = 49406, 49407


def tiny(**kw: object) -> ldm.CLIPTextConfig:
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3)
    return dataclasses.replace(ldm.SD15.text, **{**base, **kw})


def reference(cfg: ldm.CLIPTextConfig, seed: int = 0) -> transformers.CLIPTextModel:
    """transformers' model with trained-like weights. Built on the meta device and materialised empty: its own
    random init would be overwritten anyway and costs half a minute at the SD 2 size on 2 cores."""
    fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**fields))
    ref.to_empty(device="cpu").eval()
    with torch.no_grad():
        ref.embeddings.position_ids.copy_(torch.arange(cfg.max_position_embeddings)[None])  # a buffer, not a weight
    return trained_like_(ref, seed)


def pair(cfg: ldm.CLIPTextConfig, seed: int = 0) -> tuple[transformers.CLIPTextModel, CLIPTextModel]:
    """(reference, ours) with the same weights: ours is built on the meta device and takes the reference's tensors
    through load_state_dict(strict=True, assign=True), the identity load the converter relies on."""
    ref = reference(cfg, seed)
    with torch.device("meta"):
        ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict({"text_model." + k: v for k, v in ref.state_dict().items()}, strict=True, assign=True)
    return ref, ours


def prompt_ids(batch: int, length: int = 77, pad: int = EOS, seed: int = 0) -> torch.Tensor:
    """Tokenizer-shaped ids: BOS, words of different lengths, EOS, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    for b in range(batch):
        n = 1 + (b * 7 + 3) % (length - 2)  # different EOS positions per row
        ids[b, 0] = BOS
        ids[b, 1:n + 1] = torch.randint(0, 49406, (n,), generator=g)
        ids[b, n + 1] = EOS
    return ids


def compare(ref: transformers.CLIPTextModel, ours: CLIPTextModel, ids: torch.Tensor, **kw: torch.Tensor) -> dict:
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True, **kw)
        o = ours(ids, **kw)
    assert len(o.hidden_states) == len(r.hidden_states) == ours.config.num_hidden_layers + 1
    errs = {"last": rel_err(o.last_hidden_state, r.last_hidden_state),
            "penultimate": rel_err(o.hidden_states[-2], r.hidden_states[-2]),
            "pooled": rel_err(o.pooler_output, r.pooler_output),
            "all": max(rel_err(a, b) for a, b in zip(o.hidden_states, r.hidden_states))}
    for name, err in errs.items():
        assert err <= TOL, f"{name}: relative error {err:.3e} > {TOL:.0e}"
    return errs


# ---------------------------------------------------------------------------------------------------------------
# Parity at tiny sizes


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [2, EOS])  # the legacy argmax rule of the official configs, and the new one
def test_parity_tiny(act: str, eos_token_id: int) -> None:
    ref, ours = pair(tiny(hidden_act=act, eos_token_id=eos_token_id))
    compare(ref, ours, prompt_ids(4, pad=EOS))
    compare(ref, ours, prompt_ids(3, pad=0, seed=1))  # SD 2 padding with "!" = 0


def test_eos_rules() -> None:
    """Both pooling rules follow transformers on EOS-padded rows (many EOS), on rows without EOS (position 0), and
    on a config whose eos_token_id is not the highest id, where the two rules part ways."""
    ids = torch.tensor([[BOS, 5, 6, EOS, EOS, EOS], [BOS, 5, 6, 7, 8, 9], [BOS, 300, EOS, 0, 0, 0]])
    for eos_token_id in (2, EOS):
        ref, ours = pair(tiny(eos_token_id=eos_token_id), seed=3)
        compare(ref, ours, ids)
        assert ours.eos_positions(ids).tolist() == [3, 0, 2]
    ids = torch.tensor([[BOS, 3, 7, EOS]])
    ref, ours = pair(tiny(eos_token_id=3), seed=3)
    compare(ref, ours, ids)
    assert ours.eos_positions(ids).tolist() == [1]  # the first id equal to eos_token_id
    assert CLIPTextModel(tiny(eos_token_id=2)).eos_positions(ids).tolist() == [3]  # legacy: the highest id


def test_parity_short_sequences_and_padding_mask() -> None:
    ref, ours = pair(tiny(num_hidden_layers=2), seed=1)
    compare(ref, ours, prompt_ids(2, length=9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0  # right padding, as a tokenizer with padding=True returns it
    compare(ref, ours, prompt_ids(2, length=9), attention_mask=mask)


def test_math_backend_and_processor_hook() -> None:
    """The explicit-softmax backend agrees within the tolerance; a processor on self_attn sees every layer."""
    ref, ours = pair(tiny(), seed=2)
    ids = prompt_ids(2)
    with attention_backend("math"):
        compare(ref, ours, ids)
    seen = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, name: str, mask: torch.Tensor | None) -> torch.Tensor:
        seen.append((name, mask.dtype, tuple(mask.shape)))
        return torch.zeros_like(q)

    changed = set_attention_processor(ours, spy)
    assert changed == [f"text_model.encoder.layers.{i}.self_attn" for i in range(3)]
    with torch.no_grad():
        broken, expected = ours(ids).last_hidden_state, ref(ids).last_hidden_state
    assert seen == [(name, torch.bool, (77, 77)) for name in changed]
    assert rel_err(broken, expected) > 1e-2  # the hook really replaces the kernel
    set_attention_processor(ours, None)
    compare(ref, ours, ids)


def test_causal_mask_hides_later_tokens() -> None:
    """Changing token j leaves the states of tokens < j untouched (the causal mask) and changes the rest."""
    _, ours = pair(tiny(), seed=4)
    a = prompt_ids(1, length=12)
    b = a.clone()
    b[0, 6] = (b[0, 6] + 1) % 49406
    with torch.no_grad():
        ha, hb = ours(a).last_hidden_state, ours(b).last_hidden_state
    assert torch.equal(ha[:, :6], hb[:, :6])
    assert not torch.allclose(ha[:, 6:], hb[:, 6:])


def test_clip_skip_from_hidden_states() -> None:
    """final_layer_norm(hidden_states[-1]) is last_hidden_state; the penultimate path is what clip_skip uses."""
    _, ours = pair(tiny(), seed=5)
    with torch.no_grad():
        out = ours(prompt_ids(2))
        assert_rel(ours.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state, 0.0, "final norm")
    assert ours.final_layer_norm is ours.text_model.final_layer_norm


# ---------------------------------------------------------------------------------------------------------------
# Keys, layouts, sizes


def test_state_dict_keys_and_layouts() -> None:
    cfg = tiny(num_hidden_layers=2)
    ref = reference(cfg)
    ours = CLIPTextModel(cfg)
    theirs = ref.state_dict()  # transformers 5.x: no "text_model." prefix, no position_ids
    assert set(ours.state_dict()) == {"text_model." + k for k in theirs}
    assert "text_model.embeddings.position_ids" not in ours.state_dict()
    assert "text_model.final_layer_norm.weight" in ours.state_dict()
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in ours.state_dict()

    ours.load_state_dict(theirs, strict=True)  # transformers 5.x layout
    assert torch.equal(ours.text_model.embeddings.token_embedding.weight, theirs["embeddings.token_embedding.weight"])
    old = {"text_model." + k: v.clone() + 1 for k, v in theirs.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # files written by transformers < 4.31
    ours.load_state_dict(old, strict=True)
    assert torch.equal(ours.text_model.final_layer_norm.bias, old["text_model.final_layer_norm.bias"])


def test_strict_loading_names_the_key() -> None:
    ours = CLIPTextModel(tiny(num_hidden_layers=1))
    good = ours.state_dict()
    with pytest.raises(RuntimeError, match="text_model.encoder.layers.5.mlp.fc1.weight"):
        ours.load_state_dict({**good, "text_model.encoder.layers.5.mlp.fc1.weight": torch.zeros(1)})
    missing = {k: v for k, v in good.items() if k != "text_model.final_layer_norm.weight"}
    with pytest.raises(RuntimeError, match="text_model.final_layer_norm.weight"):
        ours.load_state_dict(missing)
    with pytest.raises(RuntimeError, match="logit_scale"):
        ours.load_state_dict({**good, "logit_scale": torch.zeros(())})
    with pytest.raises(ValueError, match="both"):
        ours.load_state_dict({**good, "final_layer_norm.weight": good["text_model.final_layer_norm.weight"]})


def test_loads_inside_a_parent_module() -> None:
    """The layout hook honours the prefix, so a pipeline holding the encoder as `text_encoder` loads too."""
    parent = torch.nn.Module()
    parent.text_encoder = CLIPTextModel(tiny(num_hidden_layers=1))
    sd = {("text_encoder." + k[len("text_model."):]): v for k, v in parent.text_encoder.state_dict().items()}
    sd["text_encoder.embeddings.position_ids"] = torch.arange(77)[None]
    parent.load_state_dict(sd, strict=True)


@pytest.mark.parametrize(("preset", "count"), [(ldm.SD15, 123_060_480), (ldm.SD21_V, 340_387_840)])
def test_parameter_counts(preset: ldm.FamilyPreset, count: int) -> None:
    with torch.device("meta"):
        model = CLIPTextModel(preset.text)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize(("family", "preset"), [("sd15", ldm.SD15), ("sd21", ldm.SD21_V)])
def test_presets_match_shipped_configs(family: str, preset: ldm.FamilyPreset) -> None:
    assert ldm.CLIPTextConfig.from_transformers(diffusers_config(family, "text_encoder")) == preset.text


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input() -> None:
    model = CLIPTextModel(tiny(num_hidden_layers=1))
    ids = prompt_ids(1, length=8)
    with pytest.raises(ValueError, match="49408"):
        model(torch.tensor([[BOS, 49408, EOS]]))
    with pytest.raises(ValueError, match="-3"):
        model(torch.tensor([[BOS, -3, EOS]]))
    with pytest.raises(TypeError, match="integer dtype"):
        model(ids.float())
    with pytest.raises(TypeError, match="integer dtype"):
        model(ids.bool())
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[BOS, EOS]])
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.full((1, 78), 5))
    with pytest.raises(ValueError, match="2-D"):
        model(ids[0])
    with pytest.raises(ValueError, match="2-D"):
        model(ids[None])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 7))
    with pytest.raises(TypeError, match="CLIPTextConfig"):
        CLIPTextModel({"hidden_size": 768})


# ---------------------------------------------------------------------------------------------------------------
# The real SD shapes (slow). The weights are full size; the prompts are short (24 tokens: the positions beyond
# change nothing in the code path, the tiny tests run all 77), which keeps a forward pass to seconds on 2 cores.


@pytest.mark.slow
@pytest.mark.parametrize("preset", [ldm.SD15, ldm.SD21_V], ids=["sd15", "sd21"])
def test_parity_full_shape(preset: ldm.FamilyPreset) -> None:
    ref, ours = pair(preset.text)
    pad = EOS if preset.pad_token == "<|endoftext|>" else 0
    errs = compare(ref, ours, prompt_ids(2, length=24, pad=pad))
    assert errs["last"] <= TOL and errs["penultimate"] <= TOL


# ---------------------------------------------------------------------------------------------------------------
# fp16 on a GPU (skipped without one): the contract's 1e-2 relative error against transformers in fp16


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_parity_fp16_cuda(act: str) -> None:
    ref, ours = pair(tiny(hidden_act=act, num_hidden_layers=4))
    ref, ours = ref.to("cuda", torch.float16), ours.to("cuda", torch.float16)
    ids = prompt_ids(3).cuda()
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        o = ours(ids)
    assert o.last_hidden_state.dtype == torch.float16
    assert_rel(o.last_hidden_state, r.last_hidden_state, 1e-2, "fp16 last_hidden_state")
    assert_rel(o.hidden_states[-2], r.hidden_states[-2], 1e-2, "fp16 penultimate")
    assert_rel(o.pooler_output, r.pooler_output, 1e-2, "fp16 pooled")
