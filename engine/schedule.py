"""Learning-rate schedules as pure functions of the step (so resume needs only the step)."""
from __future__ import annotations

import math

from engine.config import OptimConfig


def lr_factor(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Multiplier of the peak learning rate for the update numbered `step` (from 0)."""
    if cfg.schedule == "tri_stage":
        # fairseq tri_stage (phase_ratio): linear warm-up from init_lr_scale 0.01 of peak, hold,
        # exp decay to final_lr_scale over int(max_steps * ratio) steps each, then final_lr_scale.
        warm = int(cfg.tri_stage[0] * max_steps)
        hold = int(cfg.tri_stage[1] * max_steps)
        decay = int(cfg.tri_stage[2] * max_steps)
        init_scale = 0.01
        final_scale = cfg.final_lr_scale if cfg.final_lr_scale is not None else 0.01
        if step < warm:
            return init_scale + (1.0 - init_scale) * step / warm
        if step < warm + hold:
            return 1.0
        if step <= warm + hold + decay and decay > 0:
            return math.exp(math.log(final_scale) * (step - warm - hold) / decay)
        return final_scale
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.schedule == "constant":
        return 1.0
    t = min(1.0, (step - warm) / max(1, max_steps - warm))
    floor = cfg.final_lr_scale or 0.0  # fairseq cosine's min_lr default
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak learning rate after scaling from lr_reference_batch to the run's global batch."""
    if cfg.lr_scaling == "none" or cfg.lr_reference_batch <= 0:
        return cfg.lr
    ratio = global_batch / cfg.lr_reference_batch
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))
