"""Speed levers for inference, each a small function you can switch on alone, and `optimize(pipe)` for all of them.

The modules in ldm/unet.py, ldm/vae.py and ldm/clip.py stay the readable reference; nothing here changes what
they compute beyond floating-point rounding, and nothing changes a state dict (keys and shapes stay diffusers').

    pipe = ldm.load_pipeline(path, dtype=torch.float16, device="cuda").optimize()    # every lever, CUDA defaults
    seconds = ldm.optimize.warm_up(pipe, height=512, width=512)                     # pay the compile up front

The levers (docs/pipeline.md, "Optimizing for speed", says what each buys and costs):

- `to_channels_last(pipe)`: the UNet and VAE weights in NHWC, the layout cuDNN's fp16 tensor-core convolutions
  want; the activations follow the weights through every conv.
- `fuse_projections(module)`: each attention layer's q, k, v projections (self-attention) or k, v (cross-attention)
  as one matmul on a concatenated weight, a non-persistent buffer kept in sync with to_q / to_k / to_v (see
  `FusedAttention`, swapped in for `ldm.unet.Attention`). GEGLU already is one projection (proj -> chunk); fusing its
  `value * gelu(gate)` into one kernel is torch.compile's work, not a module change.
- `compile_unet(unet, ...)`: `torch.compile(unet.network, fullgraph=True, dynamic=False)` (the network without
  forward's input checks; the graph replaces `network` on that one UNet), with CUDA graphs over
  each UNet call ("reduce-overhead") when asked. Static shapes: one graph per (batch, latent size, dtype); a new
  size compiles again. The first call's compile time is what `warm_up` returns; inductor's FX-graph and AOTAutograd
  caches live in `compile_cache_dir()` (~/.cache/ldm/inductor) so another process skips most of it.
- `PromptCache`: the text encoder runs once per prompt, the pipeline keeps a small LRU of prompt embeddings
  (always on; `StableDiffusionPipeline.prompt_cache_size = 0` turns it off).
- VAE decode in the pipeline's dtype with an fp32 retry when fp16 overflows (always on; `pipe.decode`).
- GroupNorm + SiLU in fp16 with fp32 statistics: no lever, because it is already so. ATen's group_norm kernels
  accumulate mean and variance in `acc_type` / `opmath_type` (float for half and bfloat16) on CUDA
  (aten/src/ATen/native/cuda/group_norm_kernel.cu) and on CPU (mixed-type path in group_norm_kernel.cpp; checked
  by tests/test_optimize.py); fusing the SiLU into the normalization is torch.compile's work.

Per-device defaults (`default_levers`): on CUDA all on (channels_last, fused projections, compile with CUDA graphs,
cudnn.benchmark). On the CPU none: measured with `python scripts/bench_levers.py --threads 2 --rounds 4` (SD 1.5 UNet,
batch 2, 32x32, fp32, 2 cores) fused projections took 1.02x and channels_last 1.03x the eager time (no gain within
the noise; fusing costs 6.6% more weight memory), and compiling costs minutes; all are opt-in there
(`optimize(pipe, fuse=True, ...)`), and CUDA graphs need CUDA. Whether each lever pays on a GPU is measured by
scripts/bench_gpu.py.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.unet import Attention

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Levers:
    """Which levers `optimize` pulls. None in `optimize`'s arguments means: this device's default."""

    channels_last: bool
    fuse: bool
    compile: bool
    cuda_graphs: bool  # only with compile, only on CUDA
    compile_mode: str  # a torch.compile mode; "reduce-overhead" is the one with CUDA graphs
    cudnn_benchmark: bool  # let cuDNN time its convolution algorithms once per shape (CUDA only)


def default_levers(device: torch.device | str) -> Levers:
    """All levers on CUDA; none elsewhere, where none measured faster (see the module docstring)."""
    if torch.device(device).type == "cuda":
        return Levers(channels_last=True, fuse=True, compile=True, cuda_graphs=True, compile_mode="reduce-overhead",
                      cudnn_benchmark=True)
    return Levers(channels_last=False, fuse=False, compile=False, cuda_graphs=False, compile_mode="default",
                  cudnn_benchmark=False)


# ----------------------------------------------------------------------------------------------------------------
# The levers, one function each


def to_channels_last(*modules: nn.Module) -> None:
    """Store every 4-D weight of `modules` in channels_last (NHWC) order, in place. Values are unchanged."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


