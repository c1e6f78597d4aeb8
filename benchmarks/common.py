"""What every benchmark shares: the device's measured peaks, versions, commit, and the record format.

A record is one comparison: {"bench", "shape", "device", "ours", "peer", "peer_value", "unit",
"ratio", "fraction_of_peak", "torch", "triton", "commit"}; ratio > 1 means ours is better (for a
throughput peer_value / ours is inverted accordingly: see `record`).
"""
from __future__ import annotations

import functools
import importlib.util
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
HIGHER_IS_BETTER = {"samples/s", "tokens/s", "GB/s", "TFLOP/s", "images/s", "audio s/s"}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device | None = None) -> str:
    dev = dev or device()
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


@functools.lru_cache(maxsize=None)
def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton
    return triton.__version__


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of fn() (synchronized around each call)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def matmul_peak_tflops(dev_type: str | None = None) -> tuple[float, str]:
    """Measured dense matmul TFLOP/s: bf16 8192^3 on CUDA (the peak MFU is measured against);
    fp32 512^3 on CPU (the dtype the CPU step runs in). Returns (TFLOP/s, dtype name)."""
    dev = torch.device(dev_type) if dev_type else device()
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = time_ms(lambda: torch.matmul(a, b), dev, repeats=10 if dev.type == "cuda" else 5,
                 warmup=3)
    return 2 * n ** 3 / ms / 1e9, str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps(dev_type: str | None = None) -> float:
    """Measured device copy bandwidth, bytes read + written, GB/s."""
    dev = torch.device(dev_type) if dev_type else device()
    nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), dev, repeats=10, warmup=2)
    return 2 * nbytes / ms / 1e6


def header(dev: torch.device | None = None, tiny: bool = False) -> dict:
    dev = dev or device()
    peak, dtype = matmul_peak_tflops(dev.type)
    return {"device": device_name(dev), "torch": torch.__version__, "triton": triton_version(),
            "commit": commit(), "copy_gbps": copy_bandwidth_gbps(dev.type),
            "matmul_tflops": peak, "matmul_dtype": dtype, "tiny": tiny}


@dataclass(frozen=True)
class BenchCase:
    """One guarded unit of benchmarks.run_all: run(emit) measures and calls emit(record) for each
    row the moment it has it (run_all writes it to disk at once), so a case cut by its time guard
    keeps the rows it measured. peers: the rows' `peer` names in the order it measures them (None:
    ours alone), for the cut's list of what it did not measure. estimate_s: its expected seconds
    on one H100 (an estimate until timed there); run_all guards it at GUARD_FACTOR x that."""
    name: str
    run: Callable[[Callable[[dict], None]], None]
    peers: tuple = ()
    estimate_s: float = 60.0


def record(bench: str, shape: str, ours: float, peer: str | None, peer_value: float | None,
           unit: str, fraction_of_peak: float | None = None, dev: torch.device | None = None) -> dict:
    """One comparison row; ratio > 1 means ours is better (faster, or more per second)."""
    ratio = None
    if peer_value is not None and ours and peer_value:
        ratio = ours / peer_value if unit in HIGHER_IS_BETTER else peer_value / ours
    return {"bench": bench, "shape": shape, "device": device_name(dev), "ours": ours,
            "peer": peer, "peer_value": peer_value, "unit": unit, "ratio": ratio,
            "fraction_of_peak": fraction_of_peak, "torch": torch.__version__,
            "triton": triton_version(), "commit": commit()}


RECORD_KEYS = ("bench", "shape", "device", "ours", "peer", "peer_value", "unit", "ratio",
               "fraction_of_peak", "torch", "triton", "commit")


def print_records(records: list[dict]) -> None:
    print(f"{'bench':<30}{'shape':<34}{'unit':<10}{'ours':>11}  {'peer':<22}{'peer':>11}"
          f"{'ratio':>8}{'%peak':>8}")
    for r in records:
        peer_value = "" if r["peer_value"] is None else f"{r['peer_value']:.4g}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        frac = "" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}%"
        print(f"{r['bench']:<30}{r['shape']:<34}{r['unit']:<10}{r['ours']:>11.4g}  "
              f"{str(r['peer']):<22}{peer_value:>11}{ratio:>8}{frac:>8}")
