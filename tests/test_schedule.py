import math

import pytest

from engine.config import OptimConfig
from engine.ema import ema_decay_at
from engine.schedule import lr_factor, scaled_lr


def test_cosine_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, final_lr_scale=0.1)
    f = [lr_factor(cfg, s, 100) for s in range(101)]
    assert all(a < b for a, b in zip(f[:10], f[1:11])), f[:11]
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.1)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)


def test_tri_stage_phases():
    cfg = OptimConfig(schedule="tri_stage", tri_stage=[0.1, 0.4, 0.5], final_lr_scale=0.05)
    f = [lr_factor(cfg, s, 100) for s in range(101)]
    assert f[0] == pytest.approx(0.01)
    assert all(x == 1.0 for x in f[10:50])
    assert f[100] == pytest.approx(0.05)
    # exponential decay: log-linear in the decay phase
    assert math.log(f[75]) == pytest.approx(0.5 * math.log(0.05), rel=1e-6)


def test_lr_scaling_from_reference_batch():
    assert scaled_lr(OptimConfig(lr=1e-3, lr_reference_batch=256, lr_scaling="linear"), 512) == pytest.approx(2e-3)
    assert scaled_lr(OptimConfig(lr=1e-3, lr_reference_batch=256, lr_scaling="sqrt"), 1024) == pytest.approx(2e-3)
    assert scaled_lr(OptimConfig(lr=1e-3, lr_reference_batch=256, lr_scaling="none"), 1024) == pytest.approx(1e-3)


def test_ema_decay_anneals_linearly_then_holds():
    assert ema_decay_at(0, 0.999, 0.9999, 100) == pytest.approx(0.999)
    assert ema_decay_at(50, 0.999, 0.9999, 100) == pytest.approx(0.99945)
    assert ema_decay_at(100, 0.999, 0.9999, 100) == pytest.approx(0.9999)
    assert ema_decay_at(10**6, 0.999, 0.9999, 100) == pytest.approx(0.9999)
