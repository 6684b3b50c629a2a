"""Load cost: ldm.load_pipeline vs diffusers' StableDiffusionPipeline.from_single_file on the same synthetic SD 1.5
file, same run, warm page cache; or the SDXL base file (`--model sdxl-base`, diffusers' StableDiffusionXLPipeline).

    flock /tmp/ldm-heavy.lock python scripts/bench_load.py [--workdir /tmp/ldm-bench] [--repeats 3]
    flock /tmp/ldm-heavy.lock python scripts/bench_load.py --model sdxl-base [--file sd_xl_base_1.0.safetensors]

SD 1.5, three paths: the fp32 file loaded as fp32 (same dtype), the fp16 file loaded as fp32, the fp32 file loaded
as fp16. SDXL base (the official file is fp16, 6.9 GB; fp32 would be 14 GB per copy): the fp16 file loaded as fp16
and as bf16. `--file` measures that file (e.g. the real sd_xl_base_1.0.safetensors) instead of a synthetic one and
keeps it.
Each measurement runs in a fresh process (so peak RSS is that load's alone): import the library, then time the
load plus one pass reading every weight (`p.sum()` over every parameter: a lazy or memory-mapped load must not
hide its cost). Peak RSS is the process's high-water mark (ru_maxrss); "over base" subtracts the RSS measured
after the imports, before the load. The synthetic files (4.3 GB fp32, 2.1 GB fp16) come from tests/synth.py and
are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "diffusers_configs"
MODELS = {  # --model: (manifest, diffusers config folder, family, load paths (file dtype, load dtype))
    "sd15": ("sd15", "sd15", "sd15", (("fp32", "fp32"), ("fp16", "fp32"), ("fp32", "fp16"))),
    "sdxl-base": ("sdxl_base", "sdxl-base", "sdxl-base", (("fp16", "fp16"), ("fp16", "bf16"))),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(loader: str, file: str, dtype_name: str, model: str) -> None:
    """One measurement, in this (fresh) process; prints a JSON line."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    _, config, family, _ = MODELS[model]
    xl = model.startswith("sdxl")
    if loader == "ours":
        sys.path.insert(0, str(ROOT))
        import ldm
        import weights_convert.load  # noqa: F401  (imports before the clock starts, as for diffusers)

        load = ldm.load_pipeline
        base = _rss_bytes()
        t0 = time.perf_counter()
        pipe = load(file, dtype=dtype, family=family)
    else:
        import diffusers

        base = _rss_bytes()
        t0 = time.perf_counter()
        if xl:
            pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
                file, config=str(CONFIGS / config), local_files_only=True, torch_dtype=dtype)
        else:
            pipe = diffusers.StableDiffusionPipeline.from_single_file(
                file, config=str(CONFIGS / config), local_files_only=True, safety_checker=None,
                feature_extractor=None, torch_dtype=dtype)
    t_load = time.perf_counter() - t0
    total = 0.0
    modules = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
    for module in modules:
        for p in module.parameters():
            assert p.dtype == dtype
            total += float(p.sum())  # touch every weight once
    t_all = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": t_load, "load_and_read_s": t_all, "peak_rss": peak, "base_rss": base,
                      "checksum": total}))


def measure(loader: str, file: Path, dtype: str, model: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", loader, str(file), dtype, model], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldm-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--model", choices=tuple(MODELS), default="sd15")
    parser.add_argument("--file", type=Path, default=None,
                        help="measure this single file (of --model's family) instead of a synthetic one; kept")
    parser.add_argument("--child", nargs=4, metavar=("LOADER", "FILE", "DTYPE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.synth import write_synthetic_checkpoint

    manifest, _, _, paths = MODELS[args.model]
    args.workdir.mkdir(parents=True, exist_ok=True)
    files, written = {}, []
    for name in sorted({src for src, _ in paths}):
        if args.file is not None:
            if not args.file.is_file():
                raise SystemExit(f"--file {args.file}: no such file")
            files[name] = args.file  # the user's file, whatever its dtype: loaded as each path's target dtype
            continue
        path = args.workdir / f"{manifest}_{name}.safetensors"
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            write_synthetic_checkpoint(manifest, path, dtype=torch.float16 if name == "fp16" else None)
        files[name] = path
        written.append(path)
    gib = 1024 ** 3
    sizes = ", ".join(f"{name} {path.stat().st_size / gib:.2f} GiB" for name, path in files.items())
    print(f"\n{args.model} files: {sizes}; torch {torch.__version__}, {os.cpu_count()} CPUs; median of "
          f"{args.repeats} fresh processes\n")
    header = (f"{'path':<14} {'loader':<10} {'load s':>7} {'load+read s':>12} {'peak RSS GiB':>13} "
              f"{'over base GiB':>14} {'peak/file':>10}")
    print(header)
    print("-" * len(header))
    results = {}
    for src, dst in paths:
        file = files[src]
        subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        for loader in ("ours", "diffusers"):
            runs = [measure(loader, file, dst, args.model) for _ in range(args.repeats)]
            r = {k: statistics.median(run[k] for run in runs) for k in ("load_s", "load_and_read_s", "peak_rss",
                                                                        "base_rss")}
            results[(src, dst, loader)] = r
            print(f"{src}->{dst:<8} {loader:<10} {r['load_s']:7.2f} {r['load_and_read_s']:12.2f} "
                  f"{r['peak_rss'] / gib:13.2f} {(r['peak_rss'] - r['base_rss']) / gib:14.2f} "
                  f"{r['peak_rss'] / file.stat().st_size:10.2f}", flush=True)
    print("\nratios ours / diffusers (<= 1.0 is the target):")
    for src, dst in paths:
        a, b = results[(src, dst, "ours")], results[(src, dst, "diffusers")]
        print(f"  {src}->{dst}: time (load+read) {a['load_and_read_s'] / b['load_and_read_s']:.2f}, "
              f"peak RSS {a['peak_rss'] / b['peak_rss']:.2f}")
    if not args.keep:
        for path in written:
            path.unlink()


if __name__ == "__main__":
    main()
