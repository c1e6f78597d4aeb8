"""The run's guards: non-finite updates, collapsed representations, checkpoint saves that fail.

Non-finite updates: when the global loss or the global gradient norm is NaN/inf, the update is
skipped: no optimizer step (weights and Adam moments untouched), no EMA update. The step still
counts: the data position, the learning-rate schedule and the EMA decay schedule move on, which
keeps them functions of the step (exact resume) and does not feed the same batch again.
fairseq instead retries the update number on the next batch; both apply nothing. Every skip is a
`{"event": "nonfinite"}` row in metrics.jsonl and the rows carry `skipped_steps`; after
`train.max_bad_steps` skips in a row the run stops with a TrainingError (exit 2).

The decision needs the values on the host before the optimizer step: the trainer reads one small
tensor per step (global loss, masked count, stop votes, gradient norm) in a single transfer, the
step's only host synchronization. Its cost on a GPU is the launch latency of the optimizer and EMA
kernels while the device waits (well under a millisecond against steps of 100 ms and more); it
also gives every rank the same skip and stop decisions without another collective.

Collapse (fairseq data2vec): after `objective.collapse_check_after` updates, a logged step whose
target_var is under `objective.min_target_var` or pred_var under `objective.min_pred_var` stops
the run with a message naming both values; checked on the logged steps (`train.log_every`), with
the variances averaged over ranks.
"""
from __future__ import annotations

import errno
import math
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from d2v_engine.checkpoint import latest_checkpoint, save_checkpoint
from d2v_engine.config import Config
from d2v_engine.runtime.distributed import all_reduce_sum
from d2v_engine.errors import CheckpointError, TrainingError, error_line, one_line
from d2v_engine.run.metrics import MetricsLog


def inject_nan(loss: torch.Tensor, done: int, nan_steps: list) -> torch.Tensor:
    """Test hook (train.debug_nan_steps): the loss of the update completing step `done` -> NaN."""
    return loss * float("nan") if done in nan_steps else loss


class UpdateGuard:
    """Counts skipped (non-finite) updates and stops the run on too many in a row or collapse."""

    def __init__(self, cfg: Config, log: MetricsLog):
        self.cfg, self.log = cfg, log
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.empty_steps = 0
        self.empty_in_a_row = 0

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row,
                "empty_steps": self.empty_steps, "empty_in_a_row": self.empty_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.empty_steps = state.get("empty_steps", 0)
        self.empty_in_a_row = state.get("empty_in_a_row", 0)

    def update_ok(self, done: int, loss: float, grad_norm: float, masked: float = 1.0,
                  bad_files: list | None = None) -> bool:
        """False (skip the update) when the global loss or gradient norm is not finite, or when
        no rank had a readable sample in this step (`masked` == 0: every file was skipped;
        `bad_files`: the first skipped paths, for the no_data row and the stop message)."""
        if masked <= 0 and math.isfinite(loss):
            return self._empty(done, list(bad_files or []))
        self.empty_in_a_row = 0
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad_in_a_row = 0
            return True
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        self.log.write({"event": "nonfinite", "step": done, "loss": loss, "grad_norm": grad_norm,
                        "skipped_steps": self.skipped_steps, "in_a_row": self.bad_in_a_row})
        limit = self.cfg.train.max_bad_steps
        if self.bad_in_a_row >= limit:
            first = done - self.bad_in_a_row + 1
            self.log.write({"event": "stopped", "step": done, "reason": "nonfinite"})
            raise TrainingError(
                f"non-finite loss or gradient in {self.bad_in_a_row} updates in a row (steps "
                f"{first}-{done}; limit train.max_bad_steps={limit}; last loss {loss}, gradient "
                f"norm {grad_norm}); nothing of them was applied; {_restart_from(self.cfg)} "
                f"with a lower optim.lr, optim.clip_norm > 0 or train.precision=fp32"
            )
        return False

    def _empty(self, done: int, bad_files: list) -> bool:
        """A step whose every sample was a skipped bad file: nothing to learn from, so no update
        (an AdamW step on zero gradients would still move the weights); too many in a row means
        the data is unreadable, not unlucky."""
        self.empty_steps += 1
        self.empty_in_a_row += 1
        self.log.write({"event": "no_data", "step": done, "empty_steps": self.empty_steps,
                        "in_a_row": self.empty_in_a_row, "bad_files_first": bad_files})
        limit = self.cfg.train.max_bad_steps
        if self.empty_in_a_row >= limit:
            self.log.write({"event": "stopped", "step": done, "reason": "no_data",
                            **({"bad_files_first": bad_files} if bad_files else {})})
            first = ", ".join(bad_files[:3]) + (", ..." if len(bad_files) > 3 else "")
            raise TrainingError(
                f"every sample of {self.empty_in_a_row} steps in a row was an unreadable file "
                f"(data.on_bad_file=skip; limit train.max_bad_steps={limit}): check data.path "
                f"{self.cfg.data.path}; first bad files: {first or 'none recorded'} "
                f"(all of the first ones in metrics.jsonl's no_data rows)")
        return False

    def check_collapse(self, step: int, target_var: float, pred_var: float) -> None:
        """Raises once `step` (updates done before it) is past the warm-up and a variance is low."""
        o = self.cfg.objective
        if step <= o.collapse_check_after:
            return
        low = []
        if target_var < o.min_target_var:
            low.append(f"target_var {target_var:.4g} < objective.min_target_var {o.min_target_var}")
        if pred_var < o.min_pred_var:
            low.append(f"pred_var {pred_var:.4g} < objective.min_pred_var {o.min_pred_var}")
        if low:
            self.log.write({"event": "stopped", "step": step + 1, "reason": "collapse",
                            "target_var": target_var, "pred_var": pred_var})
            raise TrainingError(
                f"representation collapse at step {step + 1}: {'; '.join(low)} (target_var "
                f"{target_var:.4g}, pred_var {pred_var:.4g}; checked after "
                f"objective.collapse_check_after={o.collapse_check_after} updates)"
            )


