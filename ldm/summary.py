"""Layer tables for learners: every module of a model, its input and output shape, and its parameter count.

The table torchinfo's `summary(model, input_data, col_names=("input_size", "output_size", "num_params"), depth=N)`
prints, written for this package: the shapes come from one forward pass with a forward hook on every module, run on
the meta device (shapes without values: no memory, no weights, a full-size UNet in a second), and the names are the
modules' own dotted paths, which are the state-dict key prefixes (`down_blocks.0.downsamplers`).

    summarize(model, args, depth=3)      -> LayerTable   any nn.Module and the arguments of one forward call
    inspect_model("sd21-v", size=512)    -> {"text_encoder": LayerTable, "unet": ..., "vae": ...}
                                            (SDXL: "text_encoder_2" too; the refiner has only that encoder)
    ldm inspect MODEL [--size PX] [--depth N] [--component unet]   (the same, printed)

Each component's default depth is the one at which the explanatory posts print its torchinfo table
(`DEFAULT_DEPTHS`): the text encoder and the UNet at 3 (torchinfo's default), the VAE at 4, where each encoder and
decoder level splits into its `resnets` and its down/upsampler (591,360 / 2,100,224 / 8,394,752 / 9,443,328
parameters in the encoder's resnets). `depth=N` / `--depth N` sets one depth for all of them.

MODEL is a family preset name (`ldm.config.FAMILIES`: "sd15", "sd21-base", "sd21-v", ...), built on the meta
device, or a checkpoint path / diffusers folder, loaded with `ldm.load_pipeline` and then described through a meta
twin built from the loaded configs (the twin's parameter counts are checked against the loaded modules).

Columns: `Input shape` is the first tensor argument of the module's first call; `Output shape` is the first tensor
it returns (a block returning (x, skips) shows x; the text encoder shows last_hidden_state). Containers that never
run themselves (ModuleList) show `--`. `Param #` is the module's own parameter count including everything below it
(torchinfo leaves `--` on a parent whose children are listed; here every row carries its total, so a row at any
depth reads as that block's size). Rows are in registration order, which is the state-dict order.

Shapes: B batch, C channels, H, W image size, h, w = H/8, W/8 latent size, S text tokens (77), D text width.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.config import FAMILIES, FamilyPreset

COMPONENTS = ("text_encoder", "unet", "vae")  # the order of the data path: prompt -> context -> latents -> pixels
# ... and with SDXL's second text encoder (OpenCLIP bigG); a family lists the ones it has (the refiner: no first)
ALL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
TIMESTEP = 999  # the UNet's example timestep (any value gives the same shapes)
MICRO_CONDITIONING = (1024, 1024, 0, 0, 1024, 1024)  # SDXL's example time_ids: original size, crop, target size
DEFAULT_DEPTHS = {"text_encoder": 3, "text_encoder_2": 3, "unet": 3, "vae": 4}  # the posts' depths (see above)
MAX_SIZE = 65536  # the largest image side a table is drawn for (a 1-head attention over it still fits int64)


@dataclass
class Row:
    """One module of the table."""

    name: str  # dotted path from the root ("" for the root), the state-dict key prefix
    type: str  # class name
    depth: int  # 0 for the root
    params: int  # parameters of this module and everything below it
    input_shape: tuple[int, ...] | None = None  # first tensor argument of the first call; None: never ran
    output_shape: tuple[int, ...] | None = None  # first tensor of the first call's result
    calls: int = 0  # how often forward ran


@dataclass
class LayerTable:
    """The rows of one model, up to `depth`, with the model's totals."""

    title: str
    rows: list[Row]
    depth: int
    total_params: int
    param_bytes: int  # in the model's own dtype
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> Row:
        """The row of the module at dotted path `name` ("" is the root); KeyError names the near misses."""
        for r in self.rows:
            if r.name == name:
                return r
        near = [r.name for r in self.rows if name.split(".")[0] in r.name][:8]
        raise KeyError(f"no row {name!r} in the table of {self.title} at depth {self.depth} (similar: {near})")

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """The table as text: indented names, shapes, parameter counts, then the totals."""
        cells = [("Layer (type)", "Input shape", "Output shape", "Param #")]
        for r in self.rows:
            label = r.type if r.depth == 0 else f"{'  ' * r.depth}{r.name} ({r.type})"
            cells.append((label, _shape(r.input_shape), _shape(r.output_shape), f"{r.params:,}" if r.params else "--"))
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = []
        for i, (label, x, y, p) in enumerate(cells):
            lines.append(f"{label:<{widths[0]}}  {x:<{widths[1]}}  {y:<{widths[2]}}  {p:>{widths[3]}}".rstrip())
            if i == 0:
                lines.append("=" * (sum(widths) + 6))
        rule = "=" * (sum(widths) + 6)
        size_mb = self.param_bytes / 1e6
        dtype = str(self.dtype).removeprefix("torch.")
        footer = [rule, f"Total params: {self.total_params:,}", f"Params size (MB): {size_mb:,.2f} ({dtype})"]
        return "\n".join([self.title, *lines, *footer, *self.notes])


