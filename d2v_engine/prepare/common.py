"""What the prepare commands share: the scan of a source folder (no folder twice, no names a
manifest cannot hold, no file that is not regular or too large), the checking pool, the progress
bar, the report and its rejection reasons, the valid split, the argument types."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import stat
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from d2v_engine.errors import DataError

MAX_LISTED = 100

# Rejection reasons (report.json keys).
EMPTY_FILE = "empty_file"  # zero bytes
NOT_AUDIO = "not_audio"  # no WAV / FLAC signature
NOT_IMAGE = "not_image"  # no image format recognised
TRUNCATED = "truncated"  # the file ends before its declared content
CORRUPT = "corrupt"  # recognised format, but decoding failed
UNSUPPORTED = "unsupported_encoding"  # a well-formed file the installed decoders cannot read
NO_SAMPLES = "no_samples"  # decodes to zero audio frames
SAMPLE_RATE = "wrong_sample_rate"  # without --resample
CHANNELS = "not_mono"  # without --resample
TOO_SHORT = "too_short"  # below --min-seconds
TOO_LONG = "too_long"  # above --max-seconds
NON_FINITE = "non_finite"  # float samples NaN / Inf, or too large to normalize
NOT_REGULAR = "not_regular_file"  # a FIFO, a device, a socket
TOO_LARGE_FILE = "too_large"  # over --max-file-bytes
UNSAFE_NAME = "unsafe_name"  # a TAB or a line break in the path: a .tsv row cannot hold it


def find_files(src: Path, extensions: tuple[str, ...], follow_symlinks: bool = True,
               skipped: list[str] | None = None) -> list[str]:
    """Paths relative to src of every file with one of `extensions`, recursively, sorted.

    No folder is read twice: a symlinked folder is followed only when it leads outside src to a
    folder not read yet (a link back into src is a loop or a second name for a folder already
    listed); follow_symlinks=False follows none and leaves symlinked files out too. The folders
    left out are appended to `skipped` (relative paths)."""
    src = Path(src)
    inside = os.path.realpath(src)
    seen: set[tuple[int, int]] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=follow_symlinks):
        info = os.stat(dirpath)
        seen.add((info.st_dev, info.st_ino))
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            if os.path.islink(full) and not _follow(full, inside, seen, follow_symlinks):
                if skipped is not None:
                    skipped.append(os.path.relpath(full, src))
                continue
            keep.append(d)
        dirnames[:] = keep
        rel_dir = os.path.relpath(dirpath, src)
        for name in sorted(filenames):
            if not name.lower().endswith(extensions) or name.startswith("."):
                continue
            if not follow_symlinks and os.path.islink(os.path.join(dirpath, name)):
                continue
            found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    return found


def _follow(link: str, inside: str, seen: set, follow_symlinks: bool) -> bool:
    if not follow_symlinks:
        return False
    target = os.path.realpath(link)
    try:
        info = os.stat(target)
    except OSError:  # a dangling link
        return False
    if target == inside or target.startswith(inside + os.sep) or \
            (info.st_dev, info.st_ino) in seen:
        return False
    seen.add((info.st_dev, info.st_ino))
    return True


def scan_sources(src: Path, extensions: tuple[str, ...], args) -> tuple[list[str], list[tuple]]:
    """(files to check, [(path, unsafe_name)]) under src, saying which symlinked folders it did
    not follow; names a .tsv manifest cannot hold (a TAB or a line break) are rejected here."""
    skipped: list[str] = []
    files = find_files(src, extensions, not args.no_follow_symlinks, skipped)
    if skipped:
        print(f"d2v-engine prepare: read no folder twice: did not follow {len(skipped)} symlinked "
              f"folder(s) ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}): "
              + ("--no-follow-symlinks" if args.no_follow_symlinks else
                 "they lead back into the source or to a folder already read"), file=sys.stderr)
    unsafe = [(f, UNSAFE_NAME) for f in files if any(c in f for c in "\t\n\r")]
    return [f for f in files if not any(c in f for c in "\t\n\r")], unsafe


def regular_file_reason(path: Path, max_bytes: int) -> str | None:
    """NOT_REGULAR / TOO_LARGE / EMPTY_FILE for a file prepare must not read, else None."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return NOT_REGULAR
    if info.st_size > max_bytes:
        return TOO_LARGE_FILE
    return EMPTY_FILE if info.st_size == 0 else None


