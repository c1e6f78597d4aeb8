"""The objective: what is learned from a batch. data2vec 1.0 (data2vec.py) and 2.0
(data2vec_v2.py) with what they share (step.py), the EMA teacher (ema.py), the optimizer and its
parameter groups (optim.py), the learning-rate and EMA schedules (schedule.py).

May import: d2v_kernels, d2v_engine's shared modules (config, errors, seeding, checkpoint),
runtime, data, models. Not planning, handoff, prepare, run or cli.
"""
from __future__ import annotations

from torch import nn

from d2v_engine.config import Config
from d2v_engine.objective.data2vec import Data2Vec
from d2v_engine.objective.data2vec_v2 import Data2VecV2


def build_objective(cfg: Config, encoder: nn.Module, special_ids: dict | None = None) -> nn.Module:
    """The module whose forward(batch, teacher, seeds) -> StepOutput: v1 or v2 (data2vec 2.0)."""
    if cfg.objective.mode == "v2":
        return Data2VecV2(cfg, encoder, special_ids)
    return Data2Vec(cfg, encoder, special_ids)
