"""torch.distributed in one place: which process this is, its device, and the few collectives ldm needs.

`torchrun --nproc-per-node N -m ldm ...` (torch.distributed.run) starts N copies of the command and tells each its
place through the environment: RANK (0 .. WORLD_SIZE-1 over every node), WORLD_SIZE, LOCAL_RANK (0 .. N-1 on its
node; the CUDA device it uses), MASTER_ADDR / MASTER_PORT (the rendezvous). Without torchrun none of these is set
and everything here degrades to one process: no process group, collectives are identities. docs/scale.md shows the
launches (one node, several nodes, Slurm).

    with process_group("gloo") as topo:      # init_process_group when WORLD_SIZE > 1, destroyed on the way out
        topo.rank, topo.world_size, topo.local_rank, topo.is_main
        value = broadcast(value)                 # rank 0's Python object, on every rank
        barrier()

Backends: gloo on CPUs (and for ldm's own coordination, which only moves small Python objects), NCCL for DDP's
gradient all-reduce on CUDA GPUs.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Topology:
    """Where this process stands: its global rank, the number of processes, its rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files (checkpoints, logs, the merged manifest)."""
        return self.rank == 0


def topology() -> Topology:
    """This process's place: from the live process group if there is one, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return Topology(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} is not a "
                         f"valid place (need 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)")
    return Topology(rank, world, local)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"torchrun environment: {name}={value!r} is not an integer") from None


def device_for(requested: str | None, topo: Topology) -> torch.device:
    """The device of this rank: `cuda:LOCAL_RANK` for "cuda" (the default when CUDA is available), else the CPU."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    if topo.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {topo.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                         f"start at most that many processes per node (--nproc-per-node)")
    torch.cuda.set_device(topo.local_rank)
    return torch.device("cuda", topo.local_rank)


@contextlib.contextmanager
def process_group(backend: str = "gloo", timeout_minutes: float = 60.0) -> Iterator[Topology]:
    """Join the process group torchrun set up (when WORLD_SIZE > 1 and none is live yet); leave it at the end.

    A group that is already initialised (a test's torch.multiprocessing workers, a caller's own) is used as is and
    left alone.
    """
    topo = topology()
    own = topo.world_size > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        topo = topology()
    try:
        yield topo
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; the value itself with one process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over the ranks (a copy; the input is left as it is)."""
    if not is_distributed():
        return x.detach().clone()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def join(backend: str = "gloo", timeout_minutes: float = 60.0) -> Topology:
    """process_group() for code that owns no with-block (the Trainer): join torchrun's group now if it set one up
    and none is live, and leave it when the interpreter exits. Returns this process's place."""
    topo = topology()
    if topo.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        atexit.register(_leave)
    return topology()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
