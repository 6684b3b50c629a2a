"""How much memory a request needs, how much there is, and the refusal when it cannot fit.

A generation request (size, batch) or a training batch is checked before any work starts: the activations it
needs are estimated from the model configs alone, by the arithmetic below, and compared with the memory free on
the device. What cannot fit is refused with the figures (`MemoryLimitError`, a ValueError); the `ldm generate`
command instead splits `--num-images` into batches that fit.

The estimate is meant as an upper bound on the activations (the weights are already loaded and not counted; the
measured figures are in docs/reliability.md). It counts every skip tensor the UNet keeps and, with the "math"
attention kernel, fp32-upcast layers or training, the whole score matrix; SDPA's fused kernels hold a block of
FUSED_BLOCK query rows. In elements, for N = batch (x2 with classifier-free guidance), latent size h x w (L = h * w
at UNet level 0, L_l = L / 4^l), widths C_l, heads nh_l and query rows q_l (the attention chunk, all of L_l for
"math", FUSED_BLOCK for SDPA):

    UNet   N * (sum_l (layers + 1) * C_l * L_l          skips kept for the up path
                + 16 * max_l (C_l + C_l+1) * L_l          one block's working tensors (skip concatenated)
                + 2 * max_l nh_l * q_l * L_l)             scores and probabilities of the widest attention
    VAE    B * (8 * max_k C'_k * H_k * W_k + 2 * q * L_t) decoder levels (C'_k: the wider of the level and the one
                                                          before it) at image size or one tile; mid attention
    output B * 3 * H * W * 9 + 64 MiB                     float images, their numpy copy, the uint8 pictures; and
                                                          a fixed allowance for kernels' scratch and the allocator

times the bytes of the dtype; the total is max(UNet, VAE) + latents + outputs. Training keeps every activation for
the backward pass: all levels' tensors (24 per block, down and up) and every attention's scores, times 3
(activations, gradients, the optimizer's transient), per sample; see `training_estimate`.

Free memory: on CUDA `torch.cuda.mem_get_info` plus what torch's allocator holds free; on the CPU `MemAvailable`
of /proc/meminfo, capped by the cgroup limit. `LDM_MEMORY_LIMIT` (e.g. `8GiB`, `500M`, bytes) caps it further.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": GIB, "gb": 1000**3, "gib": GIB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


class MemoryLimitError(ValueError):
    """A request whose estimated memory exceeds what the device has free; the message gives both figures."""


def format_bytes(n: float) -> str:
    if n >= 1024**4 * 1000:
        return f"{n / 1024**4:.3g} TiB"
    for unit, size in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def parse_bytes(text: str, what: str = "LDM_MEMORY_LIMIT") -> int:
    """'8GiB', '500M', '1e9' -> bytes (binary units for K/M/G/T without a B, as `free -h` prints them)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{what}: cannot read {text!r} as a size (e.g. 8GiB, 500M, 1000000)")
    return int(float(m.group(1)) * _UNITS[unit])


def available_bytes(device: Any = "cpu") -> int:
    """Memory free for new tensors on `device` now (see the module docstring), capped by LDM_MEMORY_LIMIT."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _cpu_available()
    limit = os.environ.get("LDM_MEMORY_LIMIT")
    return min(free, parse_bytes(limit)) if limit else free


def _cpu_available() -> int:
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:  # not Linux: the physical memory, the best figure without a dependency
        try:
            free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 1 << 62
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(free, 0)


# ----------------------------------------------------------------------------------------------------------------
# The estimates (module docstring), in bytes


@dataclass(frozen=True)
class Estimate:
    unet: int
    vae: int
    other: int

    @property
    def total(self) -> int:
        return max(self.unet, self.vae) + self.other


def _levels(cfg: Any, h: int, w: int) -> list[tuple[int, int, int, bool]]:
    """(width C_l, positions L_l, heads, has attention) per UNet level at latent size h x w."""
    out = []
    for l, (width, heads, attn) in enumerate(zip(cfg.block_out_channels, cfg.num_heads, cfg.cross_attention_levels)):
        out.append((width, math.ceil(h / 2**l) * math.ceil(w / 2**l), heads, attn))
    return out


OVERHEAD = 64 * 1024**2  # kernels' scratch, the text encoder's pass, the allocator's slack (measured, see docs)
FUSED_BLOCK = 256  # query rows we count for SDPA's fused kernels, which never hold the whole score matrix


def _rows(n: int, chunk: int | None, full: bool) -> int:
    """Query rows whose scores exist at once: the chunk, else all of them (math kernel) or a fused kernel's block."""
    return min(n, chunk or (n if full else FUSED_BLOCK))


def unet_elements(cfg: Any, h: int, w: int, chunk: int | None = None, training: bool = False,
                  full_scores: bool = True) -> int:
    """Activation elements of one sample through the UNet at latent size h x w (see the module docstring)."""
    levels = _levels(cfg, h, w)
    sizes = [c * n for c, n, _, _ in levels]
    skips = sum((cfg.layers_per_block + 1) * s for s in sizes)
    # the up path's blocks take the skip concatenated to the level's own width
    widest = max((c + levels[min(l + 1, len(levels) - 1)][0]) * n for l, (c, n, _, _) in enumerate(levels))
    full = full_scores or training or cfg.upcast_attention  # fp32-upcast layers and backward use the math path
    scores = [nh * _rows(n, chunk, full) * n for _, n, nh, attn in levels if attn]
    if training:  # everything is kept for the backward pass, down and up, plus each level's attention scores
        kept = 2 * (cfg.layers_per_block + 1) * 24 * sum(sizes)  # every block's tensors, down and up
        return 3 * (kept + 2 * (2 * cfg.layers_per_block + 1) * sum(scores))
    return skips + 16 * widest + 2 * max(scores, default=0)


