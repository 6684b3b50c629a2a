"""Captioned images of coloured shapes, made on the fly and deterministic by seed: the training set of the tiny model.

No paper: a synthetic toy domain in the spirit of dSprites (Matthey et al. 2017) and CLEVR (Johnson et al. 2017),
small enough that a latent diffusion model learns it on a laptop CPU, rich enough to test text conditioning
(colour, shape, relation) and compositional generalisation (colour-shape pairs held out of training).

    ShapesDataset(size=64, seed=0, split="train")[i] -> Sample(image uint8 (H, W, 3), caption, scene, masks)
    ShapesDataset.batch(start, n) -> (images float (n, 3, H, W) in [-1, 1], captions list[str])
    classify(image uint8 (H, W, 3)) -> Prediction(colour, shape) | None   # the pixel classifier the tests use

A scene holds one object ("a red circle") or two ("a red circle above a blue square") on a plain, unsaturated
background. Sample i of a split is drawn from `numpy.random.default_rng([seed, split, i])`, so any sample can be
made again from its index alone (a resumed run sees exactly the batches it would have seen).

Shapes: H, W image size in pixels; n batch.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {  # six hues 60 degrees apart, so the classifier can tell them apart
    "red": (220, 30, 30), "yellow": (230, 210, 30), "green": (30, 170, 50),
    "cyan": (30, 200, 210), "blue": (40, 60, 220), "purple": (150, 40, 200),
}
HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((245, 245, 240), (205, 205, 205), (128, 128, 128), (60, 60, 65), (20, 20, 20), (225, 215, 195))
RELATIONS = ("above", "below", "left of", "right of")
# Left out of the training split: the test asks for them and checks the model composes colour and shape.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("blue", "circle"), ("yellow", "square"), ("purple", "triangle")})
SPLITS = {"train": 0, "test": 1}
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Shape:
    """One object: its colour and kind, centre (cx, cy) and half-size r, in pixels of the final image."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[Shape, ...]
    relation: str | None  # how objects[0] stands to objects[1]; None for one object

    @property
    def caption(self) -> str:
        first = f"a {self.objects[0].colour} {self.objects[0].shape}"
        if self.relation is None:
            return first
        return f"{first} {self.relation} a {self.objects[1].colour} {self.objects[1].shape}"


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    scene: Scene
    masks: np.ndarray  # (n_objects, H, W) bool: each object's pixels (covered at least half)


def caption_pairs(split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws from: all but HELD_OUT for "train", all of them for "test"."""
    _check_split(split)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in pairs if p not in HELD_OUT] if split == "train" else pairs


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def random_scene(rng: np.random.Generator, size: int, split: str = "train", two_objects: float = 0.4) -> Scene:
    """Draw a scene: background, one or two objects (distinct pairs), sizes and positions inside the frame."""
    pairs = caption_pairs(split)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if rng.random() >= two_objects:
        colour, shape = pairs[rng.integers(len(pairs))]
        r = rng.uniform(0.18, 0.32) * size
        cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
        return Scene(background, (Shape(colour, shape, cx, cy, r),), None)
    i, j = rng.choice(len(pairs), size=2, replace=False)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    objects = []
    for k, (colour, shape) in enumerate((pairs[i], pairs[j])):
        r = rng.uniform(0.12, 0.2) * size
        along = rng.uniform(r + 2, size / 2 - r)  # wholly in its own half: the two never overlap
        across = rng.uniform(r + 2, size - r - 2)
        first_half = (k == 0) == (relation in ("above", "left of"))
        along = along if first_half else size - along
        vertical = relation in ("above", "below")
        cx, cy = (across, along) if vertical else (along, across)
        objects.append(Shape(colour, shape, cx, cy, r))
    return Scene(background, tuple(objects), relation)


def _draw(draw: ImageDraw.ImageDraw, obj: Shape, fill: tuple[int, int, int] | int, k: int) -> None:
    cx, cy, r = obj.cx * k, obj.cy * k, obj.r * k
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:  # an upright triangle, apex up, inside the same 2r x 2r box
        draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=fill)


def render(scene: Scene, size: int,
           palette: dict[str, tuple[int, int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The scene as an image (H, W, 3) uint8 and its object masks (n, H, W) bool, anti-aliased by supersampling.
    palette: colour name -> RGB (default COLOURS; ldm/train/embedding.py draws colours the model never saw)."""
    palette = COLOURS if palette is None else palette
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), scene.background)
    draw = ImageDraw.Draw(canvas)
    masks = []
    for obj in scene.objects:
        _draw(draw, obj, palette[obj.colour], k)
        mask = Image.new("L", (size * k, size * k), 0)
        _draw(ImageDraw.Draw(mask), obj, 255, k)
        masks.append(np.asarray(mask.resize((size, size), Image.BOX)) >= 128)
    image = np.asarray(canvas.resize((size, size), Image.BOX))  # (H, W, 3)
    return image, np.stack(masks)


