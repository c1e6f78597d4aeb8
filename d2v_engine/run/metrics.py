"""Run logging on rank 0: metrics.jsonl (one JSON object per row), a terminal progress line, and
TensorBoard / Weights & Biases when installed and enabled (never required: missing, they are
reported once and the run goes on)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf; keep them visible as strings
    return value


def _scalars(row: dict) -> dict:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tensorboard_writer(run_dir: Path):
    if importlib.util.find_spec("tensorboard") is None:
        print("d2v-engine: tensorboard not installed: metrics.jsonl only (pip install tensorboard)",
              file=sys.stderr)
        return None
    try:  # an install that imports but cannot run (a missing dependency such as absl)
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
    except Exception as e:  # noqa: BLE001  whatever breaks, the run does not need it
        print(f"d2v-engine: tensorboard installed but unusable ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}): metrics.jsonl only", file=sys.stderr)
        return None


def _wandb_run(run_dir: Path, wandb: dict):
    if importlib.util.find_spec("wandb") is None:
        print("d2v-engine: run.wandb=true but wandb is not installed: metrics.jsonl only",
              file=sys.stderr)
        return None
    import wandb as wb

    return wb.init(project=wandb["project"], name=wandb["name"], config=wandb.get("config"),
                   dir=str(run_dir), id=wandb.get("id"), resume="allow")


class MetricsLog:
    """Appends rows to run_dir/metrics.jsonl; a no-op object on ranks other than 0.

    Rows with a `step` and no `event` also go, as scalars under train/, to TensorBoard
    (run_dir/tensorboard) when `tensorboard` is true and installed, and to W&B when `wandb`
    ({"project", "name", "config", "id"}) is given and wandb is installed.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False,
                 wandb: dict | None = None):
        self.enabled = enabled
        self._file = self._tb = self._wandb = None
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
            self._tb = _tensorboard_writer(run_dir) if tensorboard else None
            self._wandb = _wandb_run(run_dir, wandb) if wandb else None

    def write(self, row: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if "event" in row or "step" not in row or not (self._tb or self._wandb):
            return
        scalars = _scalars(row)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}", value, row["step"])
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def throughput(flops: float, tokens: float, seconds: float, world_size: int,
               peak_tflops: float | None) -> dict:
    """A log row's compute rates from the FLOPs and tokens of all ranks over `seconds` of wall
    time: tflops_per_gpu, mfu (against the dense bf16 peak; None when it is unknown, e.g. CPU)
    and tokens_per_s (the tokens the teacher encodes, all ranks: patches + CLS, audio frames,
    text tokens, padding included)."""
    tflops = flops / world_size / seconds / 1e12
    return {"tflops_per_gpu": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "tokens_per_s": tokens / seconds}


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
