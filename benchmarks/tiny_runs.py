"""Full runs of the tiny configs on this machine: the losses, seconds per update and peak memory
that README.md states for them (tests/test_readme.py checks that the two agree).

    python -m benchmarks.tiny_runs [--configs tiny_image,tiny_audio,...] [--json PATH]

Each config runs in its own process as `make train` runs it (python -m d2v_engine.cli.train CONFIG, the
config's defaults: its 200 steps, the DALI loader when installed), with train.log_every=1 so
that step 1 is logged too, and on one thread (OMP_NUM_THREADS=1, data.num_workers=1): on a shared
machine, threads that spin-wait for cores other processes hold multiply the time per step (here
tiny_image took 13 s per update on 2 threads and 1.2 s on one, under a load average of 17).

Per config it records the loss at step 1, at the config's own first logged step (its
train.log_every) and at the last step; the CPU seconds per update (the process's user + system
time from step 10 to the last step, DALI's thread included, over those steps: what the machine's
load does not change); the median wall seconds per update over the same steps (what it does); the
process's peak resident memory (ru_maxrss); and the machine's load average.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["tiny_image", "tiny_audio", "tiny_text", "tiny_image_v2", "tiny_audio_v2",
           "tiny_text_v2"]


def run_config(name: str, work: Path) -> dict:
    """One full run of configs/<name>.yaml in a child process; its figures."""
    config = ROOT / "configs" / f"{name}.yaml"
    spec = yaml.safe_load(config.read_text())
    run_dir = work / name
    cmd = [sys.executable, "-m", "d2v_engine.cli.train", str(config), f"run.dir={run_dir}",
           "train.log_every=1", "train.progress=false", "data.num_workers=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    start, loads = time.time(), [os.getloadavg()[0]]
    steps = spec["train"]["max_steps"]
    cpu_at = {}  # step -> the process's CPU seconds when its row appeared
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            step = _last_step(run_dir / "metrics.jsonl")
            for mark in (10, steps):
                if step >= mark and mark not in cpu_at:
                    cpu_at[mark] = _cpu_seconds(proc.pid)
                    loads.append(os.getloadavg()[0])
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {work / (name + '.log')}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    log_every = spec["train"].get("log_every", 1)
    batch = spec["train"]["global_batch"]
    seconds = [batch / r["samples_per_s"] for r in rows if r["step"] > 10]
    return {
        "config": f"configs/{name}.yaml",
        "steps": rows[-1]["step"],
        "loss_step_1": rows[0]["loss"],
        "first_logged_step": log_every,
        "loss_first_logged": next(r["loss"] for r in rows if r["step"] == log_every),
        "loss_last": rows[-1]["loss"],
        "cpu_seconds_per_update": (cpu_at[steps] - cpu_at[10]) / (steps - 10),
        "wall_seconds_per_update": statistics.median(seconds),
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,  # Linux reports KiB
        "wall_s": time.time() - start,
        "load_average": [round(x, 2) for x in loads],  # at the start, step 10, the last step
    }


def _last_step(metrics: Path) -> int:
    """The step of the newest complete row of a growing metrics.jsonl (0 before the first)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a row being written
            continue
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiny_runs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated names under configs/ (default: every tiny one)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="tiny_runs_") as work:
        for name in args.configs.split(","):
            result = run_config(name, Path(work))
            print(json.dumps(result), flush=True)
            results.append(result)
    out = {
        "what": "full runs of the tiny configs (python -m benchmarks.tiny_runs)",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor(),
                    "torch": torch.__version__, "precision": "fp32", "threads": 1},
        "runs": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
