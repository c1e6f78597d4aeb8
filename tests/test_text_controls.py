"""benchmarks.text_controls: the position share of targets, and the masked-LM control's training."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.text_controls import position_share


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("D2V_ATTENTION", "sdpa")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_targets_that_only_say_the_position_have_share_one():
    g = torch.Generator().manual_seed(0)
    per_position = torch.randn(1, 16, 8, generator=g, dtype=torch.float64)
    assert position_share(per_position.expand(32, 16, 8)) == pytest.approx(1.0, abs=1e-12)


def test_targets_that_ignore_the_position_have_a_share_near_chance():
    g = torch.Generator().manual_seed(1)
    n, t = 512, 16
    share = position_share(torch.randn(n, t, 8, generator=g, dtype=torch.float64))
    # T - 1 of the N*T - 1 degrees of freedom of the total are between positions: about 1/N
    assert 0 < share < 5.0 / n


@pytest.mark.parametrize("ratio", [0.25, 1.0, 4.0])
def test_share_is_the_positional_part_of_the_variance(ratio):
    g = torch.Generator().manual_seed(2)
    n, t, c = 4096, 8, 16
    per_position = torch.randn(1, t, c, generator=g, dtype=torch.float64)
    per_position = (per_position - per_position.mean((0, 1))) / per_position.std(1, False)
    noise = torch.randn(n, t, c, generator=g, dtype=torch.float64)
    share = position_share(math.sqrt(ratio) * per_position + noise)
    assert share == pytest.approx(ratio / (ratio + 1.0), abs=0.01)


def test_padded_positions_do_not_count():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 12, 4, generator=g, dtype=torch.float64)
    keep = torch.rand(64, 12, generator=g) > 0.3
    keep[:, 0] = True
    poisoned = torch.where(keep[..., None], x, torch.full_like(x, 1e6))
    # the same share as computing it on the kept rows by hand
    rows = x[keep]
    pos = torch.arange(12).expand(64, 12)[keep]
    mean = rows.mean(0)
    between = sum(((pos == p).sum() * (rows[pos == p].mean(0) - mean) ** 2).sum()
                  for p in range(12))
    expected = float(between / ((rows - mean) ** 2).sum())
    assert position_share(poisoned, keep) == pytest.approx(expected, rel=1e-9)


def test_the_masked_lm_control_learns_from_the_masked_tokens():
    """Its first loss is the uniform guess over the vocabulary and it falls: the control trains."""
    from benchmarks.text_controls import mlm_control
    from d2v_engine.config import load_config
    from d2v_engine.handoff.probe import labelled_split
    from benchmarks.common import ROOT

    cfg = load_config(ROOT / "configs/tiny_text.yaml")
    items, labels, _, classes = labelled_split(cfg, max_samples=80)
    result = mlm_control("tiny_text", 24, 1, items, labels, classes, loss_every=1)
    losses = result["losses"]
    assert losses[0] == pytest.approx(math.log(cfg.model.vocab_size), abs=0.5)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5
    assert [p["step"] for p in result["points"]] == [0, 6, 12, 18, 24]
    assert all(0.0 <= p["probe"] <= 1.0 for p in result["points"])
