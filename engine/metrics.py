"""Run logging on rank 0: metrics.jsonl (one JSON object per row) and a terminal progress line."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf; keep them visible as strings
    return value


class MetricsLog:
    """Appends rows to run_dir/metrics.jsonl; a no-op object on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)

    def write(self, row: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


DATA_WAIT_WARN = 0.2  # fraction of a step spent waiting for the loader that earns a warning
DATA_WAIT_WARN_EVERY_S = 300.0


def warn_data_wait(row: dict, last_warning: float, enabled: bool = True) -> float:
    """Warns (at most every 5 minutes) when the loader holds back the step; returns the time of
    the last warning."""
    frac = row.get("data_wait_frac", 0.0)
    now = time.time()
    if enabled and frac > DATA_WAIT_WARN and now - last_warning >= DATA_WAIT_WARN_EVERY_S:
        print(f"d2v-engine: warning: step {row.get('step')}: {frac:.0%} of the step waits for the "
              f"data loader (more data.num_workers, faster storage or a GPU loader would help)",
              file=sys.stderr, flush=True)
        return now
    return last_warning


class Progress:
    """One updating line on a terminal; a plain line every `every` steps otherwise."""

    def __init__(self, total: int, enabled: bool = True, every: int = 10):
        self.total, self.enabled, self.every = total, enabled, every
        self.tty = sys.stderr.isatty()
        self.start = time.time()

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * step / max(1, self.total))
        bar = "#" * done + "." * (width - done)
        parts = [f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
                 f"{row['samples_per_s']:.1f} samples/s"]
        line = f"[{bar}] {step}/{self.total} " + " | ".join(parts)
        if self.tty:
            end = "\n" if step >= self.total else ""
            sys.stderr.write("\r" + line + end)
            sys.stderr.flush()
        elif step % self.every == 0 or step >= self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
