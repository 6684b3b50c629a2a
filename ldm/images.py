"""Image input and output for the pipeline and the `ldm` command.

Input: an image is given as a PIL image, a path, a uint8 array (H, W, 3) or a tensor; it becomes the VAE's input,
a float tensor (1, 3, H, W) in [-1, 1], with diffusers' `VaeImageProcessor` arithmetic (uint8 / 255, then 2x - 1)
and its memory layout, so the same picture gives the same latents bit for bit. The layout matters: diffusers
transposes an (H, W, 3) array to (1, 3, H, W), so its VAE receives a channels-last tensor, and the convolutions and
GroupNorm then run their channels-last kernels, which sum in another order than the contiguous ones (the latents
differ by ~1e-6, which a few denoising steps turn into a uint8 level on some pixels). A mask (white = repaint, as diffusers) becomes (1, 1, H, W) in {0, 1}
with diffusers' grayscale conversion and its binarisation at 0.5.

Output: decoded images (B, 3, H, W) in [-1, 1] become a float array (B, H, W, 3) in [0, 1] or PIL images (the
array times 255, rounded, as diffusers' `numpy_to_pil`). PNGs are written atomically (a temporary file in the same
folder, then a rename) with the generation parameters in a `parameters` text chunk in the format of the AUTOMATIC1111
web UI, which the common PNG-info readers (A1111, ComfyUI, Civitai, sd-parsers) understand:

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

Shapes: B batch, H, W image height and width in pixels.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from ldm.fileio import plain_file_mode

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray, Tensor]

# The A1111 names of our schedulers (its "Sampler:" field); PNDM with skip_prk_steps is its PLMS.
SAMPLER_NAMES = {
    "ddim": "DDIM", "lms": "LMS", "pndm": "PLMS", "euler": "Euler", "euler-a": "Euler a",
    "dpm++2m": "DPM++ 2M", "dpm++2m-karras": "DPM++ 2M Karras",
}


# ----------------------------------------------------------------------------------------------------------------
# Reading images and masks


def open_image(image: ImageInput, what: str = "image") -> Image.Image | np.ndarray | Tensor:
    """A path becomes a loaded PIL image (ValueError naming the file if it cannot be read); the rest pass through."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{what}: no such file {str(path)!r}")
        try:
            with warnings.catch_warnings():  # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.load()
                    return img.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{what}: {str(path)!r} is too large to open safely (a decompression bomb? {e}; "
                             f"Pillow's limit is {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{what}: cannot read {str(path)!r} as an image ({e})") from None
    if not isinstance(image, (Image.Image, np.ndarray, Tensor)):
        raise TypeError(f"{what} must be a PIL image, a path, a uint8 array or a tensor, got {type(image).__name__}")
    return image


def image_to_tensor(image: ImageInput, what: str = "image") -> Tensor:
    """An RGB picture as the VAE's input: float32 (1, 3, H, W) in [-1, 1], in diffusers' memory layout.

    A PIL image or path is converted to RGB; an array is (H, W, 3), uint8 in [0, 255] or float in [0, 1]; a tensor
    is (3, H, W) or (1, 3, H, W), uint8 in [0, 255] or float in [0, 1]. A float input is mapped to [-1, 1] in its
    own precision, then made float32, as diffusers normalises before casting.
    """
    image = open_image(image, what)
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))  # (H, W, 3) uint8
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or not (image.dtype == np.uint8
                                                          or np.issubdtype(image.dtype, np.floating)):
            raise ValueError(f"{what}: an array must be uint8 or float of shape (H, W, 3), got {image.dtype} "
                             f"{image.shape}")
        if image.dtype != np.uint8 and image.size and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"{what}: a float array must hold values in [0, 1], got [{image.min():.3g}, "
                             f"{image.max():.3g}]")
        # diffusers' pil_to_numpy + numpy_to_pt: a contiguous (1, H, W, 3) batch, transposed (not copied), so the
        # tensor has channels-last strides (3HW, 1, 3W, 3), the batch stride included (oneDNN reads it too)
        batch = np.stack([image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image])  # (1, H, W, 3)
        x = torch.from_numpy(batch.transpose(0, 3, 1, 2))  # (1, 3, H, W) in [0, 1], channels-last
    else:
        x = _tensor_01(image, channels=3, what=what)
    return (2.0 * x - 1.0).float()  # (1, 3, H, W) in [-1, 1], the layout of x kept


