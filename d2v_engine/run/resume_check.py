"""A resumed run continues the recipe its checkpoint was written with, or says what it changes.

A resume compares this start's resolved config with the one saved in the checkpoint. Keys that
only say where and how the run is logged, scheduled or executed (FREE_ON_RESUME) may change; a
change anywhere else (model, objective, masking, data, optim, seed, the global batch, precision)
would give another trajectory than the run's without a word, so it is an error listing each key
with both values, unless the start names the key in train.resume_overrides.
"""
from __future__ import annotations

from pathlib import Path

from d2v_engine.config import BOOKKEEPING, Config, flatten, to_dict
from d2v_engine.errors import ConfigError

FREE_ON_RESUME = tuple(k for k in BOOKKEEPING if k != "data.path") + (
    "train.max_steps",  # a longer (or shorter) run; the plan restates the schedules
    "train.micro_batch",  # accumulation follows: the same global batch, the same losses (tested)
    "train.device_memory_gb", "train.memory_fraction", "train.peak_tflops",
    # Drop-ins tested equal to the plain path: compile, FSDP, masks drawn ahead.
    "train.compile", "train.compile_mode", "train.compile_backend", "train.distributed",
    "train.ddp_bucket_cap_mb", "train.mask_ahead", "train.collective_timeout_s",
    "model.init_from",  # the run's start; its weights are in the checkpoint since
)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def recipe_changes(cfg: Config, saved: dict) -> list[tuple[str, object, object]]:
    """[(key, checkpoint's value, this start's value)] for every key that differs; a key the
    checkpoint predates counts as its default there."""
    ours, theirs = flatten(to_dict(cfg)), flatten(saved)
    defaults = flatten(to_dict(Config()))
    return [(k, theirs.get(k, defaults[k]), v) for k, v in sorted(ours.items())
            if v != theirs.get(k, defaults[k])]


def check_resume(cfg: Config, saved: dict, checkpoint: Path) -> list[tuple[str, object, object]]:
    """The changes this resume makes (all allowed); ConfigError naming each one that is not."""
    changes = recipe_changes(cfg, saved)
    named = set(cfg.train.resume_overrides)
    refused = [c for c in changes if not c[0].startswith(FREE_ON_RESUME) and c[0] not in named]
    if refused:
        listed = "; ".join(f"{k}: {_short(a)} in the checkpoint, {_short(b)} now"
                           for k, a, b in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigError(
            f"resuming from {checkpoint.name} with a different recipe ({listed}): that would not "
            f"continue the run's trajectory; pass the checkpoint's values, or name the keys you "
            f"mean to change: train.resume_overrides=[{keys}]")
    return changes


def describe_changes(changes: list[tuple[str, object, object]]) -> str | None:
    """One line for the start, or None: the keys this resume changes, bookkeeping left out."""
    shown = [c for c in changes if not c[0].startswith(("train.resume", "train.stop_at"))]
    if not shown:
        return None
    return "resumed with " + ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in shown)
