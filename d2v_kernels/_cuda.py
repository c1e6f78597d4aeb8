"""Finds the CUDA C++ extension (csrc/ -> module d2v_cuda): installed by setup.py, or compiled just
in time with torch.utils.cpp_extension.load on a machine with a GPU, nvcc and a CUDA build of torch.

`load()` returns (module, None) or (None, reason) and never raises: on a CPU machine, without nvcc,
or when the build fails, the callers take the Triton / PyTorch paths. `load_failed()` tells the two
kinds of None apart: True when a build or load was tried and raised (a bug to report), False when
the environment lacks what the extension needs (no GPU, no nvcc, a CPU torch: a reason to skip).
A failed build's reason is its compiler's error lines, not the first line of torch's exception
(which is the nvcc command line). The result is cached per process; the JIT build itself is cached
by torch under TORCH_EXTENSIONS_DIR, so only the first run on a machine compiles (about a minute).

A build killed mid-way (gpu_check's cap) leaves torch's lock file (a FileBaton: a file created
with O_EXCL, held open by the building process, no timeout for those who wait on it) in the build
folder, and every later load would wait on it forever. `_remove_stale_lock` deletes it first when
no process holds it open (/proc/*/fd) -- and, where some process's descriptors cannot be read (a
container's PID 1, another user), only when it is older than BUILD_CAP_S: gpu_check kills a build
at that cap, so no live build's lock is older.

Environment: D2V_NO_CUDA_EXT=1 never loads it; D2V_CUDA_JIT=0 uses only an installed build;
D2V_CUDA_VERBOSE=1 streams the build's output.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
MODULE_NAME = "d2v_cuda"
# The build's own flags (setup.py passes the same); torch adds its COMMON_NVCC_FLAGS, arch flags and
# include paths (benchmarks.compile_check compiles with exactly those).
EXTRA_CFLAGS = ["-O3"]
EXTRA_CUDA_CFLAGS = ["-O3", "--use_fast_math"]
# The longest a build may run: gpu_check kills its extension build at this cap (a build of csrc/
# takes one to two minutes), so an older lock that no visible process holds is a dead build's.
BUILD_CAP_S = 240
ERROR_LINES = 8  # compiler error lines kept in a failed build's reason


def sources() -> list[Path]:
    """The extension's translation units (the same list setup.py builds)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")) if CSRC.is_dir() else []


def load():
    """(module, None) when the CUDA extension is usable here, else (None, why not)."""
    module, reason, _ = _load_cached()
    return module, reason


def load_failed() -> bool:
    """Whether load() tried a build or an import and it raised (not an environment lack)."""
    return _load_cached()[2]


def status() -> str:
    """One word-ish line for reports: 'installed', 'jit' or 'unavailable: <reason>'."""
    module, reason = load()
    if module is None:
        return f"unavailable: {reason}"
    return getattr(module, "_d2v_origin", "installed")


def error_summary(text: str, limit: int = ERROR_LINES) -> str:
    """The compiler's error lines of a build log or exception text (deduplicated, in order), or
    its first line when none says error."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        # command lines (torch's "Error building extension 'd2v_cuda': [1/3] nvcc ... -c ...",
        # ninja's "FAILED: ...") name the failing step, not the error
        if re.search(r"\berrors?\b", line, re.I) and " -c " not in line \
                and not line.startswith(("[", "FAILED:")) and line[:300] not in lines:
            lines.append(line[:300])
    if not lines:
        return text.strip().splitlines()[0][:300] if text.strip() else ""
    more = len(lines) - limit
    return "; ".join(lines[:limit]) + (f"; ... {more} more error lines" if more > 0 else "")


@functools.lru_cache(maxsize=None)
def _load_cached():
    try:
        return (*_load(), False)
    except Exception as e:  # a broken toolchain must never take the training run down
        return None, error_summary(f"{type(e).__name__}: {e}"), True


def _load():
    if os.environ.get("D2V_NO_CUDA_EXT") == "1":
        return None, "disabled by D2V_NO_CUDA_EXT=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        module = importlib.import_module(MODULE_NAME)
        module._d2v_origin = "installed"
        return module, None
    except ImportError:
        pass
    if os.environ.get("D2V_CUDA_JIT", "1") == "0":
        return None, f"{MODULE_NAME} is not installed and D2V_CUDA_JIT=0"
    from torch.utils.cpp_extension import CUDA_HOME, _get_build_directory, load as jit_load
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, "no nvcc (CUDA_HOME unset and nvcc not on PATH)"
    srcs = sources()
    if not srcs:
        return None, f"no .cu/.cpp sources in {CSRC}"
    verbose = os.environ.get("D2V_CUDA_VERBOSE") == "1"
    build_dir = Path(_get_build_directory(MODULE_NAME, verbose))
    _remove_stale_lock(build_dir / "lock")
    module = jit_load(
        name=MODULE_NAME,
        sources=[str(p) for p in srcs],
        extra_include_paths=[str(CSRC)],
        extra_cflags=EXTRA_CFLAGS,
        extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
        build_directory=str(build_dir),
        verbose=verbose,
    )
    module._d2v_origin = "jit"
    return module, None


def lock_holders(path: Path) -> tuple[list[int], bool]:
    """(pids of the processes with `path` open, whether some process's descriptors could not be
    read), from /proc; ([], True) where there is no /proc."""
    proc = Path("/proc")
    if not proc.is_dir():
        return [], True
    target, pids, unreadable = str(path), [], False
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except PermissionError:
            unreadable = True
        except OSError:  # the process exited while we looked
            continue
    return pids, unreadable


def _remove_stale_lock(lock: Path) -> bool:
    """Deletes torch's build lock when no live process holds it (see the module docstring);
    True when it did."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    holders, unreadable = lock_holders(lock)
    if holders or (unreadable and age < BUILD_CAP_S):
        return False
    lock.unlink(missing_ok=True)
    print(f"d2v_cuda: removed a stale build lock {lock} ({age:.0f} s old, no process holds it)",
          flush=True)
    return True
