"""Stable Diffusion under ControlNets: text to image, image to image and inpainting, each with a control image.

Paper: Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models" (arXiv:2302.05543).
Mirrors diffusers 0.42.1 `pipelines/controlnet/pipeline_controlnet.py` (StableDiffusionControlNetPipeline) and its
`_img2img` / `_inpaint` siblings: the same arguments, preprocessing and random draws, so the same weights and seed
give diffusers' image. The work is the plain pipeline's (ldm/pipeline.py): the same prompt encoding, noise and
denoising loop. What this class adds:

    pipe(prompt, control_image=...)     check the ControlNet arguments (ldm/control.py, ControlArgs), then run
                                        StableDiffusionPipeline.__call__ (img2img, inpaint alike)
    its common start (_begin)           calls the `_control` hook: the call's control images, resized to the output
                                        and batched (Control)
    every denoising step                Control.residuals: each ControlNet on the scaled latents -> 12 down + 1 mid
                                        residuals, summed over the ControlNets, added to the UNet's skips and middle

A call's ControlNet arguments are held for the length of that call only (`_controlled`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ldm.config import FamilyPreset
from ldm.control import Control, ControlArgs, default_size
from ldm.controlnet import ControlNetModel
from ldm.images import ImageInput
from ldm.pipeline import PipelineOutput, StableDiffusionPipeline, _Run

ControlImage = ImageInput | list[ImageInput]  # one per ControlNet


class StableDiffusionControlNetPipeline(StableDiffusionPipeline):
    """A Stable Diffusion pipeline with one or more ControlNets (`pipe.controlnet`, a list). Built by
    `ldm.load_pipeline(model, controlnet=PATH or [PATHS])`, or from parts:
    `StableDiffusionControlNetPipeline(unet=..., vae=..., text_encoder=..., tokenizer=..., scheduler=...,
    controlnet=ControlNetModel or [ControlNetModel, ...])`.

    Every entry point takes, besides the plain pipeline's arguments (diffusers' names and semantics):
    - control_image: one per ControlNet (a list for several): a PIL image, a path, a uint8 (H, W, 3) array or a
      float tensor in [0, 1]; RGB, resized to the output (PIL: Lanczos; tensors: nearest), in [0, 1];
    - controlnet_conditioning_scale: a number, or one per ControlNet; diffusers' defaults, 1.0 for text to image,
      0.8 for img2img, 0.5 for inpainting;
    - control_guidance_start (0.0) / control_guidance_end (1.0): a number, or one per ControlNet; ControlNet k acts
      on step i of n when start_k <= i/n and (i+1)/n <= end_k;
    - guess_mode (False): the ControlNets see only the conditional half of the guided batch, their residuals scaled
      from 0.1 to 1.0 (the 1.1 shuffle model, `global_pool_conditions`, always runs so).
    Several ControlNets: their residuals are summed. Scale 0 gives exactly the uncontrolled image.
    """

    def __init__(self, *, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Callable,
                 scheduler: Any, controlnet: ControlNetModel | list[ControlNetModel],
                 family: FamilyPreset | None = None, optimize: bool = False) -> None:
        super().__init__(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                         family=family)
        nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        if not nets:
            raise ValueError("controlnet: an empty list; a StableDiffusionControlNetPipeline needs at least one "
                             "ControlNet (ldm.StableDiffusionPipeline is the pipeline without)")
        for k, net in enumerate(nets):
            _check_controlnet(net, unet, f"controlnet[{k}]" if len(nets) > 1 else "controlnet")
        self.controlnet = nets
        self._call_control: ControlArgs | None = None  # the running call's arguments (see _controlled)
        if optimize:
            self.optimize()

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> StableDiffusionControlNetPipeline:
        """Move every module, the ControlNets included, to `device` and/or cast it to `dtype`. Returns self."""
        super().to(device, dtype)
        for net in self.controlnet:
            net.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------------------------------------------------
    # The three entry points: the plain pipeline's, under control

    def __call__(self, prompt: str | list[str], *, control_image: ControlImage | None = None,
                 controlnet_conditioning_scale: float | list[float] = 1.0,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 guess_mode: bool = False, height: int | None = None, width: int | None = None,
                 **kwargs: Any) -> PipelineOutput:
        """Text to image under control. height/width default to the (first) control image's size, rounded down to
        a multiple of 8. The other arguments (kwargs) are `StableDiffusionPipeline.__call__`'s."""
        args = self._control_args(control_image, controlnet_conditioning_scale, control_guidance_start,
                                  control_guidance_end, guess_mode)
        if height is None or width is None:
            size = default_size(control_image, self.vae_scale_factor)
            height, width = size[0] if height is None else height, size[1] if width is None else width
        with self._controlled(args):
            return super().__call__(prompt, height=height, width=width, **kwargs)

    def img2img(self, prompt: str | list[str], image: ImageInput, *, control_image: ControlImage | None = None,
                controlnet_conditioning_scale: float | list[float] = 0.8,
                control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                guess_mode: bool = False, **kwargs: Any) -> PipelineOutput:
        """Image to image under control; the control image is resized to `image`'s size. The other arguments
        (kwargs: strength, ...) are `StableDiffusionPipeline.img2img`'s."""
        args = self._control_args(control_image, controlnet_conditioning_scale, control_guidance_start,
                                  control_guidance_end, guess_mode)
        with self._controlled(args):
            return super().img2img(prompt, image, **kwargs)

    def inpaint(self, prompt: str | list[str], image: ImageInput, mask_image: ImageInput, *,
                control_image: ControlImage | None = None, controlnet_conditioning_scale: float | list[float] = 0.5,
                control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                guess_mode: bool = False, **kwargs: Any) -> PipelineOutput:
        """Inpainting under control (ordinary and 9-channel inpainting UNets; the ControlNets see the 4 latent
        channels); the control image is resized to `image`'s size. The other arguments (kwargs: strength, ...) are
        `StableDiffusionPipeline.inpaint`'s."""
        args = self._control_args(control_image, controlnet_conditioning_scale, control_guidance_start,
                                  control_guidance_end, guess_mode)
        with self._controlled(args):
            return super().inpaint(prompt, image, mask_image, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # The call's ControlNet state

    def _control_args(self, control_image: ControlImage | None, scale: Any, start: Any, end: Any,
                      guess_mode: bool) -> ControlArgs:
        return ControlArgs.check(len(self.controlnet), control_image, scale, start, end, guess_mode)

    @contextmanager
    def _controlled(self, args: ControlArgs) -> Iterator[None]:
        """Hold a call's ControlNet arguments while the plain entry point runs; the previous ones come back after
        (a call made from inside another's callback keeps its own)."""
        outer, self._call_control = self._call_control, args
        try:
            yield
        finally:
            self._call_control = outer

    def _control(self, run: _Run, height: int, width: int) -> Control:
        """The hook of the plain pipeline's common start: the running call's control images, prepared for an
        output of height x width and run.batch images (twice that under guidance, unless guess_mode)."""
        if self._call_control is None:
            raise ValueError(f"this pipeline has {len(self.controlnet)} ControlNet(s): call pipe(...), pipe.img2img "
                             f"or pipe.inpaint with control_image=")
        return self._call_control.prepare(self.controlnet, height=height, width=width, batch=run.batch,
                                          guided=run.guided, device=self.device, dtype=self.dtype)


def _check_controlnet(net: Any, unet: nn.Module, what: str) -> None:
    """A ControlNet's residuals must fit the UNet's skips and its attention the UNet's text width."""
    if not isinstance(net, ControlNetModel):
        raise TypeError(f"{what} must be an ldm.controlnet.ControlNetModel (or a list of them), got "
                        f"{type(net).__name__}")
    for name in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        ours, theirs = getattr(net.config.unet, name), getattr(unet.config, name)
        if ours != theirs:
            raise ValueError(f"{what} has {name}={ours} but the UNet has {theirs}: it cannot control this model")
