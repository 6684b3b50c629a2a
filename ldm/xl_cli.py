"""`ldm generate` with SDXL: the second prompts, micro-conditioning, and the base + refiner hand-off.

    ldm generate "a lighthouse at dusk" --model sd_xl_base_1.0.safetensors \\
        --refiner sd_xl_refiner_1.0.safetensors --refiner-start 0.8

ldm/cli.py registers the options (`add_arguments`) and hands an SDXL run to `run`; the pipeline is
`ldm.StableDiffusionXLPipeline` (ldm/pipeline_xl.py, docs/pipeline.md). With --refiner the base walks the first
`--refiner-start` of the schedule and returns latents, the refiner (loaded with the base's device and dtype) walks
the rest from those latents (diffusers' "ensemble of experts"); txt2img, img2img and inpainting all hand off.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

FLAGS = ("prompt_2", "negative_prompt_2", "refiner", "refiner_start", "original_size", "crops_coords_top_left",
         "target_size", "aesthetic_score", "negative_aesthetic_score")
DEFAULT_REFINER_START = 0.8  # the fraction of the schedule the base runs (diffusers' documented example)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SDXL (ldm/xl_cli.py, docs/pipeline.md)")
    g.add_argument("--prompt-2", default=None, help="what the second (OpenCLIP bigG) text encoder reads "
                                                    "(default: the prompt)")
    g.add_argument("--negative-prompt-2", default=None, help="the bigG encoder's negative prompt "
                                                             "(default: --negative-prompt)")
    g.add_argument("--refiner", metavar="PATH", default=None,
                   help="an SDXL refiner (file, folder or hub id): the base runs the first --refiner-start of the "
                        "steps, the refiner the rest from the base's latents")
    g.add_argument("--refiner-start", type=_fraction, metavar="F", default=None,
                   help=f"where the refiner takes over, a fraction of the schedule in (0, 1) (default "
                        f"{DEFAULT_REFINER_START})")
    g.add_argument("--original-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                   help="micro-conditioning: the size the model is told the training image had (default: the "
                        "output size)")
    g.add_argument("--crops-coords-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                   help="micro-conditioning: the crop's top-left corner (default 0 0; > 0 draws cropped-looking "
                        "images)")
    g.add_argument("--target-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                   help="micro-conditioning: the target size (default: the output size)")
    g.add_argument("--aesthetic-score", type=float, default=None,
                   help="the refiner's aesthetic conditioning (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=float, default=None,
                   help="the refiner's unconditional aesthetic score (default 2.5)")


def check_batch(args: argparse.Namespace) -> None:
    """Batch generation (--prompts, ldm/batch.py) runs the base model alone: the SDXL options are refused there."""
    from ldm.cli import UsageError

    given = [f for f in FLAGS if getattr(args, f, None) is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} is not available with --prompts (batch generation runs the "
                         f"--model alone)")


def applies(pipe: Any, args: argparse.Namespace) -> bool:
    """True when `run` handles this generation: an SDXL model, or any SDXL option (refused on other models)."""
    from ldm.pipeline_xl import StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionXLPipeline) or any(getattr(args, f, None) is not None for f in FLAGS)


def run(pipe: Any, args: argparse.Namespace, common: dict[str, Any]) -> tuple[Any, tuple[int, int]]:
    """One batch of an SDXL generation, with the refiner when --refiner; returns (output, (width, height))."""
    from tqdm import tqdm

    from ldm.cli import _steps_run

    refiner = _refiner(pipe, args)
    kwargs = {**common, **_conditioning(args)}
    start = args.refiner_start or DEFAULT_REFINER_START
    steps = _steps_run(args)
    with tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, disable=None) as bar:
        kwargs["callback"] = lambda i, t, latents: bar.update(1)
        if refiner is None:
            result = _call(pipe, args, kwargs, args.init_image)
        else:  # the base's share of the schedule as latents, the refiner's from them without new noise
            latents = _call(pipe, args, {**kwargs, "denoising_end": start, "output_type": "latent"},
                            args.init_image).latents
            result = _call(refiner, args, {**kwargs, "denoising_start": start}, latents)
    return result, result.images[0].size


def _call(pipe: Any, args: argparse.Namespace, kwargs: dict[str, Any], image: Any) -> Any:
    """txt2img without an image, else img2img, or inpaint with --mask (the image may be the base's latents)."""
    from ldm.cli import _strength

    strength = _strength(args)
    if not pipe.requires_aesthetics_score:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("aesthetic_score", "negative_aesthetic_score")}
    if image is None:
        return pipe(args.prompt, height=args.height, width=args.width, **kwargs)
    if args.mask is None:
        return pipe.img2img(args.prompt, image, strength=strength, **kwargs)
    return pipe.inpaint(args.prompt, image, args.mask, strength=strength, **kwargs)


def _conditioning(args: argparse.Namespace) -> dict[str, Any]:
    """The SDXL keyword arguments the options ask for (absent ones keep the pipeline's defaults)."""
    out = {"prompt_2": args.prompt_2, "negative_prompt_2": args.negative_prompt_2}
    for name in ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                 "negative_aesthetic_score"):
        value = getattr(args, name)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _refiner(pipe: Any, args: argparse.Namespace) -> Any:
    """The checks, then the refiner pipeline (loaded once per command, on the base's device and dtype) or None."""
    import ldm
    from ldm.cli import UsageError
    from ldm.pipeline_xl import StableDiffusionXLPipeline

    if not isinstance(pipe, StableDiffusionXLPipeline):
        given = ", ".join("--" + f.replace("_", "-") for f in FLAGS if getattr(args, f, None) is not None)
        raise UsageError(f"{given} need an SDXL --model (this model is {type(pipe).__name__})")
    if args.hires_scale is not None:
        raise UsageError("--hires-* is not supported with SDXL models (generate at the native 1024 px instead)")
    if args.refiner is None:
        if args.refiner_start is not None:
            raise UsageError("--refiner-start needs --refiner")
        scores = [f for f in ("aesthetic_score", "negative_aesthetic_score") if getattr(args, f) is not None]
        if scores and not pipe.requires_aesthetics_score:
            raise UsageError(f"--{scores[0].replace('_', '-')} conditions the SDXL refiner: give --refiner (or the "
                             f"refiner as --model with --init-image)")
        return None
    if pipe.requires_aesthetics_score:
        raise UsageError("--model is an SDXL refiner: give the base as --model and the refiner as --refiner")
    loaded = vars(args).get("_refiner_pipe")
    if loaded is None:
        try:
            loaded = ldm.load_pipeline(args.refiner, dtype=pipe.dtype, device=pipe.device,
                                       allow_pickle=args.allow_pickle)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise UsageError(f"cannot load refiner {args.refiner!r}: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, StableDiffusionXLPipeline):
            raise UsageError(f"--refiner {args.refiner!r} is not an SDXL model ({type(loaded).__name__})")
        if args.vae_tiling:
            loaded.enable_vae_tiling()
        if args.attention_chunk is not None:
            loaded.enable_attention_chunking(args.attention_chunk)
        args._refiner_pipe = loaded
    return loaded


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {text}")
    return value


def fields(args: argparse.Namespace) -> dict[str, Any]:
    """What the PNG's parameters record of an SDXL run (A1111's names for the refiner)."""
    out: dict[str, Any] = {}
    if getattr(args, "refiner", None) is not None:
        from ldm.cli import _model_name

        out["Refiner"] = _model_name(args.refiner)
        out["Refiner switch at"] = args.refiner_start or DEFAULT_REFINER_START
    if getattr(args, "prompt_2", None):
        out["Prompt 2"] = args.prompt_2
    return out