def mask_to_tensor(mask: ImageInput, what: str = "mask_image") -> Tensor:
    """A mask as diffusers reads it: float32 (1, 1, H, W), 1 where the picture is repainted (white), else 0.

    A PIL image or path is converted to grayscale ("L"); an array is uint8 (H, W), (H, W, 1) or (H, W, 3); a tensor
    is (H, W), (1, H, W) or (1, 1, H, W), uint8 or float in [0, 1]. Values are binarised at 0.5 as diffusers does.
    """
    mask = open_image(mask, what)
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.uint8 or not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[-1] in (1, 3))):
            raise ValueError(f"{what}: an array must be uint8 of shape (H, W), (H, W, 1) or (H, W, 3), "
                             f"got {mask.dtype} {mask.shape}")
        mask = Image.fromarray(mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask)
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.array(mask.convert("L")).astype(np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    else:
        m = _tensor_01(mask.reshape(1, 1, *mask.shape[-2:]) if mask.ndim in (2, 3) else mask, channels=1, what=what)
    return (m >= 0.5).float()  # float32; diffusers' binarize: < 0.5 -> 0, >= 0.5 -> 1


def _tensor_01(x: Tensor, channels: int, what: str) -> Tensor:
    """A uint8 or [0, 1] float tensor (C, H, W) / (1, C, H, W) as (1, C, H, W) in [0, 1]: uint8 becomes float32.

    The layout is diffusers' (see the module docstring): a 3-D tensor is stacked into a contiguous batch, a 4-D one
    concatenated, which keeps channels-last strides and makes any other layout contiguous."""
    if (x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[0] != 1)) or x.shape[-3] != channels:
        raise ValueError(f"{what}: a tensor must be ({channels}, H, W) or (1, {channels}, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float().cpu() / 255.0
    elif not x.is_floating_point():
        raise ValueError(f"{what}: a tensor must be uint8 or floating point, got {x.dtype}")
    else:
        x = x.detach().cpu()  # its own float dtype: the caller normalises in it, as diffusers does
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{what}: a float tensor must hold values in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    return torch.stack([x]) if x.ndim == 3 else torch.cat([x])  # (1, C, H, W)


# ----------------------------------------------------------------------------------------------------------------
# Decoded images out


def to_numpy(images: Tensor) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> float32 array (B, H, W, 3) in [0, 1] (diffusers' postprocess)."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    return images.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float array (B, H, W, 3) in [0, 1] -> PIL images, rounding as diffusers' numpy_to_pil."""
    return [Image.fromarray(x) for x in (images * 255).round().astype("uint8")]


# ----------------------------------------------------------------------------------------------------------------
# PNG with generation parameters


def a1111_parameters(
    prompt: str,
    *,
    negative_prompt: str | None = None,
    steps: int,
    sampler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model_name: str | None = None,
    model_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The `parameters` text of the AUTOMATIC1111 web UI: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    fields = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(sampler, sampler), "CFG scale": guidance_scale,
              "Seed": seed, "Size": f"{width}x{height}"}
    if model_hash:
        fields["Model hash"] = model_hash
    if model_name:
        fields["Model"] = model_name
    fields.update(extra or {})
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items()))
    return "\n".join(lines)


def _quote(value: str) -> str:
    """A1111 quotes a value holding a comma, colon or quote as a JSON string."""
    if not any(c in value for c in ',:"\n'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def parse_parameters(text: str) -> dict[str, str]:
    """Read a `parameters` text back (the inverse of `a1111_parameters`, as A1111's PNG-info does).

    Returns 'Prompt', 'Negative prompt' and every 'Key: value' of the last line, values as strings.
    """
    *head, last = text.strip("\n").split("\n")
    out: dict[str, str] = {}
    prompt, negative = [], []
    for line in head:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip() if not negative else line)
        else:
            prompt.append(line)
    out["Prompt"] = "\n".join(prompt)
    if negative:
        out["Negative prompt"] = "\n".join(negative)
    i = 0
    while i < len(last):  # 'Key: value' pairs separated by ', '; a value may be a quoted string
        colon = last.index(": ", i)
        key = last[i:colon].strip()
        j = colon + 2
        if j < len(last) and last[j] == '"':
            k = j + 1
            while last[k] != '"':
                k += 2 if last[k] == "\\" else 1
            value = last[j + 1:k].replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
            j = k + 1
        else:
            k = last.find(", ", j)
            k = len(last) if k < 0 else k
            value, j = last[j:k], k
        out[key] = value
        i = j + 2 if last.startswith(", ", j) else len(last)
    return out


def read_parameters(path: str | os.PathLike) -> str | None:
    """The `parameters` text chunk of a PNG, or None."""
    with Image.open(path) as img:
        return img.info.get("parameters")


def save_png(image: Image.Image, path: str | os.PathLike, *, parameters: str | None = None,
             overwrite: bool = False) -> Path:
    """Write `image` to `path` atomically: a temporary file in the same folder, then a rename.

    Without `overwrite`, an existing file is never replaced (FileExistsError), even one that appears while writing.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        _add_parameters(info, parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, plain_file_mode())  # mkstemp's 0600 -> what the umask gives a plainly written file
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _add_parameters(info: PngImagePlugin.PngInfo, text: str) -> None:
    """A tEXt chunk where the PNG format allows one (Latin-1, no NUL: what A1111 writes), else an iTXt chunk (UTF-8,
    which carries any character; Pillow, A1111 and ComfyUI read both into `info["parameters"]`)."""
    try:
        text.encode("latin-1")
        plain = "\0" not in text
    except UnicodeEncodeError:
        plain = False
    if plain:
        info.add_text("parameters", text)
    else:
        info.add_itxt("parameters", text)


def _move_no_clobber(tmp: str, path: Path) -> None:
    """Rename `tmp` to `path` unless `path` exists (FileExistsError, `tmp` left for the caller to remove)."""
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists, even one created a moment ago
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: check, then rename (a narrow race, never a partial file)
        if path.exists():
            raise FileExistsError(f"{str(path)!r} exists") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def model_hash(path: str | os.PathLike) -> str | None:
    """The A1111 model hash of a checkpoint file: the first 10 hex digits of its sha256; None for a folder or id."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:10]
