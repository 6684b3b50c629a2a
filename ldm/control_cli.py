"""`ldm generate`'s ControlNet options: `--controlnet PATH --control-image IMG [--control-scale S] ...`.

Registered by ldm/cli.py like every feature's flags: `add_arguments(parser)`; `check_args(args)` runs with the other
checks before any model is loaded (counts, ranges, the control images readable); `pipeline_kwargs(args)` gives the
pipeline's ControlNet arguments (ldm/control.py, docs/controlnet.md). The ControlNets themselves are loaded with the
model (`ldm.load_pipeline(controlnet=...)`, ldm/cli.py `load_model`).
"""

from __future__ import annotations

import argparse
from typing import Any

from ldm.cli import UsageError, _one_line

PREPROCESSORS = ("none", "canny")


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--controlnet", action="append", metavar="PATH", default=None,
                   help="a ControlNet file or folder (repeatable: several ControlNets, one --control-image each)")
    g.add_argument("--control-image", action="append", metavar="IMG", default=None,
                   help="the control image of each --controlnet, in order (resized to the output)")
    g.add_argument("--control-scale", action="append", type=float, metavar="S", default=None,
                   help="conditioning scale, once for all or once per --controlnet (default as diffusers: 1.0, "
                        "0.8 with --init-image, 0.5 with --mask)")
    g.add_argument("--control-start", action="append", type=float, metavar="A", default=None,
                   help="fraction of the steps after which a ControlNet starts acting (default 0.0)")
    g.add_argument("--control-end", action="append", type=float, metavar="B", default=None,
                   help="fraction of the steps after which it stops (default 1.0)")
    g.add_argument("--control-preprocess", action="append", choices=PREPROCESSORS, default=None,
                   help="turn each --control-image into a control map first (canny: edges), once or once per image")
    g.add_argument("--canny-low", type=float, default=100.0, help="Canny's lower threshold (default 100)")
    g.add_argument("--canny-high", type=float, default=200.0, help="Canny's upper threshold (default 200)")
    g.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (diffusers' formula)")


def check_args(args: argparse.Namespace) -> None:
    """The --control-* checks `ldm generate` can make before loading anything."""
    n = len(args.controlnet or [])
    if not n:
        for flag in ("control_image", "control_scale", "control_start", "control_end", "control_preprocess"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} needs --controlnet")
        if args.guess_mode:
            raise UsageError("--guess-mode needs --controlnet")
        return
    if len(args.control_image or []) != n:
        raise UsageError(f"{n} --controlnet but {len(args.control_image or [])} --control-image: give one each")
    for flag in ("control_scale", "control_start", "control_end", "control_preprocess"):
        values = getattr(args, flag) or []
        if len(values) not in (0, 1, n):
            raise UsageError(f"--{flag.replace('_', '-')} given {len(values)} times: once for all or once per "
                             f"--controlnet ({n})")
    for a, b in zip(_each(args.control_start or [0.0], n), _each(args.control_end or [1.0], n)):
        if not 0 <= a < b <= 1:
            raise UsageError(f"--control-start {a} / --control-end {b}: need 0 <= start < end <= 1")
    if not 0 <= args.canny_low <= args.canny_high:
        raise UsageError(f"--canny-low {args.canny_low} / --canny-high {args.canny_high}: need 0 <= low <= high")
    from ldm.images import open_image

    for path in args.control_image:
        try:
            open_image(path, "--control-image")
        except (ValueError, TypeError) as e:
            raise UsageError(_one_line(e)) from None


def pipeline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's ControlNet arguments from --control-* (already checked by check_args); {} without."""
    if not args.controlnet:
        return {}
    from ldm.canny import canny_image
    from ldm.images import open_image

    n = len(args.controlnet)
    steps = _each(args.control_preprocess or ["none"], n)
    images = []
    for path, step in zip(args.control_image, steps):
        image = open_image(path, "--control-image")
        images.append(canny_image(image, args.canny_low, args.canny_high) if step == "canny" else image)
    kwargs = {"control_image": images, "control_guidance_start": _each(args.control_start or [0.0], n),
              "control_guidance_end": _each(args.control_end or [1.0], n), "guess_mode": args.guess_mode}
    if args.control_scale:  # else the entry point's own default (diffusers': txt2img 1.0, img2img 0.8, inpaint 0.5)
        kwargs["controlnet_conditioning_scale"] = _each(args.control_scale, n)
    return kwargs


def _each(values: list[Any], n: int) -> list[Any]:
    """A flag given once stands for every ControlNet; given n times, one each."""
    return values * n if len(values) == 1 else values
