"""The main job over several seeds: what a newcomer's `make train` ends with, and how long it takes.

    python -m benchmarks.default_run [--config configs/tiny_image_v2.yaml] [--seeds 1,2,3,4,5]
                                     [--args "train.max_steps=200"] [--json PATH]

Each seed runs in its own process exactly as `make train` runs it (python -m d2v_engine.cli.train
CONFIG train.probe=true, the machine's threads, the installed loader), one after another, with
seed=S and a fresh run.dir. Per seed: the wall seconds of the whole command (start-up, training,
the probe), the linear probe it prints (checkpoint vs the same encoder at random init, fixed
80/20 split: d2v_engine/handoff/probe.py) and the gain, the loss at the first and last logged step, and
the smallest target_var logged (a collapse drives it to 0 while the loss falls too). README.md
states the spread; tests/test_readme.py checks it against the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/tiny_image_v2.yaml"  # the Makefile's CONFIG


def run_seed(config: str, seed: int, extra: list[str], work: Path) -> dict:
    run_dir = work / f"seed{seed}"
    cmd = [sys.executable, "-m", "d2v_engine.cli.train", config, "train.probe=true", f"seed={seed}",
           f"run.dir={run_dir}", "train.progress=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    load_before = os.getloadavg()[0]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode:
        raise SystemExit(f"seed {seed} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    probe = json.loads((run_dir / "probe.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {
        "seed": seed,
        "wall_s": wall,
        "probe": probe["checkpoint_accuracy"],
        "random_init": probe["random_init_accuracy"],
        "gain": probe["checkpoint_accuracy"] - probe["random_init_accuracy"],
        "num_train": probe["num_train"], "num_test": probe["num_test"],
        "steps": rows[-1]["step"],
        "loss_first_logged": rows[0]["loss"], "loss_last": rows[-1]["loss"],
        "min_target_var": min(r["target_var"] for r in rows),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.default_run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--args", default="", help="extra overrides, as make train's ARGS")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    extra = shlex.split(args.args)
    results = []
    with tempfile.TemporaryDirectory(prefix="default_run_") as work:
        for seed in (int(s) for s in args.seeds.split(",")):
            result = run_seed(args.config, seed, extra, Path(work))
            print(json.dumps(result), flush=True)
            results.append(result)
    gains = [r["gain"] for r in results]
    walls = [r["wall_s"] for r in results]
    out = {
        "what": "the main job (make train) over seeds (python -m benchmarks.default_run)",
        "date": datetime.date.today().isoformat(),
        "command": f"python -m d2v_engine.cli.train {args.config} train.probe=true seed=S "
                   + " ".join(extra),
        "config": args.config,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor(),
                    "torch": torch.__version__, "precision": "fp32",
                    "threads": torch.get_num_threads()},
        "runs": results,
        "gain": [min(gains), max(gains)],
        "wall_s": [min(walls), max(walls)],
    }
    print(json.dumps({k: out[k] for k in ("gain", "wall_s")}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
