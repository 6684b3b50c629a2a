"""Batch generation (`ldm generate --prompts FILE --outdir DIR`, ldm/batch.py) on the packaged shapes model: one
process and two (torchrun, gloo on the CPU) give byte-identical PNGs; a run whose rank is killed midway finishes
on a rerun with every image exactly once and a correct manifest; bad input is one line naming the file and line, exit 2,
before any work (no model load, no folder made).

Byte identity is asserted with equal bytes, not a tolerance: every image's seed and batch are fixed by its index
(ldm/batch.py), and each process runs one torch thread (`--threads 1`, torchrun's default too), so the same
kernels run on the same inputs. The runs use 2 denoising steps at 64x64: seconds each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ldm import batch
from ldm.cli import main
from ldm.images import read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parent.parent
JOB = [{"prompt": "a red circle"},
       {"prompt": "a blue square", "negative_prompt": "a green square"},
       {"prompt": "a green triangle", "seed": 77},
       {"prompt": "a yellow circle", "steps": 3},
       {"prompt": "a cyan square"},
       {"prompt": "a purple triangle", "guidance": 3.0},
       {"prompt": "a red square above a blue circle", "scheduler": "euler-a"},
       {"prompt": "a yellow triangle"}]
FLAGS = ["--seed", "100", "--steps", "2", "--batch-size", "2", "--threads", "1"]


def write_job(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in JOB))
    return path


def command(prompts: Path, outdir: Path, *extra: str) -> list[str]:
    return ["generate", "--prompts", str(prompts), "--outdir", str(outdir), *FLAGS, *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], nproc: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "ldm", *args]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The job run by one process, in this process."""
    folder = tmp_path_factory.mktemp("one")
    assert main(command(write_job(folder), folder / "out")) == 0
    return folder / "out"


def check_complete(out: Path) -> None:
    """Every image exactly once, each row naming its file, index, seed and the PNG's own A1111 text."""
    rows = manifest(out)
    assert [r["index"] for r in rows] == list(range(len(JOB)))
    assert sorted(r["file"] for r in rows) == sorted(pngs(out))
    for row, spec in zip(rows, JOB):
        assert row["prompt"] == spec["prompt"]
        assert row["seed"] == spec.get("seed", 100 + row["index"])
        assert row["steps"] == spec.get("steps", 2) and row["guidance"] == spec.get("guidance", 7.5)
        assert read_parameters(out / row["file"]) == row["parameters"]
        assert f"Seed: {row['seed']}," in row["parameters"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or "rank-" in p.name]  # nothing left over


def test_one_process_writes_the_job(reference):
    check_complete(reference)
    rows = manifest(reference)
    assert {r["rank"] for r in rows} == {0} and {r["world_size"] for r in rows} == {1}
    assert rows[6]["scheduler"] == "euler-a" and "Sampler: Euler a" in rows[6]["parameters"]
    assert rows[1]["negative_prompt"] == "a green square" and "Negative prompt: a green square" in rows[1]["parameters"]
    assert Image.open(reference / rows[0]["file"]).size == (64, 64)
    job = json.loads((reference / "job.json").read_text())
    assert job["seed"] == 100 and job["batch_size"] == 2


def test_two_processes_are_byte_identical_to_one(reference, tmp_path):
    proc = torchrun(command(write_job(tmp_path), tmp_path / "out"))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert pngs(tmp_path / "out") == pngs(reference)
    check_complete(tmp_path / "out")
    rows = manifest(tmp_path / "out")
    assert {r["rank"] for r in rows} == {0, 1} and {r["world_size"] for r in rows} == {2}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("rank", "world_size")} for r in rs]  # noqa: E731
    assert strip(rows) == strip(manifest(reference))


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (read from /proc), or None while it is not started."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_leaves_a_state_the_rerun_completes(reference, tmp_path):
    prompts, out = write_job(tmp_path), tmp_path / "out"
    proc = torchrun(command(prompts, out, "--batch-size", "1"))  # one image per batch: more points to die at
    part, deadline, pid = out / "manifest.rank-1.jsonl", time.monotonic() + 300, None
    while time.monotonic() < deadline and proc.poll() is None:
        pid = pid or _rank_pid(proc.pid, 1)
        if pid and part.exists() and part.read_text().count("\n") >= 1:
            os.kill(pid, signal.SIGKILL)  # rank 1 dies after its first image; torchrun stops rank 0
            break
        time.sleep(0.05)
    proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run finished before a rank could be killed"
    done = len(list(out.glob("*.png")))
    assert 1 <= done < len(JOB)
    with open(part, "a") as f:  # and a row torn by the kill
        f.write('{"index": 5, "file": "000005-a-pur')
    (out / ".000007-a-yellow-triangle.png.x1y2.tmp").write_bytes(b"\x89PNG half")  # a temporary file left behind
    # The rerun: one process, other batch size than the job's would be refused; the job's is given.
    assert main(command(prompts, out, "--batch-size", "1")) == 0
    check_complete(out)
    assert 1 in {r["rank"] for r in manifest(out)}  # the rows rank 1 wrote before it died survive, with its rank
    # Same bytes as the batch-size-1 job made in one go (equal to the single-image command's, see below).
    fresh = tmp_path / "fresh"
    assert main(command(prompts, fresh, "--batch-size", "1")) == 0
    assert pngs(out) == pngs(fresh)