class FusedAttention(Attention):
    """ldm.unet.Attention with q, k, v (self-attention) or k, v (cross-attention) as one matmul on a concatenated
    weight. `fuse_projections` swaps it in on existing layers (their parameters, processor and state dict stay);
    `unfuse_projections` swaps it out. How the fused weight stays equal to to_q / to_k / to_v:

    - `.to()`, `.half()`, `.cuda()`: it is a non-persistent buffer, converted by the same function as the
      parameters, and absent from the state dict.
    - `load_state_dict` (on this module or any parent): a post-hook rebuilds it from the loaded parameters.
    - anything else that writes the weights in place (an optimizer step, `weight.data.copy_`): eager forward
      compares the weights' storage pointers and version counters with those recorded at fusing and rebuilds.
      (A compiled graph skips that check; it relies on the two rules above.)
    - with autograd on and trainable weights, forward uses the three separate projections, so gradients reach
      to_q / to_k / to_v.
    """

    fused_weight: Tensor  # [Wq; Wk; Wv] (3D, D) for self-attention, [Wk; Wv] (2D, D_text) for cross-attention

    def _source_weights(self) -> list[Tensor]:
        return ([] if self.is_cross else [self.to_q.weight]) + [self.to_k.weight, self.to_v.weight]

    def fuse(self) -> None:
        """(Re)build the fused weight from to_q / to_k / to_v."""
        weights = self._source_weights()
        with torch.no_grad():
            self.register_buffer("fused_weight", torch.cat([w.detach() for w in weights]), persistent=False)
        self._fused_from = tuple((w.data_ptr(), w._version) for w in weights)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q: (B, L, D), k, v: (B, S, D), from one matmul on the fused weight (two for cross-attention)."""
        if torch.is_grad_enabled() and self.to_q.weight.requires_grad:
            return super()._project(x, context)  # training: the separate projections carry the gradients
        if not torch.compiler.is_compiling():
            if self._fused_from != tuple((w.data_ptr(), w._version) for w in self._source_weights()):
                self.fuse()  # the weights were replaced or written in place since fusing
        if context is None:
            q, k, v = F.linear(x, self.fused_weight).chunk(3, dim=-1)  # (B, L, 3D) -> 3 x (B, L, D)
            return q, k, v
        k, v = F.linear(context, self.fused_weight).chunk(2, dim=-1)  # (B, S, 2D) -> 2 x (B, S, D)
        return self.to_q(x), k, v


def _refuse_after_load(module: FusedAttention, _incompatible_keys: object) -> None:
    module.fuse()


def fuse_projections(module: nn.Module) -> int:
    """Fuse the q/k/v (or k/v) projections of every UNet attention layer in `module`. Returns how many."""
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    for layer in layers:
        if not isinstance(layer, FusedAttention):
            layer.__class__ = FusedAttention  # the same module object: parents, parameters and hooks stay
            layer._fuse_hook = layer.register_load_state_dict_post_hook(_refuse_after_load)
        layer.fuse()
    return len(layers)


def unfuse_projections(module: nn.Module) -> int:
    """Undo `fuse_projections`: plain Attention layers again, the fused weights freed. Returns how many."""
    layers = [m for m in module.modules() if isinstance(m, FusedAttention)]
    for layer in layers:
        layer._fuse_hook.remove()
        del layer.fused_weight, layer._fused_from, layer._fuse_hook
        layer.__class__ = Attention
    return len(layers)


class PromptCache:
    """The last `size` prompt encodings, least recently used dropped first; the pipeline keeps one (always on).

    The text encoder's share of a run is small (< 0.1% of a 50-step SD run), but repeated calls with one prompt,
    the common case in notebooks and benches, skip it entirely. The key holds the prompts, negatives, clip_skip,
    weighting, the text encoder and tokenizer objects, and a fingerprint of the encoder's weights: each parameter's
    storage pointer and version counter, which change on `.to()`, on load_state_dict and on any in-place write, so
    a changed encoder never serves stale embeddings.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __call__(self, encode: Callable[..., Any], text_encoder: nn.Module, tokenizer: Any, prompts: list[str],
                 negatives: list[str] | None, clip_skip: int | None, weighting: bool, *, extra: Any = None) -> Any:
        """encode(prompts, negatives, clip_skip, weighting), or its cached result for the same key. extra: any
        other hashable state the encoding depends on (the loaded textual inversion embeddings)."""
        if self.size <= 0:
            return encode(prompts, negatives, clip_skip, weighting)
        weights = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in text_encoder.parameters())
        key = (tuple(prompts), None if negatives is None else tuple(negatives), clip_skip, weighting,
               id(text_encoder), id(tokenizer), weights, extra)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = encode(prompts, negatives, clip_skip, weighting)
        self._entries[key] = value
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)  # the least recently used
        return value


def compile_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOTAutograd, Triton kernels) at one folder and return it.

    Order: `cache_dir` if given; else $TORCHINDUCTOR_CACHE_DIR if the user set it; else
    $XDG_CACHE_HOME/ldm/inductor (~/.cache/ldm/inductor), which, unlike inductor's default under /tmp, survives a
    reboot. Inductor reads the variable whenever it opens its cache, so call this before the first compile.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache_dir = Path(base) / "ldm" / "inductor"
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # the default in torch >= 2.5; stated so a changed default shows here
    functorch_config.enable_autograd_cache = True
    return path


