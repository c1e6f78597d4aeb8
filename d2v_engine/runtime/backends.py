"""Detects the optional accelerators once (Triton, flash-attn, apex, DALI, our CUDA extension) and
reports which paths this process will take."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import platform
import time

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


def describe(device: torch.device, loader: str | None = None, cfg=None,
             optimizer: str | None = None) -> str:
    """One line saying which path each kind of op takes on `device`; `loader` is the data
    loader's own line (d2v_engine.data.select.describe_loader), `optimizer` the optimizer's
    (d2v_engine.objective.optim.describe_optimizer). With `cfg` on CUDA the attention backends are picked
    (timed) here for the config's training shapes."""
    info = detect()
    gpu = device.type == "cuda"
    triton = info["triton"] is not None and (gpu or info["triton_interpret"])
    kernels = "triton" if triton else "torch reference"
    parts = [
        f"torch {info['torch']}" + (f" (cuda {info['cuda']}, {info['gpu']})" if gpu else " (cpu)"),
        f"targets: {_targets_backend(device)}",
        f"masking: {kernels}",
        f"attention: {_attention_backend(device, cfg)}"
        + (" (flash-attn present)" if info["flash_attn"] else ""),
        f"optimizer: {optimizer}" if optimizer else
        f"optimizer: {'torch fused AdamW' if gpu else 'torch foreach AdamW'}"
        + (" (apex present)" if info["apex"] else ""),
        f"loader: {loader}" if loader else
        "loader: torch DataLoader" + (f" (DALI {info['dali']} present)" if info["dali"] else ""),
    ]
    return "; ".join(parts)


_ATTENTION_NAMES = {"sdpa": "torch sdpa", "flash_attn": "flash-attn", "flex": "flex attention",
                    "sdpa_flash": "sdpa flash", "sdpa_efficient": "sdpa efficient",
                    "sdpa_cudnn": "sdpa cudnn", "sdpa_math": "sdpa math"}


def _attention_backend(device: torch.device, cfg=None) -> str:
    """What d2v_kernels.attention dispatches to: the forced backend, on CUDA the measured picks (for
    cfg's shapes when given), else its fixed choice for a fp32 B x H x T x 64 CPU call."""
    try:
        from d2v_kernels.attention_dispatch import attention_backend
        probe = _attention_probe(device)
        if _attention_measured(device):
            picks = attention_picks(cfg, device) if cfg is not None else []
            if not picks:
                return "measured per shape on its first call"
            return "measured: " + ", ".join(f"{role} {_ATTENTION_NAMES.get(b, b)}"
                                            for role, b in picks)
        name = attention_backend(probe)
    except Exception as e:  # reporting must never stop a run
        return f"unknown ({type(e).__name__}: {e})"
    if name == "triton":
        return "triton flash (interpreted)" if device.type == "cpu" else "triton flash"
    return _ATTENTION_NAMES.get(name, name)


def _attention_probe(device: torch.device) -> torch.Tensor:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.empty(1, 1, 1, 64, device=device, dtype=dtype)


def _attention_measured(device: torch.device) -> bool:
    """Whether attention on `device` takes measured picks (CUDA, and no usable D2V_ATTENTION)."""
    from d2v_kernels import attention_dispatch
    from d2v_kernels.attention import supports
    forced = os.environ.get("D2V_ATTENTION")
    probe = _attention_probe(device)
    return attention_dispatch.measures(device) and not (forced and supports(forced, probe, probe,
                                                                            probe))


def share_attention_picks(cfg, device: torch.device, rank: int, broadcast) -> dict:
    """Several ranks: every rank picks the attention backends of `cfg`'s shapes at once (timed,
    or preloaded on resume), then takes rank 0's (`broadcast(obj)` returns rank 0's obj), unless
    its GPU is another model. Called before training's first collective, so no rank waits in a
    collective while another times kernels. Returns {"shapes", "seconds", "replaced",
    "same_gpu", "error"}."""
    from d2v_kernels import attention_dispatch
    start, error = time.perf_counter(), ""
    try:
        if _attention_measured(device):
            attention_picks(cfg, device)
    except Exception as e:  # the other ranks wait in the broadcast; the step meets it again
        error = f"{type(e).__name__}: {e}"
    own = {desc: record["backend"] for desc, record in attention_dispatch.picks().items()}
    gpu = detect()["gpu"]
    sent = broadcast({"gpu": gpu, "picks": own})
    same_gpu = sent["gpu"] == gpu
    replaced = attention_dispatch.adopt(sent["picks"]) if rank != 0 and same_gpu else 0
    return {"shapes": len(sent["picks"]), "seconds": time.perf_counter() - start,
            "replaced": replaced, "same_gpu": same_gpu, "error": error}


def attention_picks(cfg, device: torch.device) -> list[tuple[str, str]]:
    """[(role, backend)] of the attention calls a training step of `cfg` makes (student forward +
    backward, teacher forward: d2v_engine.runtime.attention_shapes), each picked -- timed on
    first sight -- by d2v_kernels.attention_dispatch. Audio and text batches shorter than the longest
    crop are picked when they first occur."""
    from d2v_kernels import attention_dispatch
    from d2v_engine.runtime.attention_shapes import attention_launches
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto"
                                             and device.type == "cuda")
    dtype = "bfloat16" if bf16 else "float32"
    picks = []
    for role, b, h, t, d, bias, padded, p, backward in attention_launches(cfg):
        key = (str(device), b, h, t, t, d, d, dtype, bias or "none",
               None if bias is None else "float32", padded, float(p), False, backward)
        picks.append((role, attention_dispatch.pick_for(key)))
    return picks


def preload_attention_picks(run_dir) -> None:
    """A resumed run keeps the attention backends its env.json recorded (d2v_kernels.attention_dispatch
    .preload): the same numerics as before the restart."""
    from pathlib import Path
    env = Path(run_dir) / "env.json"
    try:
        recorded = json.loads(env.read_text()).get("attention_picks", {}) if env.exists() else {}
    except (OSError, ValueError):  # an unreadable env.json: pick afresh
        return
    from d2v_kernels import attention_dispatch
    attention_dispatch.preload(recorded)


def _kernel_path(module: str, device: torch.device) -> str:
    """What a d2v_kernels/ dispatcher picks for tensors on `device` (its own `_use_triton` predicate)."""
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
        "masking": _kernel_path("d2v_kernels.masking", device),
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
    """detect() plus the device, the per-op dispatch and the attention picks made so far (key ->
    backend, each candidate's ms and the reasons others were skipped): what env.json in the run
    directory holds."""
    from d2v_kernels import attention_dispatch
    return {**detect(), "device": str(device),
            "dispatch": dispatch_report(device, optimizer, loader),
            "attention_picks": attention_dispatch.picks()}
def _targets_backend(device: torch.device) -> str:
    """Which teacher-targets path runs on `device` (d2v_kernels.targets decides; CUDA ext included)."""
    from d2v_kernels.targets import describe_backend
    return describe_backend(device)
