"""Batch generation: `ldm generate --prompts FILE --outdir DIR`, on one process or many (torchrun), resumable.

    ldm generate --prompts prompts.txt --outdir out/ --seed 1000 --batch-size 8
    torchrun --nproc-per-node 4 -m ldm generate --prompts prompts.jsonl --outdir out/ --seed 1000

FILE: a text file, one prompt a line (blank lines skipped), or JSONL (a `.jsonl` / `.ndjson` name, or a first line
that starts with `{`): one object a line with `prompt` and optionally `negative_prompt`, `seed`, `steps`,
`guidance`, `width`, `height`, `scheduler`; everything else comes from the command line. Every line is read and
checked before the model loads: a bad line is an error naming the file and the line (exit 2), and nothing is written.

Image k (the k-th line's j-th image with --num-images N: k = line * N + j) is fixed by its index: its seed is
`--seed S` + k (a line's own `seed` s gives s + j), its file `DIR/<k>-<slug>.png`, its batch is planned from the
whole job (the lines that share steps, guidance, size and scheduler, in index order, --batch-size at a time), and
batch b runs on rank b % world_size. So which process ran an image, how many there were and in what order never
changes its bytes (CPU kernels may round differently for another batch size or thread count, so those are fixed
by the job too: the batch size is part of it, the thread count is one per process; docs/scale.md).

The output folder:
    job.json                   what the job is (settings, the prompt file's sha256, the base seed): a rerun with
                               other settings is refused, a rerun with the same ones resumes
    000000-a-red-circle.png    the images, written atomically, with the A1111 `parameters` text chunk
    manifest.jsonl             one row per image, sorted by index: index, file, every parameter, the A1111 text,
                               the rank that made it; written atomically by rank 0
    manifest.rank-R.jsonl      rank R's rows while the job runs (appended one fsync'd line per image), merged into
                               manifest.jsonl by rank 0 at the end and at the start of a rerun
A rerun skips the batches whose images and rows are all there, redoes a batch a crash left half-done (whole, so its
images keep their bytes), and merges rows by index: no row is ever duplicated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ldm import distributed
from ldm import schedulers
from ldm.cli import SCHEDULERS, UsageError, _check_model, _model_name, _one_line, load_model
from ldm.images import a1111_parameters, model_hash, save_png

JSONL_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "scheduler")
GROUP_KEYS = ("steps", "guidance", "width", "height", "scheduler")  # what images of one batch must share
MANIFEST, JOB = "manifest.jsonl", "job.json"
_PART = re.compile(r"^manifest\.rank-(\d+)\.jsonl$")
_NOT_BATCH = (("prompt", "a PROMPT argument"), ("out", "--out"), ("init_image", "--init-image"), ("mask", "--mask"),
              ("strength", "--strength"), ("attention_maps", "--attention-maps"), ("overwrite", "--overwrite"),
              # Not yet part of a batch job's recorded settings (job.json), so a resumed job could not check them:
              ("embedding", "--embedding"), ("lora", "--lora"), ("lora_dir", "--lora-dir"),
              ("hires_scale", "--hires-scale"), ("hires_strength", "--hires-strength"),
              ("hires_steps", "--hires-steps"), ("hires_upscaler", "--hires-upscaler"), ("hires_model", "--hires-model"),
              ("controlnet", "--controlnet"), ("control_image", "--control-image"), ("guess_mode", "--guess-mode"))


@dataclass(frozen=True)
class Item:
    """One image of the job: its index, the line it comes from and every setting (None: the model's own)."""

    index: int
    line: int
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    width: int | None
    height: int | None
    scheduler: str | None

    @property
    def group(self) -> tuple:
        return tuple(getattr(self, k) for k in GROUP_KEYS)


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking the job (no torch, no model: every rank does it, and a mistake costs nothing)


def read_prompts(path: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The lines of FILE as dicts of the JSONL keys (missing ones from the command line) plus `line` (1-based)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--prompts: no such file {path!r}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts: cannot read {path!r} as UTF-8 text ({_one_line(e)})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"--prompts: {path!r} holds no prompts")
    jsonl = file.suffix.lower() in (".jsonl", ".ndjson") or (file.suffix.lower() != ".txt"
                                                            and lines[0][1].startswith("{"))
    defaults = dict(negative_prompt=args.negative_prompt, seed=None, steps=args.steps, guidance=args.guidance,
                    width=args.width, height=args.height, scheduler=args.scheduler)
    rows = []
    for n, line in lines:
        fields = _parse_line(line, f"--prompts {path}, line {n}") if jsonl else {"prompt": line}
        rows.append({**defaults, **fields, "line": n})
    return rows


def _parse_line(line: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object with \"prompt\", got {type(obj).__name__}")
    unknown = [k for k in obj if k not in JSONL_KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(JSONL_KEYS)})")
    if not isinstance(obj.get("prompt"), str):
        raise UsageError(f"{where}: \"prompt\" must be given as a string")
    if obj.get("negative_prompt") is not None and not isinstance(obj["negative_prompt"], str):
        raise UsageError(f"{where}: \"negative_prompt\" must be a string or null")
    checks = (("seed", 0), ("steps", 1), ("width", 8), ("height", 8))
    for key, minimum in checks:
        value = obj.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise UsageError(f"{where}: \"{key}\" must be an integer >= {minimum}, got {value!r}")
    for key in ("width", "height"):
        if obj.get(key) is not None and obj[key] % 8:
            raise UsageError(f"{where}: \"{key}\" must be a multiple of 8, got {obj[key]}")
    g = obj.get("guidance")
    if g is not None and (not isinstance(g, (int, float)) or isinstance(g, bool) or not g >= 0):
        raise UsageError(f"{where}: \"guidance\" must be a number >= 0, got {g!r}")
    if obj.get("scheduler") is not None and obj["scheduler"] not in SCHEDULERS:
        raise UsageError(f"{where}: \"scheduler\" must be one of {', '.join(SCHEDULERS)}, got {obj['scheduler']!r}")
    return {k: v for k, v in obj.items() if v is not None or k == "negative_prompt"}


