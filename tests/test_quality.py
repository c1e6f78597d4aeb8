"""A short pretraining run learns something a collapsed or idle one would not: its linear probe beats
the same encoder at random init, and target_var stays clear of the collapse threshold.

benchmarks.quality.short_run is the run (tiny_image_v2, SHORT_STEPS updates, then the 5-fold
cross-validated probe of its last checkpoint and of its random init on all 1,797 digits).
`python -m benchmarks.quality --short` measured it over seeds 1-5 into MEASURED. The thresholds
sit at about half the smallest gain and under half the smallest variance measured there: a
healthy run passes on any of those seeds, a collapsed one (constant targets: target_var near 0,
features no better than at init) fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.quality import FOLDS, SHORT_CONFIG, SHORT_SEEDS, SHORT_STEPS, short_run

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "benchmarks/results/2026-11-27-cpu-quality-short.json"
MIN_GAIN = 0.07  # probe accuracy over random init
MIN_TARGET_VAR = 0.4  # 4 x fairseq's collapse threshold (min_target_var 0.1)


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels have their own tests
    monkeypatch.setenv("D2V_ATTENTION", "sdpa")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; a shared machine
    yield
    torch.set_num_threads(threads)


def test_thresholds_sit_under_the_margins_measured_over_seeds():
    record = json.loads(MEASURED.read_text())
    assert (record["config"], record["steps"], record["folds"]) == (SHORT_CONFIG, SHORT_STEPS,
                                                                    FOLDS), "remeasure: --short"
    assert sorted(r["seed"] for r in record["runs"]) == list(SHORT_SEEDS)
    assert min(r["gain"] for r in record["runs"]) >= 1.8 * MIN_GAIN, record["gain"]
    assert min(r["min_target_var"] for r in record["runs"]) >= 2 * MIN_TARGET_VAR
    assert all(r["collapse_threshold"] < MIN_TARGET_VAR for r in record["runs"])


def test_short_run_probe_beats_random_init_and_targets_do_not_collapse(tmp_path):
    record = json.loads(MEASURED.read_text())
    r = short_run(tmp_path, seed=SHORT_SEEDS[0])
    assert r["min_target_var"] > MIN_TARGET_VAR, (
        f"target_var fell to {r['min_target_var']:.3f} (collapse threshold "
        f"{r['collapse_threshold']}; seeds {SHORT_SEEDS} stayed above "
        f"{record['min_target_var'][0]:.3f})")
    assert r["gain"] > MIN_GAIN, (
        f"probe {r['probe']:.3f} vs random init {r['random_init']:.3f}: gain {r['gain']:.3f} "
        f"(seeds {SHORT_SEEDS} gained {record['gain'][0]:.3f}-{record['gain'][1]:.3f})")
