import math

import pytest

from d2v_engine.config import OptimConfig
from d2v_engine.objective.ema import ema_decay_at
from d2v_engine.objective.schedule import lr_factor, scaled_lr


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


# ---------------------------------------------------------------------------------------------
# Schedules scale with train.max_steps (d2v_engine.objective.schedule.run_steps)

import json
from pathlib import Path

from d2v_engine.config import load_config
from d2v_engine.objective.schedule import run_steps, schedule_steps

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def _curves(cfg, max_steps):
    """(lr factor, EMA decay) of every update of a run of max_steps, as the trainer has them."""
    cfg.train.max_steps = max_steps
    anneal = schedule_steps(cfg)["ema_anneal_end_step"]
    o = cfg.objective
    return ([lr_factor(cfg.optim, s, max_steps) for s in range(max_steps + 1)],
            [ema_decay_at(s, o.ema_decay, o.ema_end_decay, anneal) for s in range(max_steps + 1)])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_states_its_schedules_at_its_own_length(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.optim.schedule_reference_steps == cfg.train.max_steps, name
    assert cfg.optim.schedule_scaling == "proportional", name
    steps = schedule_steps(cfg)
    assert steps["warmup_steps"] == (cfg.optim.warmup_steps if cfg.optim.schedule != "tri_stage"
                                     else int(cfg.optim.tri_stage[0] * cfg.train.max_steps))
    assert steps["ema_anneal_end_step"] == cfg.objective.ema_anneal_end_step


@pytest.mark.parametrize("name", ["tiny_image.yaml", "tiny_audio.yaml", "tiny_text.yaml",
                                  "tiny_image_v2.yaml", "tiny_audio_v2.yaml"])
def test_a_20_step_run_follows_the_200_step_lr_and_ema_curves_at_the_same_fractions(name):
    short_lr, short_ema = _curves(load_config(ROOT / "configs" / name), 20)
    long_lr, long_ema = _curves(load_config(ROOT / "configs" / name), 200)
    for k in range(21):
        assert short_lr[k] == pytest.approx(long_lr[10 * k], abs=1e-12), (k, short_lr)
        assert short_ema[k] == pytest.approx(long_ema[10 * k], abs=1e-12), (k, short_ema)
    assert short_ema[20] == load_config(ROOT / "configs" / name).objective.ema_end_decay
    assert max(short_lr) == pytest.approx(1.0), "the short run reaches its peak lr"


def test_a_shortened_base_recipe_warms_up_and_anneals_over_the_same_fractions():
    cfg = load_config(ROOT / "configs/image_base.yaml", ["train.max_steps=100000"])
    steps = schedule_steps(cfg)
    assert steps["warmup_steps"] == round(12510 * 100000 / 375300) == 3333
    assert steps["ema_anneal_end_step"] == 100000, "the EMA reaches its end decay at the run's end"
    assert steps["collapse_check_after"] == 5000, "a guard, not a schedule: as stated"
    assert steps["decay_steps"] == 100000 - 3333


def test_absolute_scaling_keeps_fairseqs_counts():
    cfg = load_config(ROOT / "configs/image_base.yaml",
                      ["train.max_steps=100000", "optim.schedule_scaling=absolute"])
    steps = schedule_steps(cfg)
    assert (steps["warmup_steps"], steps["ema_anneal_end_step"]) == (12510, 375300)
    assert run_steps(5000, cfg.optim, 100000) == 5000


def test_no_reference_length_means_no_scaling():
    cfg = OptimConfig(warmup_steps=10)
    assert [run_steps(10, cfg, n) for n in (5, 100, 10**6)] == [10, 10, 10]


def test_the_trainer_logs_the_scaled_curves(tmp_path, monkeypatch):
    """A real 20-step run logs, for every update, the lr and EMA decay of the 200-step curves at
    the same fraction of the run (tiny_text, one block: the schedule does not depend on it)."""
    from d2v_engine.run.trainer import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels have their own tests
    small = ["model.depth=1", "objective.top_k=1", "train.global_batch=2", "train.progress=false",
             "train.log_every=1", "run.tensorboard=false"]
    cfg = load_config(ROOT / "configs/tiny_text.yaml",
                      [f"run.dir={tmp_path}", "train.max_steps=20", *small])
    train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    long_lr, long_ema = _curves(load_config(ROOT / "configs/tiny_text.yaml", small), 200)
    plan = json.loads((tmp_path / "plan.json").read_text())["schedule"]
    assert (plan["warmup_steps"], plan["ema_anneal_end_step"]) == (2, 20)
    for r in rows:
        k = r["step"] - 1  # the row of update k (from 0) logs its lr and EMA decay
        assert r["lr"] == pytest.approx(cfg.optim.lr * long_lr[10 * k], rel=1e-9), r
        assert r["ema_decay"] == pytest.approx(long_ema[10 * k], abs=1e-12), r
