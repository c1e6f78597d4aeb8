"""Runs every benchmark in one process: python -m benchmarks.run_all [--tiny] [--out DIR].

Each module in MODULES has `run(tiny: bool) -> list[dict]` returning records in the format of
benchmarks.common.record ({"bench", "shape", "device", "ours", "peer", "peer_value", "unit",
"ratio", "fraction_of_peak", "torch", "triton", "commit"}; ratio > 1: ours is better). This writes
DIR/<date>-<device>.json = the device header (measured copy bandwidth and matmul peak, versions,
commit) + "records", and prints one table. On a machine without a GPU use --tiny: it checks the
suite itself, not the speed. --only bench_step,bench_targets runs a subset.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: our kernels run interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import common  # noqa: E402

# Each entry: a module with run(tiny: bool) -> list[dict]. Add new benchmarks here.
MODULES = [
    "benchmarks.bench_step",
    "benchmarks.bench_targets",
    "benchmarks.bench_masking",
    "benchmarks.bench_v2",
    "benchmarks.bench_loader",
    "benchmarks.bench_attention",
]


def result_path(out: Path, device_name: str, date: datetime.date | None = None) -> Path:
    date = date or datetime.date.today()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    return out / f"{date.isoformat()}-{slug}.json"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
    args = parser.parse_args(argv)
    only = {f"benchmarks.{m.strip()}" for m in args.only.split(",") if m.strip()}
    modules = [m for m in MODULES if not only or m in only]
    head = common.header(tiny=args.tiny)
    records, failed = [], {}
    for name in modules:
        try:
            records += importlib.import_module(name).run(args.tiny)
        except Exception as e:  # one broken bench must not lose the others' results
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"run_all: {name} failed: {failed[name]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, head["device"])
    path.write_text(json.dumps({**head, "date": datetime.date.today().isoformat(),
                                "modules": modules, "failed": failed, "records": records},
                               indent=1) + "\n")
    print(f"device {head['device']}  torch {head['torch']}  triton {head['triton']}  commit "
          f"{head['commit']}  copy {head['copy_gbps']:.0f} GB/s  matmul {head['matmul_tflops']:.1f} "
          f"TFLOP/s ({head['matmul_dtype']})")
    common.print_records(records)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
