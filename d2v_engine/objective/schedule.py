"""Learning-rate schedules as pure functions of the step (so resume needs only the step), and the
run-length scaling of every step-denominated schedule.

A config states its warmup (optim.warmup_steps) and EMA anneal (objective.ema_anneal_end_step) as
the paper's values at the paper's run length, optim.schedule_reference_steps. A run of another
train.max_steps scales them by max_steps / schedule_reference_steps
(optim.schedule_scaling=proportional), so a shortened run warms up, anneals its EMA and decays its
learning rate over the same fractions of the run; optim.schedule_scaling=absolute keeps the counts
as stated (fairseq's behaviour). Tri-stage phases and the cosine decay are fractions of / end at
train.max_steps either way. The collapse guard's onset (objective.collapse_check_after) is a guard,
not a schedule: it stays as stated.
"""
from __future__ import annotations

import math

from d2v_engine.config import Config, OptimConfig


def run_steps(steps: int, cfg: OptimConfig, max_steps: int) -> int:
    """A step count stated at optim.schedule_reference_steps, at a run of `max_steps` updates."""
    ref = cfg.schedule_reference_steps
    if cfg.schedule_scaling == "absolute" or ref <= 0 or ref == max_steps:
        return steps
    return round(steps * max_steps / ref)


def _tri_stage_phases(cfg: OptimConfig, max_steps: int) -> tuple[int, int, int]:
    """fairseq tri_stage's phase_ratio: each stage int(max_steps * ratio) updates (a rounding
    remainder runs at the final scale)."""
    warm, hold, decay = (int(r * max_steps) for r in cfg.tri_stage)
    return warm, hold, decay


def lr_factor(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Multiplier of the peak learning rate for the update numbered `step` (from 0)."""
    if cfg.schedule == "tri_stage":
        # fairseq tri_stage: linear warm-up from init_lr_scale 0.01 of peak, hold, exponential
        # decay to final_lr_scale, then final_lr_scale.
        warm, hold, decay = _tri_stage_phases(cfg, max_steps)
        init_scale = 0.01
        final_scale = cfg.final_lr_scale if cfg.final_lr_scale is not None else 0.01
        if step < warm:
            return init_scale + (1.0 - init_scale) * step / warm
        if step < warm + hold:
            return 1.0
        if step <= warm + hold + decay and decay > 0:
            return math.exp(math.log(final_scale) * (step - warm - hold) / decay)
        return final_scale
    # fairseq cosine: warm-up linear from the floor (warmup_init_lr = min_lr) at update 0, so the
    # curve is a function of step / warmup and step / max_steps only: a run scaled in length
    # follows it at the same fractions.
    warm = run_steps(cfg.warmup_steps, cfg, max_steps)
    floor = cfg.final_lr_scale or 0.0  # fairseq cosine's min_lr default
    if step < warm:
        return floor + (1.0 - floor) * step / warm
    if cfg.schedule == "constant":
        return 1.0
    t = min(1.0, (step - warm) / max(1, max_steps - warm))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def schedule_steps(cfg: Config) -> dict:
    """The run's schedules in steps, after scaling: what the plan prints and plan.json holds."""
    o, max_steps = cfg.optim, cfg.train.max_steps
    if o.schedule == "tri_stage":
        warm, hold, decay = _tri_stage_phases(o, max_steps)
    else:
        warm = run_steps(o.warmup_steps, o, max_steps)
        rest = max(0, max_steps - warm)
        hold, decay = (rest, 0) if o.schedule == "constant" else (0, rest)
    return {
        "lr_schedule": o.schedule,
        "scaling": o.schedule_scaling,
        "reference_steps": o.schedule_reference_steps or max_steps,
        "warmup_steps": warm,
        "hold_steps": hold,
        "decay_steps": decay,
        "ema_decay": cfg.objective.ema_decay,
        "ema_end_decay": cfg.objective.ema_end_decay,
        "ema_anneal_end_step": run_steps(cfg.objective.ema_anneal_end_step, o, max_steps),
        "collapse_check_after": cfg.objective.collapse_check_after,
    }


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak learning rate after scaling from lr_reference_batch to the run's global batch."""
    if cfg.lr_scaling == "none" or cfg.lr_reference_batch <= 0:
        return cfg.lr
    ratio = global_batch / cfg.lr_reference_batch
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))