def _shape(shape: tuple[int, ...] | None) -> str:
    return "--" if shape is None else str(list(shape))


def _first_tensor(value: Any) -> Tensor | None:
    """The first tensor in a forward argument or result: a tensor, a tuple/list, or an output object."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):  # CLIPTextOutput: last_hidden_state comes first
            found = _first_tensor(getattr(value, f.name))
            if found is not None:
                return found
    return None


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Any model


@torch.no_grad()
def summarize(model: nn.Module, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *, depth: int = 3,
              title: str | None = None) -> LayerTable:
    """Run `model(*args, **kwargs)` once with a forward hook on every module up to `depth`, and tabulate.

    Put the model and the arguments on the meta device for shapes without computation (`torch.device("meta")`
    as a context manager around the constructor). depth: 0 = the root only, 1 = its children, ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"summarize: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"summarize: depth must be an int >= 0, got {depth!r}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"summarize: args must be a tuple of forward arguments, got {type(args).__name__}")
    rows: list[Row] = []
    handles = []
    for name, module in model.named_modules():
        level = 0 if name == "" else name.count(".") + 1
        if level > depth:
            continue
        row = Row(name, type(module).__name__, level, _count(module))
        rows.append(row)

        def hook(mod: nn.Module, inputs: tuple[Any, ...], in_kwargs: dict[str, Any], output: Any,
                 row: Row = row) -> None:
            row.calls += 1
            if row.calls == 1:
                x = _first_tensor(list(inputs) + list(in_kwargs.values()))
                y = _first_tensor(output)
                row.input_shape = None if x is None else tuple(x.shape)
                row.output_shape = None if y is None else tuple(y.shape)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    # an empty container (a level without a downsampler keeps an empty `downsamplers` list) is not a layer
    rows = [r for r in rows if r.calls or r.params or len(list(modules[r.name].children()))]
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return LayerTable(title or type(model).__name__, rows, depth, _count(model), nbytes, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion components


def example_inputs(component: str, preset: FamilyPreset, size: int, batch: int = 1,
                   device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    """The forward arguments of one component at image size `size` x `size` (pixels).

    text_encoder, text_encoder_2: ids (B, 77); unet: latents (B, in_channels, size/8, size/8), timestep TIMESTEP,
    context (B, 77, D); vae: an image (B, 3, size, size), which its forward encodes and decodes. The keyword
    arguments (SDXL's added_cond_kwargs) are `example_kwargs`.
    """
    f = preset.vae.downsample_factor
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % (f * preset.unet.downsample_factor):
        raise ValueError(f"size must be a positive multiple of {f * preset.unet.downsample_factor} pixels "
                         f"(VAE x UNet downsampling), got {size!r}")
    if size > MAX_SIZE:  # the shapes are symbolic, but tensor sizes beyond int64 overflow even on the meta device
        raise ValueError(f"size must be at most {MAX_SIZE:,} pixels, got {size:,}")
    S = (preset.text or preset.text_encoder_2).max_position_embeddings
    if component in ("text_encoder", "text_encoder_2"):
        return (torch.zeros(batch, S, dtype=torch.long, device=device),)
    if component == "unet":
        latents = torch.zeros(batch, preset.unet.in_channels, size // f, size // f, device=device, dtype=dtype)
        context = torch.zeros(batch, S, preset.unet.cross_attention_dim, device=device, dtype=dtype)
        if preset.unet.num_class_embeds is not None:  # the x4 upscaler: its noise level, as a class label
            return latents, TIMESTEP, context, torch.zeros(batch, dtype=torch.long, device=device)
        return latents, TIMESTEP, context
    if component == "vae":
        return (torch.zeros(batch, preset.vae.in_channels, size, size, device=device, dtype=dtype),)
    raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")


def example_kwargs(component: str, preset: FamilyPreset, batch: int = 1, device: str | torch.device = "meta",
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The keyword arguments of one component's forward: SDXL's UNet takes added_cond_kwargs, text_embeds (B, P)
    and time_ids (B, N) with N = (projection_class_embeddings_input_dim - P) / addition_time_embed_dim."""
    unet = preset.unet
    if component != "unet" or unet.addition_embed_type is None:
        return {}
    pooled = preset.text_encoder_2.projection_dim if preset.text_encoder_2 is not None else 0
    n = (unet.projection_class_embeddings_input_dim - pooled) // unet.addition_time_embed_dim
    ids = (MICRO_CONDITIONING[:n - 1] + (6,)) if n == 5 else MICRO_CONDITIONING[:n]  # refiner: aesthetic score 6
    return {"added_cond_kwargs": {"text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                                  "time_ids": torch.tensor([ids] * batch, device=device, dtype=dtype)}}


def components_of(preset: FamilyPreset) -> tuple[str, ...]:
    """The components a family has, in data-path order (SD: text_encoder, unet, vae; SDXL adds text_encoder_2)."""
    return tuple(c for c in ALL_COMPONENTS if c not in ("text_encoder", "text_encoder_2")
                 or getattr(preset, "text" if c == "text_encoder" else c) is not None)


def build_meta(component: str, preset: FamilyPreset) -> nn.Module:
    """The full-size component of a family with every parameter on the meta device (no memory, no init)."""
    from ldm.clip import CLIPTextModel, CLIPTextModelWithProjection
    from ldm.unet import UNet2DConditionModel
    from ldm.vae import AutoencoderKL

    classes = {"text_encoder": (CLIPTextModel, preset.text), "unet": (UNet2DConditionModel, preset.unet),
               "text_encoder_2": (CLIPTextModelWithProjection, preset.text_encoder_2),
               "vae": (AutoencoderKL, preset.vae)}
    if component not in classes:
        raise ValueError(f"component must be one of {ALL_COMPONENTS}, got {component!r}")
    cls, cfg = classes[component]
    if cfg is None:
        raise ValueError(f"{preset.name} has no {component}")
    with torch.device("meta"):
        return cls(cfg).eval()


def inspect_model(model: str | os.PathLike | FamilyPreset, *, size: int | None = None, depth: int | None = None,
                  components: Sequence[str] = ALL_COMPONENTS, family: str | None = None,
                  allow_pickle: bool = False) -> dict[str, LayerTable]:
    """Layer tables of a model's components, in data-path order.

    model: a preset name ("sd15", "sd21-v", ... built on the meta device, no weights), a FamilyPreset, or a
    checkpoint file / diffusers folder (loaded with ldm.load_pipeline; `family` and `allow_pickle` go to it).
    size: the image side in pixels (default: the family's native size, 512, 768 or 1024).
    components: which to tabulate, of those the family has (an SDXL refiner has no text_encoder).
    depth: levels of submodules listed, for every component (default: DEFAULT_DEPTHS, each its own).
    """
    for c in components:
        if c not in ALL_COMPONENTS:
            raise ValueError(f"components: each must be one of {ALL_COMPONENTS}, got {c!r}")
    loaded: dict[str, nn.Module] = {}
    if isinstance(model, FamilyPreset):
        preset = model
    elif isinstance(model, str) and model in FAMILIES:
        preset = FAMILIES[model]
    elif isinstance(model, (str, os.PathLike)) and Path(model).exists():
        import ldm

        pipe = ldm.load_pipeline(model, family=family, allow_pickle=allow_pickle)
        preset = pipe.family
        loaded = {c: getattr(pipe, c, None) for c in ALL_COMPONENTS}
    else:
        raise ValueError(f"model must be a family name ({', '.join(FAMILIES)}) or an existing checkpoint file or "
                         f"diffusers folder, got {str(model)!r}")
    size = preset.native_size if size is None else size
    tables = {}
    for c in components_of(preset):
        if c not in components:
            continue
        twin = build_meta(c, preset)
        args, kwargs = example_inputs(c, preset, size), example_kwargs(c, preset)
        title = f"{preset.name} {c}: {type(twin).__name__}, image {size}x{size}"
        table = summarize(twin, args, kwargs, depth=DEFAULT_DEPTHS[c] if depth is None else depth, title=title)
        if loaded.get(c) is not None:
            real = loaded[c]
            if _count(real) != table.total_params:
                raise RuntimeError(f"{c}: the loaded module has {_count(real):,} parameters but its meta twin from "
                                   f"the same config has {table.total_params:,}")
            dtype = next(real.parameters()).dtype
            table.dtype, table.param_bytes = dtype, table.total_params * dtype.itemsize
        tables[c] = table
    return tables


# ----------------------------------------------------------------------------------------------------------------
# The command line: `ldm inspect MODEL` (ldm/cli.py registers these) or `python -m ldm.summary MODEL`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a family preset ({', '.join(FAMILIES)}; no weights needed) or a checkpoint "
                                      f"file / diffusers folder")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the family's native "
                                                               "size, 512 or 768)")
    parser.add_argument("--depth", type=int, default=None,
                        help="how many levels of submodules to list (default: as the posts' tables, 3 for the text "
                             "encoder and the UNet, 4 for the VAE)")
    parser.add_argument("--component", choices=ALL_COMPONENTS, action="append", default=None,
                        help="only this component (repeatable; default: all the model has)")
    parser.add_argument("--family", choices=tuple(FAMILIES), default=None,
                        help="model family of a checkpoint whose keys cannot tell (SD 2.x single files)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .ckpt files")


def run(args: argparse.Namespace) -> int:
    """Print the tables; a bad argument prints one line `ldm inspect: error: ...` and returns 2."""
    import sys

    try:
        if args.depth is not None and args.depth < 0:
            raise ValueError(f"--depth must be >= 0, got {args.depth}")
        tables = inspect_model(args.model, size=args.size, depth=args.depth,
                               components=args.component or ALL_COMPONENTS, family=args.family,
                               allow_pickle=args.allow_pickle)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"ldm inspect: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print("\n\n".join(str(t) for t in tables.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm inspect", description="Layer tables of a Stable Diffusion model.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
