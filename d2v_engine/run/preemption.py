"""Stopping cleanly and coming back.

Preemption: SLURM (and most schedulers) send SIGTERM, or the signal asked for with
`#SBATCH --signal=USR1@120`, some time before the kill. While `train()` runs, SIGTERM and SIGUSR1
only record that a stop was asked for; every rank adds its vote to the all-reduce the step does
anyway, so all ranks see the same sum after the same step, finish it, rank 0 writes a checkpoint
and the process exits 0. Further signals during the save are recorded the same way and change
nothing, and the save is atomic (d2v_engine.checkpoint), so a kill at any moment leaves the previous
checkpoint set intact. From the command line, signals after the first are absorbed until the
process exits, also after train() returned (absorb_after_stop, then SIG_IGN: Python resets its
own handlers to the default while it shuts down), so a burst still exits 0.

Restarts: a launcher that restarts the job (torchrun --max-restarts N, which sets
TORCHELASTIC_RESTART_COUNT; a requeued SLURM job, SLURM_RESTART_COUNT) resumes from the newest
complete checkpoint written by the same launch (TORCHELASTIC_RUN_ID, i.e. torchrun's rdzv id, or
the SLURM job id), or starts fresh if that launch wrote none yet. Checkpoints of another launch
are never picked up silently: that still needs train.resume=true.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from d2v_engine.checkpoint import latest_checkpoint, load_checkpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While entered (main thread only), SIGTERM / SIGUSR1 set `received` instead of killing."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        global _stop_requested
        _stop_requested = True
        if self.received is None:
            self.received = signal.Signals(signum).name

    def vote(self, device: torch.device) -> torch.Tensor:
        """0-d float32 on `device`: 1 if this rank was asked to stop (a fill, no host sync)."""
        return torch.full((), 1.0 if self.received else 0.0, device=device)


_stop_requested = False  # a stop signal reached a StopSignals in this process


def absorb_after_stop(signum, frame) -> None:
    """The command line's handler around train(): once a stop was asked for while training, every
    later SIGTERM / SIGUSR1 (a scheduler's burst, an impatient user) is absorbed until the
    process has exited 0 with its checkpoint; before that, the signal does what it always does."""
    if _stop_requested:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def stop_requested() -> bool:
    return _stop_requested


def restart_count() -> int:
    """How many times the launcher has restarted this job (0: first attempt)."""
    counts = [os.environ.get("TORCHELASTIC_RESTART_COUNT"), os.environ.get("SLURM_RESTART_COUNT")]
    return max([int(c) for c in counts if c and c.isdigit()], default=0)


def launch_id() -> str | None:
    """What stays the same across restarts of one launch: torchrun's run id, else the SLURM job."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    return os.environ.get("SLURM_JOB_ID") or None


def restart_checkpoint(run_dir: Path) -> Path | None:
    """On a launcher restart, the newest complete checkpoint this launch wrote; else None."""
    if restart_count() == 0 or launch_id() is None:
        return None
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    # mmap: reads the pickled dict, not the tensors. A file refused here (damaged, foreign,
    # unsafe) stops the restart with its one-line error rather than a misleading one later.
    state = load_checkpoint(newest, mmap=True)
    return newest if state.get("launch_id") == launch_id() else None


def injected_kill_step(rank: int) -> int | None:
    """Test hook for elastic restarts: D2V_TEST_KILL_AT_STEP=RANK:STEP makes that rank SIGKILL
    itself when it reaches 0-based step STEP, on the launch's first attempt only."""
    spec = os.environ.get("D2V_TEST_KILL_AT_STEP")
    if not spec or restart_count() > 0:
        return None
    kill_rank, kill_step = (int(v) for v in spec.split(":"))
    return kill_step if kill_rank == rank else None


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
