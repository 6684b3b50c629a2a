"""Training on two processes (DistributedDataParallel over gloo, as `torchrun --nproc-per-node 2 -m ldm train`
runs it) against one process with the same global batch: the same run up to the order of floating-point sums.

The workers join the process group the way torchrun's workers do: from RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT in their environment (ldm.distributed.join, called by the Trainer). A first session trains 3 of 6
steps and stops; a second resumes from rank 0's checkpoint, again on two processes, and finishes.

Tolerance: each rank's gradient is the mean over its half of the batch and DDP averages the halves, where one
process takes the mean over the whole batch: the same sum in another order (and the convolutions see batches of
2 instead of 4). Measured on 2 CPU cores after 6 AdamW steps: weights and their EMA differ by at most 5.4e-6
(absolute), losses by 1e-7 relative. Asserted: weights and EMA within 2e-5 absolute (a tenth of one step's
update, lr 1e-3 VAE / 5e-4 UNet), losses within 1e-5 relative, the RNG state identical.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ldm import distributed
from ldm.train import Trainer, load_state
from ldm.train.trainer import _check_shardable
from tests.test_train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
STEPS = dict(vae_batch_size=4, batch_size=4, vae_steps=3, unet_steps=3, checkpoint_every=1)


def _worker(rank: int, world: int, port: int, out: str, until: int | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    checkpoint = os.path.join(out, "checkpoint.safetensors")
    if until is not None:
        Trainer(tiny(out, **STEPS), progress=False).run(until=until, finish=False)
    else:
        Trainer(tiny(out, **STEPS), resume=checkpoint, progress=False).run(finish=False)
    distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_and_resumes(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, _free_port(), out, 3), nprocs=2)  # session 1: steps 1-3 (the VAE stage)
    _, meta = load_state(tmp_path / "ddp" / "checkpoint.safetensors")
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["per_rank_batch"] == {"vae": 2, "unet": 2}
    mp.spawn(_worker, args=(2, _free_port(), out, None), nprocs=2)  # session 2: resume, steps 4-6

    one = Trainer(tiny(tmp_path / "one", **STEPS), progress=False)
    one.run(finish=False)
    a, meta_a = load_state(tmp_path / "ddp" / "checkpoint.safetensors")
    b, meta_b = load_state(one.checkpoint_path)
    assert a.keys() == b.keys() and meta_a["step"] == meta_b["step"] == 6
    weights = [k for k in a if k.split(".")[0] in ("vae", "unet", "text_encoder", "ema")]
    worst = max(weights, key=lambda k: (a[k] - b[k]).abs().max().item())
    print(f"worst weight difference {(a[worst] - b[worst]).abs().max().item():.2g} ({worst})")
    assert (a[worst] - b[worst]).abs().max().item() < 2e-5, worst
    assert torch.equal(a["rng.torch"], b["rng.torch"])
    for stage in ("vae", "unet"):
        torch.testing.assert_close(torch.tensor(meta_a["losses"][stage]), torch.tensor(meta_b["losses"][stage]),
                                   rtol=1e-5, atol=0)
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("start") == 2  # one line per session: rank 0 alone writes
    assert [r["step"] for r in log if r["event"] == "checkpoint"] == [1, 2, 3, 4, 5, 6]
    assert all(r["world_size"] == 2 and r["per_rank_batch"] == {"vae": 2, "unet": 2} for r in log)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.safetensors", "train_log.jsonl",
                                                                   "vae_reconstructions.png"]


def test_global_batch_must_split_evenly(tmp_path):
    _check_shardable(tiny(tmp_path, vae_batch_size=4, batch_size=6), 2)
    with pytest.raises(ValueError, match="batch_size 6 is the global batch and must split evenly over the 4"):
        _check_shardable(tiny(tmp_path, vae_batch_size=4, batch_size=6), 4)


def test_one_process_topology_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.topology() == distributed.Topology(0, 1, 0)
    assert distributed.broadcast({"x": 1}) == {"x": 1}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        distributed.topology()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one' is not an integer"):
        distributed.topology()