def add_arguments(g: argparse.ArgumentParser) -> None:
    """`ldm generate`'s batch options (registered by ldm/cli.py); any of them makes the command a batch job."""
    batch = g.add_argument_group("batch generation (ldm/batch.py, docs/scale.md; under torchrun: one shard per rank)")
    batch.add_argument("--prompts", metavar="FILE", default=None,
                       help="a text file (one prompt a line) or JSONL (prompt, negative_prompt, seed, steps, "
                            "guidance, width, height, scheduler per line); image k gets seed SEED + k")
    batch.add_argument("--outdir", metavar="DIR", default=None,
                       help="where the images, job.json and manifest.jsonl go; a rerun resumes the job")
    batch.add_argument("--batch-size", type=int, metavar="N", default=None,
                       help="images per forward among lines that share settings (default 1; part of the job)")


def requested(args: argparse.Namespace) -> bool:
    """Whether `ldm generate` was asked for a batch job (then `run` takes over)."""
    return args.prompts is not None or args.outdir is not None or args.batch_size is not None


def check_args(args: argparse.Namespace) -> None:
    """The command-line checks of batch mode (the numeric ones as `ldm generate` makes them)."""
    if args.prompts is None or args.outdir is None:
        raise UsageError("batch generation needs both --prompts FILE and --outdir DIR")
    args.batch_size = 1 if args.batch_size is None else args.batch_size
    for name, flag in _NOT_BATCH:
        if getattr(args, name) not in (None, False, []):
            raise UsageError(f"{flag} does not apply to --prompts (batch generation writes into --outdir; "
                             f"a rerun resumes)")
    for flag, value, minimum in (("--steps", args.steps, 1), ("--num-images", args.num_images, 1),
                                 ("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1),
                                 ("--clip-skip", args.clip_skip, 1), ("--attention-chunk", args.attention_chunk, 1),
                                 ("--height", args.height, 8), ("--width", args.width, 8)):
        if value is not None and value < minimum:
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise UsageError(f"{flag} must be a multiple of 8, got {value}")
    if not args.guidance >= 0 or not args.eta >= 0:
        raise UsageError(f"--guidance and --eta must be >= 0, got {args.guidance} and {args.eta}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    _check_model(args)
    _check_outdir(Path(args.outdir))


def _check_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"--outdir: {str(outdir)!r} is a file, not a folder")
    existing = outdir
    while not existing.exists():  # the folder is made later: its nearest existing parent must take it
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--outdir: {str(existing)!r} is a file, not a folder")
    try:  # a real probe: os.access says yes to root even on a read-only file system
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"--outdir: cannot write in {str(existing)!r} ({_one_line(e)})") from None


