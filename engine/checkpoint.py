"""Atomic checkpoints and exact resume.

A checkpoint is written to a temporary name in the run directory, fsync'd, then renamed to
`checkpoint_<step>.pt` and the directory fsync'd: a crash leaves either the old set or the new
file whole, and a half-written file never carries a final name, so it is never picked up.
Retention keeps the newest `keep_last` and every checkpoint whose step is a multiple of
`keep_every`; older ones are deleted only after the new one is safely in place.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from engine.errors import CheckpointError

_NAME = re.compile(r"^checkpoint_(\d{8,})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep_last: int = 2,
                    keep_every: int = 0) -> Path:
    """Writes state atomically as checkpoint_<step>.pt; keeps the newest `keep_last` and every
    `keep_every`-th step. On any error the previous checkpoints are untouched and it re-raises."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    # A writer killed mid-save (SIGKILL, node loss) leaves its temp file; only one process writes
    # checkpoints, so any other temp file is such a leftover.
    for stale in run_dir.glob(".checkpoint_*.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old_step, old in list_checkpoints(run_dir)[:-keep_last]:
        if not (keep_every and old_step % keep_every == 0):
            old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """Loads a checkpoint on the CPU; a file that does not load is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: name it, do not dump a traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    """Every RNG state of this process (Python, NumPy, torch CPU and each CUDA device)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
