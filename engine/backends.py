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


def describe(device: torch.device, loader: str | None = None) -> str:
    """One line saying which path each kind of op takes on `device`; `loader` is the data
    loader's own line (engine.data.select.describe_loader)."""
    info = detect()
    gpu = device.type == "cuda"
    triton = info["triton"] is not None and (gpu or info["triton_interpret"])
    kernels = "triton" if triton else "torch reference"
    parts = [
        f"torch {info['torch']}" + (f" (cuda {info['cuda']}, {info['gpu']})" if gpu else " (cpu)"),
        f"targets: {_targets_backend(device)}",
        f"masking: {kernels}",
        f"attention: {_attention_backend(device)}"
        + (" (flash-attn present)" if info["flash_attn"] else ""),
        f"optimizer: {'torch fused AdamW' if gpu else 'torch foreach AdamW'}"
        + (" (apex present)" if info["apex"] else ""),
        f"loader: {loader}" if loader else
        "loader: torch DataLoader" + (f" (DALI {info['dali']} present)" if info["dali"] else ""),
    ]
    return "; ".join(parts)


def _attention_backend(device: torch.device) -> str:
    """What kernels.attention dispatches to for a bf16 (CUDA) / fp32 (CPU) B x H x T x 64 call."""
    try:
        from kernels.attention import attention_backend
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        name = attention_backend(torch.empty(1, 1, 1, 64, device=device, dtype=dtype))
    except Exception as e:  # reporting must never stop a run
        return f"unknown ({type(e).__name__})"
    if name == "triton":
        return "triton flash (interpreted)" if device.type == "cpu" else "triton flash"
    return {"sdpa": "torch sdpa", "flash_attn": "flash-attn"}.get(name, name)


def _kernel_path(module: str, device: torch.device) -> str:
    """What a kernels/ dispatcher picks for tensors on `device` (its own `_use_triton` predicate)."""
    try:
        use_triton = importlib.import_module(module)._use_triton
        try:  # predicates take a device or a tensor (a tensor has .type(), a device no .device)
            triton = use_triton(device)
        except (AttributeError, TypeError):
            triton = use_triton(torch.empty(0, device=device))
    except Exception as e:  # a renamed dispatcher must not stop a run: say so in the report
        return f"unknown ({type(e).__name__})"
    if not triton:
        return "torch reference"
    return "triton (interpreter)" if device.type == "cpu" else "triton"


def dispatch_report(device: torch.device, optimizer=None, loader=None) -> dict:
    """Which implementation each op of the step takes in this process on `device`."""
    report = {
        "teacher_targets": _targets_backend(device),
        "masking": _kernel_path("kernels.masking", device),
        "attention": _attention_backend(device),
    }
    if device.type == "cuda" and report["attention"] == "torch sdpa":
        sdpa = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled()}
        report["attention"] += " (enabled: " + ", ".join(k for k, v in sdpa.items() if v) + ")"
    if optimizer is not None:
        d = optimizer.defaults
        impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
        report["optimizer"] = f"{type(optimizer).__module__}.{type(optimizer).__name__} ({impl})"
    report["ema"] = "torch._foreach_lerp_"
    if loader is not None:
        report["loader"] = f"{type(loader).__module__}.{type(loader).__name__}"
    return report


def env_report(device: torch.device, optimizer=None, loader=None) -> dict:
    """detect() plus the device and the per-op dispatch: what env.json in the run directory holds."""
    return {**detect(), "device": str(device), "dispatch": dispatch_report(device, optimizer, loader)}
def _targets_backend(device: torch.device) -> str:
    """Which teacher-targets path runs on `device` (kernels.targets decides; CUDA ext included)."""
    from kernels.targets import describe_backend
    return describe_backend(device)