def plan_items(rows: list[dict[str, Any]], seed: int, num_images: int) -> list[Item]:
    """Image k = row i's j-th image (k = i * num_images + j); seed = the row's seed + j, else seed + k."""
    items = []
    for i, row in enumerate(rows):
        for j in range(num_images):
            k = i * num_images + j
            s = row["seed"] + j if row["seed"] is not None else seed + k
            if s >= 2**63:
                raise UsageError(f"line {row['line']}: seed {s} of image {k} is past 2**63 - 1")
            items.append(Item(k, row["line"], row["prompt"], row["negative_prompt"], s, row["steps"],
                              float(row["guidance"]), row["width"], row["height"], row["scheduler"]))
    return items


def plan_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Images sharing steps, guidance, size and scheduler, in index order, batch_size at a time; batches ordered by
    their first index. A function of the job alone: the same for any number of processes."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: b[0].index)


def file_name(item: Item, total: int) -> str:
    slug = "-".join(re.findall(r"[a-z0-9]+", item.prompt.lower()))[:48].strip("-") or "image"
    return f"{item.index:0{max(6, len(str(total - 1)))}d}-{slug}.png"


def job_spec(args: argparse.Namespace, prompts_sha: str, dtype: str) -> dict[str, Any]:
    """What the images depend on; a rerun must match it (the seed is settled by rank 0: job.json's when resuming)."""
    model = args.model if not os.path.exists(args.model) else str(Path(args.model).resolve())
    return {"format": "ldm-batch", "version": 1, "prompts_sha256": prompts_sha, "model": model,
            "family": args.family, "vae": args.vae, "negative_prompt": args.negative_prompt, "steps": args.steps,
            "guidance": args.guidance, "scheduler": args.scheduler, "eta": args.eta, "width": args.width,
            "height": args.height, "clip_skip": args.clip_skip, "weighting": args.weighting,
            "num_images": args.num_images, "batch_size": args.batch_size, "dtype": dtype,
            "vae_tiling": args.vae_tiling, "attention_chunk": args.attention_chunk, "optimize": args.optimize,
            "seed": args.seed}


# ----------------------------------------------------------------------------------------------------------------
# The output folder (rank 0 alone sets it up and merges; every rank appends to its own part file)


def setup_outdir(outdir: Path, spec: dict[str, Any], total: int) -> dict[str, Any]:
    """Make the folder, settle job.json (the seed), tidy what a crash left, merge earlier rows into the manifest.

    Returns the job (spec with its seed) and the rows already complete, by index."""
    outdir.mkdir(parents=True, exist_ok=True)
    job_file = outdir / JOB
    if job_file.exists():
        try:
            old = json.loads(job_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--outdir: {str(job_file)!r} is damaged ({_one_line(e)}); use another --outdir") \
                from None
        if spec["seed"] is None:
            spec = {**spec, "seed": old.get("seed")}
        differ = sorted(k for k in set(spec) | set(old) if spec.get(k) != old.get(k))
        if differ:
            raise UsageError(f"--outdir {str(outdir)!r} holds another job (differs in: {', '.join(differ)}); rerun "
                             f"with the same prompts and settings to resume it, or use another --outdir")
    else:
        if spec["seed"] is None:
            spec = {**spec, "seed": secrets.randbelow(2**32)}
        _write_atomic(job_file, json.dumps(spec, indent=1) + "\n")
    for tmp in outdir.glob(".*.png.*.tmp"):  # save_png's temporary files of a killed run
        tmp.unlink(missing_ok=True)
    done = merge_manifest(outdir, total)
    return {"job": spec, "done": done}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a manifest file; a line a kill tore (not JSON, not a row) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("index"), int) and isinstance(row.get("file"), str):
            rows.append(row)
    return rows


