"""Learning-rate schedules as pure functions of the step (so resume needs only the step)."""
from __future__ import annotations

import math

from engine.config import OptimConfig


def lr_factor(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Multiplier of the peak learning rate for the update numbered `step` (from 0)."""
    if cfg.schedule == "tri_stage":
        # fairseq tri_stage: linear warm-up from 1% of peak, hold, exponential decay to the end.
        warm = int(cfg.tri_stage[0] * max_steps)
        hold = int(cfg.tri_stage[1] * max_steps)
        decay = max(1, max_steps - warm - hold)
        init_scale, final_scale = 0.01, cfg.final_lr_scale or 0.05
        if step < warm:
            return init_scale + (1.0 - init_scale) * step / warm
        if step < warm + hold:
            return 1.0
        t = min(1.0, (step - warm - hold) / decay)
        return math.exp(math.log(final_scale) * t)
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.schedule == "constant":
        return 1.0
    t = min(1.0, (step - warm) / max(1, max_steps - warm))
    floor = cfg.final_lr_scale
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak learning rate after scaling from lr_reference_batch to the run's global batch."""
    if cfg.lr_scaling == "none" or cfg.lr_reference_batch <= 0:
        return cfg.lr
    ratio = global_batch / cfg.lr_reference_batch
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))
