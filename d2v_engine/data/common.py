"""What the three datasets share: the skippable bad-sample error, the file check, label batching."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from d2v_engine.errors import DataError


class BadSample(DataError):
    """One file could not be decoded and data.on_bad_file is "skip": the loader counts it and
    draws another sample instead of stopping the run. `path` names the file."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        super().__init__(f"bad sample {self.path}: {reason}")


def check_file(path: Path | str, max_bytes: int) -> None:
    """ValueError unless `path` is a regular file of at most max_bytes (data.max_file_bytes): a
    device (/dev/zero), a FIFO or a runaway file would be read until memory runs out."""
    info = os.stat(path)  # FileNotFoundError stays what it is
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file (a device, FIFO or socket)")
    if info.st_size > max_bytes:
        raise ValueError(f"{info.st_size} bytes, over data.max_file_bytes={max_bytes}")


def bad_file(on_bad_file: str, path: Path | str, reason: str) -> DataError:
    """The error to raise for an undecodable file: BadSample under "skip", else a DataError."""
    if on_bad_file == "skip":
        return BadSample(path, reason)
    return DataError(f"cannot read {path}: {reason} (data.on_bad_file=skip skips such files)")


def read_labels(path: Path, count: int, what: Path) -> list[int]:
    """One integer label per line of `path`; exactly `count` of them, matching `what`'s entries."""
    lines = path.read_text().split()
    if len(lines) != count:
        raise DataError(f"{path} has {len(lines)} labels but {what} has {count} entries")
    try:
        labels = [int(line) for line in lines]
    except ValueError:
        raise DataError(f"{path}: every line must be one integer label") from None
    if labels and min(labels) < 0:
        raise DataError(f"{path}: labels must be >= 0")
    return labels


def with_labels(batch: dict, samples: list[dict]) -> dict:
    """Adds "label" (B int64) to the batch when every sample has one."""
    if samples and all("label" in s for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    return batch


def stand_in_batch(modality: str, data_cfg) -> dict:
    """A one-sample batch of zeros, for a micro-batch whose every file was skipped before this
    rank has seen a good one. The trainer runs forward and backward on it with the loss times 0,
    so this rank still takes part in the step's collectives and adds nothing to it."""
    if modality == "image":
        source = torch.zeros(1, 3, data_cfg.img_size, data_cfg.img_size)
    elif modality == "audio":
        source = torch.zeros(1, min(data_cfg.max_sample_size, 2 * data_cfg.sample_rate))
    else:
        raise DataError(f"no readable sample in a micro-batch of {modality} data")
    return {"source": source, "padding_mask": None, "position": torch.zeros(1, dtype=torch.long)}