def _newest(run_dir: Path) -> str:
    newest = latest_checkpoint(run_dir)
    return newest.name if newest else "none"


def _restart_from(cfg: Config) -> str:
    """Where a stopped run can start again: its newest checkpoint, or the beginning."""
    newest = latest_checkpoint(cfg.run_dir)
    if newest is None:
        return f"no checkpoint was written yet in {cfg.run_dir}: start the run again"
    return f"the newest checkpoint is {newest}: resume from it (train.resume=true)"


def save_error(error: Exception, run_dir: Path) -> str:
    """What a failed save says. torch.save's writer reports a full disk as a bare RuntimeError
    ("file write failed", no errno): the free space in run_dir tells, against the newest
    checkpoint's size."""
    text = error_line(error) or f"{type(error).__name__}: {one_line(error)}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return text
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return text
    newest = latest_checkpoint(run_dir)
    needed = max(newest.stat().st_size if newest else 0, 64 << 20)
    if free < needed:
        return (f"no space left on device: {free / 1e6:.0f} MB free in {run_dir}, a checkpoint "
                f"needs about {needed / 1e6:.0f} MB (free some, or lower train.keep_last; {text})")
    return text


class CheckpointSaver:
    """Rank 0 writes; every rank learns the outcome (the all-reduce is also the barrier).

    A failed periodic save (disk full, permission) is reported on stderr and as a
    `{"event": "save_failed"}` row, the previous checkpoints stay intact, and training goes on to
    try again at the next checkpoint step; `train.max_failed_saves` failures in a row, or a failed
    final or preemption save, stop the run with a CheckpointError.
    """

    def __init__(self, cfg: Config, is_main: bool, device: torch.device, log: MetricsLog):
        self.cfg, self.is_main, self.device, self.log = cfg, is_main, device, log
        self.failed_in_a_row = 0

    def save(self, step: int, make_state: Callable[[], dict], must_succeed: bool) -> bool:
        t = self.cfg.train
        error = None
        if self.is_main:
            try:
                save_checkpoint(self.cfg.run_dir, step, make_state(), keep_last=t.keep_last,
                                keep_every=t.keep_every)
            except Exception as e:  # whatever failed, the atomic save left the old set intact
                error = save_error(e, self.cfg.run_dir)
        failed = all_reduce_sum(torch.full((1,), float(error is not None), device=self.device))
        if failed.item() == 0:
            self.failed_in_a_row = 0
            return True
        self.failed_in_a_row += 1
        newest = _newest(self.cfg.run_dir)
        message = (f"checkpoint for step {step} not written ({error or 'failed on rank 0'}); "
                   f"the newest complete checkpoint in {self.cfg.run_dir} is {newest}")
        self.log.write({"event": "save_failed", "step": step, "error": error,
                        "failed_in_a_row": self.failed_in_a_row, "newest": newest})
        if must_succeed or self.failed_in_a_row >= t.max_failed_saves:
            why = ("the final / preemption checkpoint" if must_succeed else
                   f"{self.failed_in_a_row} failed saves in a row (train.max_failed_saves)")
            raise CheckpointError(f"{message}; stopping: {why}")
        if self.is_main:
            print(f"d2v-engine: warning: {message}; training goes on", file=sys.stderr, flush=True)
        return False