def vae_elements(cfg: Any, height: int, width: int, chunk: int | None = None, training: bool = False,
                 full_scores: bool = True) -> int:
    """Activation elements of one image through the VAE decoder (or encoder) at height x width pixels."""
    f = cfg.downsample_factor
    widths = list(reversed(cfg.block_out_channels))  # decoder: the widest channels at the smallest size
    # a level's first tensors (the upsampled input, the first ResNet) still have the previous level's width
    sizes = [max(c, widths[max(k - 1, 0)]) * math.ceil(height * 2**k / f) * math.ceil(width * 2**k / f)
             for k, c in enumerate(widths)]
    lat = math.ceil(height / f) * math.ceil(width / f)
    scores = _rows(lat, chunk, full_scores or training) * lat if cfg.mid_block_add_attention else 0
    if training:
        return 3 * (2 * (cfg.layers_per_block + 1) * 8 * sum(sizes) + 2 * scores)
    return 8 * max(sizes) + 2 * scores


def generation_estimate(unet_cfg: Any, vae_cfg: Any, height: int, width: int, batch: int, guided: bool,
                        itemsize: int, chunk: int | None = None, vae_tile: int | None = None,
                        fused: bool = False) -> Estimate:
    """The memory one pipeline call of `batch` images at height x width needs (bytes, upper bound).

    fused: attention runs in SDPA's fused kernels (the "sdpa" backend), which hold a block of scores, not all."""
    f = vae_cfg.downsample_factor
    h, w = math.ceil(height / f), math.ceil(width / f)
    n = batch * (2 if guided else 1)
    unet = n * unet_elements(unet_cfg, h, w, chunk, full_scores=not fused) * itemsize
    th, tw = (height, width) if vae_tile is None else (min(height, vae_tile), min(width, vae_tile))
    vae = batch * vae_elements(vae_cfg, th, tw, chunk, full_scores=not fused) * itemsize
    latents = 4 * n * unet_cfg.in_channels * h * w * 4
    outputs = batch * 3 * height * width * (4 + 4 + 1)
    return Estimate(unet, vae, latents + outputs + OVERHEAD)


def check_fits(needed: int, device: Any, what: str) -> None:
    """MemoryLimitError when `needed` bytes exceed what `device` has free."""
    free = available_bytes(device)
    if needed > free:
        raise MemoryLimitError(f"{what} needs about {format_bytes(needed)} of memory, {format_bytes(free)} is "
                               f"free on {device} (the estimate: docs/reliability.md)")


def pipeline_estimate(pipe: Any, height: int, width: int, batch: int, guided: bool) -> Estimate:
    """`generation_estimate` for a loaded pipeline, with its dtype, attention chunk and VAE tiling."""
    from ldm.attention import attention_layers, current_backend

    chunks = {getattr(layer, "chunk", None) for layer in attention_layers(pipe.unet).values()}
    chunk = chunks.pop() if len(chunks) == 1 else None
    vae = pipe.vae
    tile = vae.tile_sample_size if getattr(vae, "use_tiling", False) else None
    fused = current_backend() == "sdpa" and not any(getattr(layer, "processor", None) is not None
                                                    for layer in attention_layers(pipe.unet).values())
    return generation_estimate(pipe.unet.config, vae.config, height, width, batch, guided, pipe.dtype.itemsize,
                               chunk, tile, fused)


def check_generation(pipe: Any, height: int, width: int, batch: int, guided: bool) -> None:
    """Refuse a pipeline call that cannot fit in the free memory of the pipeline's device (before any work)."""
    need = pipeline_estimate(pipe, height, width, batch, guided).total
    check_fits(need, pipe.device, f"generating {batch} image(s) of {width}x{height}")


def images_per_batch(pipe: Any, height: int, width: int, wanted: int, guided: bool) -> int:
    """How many of `wanted` images fit in one batch (at least 1; check_generation refuses what even 1 cannot)."""
    one = pipeline_estimate(pipe, height, width, 1, guided).total
    return max(1, min(wanted, available_bytes(pipe.device) // max(one, 1)))


def training_estimate(cfg: Any) -> int:
    """The memory a training run (ldm.train.TrainConfig) needs at its larger stage, in bytes (upper bound, fp32).

    UNet stage: batch_size samples through the UNet and the text encoder with everything kept for the backward
    pass, plus the images; VAE stage: vae_batch_size crops through the VAE; plus the token embedding with its
    gradient and AdamW's two moments (the one weight whose size a config can inflate on its own)."""
    f = cfg.vae.downsample_factor
    side = cfg.image_size // f
    text = cfg.text
    per_text = text.max_position_embeddings * text.num_hidden_layers * (
        20 * text.hidden_size + 2 * text.num_attention_heads * text.max_position_embeddings)
    unet_stage = cfg.batch_size * (unet_elements(cfg.unet, side, side, training=True) + per_text
                                   + 2 * 3 * cfg.image_size**2)
    vae_stage = cfg.vae_batch_size * (vae_elements(cfg.vae, cfg.vae_crop, cfg.vae_crop, training=True)
                                      + 2 * 3 * cfg.image_size**2)
    embedding = text.vocab_size * text.hidden_size * 4
    return 4 * (max(unet_stage, vae_stage) + embedding)
