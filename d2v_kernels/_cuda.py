"""Finds the CUDA C++ extension (csrc/ -> module d2v_cuda): installed by setup.py, or compiled just
in time with torch.utils.cpp_extension.load on a machine with a GPU, nvcc and a CUDA build of torch.

`load()` returns (module, None) or (None, reason) and never raises: on a CPU machine, without nvcc,
or when the build fails, the callers take the Triton / PyTorch paths. The result is cached per
process; the JIT build itself is cached by torch under TORCH_EXTENSIONS_DIR, so only the first run
on a machine compiles (about a minute).

Environment: D2V_NO_CUDA_EXT=1 never loads it; D2V_CUDA_JIT=0 uses only an installed build.
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
MODULE_NAME = "d2v_cuda"


def sources() -> list[Path]:
    """The extension's translation units (the same list setup.py builds)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")) if CSRC.is_dir() else []


def load():
    """(module, None) when the CUDA extension is usable here, else (None, why not)."""
    return _load_cached()


def status() -> str:
    """One word-ish line for reports: 'installed', 'jit' or 'unavailable: <reason>'."""
    module, reason = load()
    if module is None:
        return f"unavailable: {reason}"
    return getattr(module, "_d2v_origin", "installed")


@functools.lru_cache(maxsize=None)
def _load_cached():
    try:
        return _load()
    except Exception as e:  # a broken toolchain must never take the training run down
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:300]


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
    from torch.utils.cpp_extension import CUDA_HOME, load as jit_load
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, "no nvcc (CUDA_HOME unset and nvcc not on PATH)"
    srcs = sources()
    if not srcs:
        return None, f"no .cu/.cpp sources in {CSRC}"
    module = jit_load(
        name=MODULE_NAME,
        sources=[str(p) for p in srcs],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math"],
        verbose=os.environ.get("D2V_CUDA_VERBOSE") == "1",
    )
    module._d2v_origin = "jit"
    return module, None
