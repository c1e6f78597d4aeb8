"""Detects the optional accelerators once (Triton, flash-attn, apex, DALI, our CUDA extension) and
reports which paths this process will take."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform

import torch


def _version(module: str) -> str | None:
    if not _has(module):
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # a broken install is reported, not fatal
        return f"broken ({type(e).__name__})"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def detect() -> dict:
    """Versions of torch, triton, flash_attn, apex, nvidia.dali and d2v_cuda (None: missing)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "flash_attn": _version("flash_attn"),
        # PyPI's unrelated "apex" package has no apex.optimizers; NVIDIA apex has.
        "apex": _version("apex") if _has("apex") and _has("apex.optimizers") else None,
        "dali": _version("nvidia.dali"),
        "d2v_cuda": _version("d2v_cuda"),
    }


def _attention_path(device: torch.device) -> str:
    """The path kernels.attention takes for this device's usual dtype, no mask or bias."""
    from kernels.attention import attention_backend
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = attention_backend(torch.empty(1, 1, 1, 64, device=device, dtype=dtype))
    return {"triton": "triton flash (ours)", "flash_attn": "flash-attn", "sdpa": "torch sdpa"}[name]


def describe(device: torch.device) -> str:
    """One line saying which path each kind of op takes on `device`."""
    info = detect()
    gpu = device.type == "cuda"
    triton = info["triton"] is not None and (gpu or info["triton_interpret"])
    kernels = "triton" if triton else "torch reference"
    parts = [
        f"torch {info['torch']}" + (f" (cuda {info['cuda']}, {info['gpu']})" if gpu else " (cpu)"),
        f"targets/masking: {kernels}",
        f"attention: {_attention_path(device)}"
        + (" (flash-attn present)" if info["flash_attn"] else ""),
        f"optimizer: {'torch fused AdamW' if gpu else 'torch foreach AdamW'}"
        + (" (apex present)" if info["apex"] else ""),
        "loader: torch DataLoader" + (f" (DALI {info['dali']} present)" if info["dali"] else ""),
    ]
    return "; ".join(parts)
