"""Runs several training jobs in one process, one after another: under torchrun every rank runs
the same list on one process group, so a test pays the start of torch and of the ranks once.

    python [-m torch.distributed.run ...] tests/run_jobs.py JOBS.json

JOBS.json: a list of {"config": path, "overrides": [...], "run_dir": path, "resume_from": path?};
with resume_from, rank 0 copies that checkpoint into run_dir and the job runs with
train.resume=true. Not a test module (pytest collects test_*.py only).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from d2v_engine.config import load_config
from d2v_engine.runtime.distributed import barrier, init_distributed, shutdown
from d2v_engine.run.trainer import train


def main(spec: str) -> int:
    jobs = json.loads(Path(spec).read_text())
    dist = init_distributed("cpu")
    try:
        for job in jobs:
            run_dir = Path(job["run_dir"])
            overrides = [f"run.dir={run_dir}", *job["overrides"]]
            if job.get("resume_from"):
                if dist.is_main:
                    run_dir.mkdir(parents=True)
                    shutil.copy(job["resume_from"], run_dir)
                barrier()
                overrides.append("train.resume=true")
            train(load_config(job["config"], overrides))
            barrier()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