class ProgressBar:
    """A one-line stderr bar (on a terminal), else a line every 10 %; at most ~5 redraws/s."""

    def __init__(self, total: int, what: str, enabled: bool = True, unit: str = "files"):
        self.total, self.what, self.enabled = total, what, enabled and total > 0
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.time()
        self.next_tenth = 1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.time()
        rate = done / max(now - self.start, 1e-9)
        if self.tty:
            if now - self.last < 0.2 and done < self.total:
                return
            self.last = now
            filled = int(30 * done / self.total)
            sys.stderr.write(f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{done}/{self.total} {self.unit}, {rate:.0f}/s")
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif done * 10 >= self.next_tenth * self.total:
            while done * 10 >= self.next_tenth * self.total:
                self.next_tenth += 1
            print(f"{self.what}: {done}/{self.total} {self.unit}, {rate:.0f}/s",
                  file=sys.stderr, flush=True)


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def check_all(worker, jobs: list, workers: int, what: str, progress: bool = True) -> list:
    """worker(job) for every job, in order, over a process pool (in-process for one worker)."""
    bar = ProgressBar(len(jobs), what, progress)
    results = []
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            results.append(worker(job))
            bar.update(len(results))
        return results
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    # An executor, not multiprocessing.Pool: a worker killed from outside (the OOM killer, a
    # SIGKILL) breaks the executor with an error, where Pool.imap would wait for it forever.
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            for result in pool.map(worker, jobs, chunksize=chunk):
                results.append(result)
                bar.update(len(results))
    except BrokenProcessPool:
        raise DataError(f"{what}: a worker process died (killed from outside, e.g. out of "
                        f"memory) after {len(results)} of {len(jobs)} files; run again, with "
                        "fewer --workers if memory is short") from None
    return results


def length_stats(values) -> dict:
    """{"min", "p50", "p95", "max"} of the accepted samples' lengths (None when there are none)."""
    if len(values) == 0:
        return {"min": None, "p50": None, "p95": None, "max": None}
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def _fixes() -> dict:
    """What accepts the files rejected for a reason that is not the file's fault."""
    from d2v_engine.data.audio import SOUNDFILE_FIX

    return {UNSUPPORTED: SOUNDFILE_FIX, SAMPLE_RATE: "--resample converts them",
            CHANNELS: "--resample converts them"}


def build_report(accepted: int, rejected: list[tuple], lengths, **totals) -> dict:
    """The report.json object; `rejected` is [(path, reason)] or [(path, reason, byte offset)]
    in scan order."""
    counts = dict(sorted(Counter(r[1] for r in rejected).items()))
    report = {"accepted": accepted,
              "rejected": counts,
              "rejected_files": [{"path": r[0], "reason": r[1],
                                  **({"offset": int(r[2])} if len(r) > 2 else {})}
                                 for r in rejected[:MAX_LISTED]]}
    fixes = {reason: fix for reason, fix in _fixes().items() if reason in counts}
    if fixes:
        report["fixes"] = fixes
    report.update(totals)
    report["lengths"] = length_stats(lengths)
    return report


def write_report(out_dir: Path, report: dict, what: str = "file") -> int:
    """Writes OUT_DIR/report.json, prints a summary; the exit code (0 accepted, 2 none)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    fixes = report.get("fixes", {})
    counts = ", ".join(f"{k} {v}" + (f" ({fixes[k]})" if k in fixes else "")
                       for k, v in report["rejected"].items()) or "none"
    if report["accepted"] == 0:
        print(f"error: no {what} accepted; rejected by reason: {counts} (details in "
              f"{out_dir / 'report.json'})", file=sys.stderr)
        return 2
    print(f"d2v-engine prepare: accepted {report['accepted']} {what}s, rejected: {counts}; "
          f"report {out_dir / 'report.json'}", file=sys.stderr)
    return 0


def split_valid(count: int, valid_percent: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out entries: round(count * valid_percent) of them, seeded; at
    least one when valid_percent > 0 and there are two entries or more (valid.tsv was asked for)."""
    is_valid = np.zeros(count, dtype=bool)
    n_valid = int(round(count * valid_percent))
    if valid_percent > 0 and count >= 2:
        n_valid = max(1, n_valid)
    if n_valid:
        is_valid[np.random.default_rng(seed).permutation(count)[:n_valid]] = True
    return is_valid


def _warn_no_valid(valid_percent: float, is_valid: np.ndarray) -> None:
    if valid_percent > 0 and not is_valid.any():
        print(f"d2v-engine prepare: warning: --valid-percent {valid_percent} but only "
              f"{len(is_valid)} file accepted: it stays in train.tsv, no valid.tsv written",
              file=sys.stderr)


def _remove_stale(out_dir: Path, names: tuple[str, ...]) -> None:
    # A manifest from an earlier prepare of the same OUT_DIR must not outlive a failed one.
    for name in names:
        (out_dir / name).unlink(missing_ok=True)


def fraction_arg(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1] (0.01 = 1 %)")
    return value


def seconds_arg(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_int_arg(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value