def merge_manifest(outdir: Path, total: int) -> dict[int, dict[str, Any]]:
    """manifest.jsonl and every part file -> one row per index whose image exists, sorted, written atomically;
    then the part files go. Returns the rows by index."""
    manifest, parts = outdir / MANIFEST, [p for p in outdir.iterdir() if _PART.match(p.name)]
    rows: dict[int, dict[str, Any]] = {}
    for path in ([manifest] if manifest.exists() else []) + sorted(parts):
        for row in read_rows(path):
            if 0 <= row["index"] < total and (outdir / row["file"]).is_file():
                rows[row["index"]] = row
    ordered = [rows[k] for k in sorted(rows)]
    _write_atomic(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    for path in parts:
        path.unlink()
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _RowCounter:
    """Rows the ranks have appended to their part files so far (rank 0's progress bar over the whole job).

    Reads only what was added since the last call, so a long job costs no more per batch than a short one."""

    def __init__(self, outdir: Path, world_size: int) -> None:
        self.parts = [outdir / f"manifest.rank-{r}.jsonl" for r in range(world_size)]
        self.seen = {p: (0, 0) for p in self.parts}  # bytes read, whole lines counted

    def __call__(self) -> int:
        for path in self.parts:
            offset, lines = self.seen[path]
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            whole = chunk.rfind(b"\n") + 1  # a line being written is counted once it ends
            self.seen[path] = (offset + whole, lines + chunk[:whole].count(b"\n"))
        return sum(lines for _, lines in self.seen.values())


# ----------------------------------------------------------------------------------------------------------------
# Running the job


def run(args: argparse.Namespace) -> int:
    """`ldm generate --prompts FILE --outdir DIR` on this process (one of torchrun's ranks, or alone)."""
    try:
        topo = distributed.topology()
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        check_args(args)
        rows = read_prompts(args.prompts, args)
        sha = hashlib.sha256(Path(args.prompts).read_bytes()).hexdigest()
        device, dtype_name = _device_dtype(args, topo)
        with distributed.process_group("gloo") as topo:  # coordination only: small Python objects, CPU is enough
            return _run_job(args, topo, rows, sha, device, dtype_name)
    except UsageError as e:
        if topo.is_main:
            raise
        if isinstance(e, _RankError):  # this rank's own trouble (its GPU): it says so itself
            print(f"ldm generate: error: rank {topo.rank}: {e}", file=sys.stderr)
        return 2  # the mistakes every rank finds alike: rank 0 alone says them


class _RankError(UsageError):
    """A usage error that may strike one rank and not the others (its device)."""


def _device_dtype(args: argparse.Namespace, topo: distributed.Topology) -> tuple[Any, str]:
    try:
        device = distributed.device_for(args.device, topo)
    except ValueError as e:
        raise _RankError(str(e)) from None
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if dtype_name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs --device cuda (on the CPU use fp32 or bf16)")
    return device, dtype_name


def _run_job(args: argparse.Namespace, topo: distributed.Topology, rows: list[dict[str, Any]], sha: str,
             device: Any, dtype_name: str) -> int:
    outdir = Path(args.outdir)
    total = len(rows) * args.num_images
    if args.seed is not None and args.seed + total - 1 >= 2**63:
        raise UsageError(f"--seed {args.seed} + {total - 1} images is past 2**63 - 1")
    state: dict[str, Any] | str = {}
    if topo.is_main:
        try:
            state = setup_outdir(outdir, job_spec(args, sha, dtype_name), total)
            state = {"job": state["job"], "done": set(state["done"])}
        except UsageError as e:
            state = str(e)
    state = distributed.broadcast(state)  # rank 0's verdict: an error every rank exits on, or the job
    if isinstance(state, str):
        raise UsageError(state)
    items = plan_items(rows, state["job"]["seed"], args.num_images)
    batches = plan_batches(items, args.batch_size)
    done: set[int] = state["done"]
    todo = [b for b in batches if any(item.index not in done for item in b)]
    missing = sum(item.index not in done for b in todo for item in b)
    if topo.is_main:
        print(f"ldm generate: {total} images, {total - missing} already in {str(outdir)!r}, {missing} to make on "
              f"{topo.world_size} process(es)", file=sys.stderr)
    if missing:
        pipe = _load(args, device, dtype_name)
        _generate(pipe, args, topo, todo[topo.rank::topo.world_size], done, total, missing, outdir)
    distributed.barrier()
    if topo.is_main:
        merged = merge_manifest(outdir, total)
        if len(merged) != total:  # cannot happen unless files vanished under the run: say so, do not pretend
            raise RuntimeError(f"{total - len(merged)} images are missing from {str(outdir)!r} after the run")
        print(f"ldm generate: {total} images and {MANIFEST} in {str(outdir)!r}", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace, device: Any, dtype_name: str) -> Any:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    pipe = load_model(args, device, dtype)
    if args.optimize:  # the levers without the single-image command's compile warm-up
        pipe.optimize()
    return pipe


def _generate(pipe: Any, args: argparse.Namespace, topo: distributed.Topology, mine: list[list[Item]],
              done: set[int], total: int, missing: int, outdir: Path) -> None:
    """Run this rank's batches; write each new image and append its row. Rank 0 shows the whole job's progress."""
    from tqdm import tqdm

    part = outdir / f"manifest.rank-{topo.rank}.jsonl"
    static = _static_fields(pipe, args, topo)
    bar = tqdm(total=missing, desc="images", unit="img", file=sys.stderr, disable=None if topo.is_main else True)
    shown, count = 0, _RowCounter(outdir, topo.world_size)  # rows the bar shows (a disabled bar counts nothing)
    try:
        for batch in mine:
            images = _run_batch(pipe, args, batch)
            for item, image in zip(batch, images):
                if item.index in done:  # a half-done batch runs whole (same bytes); its finished images stay
                    continue
                name = file_name(item, total)
                row = _row(item, name, image.size, static)
                save_png(image, outdir / name, parameters=row["parameters"], overwrite=True)
                _append_row(part, row)
            shown = _show(bar, count(), shown) if topo.is_main else shown
        while topo.is_main and shown < missing:  # the other ranks' last batches
            time.sleep(0.2)
            shown = _show(bar, count(), shown)
    finally:
        bar.close()


def _show(bar: Any, written: int, shown: int) -> int:
    bar.update(written - shown)
    return written


def _run_batch(pipe: Any, args: argparse.Namespace, batch: list[Item]) -> list[Any]:
    import torch

    first = batch[0]
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]  # image i: its own seed
    negatives = [item.negative_prompt or "" for item in batch]
    try:
        out = pipe([item.prompt for item in batch], negative_prompt=negatives, height=first.height,
                   width=first.width, num_inference_steps=first.steps, guidance_scale=first.guidance,
                   generator=generators, scheduler=first.scheduler, eta=args.eta, clip_skip=args.clip_skip,
                   weighting=args.weighting, output_type="pil")
    except ValueError as e:  # what only the loaded model can tell (an inpainting model, a size it cannot take)
        raise UsageError(f"line {first.line}: {_one_line(e)}") from None
    return out.images


