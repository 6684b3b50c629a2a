"""The torch Canny detector (ldm/canny.py) on pictures whose edges are known: a square, a ramp, a faint square
joined to a strong one (hysteresis), and the thresholds' effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.canny import canny, canny_image


def square(value: float, size: int = 64, lo: int = 16, hi: int = 48) -> torch.Tensor:
    img = torch.zeros(size, size)
    img[lo:hi, lo:hi] = value
    return img


def test_square_edges_on_the_border_only() -> None:
    edges = canny(square(255.0))
    ys, xs = torch.nonzero(edges, as_tuple=True)
    # every edge pixel lies on the square's outline (one pixel either side of the step)
    near = lambda v: ((v >= 15) & (v <= 16)) | ((v >= 47) & (v <= 48))  # noqa: E731
    on_outline = (near(ys) & (xs >= 15) & (xs <= 48)) | (near(xs) & (ys >= 15) & (ys <= 48))
    assert edges.any() and bool(on_outline.all())
    # thin: one edge pixel per row across each vertical side (non-maximum suppression)
    row = edges[32]
    assert int(row[:32].sum()) == 1 and int(row[32:].sum()) == 1
    # the outline is closed: every side is edged along its length (away from the corners)
    assert bool(edges[20:44, 15:17].any(dim=1).all()) and bool(edges[15:17, 20:44].any(dim=0).all())
    assert not edges[20:44, 20:44].any() and not edges[:10].any()  # nothing inside or far outside


def step(value: float, size: int = 64) -> torch.Tensor:
    """A vertical step (no corners): Sobel L1 magnitude 4 * value along it."""
    img = torch.zeros(size, size)
    img[:, size // 2:] = value
    return img


def test_thresholds_respected() -> None:
    faint = step(40.0)  # magnitude 160 along the step
    assert not canny(faint, 100, 200).any()  # below high: no seed, no edge
    assert canny(faint, 100, 150).any()  # above high now
    assert not canny(faint, 170, 180).any()
    smooth = torch.linspace(0, 255, 64).repeat(64, 1)  # a ramp: magnitude 4 * 4 = 16 everywhere, no edge
    assert not canny(smooth, 20, 40).any()
    assert canny(smooth, 5, 10).any()
    with pytest.raises(ValueError, match="low <= high"):
        canny(faint, 200, 100)


def test_hysteresis_keeps_weak_edges_connected_to_strong_ones() -> None:
    img = step(40.0)
    img[:16, 32:] = 255.0  # the top of the same step is strong: the faint rest is connected to it
    edges = canny(img, 100, 200)
    assert bool(edges[20:60, 31:33].any(dim=1).all())  # the faint part survives along its whole length
    assert not canny(step(40.0), 100, 200).any()  # the same faint step alone is dropped


def test_canny_image_is_rgb_white_on_black() -> None:
    img = Image.fromarray(np.stack([square(255.0).numpy().astype(np.uint8)] * 3, axis=-1))
    out = canny_image(img)
    arr = np.array(out)
    assert out.mode == "RGB" and arr.shape == (64, 64, 3) and set(np.unique(arr)) == {0, 255}
    assert (arr[..., 0] == arr[..., 2]).all()
