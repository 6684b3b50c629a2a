"""ControlNet in the pipeline: the control images, the per-step scales, and the residuals the UNet adds.

`ControlArgs` is a call's arguments, checked; `ControlArgs.prepare` gives the call's `Control`, whose `residuals`
the shared denoising loop (`StableDiffusionPipeline.denoise`) asks for at every step. The pipeline class that takes
these arguments is ldm/pipeline_controlnet.py. Mirrors diffusers 0.42.1 `pipelines/controlnet/pipeline_controlnet.py` (and `_img2img`, `_inpaint`), with
`MultiControlNetModel` for several ControlNets:
- preprocessing: the control image, RGB, resized to the output size (PIL: Lanczos; tensors: nearest), in [0, 1]
  (not [-1, 1]: diffusers' control image processor does not normalise); repeated over the batch, and twice under
  classifier-free guidance (both halves see it) unless guess_mode;
- the schedule: ControlNet k acts on step i of n when start_k <= i/n and (i+1)/n <= end_k
  (`control_guidance_start` / `control_guidance_end`), its residuals times `controlnet_conditioning_scale`;
- guess_mode under guidance: the ControlNets see only the conditional half (latents and prompt) with the log-spaced
  scales of ldm/controlnet.py, and the unconditional half gets zero residuals;
- several ControlNets: their residuals are summed.
No random draws: a controlled call draws exactly what the uncontrolled one does.

Shapes: B images, C latent channels, h, w latent size, H, W image size (= 8 h, 8 w).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.images import ImageInput, _tensor_01, open_image


def control_image_tensor(image: ImageInput, height: int, width: int, what: str = "control_image") -> Tensor:
    """A control image as diffusers' control image processor gives it: float32 (1, 3, H, W) in [0, 1]."""
    img = open_image(image, what)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"{what}: an array must be uint8 of shape (H, W, 3), got {img.dtype} {img.shape}")
        img = Image.fromarray(img)
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.LANCZOS)
        return torch.from_numpy(np.array(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = _tensor_01(img, channels=3, what=what)  # (1, 3, H', W')
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width))  # nearest, as diffusers resizes tensors
    return x


def default_size(control_image: ImageInput | list, f: int) -> tuple[int, int]:
    """txt2img's size when none is given: the (first) control image's, rounded down to a multiple of f."""
    first = control_image[0] if isinstance(control_image, (list, tuple)) else control_image
    img = open_image(first, "control_image")
    if isinstance(img, Image.Image):
        h, w = img.height, img.width
    else:
        h, w = (img.shape[0], img.shape[1]) if isinstance(img, np.ndarray) else img.shape[-2:]
    return h - h % f, w - w % f


def _per_net(value: Any, n: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} ControlNet(s)")
    for v in values:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise ValueError(f"{name} must be a number or a list of numbers (one per ControlNet), got {value!r}")
    return [float(v) for v in values]


@dataclass
class Control:
    """One call's ControlNet state: the nets, their prepared images and scales, the step window, guess_mode."""

    nets: list[Any]  # ldm.controlnet.ControlNetModel
    images: list[Tensor]  # per net: (B or 2B, 3, H, W) in the pipeline's dtype
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    guided: bool

    def residuals(self, i: int, n_steps: int, x: Tensor, t: Tensor, context: Tensor) -> dict[str, Any]:
        """The UNet's residual arguments for step i of n_steps; x (2B or B, C, h, w) scaled, before any inpainting
        channels; context (2B or B, S, D)."""
        if self.guess_mode and self.guided:  # the ControlNets see the conditional half only
            x, context = x.chunk(2)[1], context.chunk(2)[1]
        down_sum, mid_sum = None, None
        for net, image, scale, start, end in zip(self.nets, self.images, self.scales, self.starts, self.ends):
            keep = 1.0 - float(i / n_steps < start or (i + 1) / n_steps > end)
            down, mid = net(x, t, context, image, conditioning_scale=scale * keep, guess_mode=self.guess_mode)
            if down_sum is None:
                down_sum, mid_sum = down, mid
            else:
                down_sum = [a + b for a, b in zip(down_sum, down)]
                mid_sum = mid_sum + mid
        if self.guess_mode and self.guided:  # zero residuals for the unconditional half
            down_sum = [torch.cat([torch.zeros_like(d), d]) for d in down_sum]
            mid_sum = torch.cat([torch.zeros_like(mid_sum), mid_sum])
        return {"down_block_additional_residuals": down_sum, "mid_block_additional_residual": mid_sum}


@dataclass(frozen=True)
class ControlArgs:
    """One call's ControlNet arguments, checked against the number of ControlNets before any work: the control
    images as given, one scale and step window per ControlNet, guess_mode (the pipeline's keyword arguments, with
    diffusers' names, become these fields)."""

    images: list[Any]  # one ImageInput per ControlNet
    scales: list[float]  # controlnet_conditioning_scale
    starts: list[float]  # control_guidance_start
    ends: list[float]  # control_guidance_end
    guess_mode: bool

    @classmethod
    def check(cls, n: int, control_image: Any, scale: Any, start: Any, end: Any, guess_mode: bool) -> ControlArgs:
        """The keyword arguments of a call to a pipeline with n ControlNets; a ValueError names a bad one."""
        if control_image is None:
            raise ValueError(f"this pipeline has {n} ControlNet(s): pass control_image= (one image per ControlNet)")
        images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        if len(images) != n:
            raise ValueError(f"control_image has {len(images)} image(s) for {n} ControlNet(s): pass one per "
                             f"ControlNet")
        if not isinstance(guess_mode, bool):
            raise TypeError(f"guess_mode must be a bool, got {type(guess_mode).__name__}")
        scales = _per_net(scale, n, "controlnet_conditioning_scale")
        starts = _per_net(start, n, "control_guidance_start")
        ends = _per_net(end, n, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control_guidance_start {s} and control_guidance_end {e} must satisfy "
                                 f"0 <= start < end <= 1")
        return cls(images, scales, starts, ends, guess_mode)

    def prepare(self, nets: list[Any], *, height: int, width: int, batch: int, guided: bool, device: torch.device,
                dtype: torch.dtype) -> Control:
        """The call's Control: the images preprocessed for an output of height x width and a batch of B images."""
        # diffusers: a global-pooling ControlNet (1.1 shuffle) always runs in guess mode (the first net decides)
        guess_mode = self.guess_mode or bool(nets[0].config.global_pool_conditions)
        n, prepared = len(nets), []
        for k, image in enumerate(self.images):
            x = control_image_tensor(image, height, width, f"control_image[{k}]" if n > 1 else "control_image")
            x = x.repeat_interleave(batch, dim=0)  # (B, 3, H, W)
            if guided and not guess_mode:
                x = torch.cat([x] * 2)  # (2B, 3, H, W)
            prepared.append(x.to(device, dtype))
        return Control(list(nets), prepared, self.scales, self.starts, self.ends, guess_mode, guided)