def _static_fields(pipe: Any, args: argparse.Namespace, topo: distributed.Topology) -> dict[str, Any]:
    import torch

    own = schedulers.name_of(pipe.scheduler)
    return {"model": _model_name(args.model), "model_hash": model_hash(args.model), "own_scheduler": own,
            "eta": args.eta, "clip_skip": args.clip_skip, "weighting": args.weighting, "rank": topo.rank,
            "world_size": topo.world_size, "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


def _row(item: Item, name: str, size: tuple[int, int], static: dict[str, Any]) -> dict[str, Any]:
    """The manifest row of one image: what the PNG's A1111 text says, and more (its line, rank, device)."""
    sampler = item.scheduler or static["own_scheduler"]
    extra: dict[str, Any] = {}
    if static["clip_skip"] is not None:
        extra["Clip skip"] = static["clip_skip"]
    if static["eta"]:
        extra["Eta"] = static["eta"]
    text = a1111_parameters(item.prompt, negative_prompt=item.negative_prompt, steps=item.steps, sampler=sampler,
                            guidance_scale=item.guidance, seed=item.seed, width=size[0], height=size[1],
                            model_name=static["model"], model_hash=static["model_hash"], extra=extra)
    fields = {k: v for k, v in asdict(item).items() if k not in ("index", "width", "height", "scheduler")}
    return {"index": item.index, "file": name, **fields, "scheduler": sampler, "width": size[0], "height": size[1],
            **{k: v for k, v in static.items() if k != "own_scheduler"}, "parameters": text}