def compile_unet(unet: nn.Module, *, cuda_graphs: bool = False, mode: str | None = None) -> None:
    """Compile the UNet's network (not its input checks) with static shapes; `unet(...)` then runs the graph.

    mode: a torch.compile mode; default "reduce-overhead" with cuda_graphs, else "default". With CUDA graphs each
    call starts a new graph step and returns a copy of the output: the graph's output buffer is overwritten on the
    next replay, and schedulers (PNDM, LMS, DPM-Solver) keep earlier model outputs.
    """
    mode = ("reduce-overhead" if cuda_graphs else "default") if mode is None else mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if cuda_graphs and mode not in ("reduce-overhead", "max-autotune"):
        raise ValueError(f"cuda_graphs=True needs mode 'reduce-overhead' or 'max-autotune', got {mode!r}")
    if not cuda_graphs and mode in ("reduce-overhead", "max-autotune"):
        mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}[mode]
    eager = type(unet).network.__get__(unet)  # the class's method, even if this instance was compiled before
    compiled = torch.compile(eager, fullgraph=True, dynamic=False, mode=mode)
    if not cuda_graphs:
        unet.network = compiled  # an instance attribute: shadows the method for this UNet only; forward calls it
        return

    def run_graph(sample: Tensor, t: Tensor, context: Tensor, *extra: Tensor | list[Tensor] | None) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(sample, t, context, *extra).clone()  # extra: class labels, ControlNet residuals

    unet.network = run_graph


def warm_up(pipe: Any, *, height: int | None = None, width: int | None = None, batch: int = 1,
            guided: bool = True, scheduler: Any = None, calls: int = 3) -> float:
    """Run the UNet `calls` times at the shapes a pipeline call with these arguments will use; return the seconds.

    On a compiled UNet the first call compiles (and with CUDA graphs the third records the graph), so this is the
    compile time, paid here instead of inside the first image. The inputs are zeros; the scheduler's timestep dtype
    (int or float) is used, so the real call finds the same graph.
    """
    height = pipe.native_size if height is None else height
    width = pipe.native_size if width is None else width
    f = pipe.vae_scale_factor
    sched = pipe._scheduler(scheduler)
    sched.set_timesteps(2)
    t = sched.timesteps[0]
    rows = 2 * batch if guided else batch
    sample = torch.zeros(rows, pipe.unet.config.in_channels, height // f, width // f, device=pipe.device,
                         dtype=pipe.dtype)
    context = torch.zeros(rows, 77, pipe.unet.config.cross_attention_dim, device=pipe.device, dtype=pipe.dtype)
    extra = {}
    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":  # SDXL's pooled text and time ids
        cfg = pipe.unet.config
        pooled = pipe.text_encoder_2.config.projection_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(rows, pooled, device=pipe.device, dtype=pipe.dtype),
            "time_ids": torch.zeros(rows, (cfg.projection_class_embeddings_input_dim - pooled)
                                    // cfg.addition_time_embed_dim, device=pipe.device, dtype=pipe.dtype)}
    _sync(pipe.device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            pipe.unet(sample, t, context, **extra)
    _sync(pipe.device)
    return time.perf_counter() - start


def compile_counters() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses in this process, and dynamo's graph count (for tests, benches)."""
    from torch._dynamo.utils import counters

    return {"fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
            "graphs": counters["stats"]["unique_graphs"]}


# ----------------------------------------------------------------------------------------------------------------
# The switch


def resolve_levers(device: torch.device | str, **overrides: Any) -> Levers:
    """This device's defaults with the non-None `overrides` applied; checks that the combination can run."""
    levers = replace(default_levers(device), **{k: v for k, v in overrides.items() if v is not None})
    if not levers.compile and overrides.get("cuda_graphs") is None:
        levers = replace(levers, cuda_graphs=False)  # compile=False alone turns the graphs off too
    if levers.cuda_graphs and not levers.compile:
        raise ValueError("cuda_graphs=True needs compile=True (the graphs are recorded by torch.compile)")
    if levers.cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the pipeline on a CUDA device, it is on {device}")
    if levers.compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {levers.compile_mode!r}")
    return levers


def optimize(pipe: Any, *, channels_last: bool | None = None, fuse: bool | None = None,
             compile: bool | None = None, cuda_graphs: bool | None = None, compile_mode: str | None = None,
             cudnn_benchmark: bool | None = None, cache_dir: str | Path | None = None) -> Any:
    """Pull the speed levers on a StableDiffusionPipeline, in place; returns it. None = the device's default.

    Call it after `pipe.to(device, dtype)`: compiled graphs are specialised to a device and dtype (a later `.to()`
    still works, and compiles again). Compilation happens on the first call at each shape (`warm_up` does it now).
    Research processors (ldm.research) installed on a compiled UNet make it compile again, or fail under
    fullgraph=True if they do Python work dynamo cannot trace: run research on the eager pipeline.
    """
    levers = resolve_levers(pipe.device, channels_last=channels_last, fuse=fuse, compile=compile,
                            cuda_graphs=cuda_graphs, compile_mode=compile_mode, cudnn_benchmark=cudnn_benchmark)
    if levers.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # process-wide, as the setting is
    if levers.channels_last:
        to_channels_last(pipe.unet, pipe.vae)
    if levers.fuse:
        fuse_projections(pipe.unet)
    if levers.compile:
        compile_cache_dir(cache_dir)
        compile_unet(pipe.unet, cuda_graphs=levers.cuda_graphs, mode=levers.compile_mode)
    pipe.levers = levers
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