def test_rerun_of_a_complete_job_skips_everything_and_keeps_the_manifest(reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = (out / "manifest.jsonl").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(command(write_job(tmp_path), out)) == 0
    assert f"{len(JOB)} already in" in capsys.readouterr().err
    assert (out / "manifest.jsonl").read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps


def test_a_half_done_batch_is_redone_whole_without_duplicate_rows(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    rows = manifest(out)
    (out / rows[4]["file"]).unlink()  # image 4 shares its batch with image 2 (--batch-size 2): that batch reruns
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:3] + lines[5:]))  # and rows 3 and 4 are lost
    assert main(command(write_job(tmp_path), out)) == 0
    assert pngs(out) == pngs(reference)
    assert manifest(out) == manifest(reference)


def test_batch_size_one_image_equals_the_single_image_command(reference, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a green circle\n\na red triangle\n")
    assert main(["generate", "--prompts", str(prompts), "--outdir", str(tmp_path / "out"), "--seed", "5",
                 "--steps", "2", "--threads", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red triangle", "--seed", "6", "--steps", "2", "--threads", "1",
                 "--out", "single.png"]) == 0
    assert (tmp_path / "out" / "000001-a-red-triangle.png").read_bytes() == (tmp_path / "single.png").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Planning: no model needed


def plan(lines: list[dict], seed: int = 10, num_images: int = 1, batch_size: int = 2) -> list[list[batch.Item]]:
    rows = [{**dict(negative_prompt=None, seed=None, steps=30, guidance=7.5, width=None, height=None,
                    scheduler=None), **line, "line": n} for n, line in enumerate(lines, 1)]
    return batch.plan_batches(batch.plan_items(rows, seed, num_images), batch_size)


def test_plan_seeds_by_index_and_batches_by_shared_settings():
    batches = plan([{"prompt": "a"}, {"prompt": "b", "steps": 5}, {"prompt": "c", "seed": 3}, {"prompt": "d"},
                    {"prompt": "e"}], num_images=2)
    assert [[i.index for i in b] for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    items = sorted((i for b in batches for i in b), key=lambda i: i.index)
    assert [i.seed for i in items] == [10, 11, 12, 13, 3, 4, 16, 17, 18, 19]  # S + k; a line's seed s: s + j
    mixed = plan([{"prompt": "a"}, {"prompt": "b", "guidance": 2.0}, {"prompt": "c"}, {"prompt": "d"}])
    assert [[i.index for i in b] for b in mixed] == [[0, 2], [1], [3]]
    names = [batch.file_name(i, 12000) for i in items[:2]]
    assert names == ["000000-a.png", "000001-a.png"] and batch.file_name(items[0], 10**7) == "0000000-a.png"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit 2, before any work


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat", "steps": 4', "prompts.jsonl, line 3: not valid JSON"),
    ('{"prompt": "a cat", "stpes": 4}', "prompts.jsonl, line 3: unknown key 'stpes'"),
    ('{"negative_prompt": "x"}', "prompts.jsonl, line 3: \"prompt\" must be given"),
    ('{"prompt": "a cat", "width": 60}', "prompts.jsonl, line 3: \"width\" must be a multiple of 8"),
    ('{"prompt": "a cat", "scheduler": "heun"}', "prompts.jsonl, line 3: \"scheduler\" must be one of"),
    ('["a cat"]', "prompts.jsonl, line 3: expected a JSON object"),
])
def test_a_bad_line_is_named_before_any_work(tmp_path, capsys, monkeypatch, line, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a dog"}\n\n' + line + "\n")
    monkeypatch.setattr("ldm.load_pipeline", lambda *a, **k: pytest.fail("the model loaded despite a bad line"))
    assert main(["generate", "--prompts", str(prompts), "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm generate: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unwritable_outdir_and_wrong_flags_are_usage_errors(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    if os.geteuid() == 0:  # root writes anywhere a mode bit says no: take a file system that takes no files
        outdir = "/proc/ldm-batch-test/out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        outdir = str(locked / "out")
    cases = [(["--outdir", outdir], "--outdir: cannot write in"),
             (["--outdir", str(prompts)], "is a file, not a folder"),
             (["--outdir", str(tmp_path / "o"), "--out", "x.png"], "--out does not apply to --prompts"),
             (["--outdir", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size must be >= 1"),
             ([], "needs both --prompts FILE and --outdir DIR")]
    for extra, message in cases:
        assert main(["generate", "--prompts", str(prompts), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_rerun_with_other_settings_is_refused(reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    assert main(command(write_job(tmp_path), out, "--steps", "3")) == 2
    assert "holds another job (differs in: steps)" in capsys.readouterr().err
    assert (out / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()