class ShapesDataset:
    """An endless, indexable stream of captioned shape images; sample i depends only on (seed, split, i)."""

    def __init__(self, size: int = 64, seed: int = 0, split: str = "train", two_objects: float = 0.4) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 16:
            raise ValueError(f"size must be an int >= 16 (pixels), got {size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        _check_split(split)
        if not 0.0 <= two_objects <= 1.0:
            raise ValueError(f"two_objects must be a probability in [0, 1], got {two_objects!r}")
        self.size, self.seed, self.split, self.two_objects = size, seed, split, two_objects

    def scene(self, index: int) -> Scene:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise IndexError(f"index must be a non-negative int, got {index!r}")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        return random_scene(rng, self.size, self.split, self.two_objects)

    def __getitem__(self, index: int) -> Sample:
        scene = self.scene(index)
        image, masks = render(scene, self.size)
        return Sample(image, scene.caption, scene, masks)

    def batch(self, start: int, n: int) -> tuple[torch.Tensor, list[str]]:
        """Samples start .. start+n-1 as a float batch (n, 3, H, W) in [-1, 1] and their captions."""
        samples = [self[start + i] for i in range(n)]
        images = np.stack([s.image for s in samples])  # (n, H, W, 3)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 3, H, W)
        return x, [s.caption for s in samples]


# ------------------------------------------------------------------------------------------------------------------
# The pixel classifier: what colour and shape is the one object in an image?


@dataclass(frozen=True)
class Prediction:
    colour: str
    shape: str
    fill: float  # object area / its bounding-box area: 1 square, pi/4 circle, 1/2 triangle
    pixels: int  # object pixels found


def foreground(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels (H, W) bool that differ from the background, taken as the median colour of the image's border."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (4W, 3)
    background = np.median(border, axis=0)
    return np.linalg.norm(img - background, axis=-1) > threshold


def hue_saturation_value(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (..., 3) -> HSV (..., 3): hue in degrees [0, 360), saturation and value in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)  # chroma
    safe = np.where(c > 0, c, 1.0)
    h = np.where(v == r, (g - b) / safe % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    s = np.where(v > 0, c / np.where(v > 0, v, 1.0), 0.0)
    return np.stack([np.where(c > 0, h, 0.0), s, v], axis=-1)


def dominant_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The colour name whose hue the saturated pixels inside `mask` vote for most (votes weighted by saturation)."""
    hsv = hue_saturation_value(image[mask].astype(np.float32) / 255.0)  # (N, 3)
    hsv = hsv[(hsv[:, 1] >= 0.35) & (hsv[:, 2] >= 0.2)]  # grey or dark pixels have no hue to read
    names = list(HUES)
    centres = np.array([HUES[c] for c in names])  # (K,)
    distance = np.abs(hsv[:, :1] - centres)  # (N, K), around the colour circle:
    nearest = np.minimum(distance, 360.0 - distance).argmin(axis=1)  # (N,)
    votes = np.bincount(nearest, weights=hsv[:, 1], minlength=len(names))
    return names[int(votes.argmax())]


def shape_of(mask: np.ndarray) -> tuple[str, float]:
    """Circle, square or triangle from the fill ratio of the mask in its bounding box (2nd-98th percentile)."""
    ys, xs = np.nonzero(mask)
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    box = (y1 - y0 + 1) * (x1 - x0 + 1)
    fill = float(mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1].sum() / box)
    if fill > 0.89:  # between pi/4 = 0.785 and 1
        return "square", fill
    if fill > 0.70:  # between 1/2 and pi/4 (a trimmed triangle box reads up to ~0.64)
        return "circle", fill
    return "triangle", fill


def classify(image: np.ndarray, min_pixels: int = 20) -> Prediction | None:
    """The colour and shape of the single object in `image` (H, W, 3) uint8, or None when nothing stands out."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise TypeError(f"image must be a uint8 array (H, W, 3), got "
                        f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    mask = foreground(image)
    if mask.sum() < min_pixels:
        return None
    shape, fill = shape_of(mask)
    return Prediction(dominant_colour(image, mask), shape, fill, int(mask.sum()))
