"""Runs every benchmark in one process: python -m benchmarks.run_all [--tiny] [--out DIR].

Writes DIR/<date>-<device>-{targets,attention}.json (device, versions, shapes, command, rows) and
prints each table. On a machine without a GPU use --tiny: it checks the suite itself, not the speed.
"""
from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

import torch

from benchmarks import bench_attention, bench_targets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stem = f"{datetime.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = ["--tiny"] if args.tiny else []
    bench_targets.main([*tiny, "--json", str(out / f"{stem}-targets.json")])
    bench_attention.main([*tiny, "--json", str(out / f"{stem}-attention.json")])


if __name__ == "__main__":
    main()
