"""The engine's regrouping by concern changed no number: each tiny config's losses over its first
updates equal the ones recorded before the move (tests/data/tiny_losses_before_regroup.json).

Recorded with `python tests/test_regroup_losses.py --record` on the commit before the move, one
thread, the kernels' reference path. On that machine the comparison was bit for bit (before and
after the move, the same code path); here it allows 1e-6 relative, since another CPU's vector unit
may round a reduction differently without any change of ours.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECORD = Path(__file__).resolve().parent / "data" / "tiny_losses_before_regroup.json"
CONFIGS = ["tiny_image", "tiny_audio", "tiny_text", "tiny_image_v2", "tiny_audio_v2",
           "tiny_text_v2"]
OVERRIDES = ["train.max_steps=6", "train.log_every=1", "train.progress=false",
             "train.checkpoint_every=0", "run.tensorboard=false", "data.num_workers=0"]


def losses_of(name: str, run_dir: Path) -> list[float]:
    from d2v_engine.config import load_config
    from d2v_engine.run.trainer import train

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"run.dir={run_dir}", *OVERRIDES])
    return train(cfg)["losses"]


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_losses_are_the_ones_recorded_before_the_regrouping(name, tmp_path, monkeypatch):
    record = json.loads(RECORD.read_text())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(record["threads"])
    try:
        got = losses_of(name, tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    want = record["losses"][name]
    assert len(got) == len(want) == 6
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= 1e-6, f"{name}: {got} vs recorded {want} (max relative difference {worst:.2e})"


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import subprocess
    import tempfile

    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        losses = {name: losses_of(name, Path(work) / name) for name in CONFIGS}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({"commit": commit, "threads": 1, "torch": torch.__version__,
                                  "overrides": OVERRIDES, "losses": losses}, indent=1) + "\n")
    print(json.dumps(losses))
