"""Two gloo ranks under torchrun: the run checkpoints and follows the 1-rank trajectory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _run(launcher, run_dir, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    cmd = [*launcher, "-m", "engine.train", "configs/tiny_image.yaml", f"run.dir={run_dir}",
           "train.progress=false", "train.log_every=1", "train.max_steps=4", "train.global_batch=8",
           "model.drop_path=0.0", "data.augment=false", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_rank_gloo_run_checkpoints_and_matches_one_rank_with_accumulation(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29533"]
    _run(torchrun, tmp_path / "two", "train.micro_batch=4", "train.checkpoint_every=2")
    assert (tmp_path / "two" / "checkpoint_00000004.pt").is_file()
    assert (tmp_path / "two" / "checkpoint_00000002.pt").is_file()
    _run([sys.executable], tmp_path / "one", "train.micro_batch=4")
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) == 4
    for a, b in zip(two, one):
        assert a == pytest.approx(b, rel=1e-5), f"2 ranks {two} vs 1 rank x 2 accumulation {one}"
