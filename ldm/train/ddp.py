"""The Trainer under torchrun: one global batch split over N processes, with the result of one process.

`torchrun --nproc-per-node N -m ldm train ...` (docs/scale.md) starts N trainers; each joins the process group
(ldm/distributed.py) and trains with DistributedDataParallel. The batch sizes of the config are global: rank r takes
rows r*n .. r*n+n-1 of each global batch (n = batch / N; the samples of a step never overlap between ranks), every
rank draws the random numbers of the whole global batch from the same generator and keeps its rows (`mine`), and
DDP averages the gradients. So N processes compute what one does with the same global batch, up to the order of
floating-point sums. One process is the case world_size == 1: no wrapper, every row is its own.

    n, first = share(batch, topo)            # this rank's rows of a global batch
    rows = mine(draw_for_the_whole_batch, topo)
    module = stage_module("unet", vae, unet, text_encoder, topo)   # DDP-wrapped when world_size > 1

Shapes: n rows per rank, C latent channels, h, w latent size, f the VAE's factor, S text tokens.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ldm.distributed import Topology


def share(batch: int, topo: Topology) -> tuple[int, int]:
    """(n, first): how many rows of a global batch this rank takes, and the first of them."""
    n = batch // topo.world_size
    return n, topo.rank * n


def mine(full: Tensor, topo: Topology) -> Tensor:
    """This rank's rows of a draw made for the whole global batch (every rank draws the same numbers)."""
    n, first = share(full.shape[0], topo)
    return full[first:first + n]


def check_shardable(cfg: Any, world_size: int) -> None:
    """The config's global batches (a TrainConfig's vae_batch_size, batch_size) split evenly over the processes."""
    for name in ("vae_batch_size", "batch_size"):
        if getattr(cfg, name) % world_size:
            raise ValueError(f"{name} {getattr(cfg, name)} is the global batch and must split evenly over the "
                             f"{world_size} processes (a multiple of {world_size})")


def parallelism(cfg: Any, world_size: int) -> dict[str, Any]:
    """What the checkpoint metadata and the log record of how the run is split."""
    return {"world_size": world_size, "per_rank_batch": {"vae": cfg.vae_batch_size // world_size,
                                                         "unet": cfg.batch_size // world_size}}


class VAEStage(nn.Module):
    """Stage 1's forward for DDP: x (n, 3, h, w) and the posterior noise (n, C, h/f, w/f) -> the reconstruction and
    the KL per latent element (what posterior.sample(generator) would draw, the noise given)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * noise  # (n, C, h/f, w/f)
        return self.vae.decode(z), posterior.kl().mean() / z[0].numel()


class UNetStage(nn.Module):
    """Stage 2's forward for DDP: the UNet's noise prediction (n, C, h, w) for z_t, t and the caption ids (n, S)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, zt: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        return self.unet(zt, t, self.text_encoder(ids).last_hidden_state)  # context (n, S, D)


def stage_module(stage: str, vae: nn.Module, unet: nn.Module, text_encoder: nn.Module, topo: Topology) -> nn.Module:
    """The trained parts of `stage` as one module, so that DDP sees one forward and all-reduces its gradients (mean
    over ranks) in backward; the plain module with one process."""
    module = VAEStage(vae) if stage == "vae" else UNetStage(unet, text_encoder)
    return nn.parallel.DistributedDataParallel(module) if topo.world_size > 1 else module
