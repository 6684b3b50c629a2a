"""The Canny edge detector in torch: a photo -> the white-on-black edge map a canny ControlNet expects.

Paper: Canny, "A Computational Approach to Edge Detection" (IEEE PAMI 1986). Reference for the conventions: OpenCV's
`cv2.Canny(image, low, high)` as ControlNet's canny annotator calls it (lllyasviel/ControlNet
`annotator/canny`, thresholds 100 / 200 by default): 3x3 Sobel gradients on the 0..255 grayscale image, the L1
magnitude |gx| + |gy|, non-maximum suppression across the gradient direction, then hysteresis: pixels above `high`
are edges, pixels above `low` are edges when connected (8-neighbourhood) to one. Not bit-identical to OpenCV
(its integer arithmetic and direction bins differ slightly), the same behaviour.

Shapes: H, W image height and width.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def canny(gray: Tensor, low: float = 100.0, high: float = 200.0) -> Tensor:
    """gray: (H, W) float in 0..255 -> (H, W) bool edges. Thresholds on the L1 Sobel magnitude, as OpenCV."""
    if gray.ndim != 2:
        raise ValueError(f"canny: expected a (H, W) grayscale tensor, got shape {tuple(gray.shape)}")
    if not 0 <= low <= high:
        raise ValueError(f"canny: thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    x = F.pad(gray.float()[None, None], (1, 1, 1, 1), mode="replicate")  # (1, 1, H+2, W+2)
    kernels = torch.stack([SOBEL_X, SOBEL_X.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy (y down)
    gx, gy = F.conv2d(x, kernels)[0]  # (H, W) each
    magnitude = gx.abs() + gy.abs()
    thin = _non_maximum_suppression(magnitude, gx, gy)
    return _hysteresis(thin, low, high)


def _non_maximum_suppression(magnitude: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    """Keep a pixel only where its magnitude is a maximum along the gradient direction (4 direction bins)."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0  # (H, W) in [0, 180)
    bins = (torch.round(angle / 45.0) % 4).long()  # 0: horizontal, 1: 45 deg, 2: vertical, 3: 135 deg
    padded = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]  # (H+2, W+2), zero border
    H, W = magnitude.shape
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for b, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
        behind = padded[1 - dy:1 - dy + H, 1 - dx:1 - dx + W]
        # >= on one side, > on the other: a plateau two pixels wide keeps one of them, as OpenCV does
        local_max = (magnitude > ahead) & (magnitude >= behind)
        keep |= (bins == b) & local_max
    return torch.where(keep, magnitude, torch.zeros_like(magnitude))


def _hysteresis(magnitude: Tensor, low: float, high: float) -> Tensor:
    """Strong pixels (> high) and the weak ones (> low) 8-connected to them, grown until nothing changes."""
    weak = magnitude > low
    edges = magnitude > high
    for _ in range(magnitude.numel()):  # each pass grows every edge by one pixel; stops when stable
        grown = F.max_pool2d(edges[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def canny_image(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """A picture -> its RGB edge map (255 on edges, 0 elsewhere), the control image of a canny ControlNet."""
    gray = torch.from_numpy(np.array(image.convert("L")).astype(np.float32))  # (H, W) in 0..255
    edges = canny(gray, low, high)
    out = (edges.numpy().astype(np.uint8) * 255)[..., None].repeat(3, axis=-1)  # (H, W, 3)
    return Image.fromarray(out)


PREPROCESSORS = {"canny": canny_image}  # --control-preprocess names
