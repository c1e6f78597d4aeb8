"""Teacher targets: normalize each of the K top teacher layers, average them, normalize again.

    target = final_norm((1/K) * sum_l norm_l(y_l))        y_l: B x T x C, target: B x T x C fp32

`norm_l` / `final_norm` is "instance" (per channel over time, padded steps left out of the
statistics), "layer" (per step over channels, no affine) or "none"; statistics in fp32 with the
biased variance of F.instance_norm / F.layer_norm; padded steps of the target are 0.
`instance_norm_padding="include"` counts padded steps in the instance statistics, as fairseq's
F.instance_norm over the full T does.

Paths: `teacher_targets_reference` (plain PyTorch, the ground truth), two Triton kernels and their
CUDA C++ counterparts in csrc/ (module d2v_cuda, loaded by kernels/_cuda.py: same two passes, a
warp per step holding the row in registers, 16-byte loads, fp32 accumulation, Welford per thread
and Chan merges across threads). `teacher_targets` runs Triton for CPU tensors under
TRITON_INTERPRET=1, the reference for other CPU tensors, and on CUDA whichever of Triton and the
extension measured faster for the shape (see _pick_backend; `last_backend()` says which ran):
  _stats_kernel    per (layer, b, channel block): Welford/Chan merges of [BLOCK_T x BLOCK_C]
                   tiles over the unpadded T -> mean and 1/std, K x B x C fp32.
  _combine_kernel  per SUB blocks of BLOCK_R steps of one sample, all C channels at once: for each
                   layer load, normalize (instance: with the stats; layer: per row), accumulate in
                   fp32; scale by 1/K; final layer norm per row; write once.
The K layers are never stacked (that copy would be a full extra pass): the kernels take the first
layer as a typed pointer and a K x 3 int64 table (element offset of each layer from the first one,
batch stride, time stride), so any list of same-dtype views works, a K x B x T x C tensor included;
only a layer whose channels are not unit-stride is copied first. Forward only: teacher outputs need
no gradient.

Bytes moved, with N = B*T steps, s = bytes per input element, p = fraction of unpadded steps.
Minimal: K*s*N*C read + 4*N*C written (padded steps need not be read).
  per-layer norm   final norm     this module's Triton path
  none / layer     none / layer   K*s*N*C*p + 4*N*C                   (the minimum: one kernel)
  instance         none / layer   2*K*s*N*C*p + 4*N*C                 (stats pass + combine pass)
  any              instance       the row above + (8*p + 4)*N*C       (stats over the fp32 average,
                                                                        then normalized in place)
plus K*B*C*8 bytes of statistics. The CUDA path moves the same bytes (its layer table is a kernel
argument, not a device tensor). "include" reads the padded steps in the statistics passes
(p = 1 there). The instance statistics must be complete before any step can be normalized, so each
layer is read twice; the stats grid walks the batch backwards so that its last reads (all layers of
the first samples) are what the combine kernel reads first, while they may still sit in L2.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

# Triton reads TRITON_INTERPRET when it is imported and when a kernel is decorated (both here), so
# the variable must be set before this module (or Triton itself) is first imported.
try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): every call takes the reference path
    triton = None

NORMS = ("instance", "layer", "none")
INSTANCE_NORM_PADDING = ("exclude", "include")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NORM_CODE = {"none": 0, "layer": 1, "instance": 2}


def teacher_targets(layers, padding_mask=None, layer_norm="instance", final_norm="none", eps=1e-5,
                    instance_norm_padding="exclude"):
    """K layers B x T x C (fp32/bf16/fp16, list or K x B x T x C), B x T bool -> B x T x C fp32.

    The path taken ("cuda", "triton" or "reference") is recorded: see last_backend().
    """
    global _last_backend
    ys, pad = _check(layers, padding_mask, layer_norm, final_norm, eps, instance_norm_padding)
    args = (ys, pad, layer_norm, final_norm, eps, instance_norm_padding)
    backend = _pick_backend(*args)
    _last_backend = backend
    return _RUNNERS[backend](*args)


def teacher_targets_reference(layers, padding_mask=None, layer_norm="instance", final_norm="none",
                              eps=1e-5, instance_norm_padding="exclude"):
    """Plain-PyTorch ground truth of teacher_targets: same arguments, B x T x C fp32."""
    ys, pad = _check(layers, padding_mask, layer_norm, final_norm, eps, instance_norm_padding)
    return _reference(ys, pad, layer_norm, final_norm, eps, instance_norm_padding)


def _check(layers, padding_mask, layer_norm, final_norm, eps, instance_norm_padding):
    if isinstance(layers, torch.Tensor):
        if layers.dim() != 4:
            raise ValueError(f"teacher_targets: a layers tensor must be K x B x T x C, got shape "
                             f"{tuple(layers.shape)}")
        layers = layers.unbind(0)
    elif not isinstance(layers, Sequence) or not all(isinstance(y, torch.Tensor) for y in layers):
        raise ValueError("teacher_targets: layers must be a sequence of tensors or one "
                         f"K x B x T x C tensor, got {type(layers).__name__}")
    ys = list(layers)
    if not ys:
        raise ValueError("teacher_targets: need at least one layer (K >= 1), got 0")
    first = ys[0]
    if first.dim() != 3:
        raise ValueError("teacher_targets: each layer must be B x T x C, got shape "
                         f"{tuple(first.shape)}")
    if first.dtype not in DTYPES:
        raise ValueError(f"teacher_targets: layer dtype must be one of float32, bfloat16, float16, "
                         f"got {first.dtype}")
    for i, y in enumerate(ys[1:], start=1):
        if y.shape != first.shape or y.dtype != first.dtype or y.device != first.device:
            raise ValueError(f"teacher_targets: every layer must match layer 0 "
                             f"{tuple(first.shape)} {first.dtype} on {first.device}; layer {i} is "
                             f"{tuple(y.shape)} {y.dtype} on {y.device}")
    if padding_mask is not None:
        if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
            got = getattr(padding_mask, "dtype", type(padding_mask).__name__)
            raise ValueError("teacher_targets: padding_mask must be a bool tensor (True = "
                             f"padded), got {got}")
        if padding_mask.shape != first.shape[:2] or padding_mask.device != first.device:
            raise ValueError(f"teacher_targets: padding_mask must be B x T = "
                             f"{tuple(first.shape[:2])} on {first.device}, got "
                             f"{tuple(padding_mask.shape)} on {padding_mask.device}")
    for name, value in (("layer_norm", layer_norm), ("final_norm", final_norm)):
        if value not in NORMS:
            raise ValueError(f"teacher_targets: {name} must be one of {NORMS}, got {value!r}")
    if instance_norm_padding not in INSTANCE_NORM_PADDING:
        raise ValueError(f"teacher_targets: instance_norm_padding must be one of "
                         f"{INSTANCE_NORM_PADDING}, got {instance_norm_padding!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"teacher_targets: eps must be a positive number, got {eps!r}")
    return ys, padding_mask


# ---------------------------------------------------------------------------------------------
# Backend choice. CPU: Triton under TRITON_INTERPRET=1, else the reference. CUDA: the CUDA C++
# extension (kernels/_cuda.py) or Triton, whichever measured faster for the shape key: the first
# call with a new key runs both (1 warm-up + 3 timed calls each, one host synchronization) and
# caches the winner; later calls only look it up. The key buckets B*T to a power of two, so audio
# batches of varying length measure once per bucket. During CUDA graph capture nothing is measured
# (an unmeasured key takes Triton). D2V_TARGETS_BACKEND=triton|cuda|reference forces one path.

BACKENDS = ("cuda", "triton", "reference")
_last_backend: str | None = None
_measured: dict[tuple, dict[str, float]] = {}  # shape key -> {backend: ms}
_chosen: dict[tuple, str] = {}


def last_backend() -> str | None:
    """The path the last teacher_targets call took: "cuda", "triton", "reference" (None: no call)."""
    return _last_backend


def measured_backends() -> dict[tuple, dict]:
    """Shape key -> {"chosen": backend, "ms": {backend: median ms}} of every measured choice."""
    return {key: {"chosen": _chosen[key], "ms": dict(ms)} for key, ms in _measured.items()}


def describe_backend(device: torch.device) -> str:
    """One line for engine.backends: which path teacher_targets takes on `device`."""
    forced = os.environ.get("D2V_TARGETS_BACKEND", "auto")
    if device.type != "cuda":
        return "triton (interpreted)" if _use_triton_on(device) else "torch reference"
    from kernels import _cuda
    ext = _cuda.status()
    if forced != "auto":
        return f"{forced} (D2V_TARGETS_BACKEND; cuda ext {ext})"
    if triton is None:
        return f"cuda ext {ext}, else torch reference"
    return f"fastest of triton / cuda measured per shape (cuda ext {ext})"


def _pick_backend(ys, pad, layer_norm, final_norm, eps, instance_norm_padding) -> str:
    forced = os.environ.get("D2V_TARGETS_BACKEND", "auto")
    if forced not in ("auto",) + BACKENDS:
        raise ValueError(f"D2V_TARGETS_BACKEND must be one of {('auto',) + BACKENDS}, got "
                         f"{forced!r}")
    device = ys[0].device
    if forced == "reference":
        return "reference"
    if device.type != "cuda":
        if forced == "cuda":
            raise ValueError(f"D2V_TARGETS_BACKEND=cuda needs CUDA tensors, got {device}")
        return "triton" if _use_triton_on(device) else "reference"
    module = _cuda_module(ys)
    if forced == "cuda":
        if module is None:
            from kernels import _cuda
            raise ValueError("D2V_TARGETS_BACKEND=cuda but the CUDA extension cannot run these "
                             f"layers: {_cuda.status()}")
        return "cuda"
    if triton is None:
        return "cuda" if module is not None else "reference"
    if forced == "triton" or module is None:
        return "triton"
    key = _shape_key(ys, pad, layer_norm, final_norm, instance_norm_padding)
    if key not in _chosen:
        if torch.cuda.is_current_stream_capturing():
            return "triton"
        _measure(key, ys, pad, layer_norm, final_norm, eps, instance_norm_padding)
    return _chosen[key]


def _cuda_module(ys):
    """The d2v_cuda module when it is loaded and takes these layers, else None."""
    from kernels import _cuda
    module, _ = _cuda.load()
    if module is None or not module.supports(list(ys)):
        return None
    return module


def _shape_key(ys, pad, layer_norm, final_norm, instance_norm_padding) -> tuple:
    B, T, C = ys[0].shape
    steps = 1 << max(0, B * T - 1).bit_length()  # B*T rounded up to a power of two
    return (len(ys), steps, C, ys[0].dtype, layer_norm, final_norm, pad is not None,
            instance_norm_padding, ys[0].device.index)


def _measure(key, *args) -> None:
    """Times the CUDA and Triton paths on these very inputs and records the faster."""
    times = {}
    for backend in ("triton", "cuda"):
        run = _RUNNERS[backend]
        run(*args)  # warm-up (and the Triton autotune/compile, the JIT load)
        samples = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(*args)
            end.record()
            samples.append((start, end))
        torch.cuda.synchronize()
        times[backend] = sorted(s.elapsed_time(e) for s, e in samples)[1]
    _measured[key] = times
    _chosen[key] = min(times, key=times.get)


def _teacher_targets_cuda(ys, pad, layer_norm, final_norm, eps, instance_norm_padding):
    """Checked layers -> B x T x C fp32 targets by the CUDA C++ extension (csrc/)."""
    from kernels import _cuda
    module, reason = _cuda.load()
    if module is None:
        raise RuntimeError(f"teacher_targets: the CUDA extension is unavailable: {reason}")
    return module.teacher_targets(list(ys), pad, _NORM_CODE[layer_norm], _NORM_CODE[final_norm],
                                  float(eps), instance_norm_padding == "include")


def _use_triton(y: torch.Tensor) -> bool:
    return _use_triton_on(y.device)


def _use_triton_on(device: torch.device) -> bool:
    """Whether `device` runs the Triton kernels: CUDA, or CPU under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return device.type == "cpu"
    return device.type == "cuda"


def _reference(ys, pad, layer_norm, final_norm, eps, instance_norm_padding):
    valid = torch.ones_like(ys[0][..., :1], dtype=torch.bool) if pad is None else ~pad[..., None]
    counted = torch.ones_like(valid) if instance_norm_padding == "include" else valid
    total = torch.zeros(ys[0].shape, dtype=torch.float32, device=ys[0].device)
    for y in ys:
        total += _normalize(y.float(), layer_norm, counted, eps)
    target = _normalize(total / len(ys), final_norm, counted, eps)
    return target.masked_fill(~valid, 0.0)


def _normalize(x, kind, counted, eps):
    """x: B x T x C fp32; counted: B x T x 1 bool, the steps that enter instance statistics."""
    if kind == "none":
        return x
    if kind == "layer":
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    # F.instance_norm over time per channel, restricted to the counted steps; where() rather than a
    # product keeps non-finite values at padded steps out of the sums.
    n = counted.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(counted, x, 0.0).sum(1, keepdim=True) / n
    var = torch.where(counted, x - mean, 0.0).square().sum(1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps)


def _teacher_targets_triton(ys, pad, layer_norm, final_norm, eps, instance_norm_padding, out=None):
    """Checked layers -> B x T x C fp32 targets by the Triton kernels (into `out` when given)."""
    B, T, C = ys[0].shape
    if out is None:
        out = torch.empty(B, T, C, dtype=torch.float32, device=ys[0].device)
    assert out.shape == (B, T, C) and out.dtype == torch.float32 and out.is_contiguous()
    if out.numel() == 0:
        return out
    include = instance_norm_padding == "include"
    pad_bytes = None if pad is None else pad.contiguous().view(torch.uint8)
    # Padded steps are computed (not zeroed) only when a fairseq-style final instance norm counts
    # them; a final instance norm is then a second pass with the average as the only layer.
    first_final = "none" if final_norm == "instance" else final_norm
    _combine(ys, pad_bytes, out, eps, layer_norm, first_final, count_pad=include,
             keep_pad=include and final_norm == "instance")
    if final_norm == "instance":
        _combine([out], pad_bytes, out, eps, "instance", "none", count_pad=include, keep_pad=False)
    return out


def _combine(ys, pad_bytes, out, eps, layer_norm, final_norm, count_pad, keep_pad):
    """One statistics launch (per-layer instance norm only) and one combine launch into `out`."""
    ys = [y if y.stride(2) == 1 else y.contiguous() for y in ys]  # channels must be unit-stride
    table, align = _layer_table(ys)
    K = len(ys)
    B, T, C = ys[0].shape
    has_pad = pad_bytes is not None
    pad_arg = pad_bytes if has_pad else out  # never read when has_pad is False
    mean = rstd = out  # never read unless the per-layer norm is "instance"
    if layer_norm == "instance":
        stats = torch.empty(2, K, B, C, dtype=torch.float32, device=out.device)
        mean, rstd = stats[0], stats[1]
        block_c = min(64, triton.next_power_of_2(C))
        _stats_kernel[(triton.cdiv(C, block_c), K, B)](
            ys[0], table, pad_arg, mean, rstd, B, T, C, eps,
            HAS_PAD=has_pad, COUNT_PAD=count_pad, ALIGN=align, BLOCK_T=32, BLOCK_C=block_c,
            # 8 warps: with 4, ptxas (triton 3.9) spills at the padded audio shapes (96 registers
            # and a 4-byte spill; python -m kernels.compile_check), with 8 it does not (80)
            num_warps=8,
        )
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(64, 4096 // block_c))
    sub = _sub_blocks(B, T, block_r)
    _combine_kernel[(triton.cdiv(T, block_r * sub), B)](
        ys[0], table, pad_arg, mean, rstd, out, K, B, T, C, eps,
        NORM=_NORM_CODE[layer_norm], FINAL=_NORM_CODE[final_norm], HAS_PAD=has_pad,
        KEEP_PAD=keep_pad, ALIGN=align, SUB=sub, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=8 if block_r * block_c >= 4096 else 4,
    )


def _sub_blocks(B, T, block_r):
    """Row blocks per combine program: up to 8 while that still leaves ~1000 programs."""
    return max(1, min(8, B * T // (block_r * 1000), triton.cdiv(T, block_r)))


def _layer_table(ys):
    """K x 3 int64 (element offset from ys[0], batch stride, time stride) and the alignment hint."""
    size = ys[0].element_size()
    rows = [[(y.data_ptr() - ys[0].data_ptr()) // size, y.stride(0), y.stride(1)] for y in ys]
    # Vector loads need 16-byte-aligned row starts; promise it only when every layer gives it.
    vec = 16 // size
    aligned = ys[0].data_ptr() % 16 == 0 and all(v % vec == 0 for row in rows for v in row)
    table = torch.tensor(rows, dtype=torch.int64)
    if ys[0].is_cuda:  # pinned + non_blocking: no host synchronization
        table = table.pin_memory().to(ys[0].device, non_blocking=True)
    return table, vec if aligned else 1



_RUNNERS = {
    "cuda": _teacher_targets_cuda,
    "triton": lambda *args: _teacher_targets_triton(*args),
    "reference": _reference,
}

if triton is not None:

    @triton.jit
    def _stats_kernel(y0, table, pad, mean, rstd, B, T, C, eps,
                      HAS_PAD: tl.constexpr, COUNT_PAD: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        layer = tl.program_id(1)
        b = B - 1 - tl.program_id(2)  # backwards: the combine kernel starts at b = 0
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        offset = tl.multiple_of(tl.load(table + 3 * layer), ALIGN)
        stride_b = tl.multiple_of(tl.load(table + 3 * layer + 1), ALIGN)
        stride_t = tl.multiple_of(tl.load(table + 3 * layer + 2), ALIGN)
        base = y0 + offset + b * stride_b
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        mu = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            row_ok = ts < T
            if HAS_PAD and not COUNT_PAD:
                row_ok = row_ok & (tl.load(pad + b * T + ts, mask=ts < T, other=1) == 0)
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(base + ts[:, None] * stride_t + cols[None, :], mask=ok, other=0.0)
            x = x.to(tl.float32)
            # Chan's merge of the tile's (count, mean, M2) into the running ones: no E[x^2] - E[x]^2
            # cancellation for channels with a large mean.
            n_tile = tl.sum(ok.to(tl.float32), axis=0)
            mu_tile = tl.sum(x, axis=0) / tl.maximum(n_tile, 1.0)
            dev = tl.where(ok, x - mu_tile[None, :], 0.0)
            n_new = count + n_tile
            weight = n_tile / tl.maximum(n_new, 1.0)
            delta = mu_tile - mu
            mu = mu + delta * weight
            m2 = m2 + tl.sum(dev * dev, axis=0) + delta * delta * count * weight
            count = n_new
        var = m2 / tl.maximum(count, 1.0)
        at = (layer * B + b) * C + cols
        tl.store(mean + at, mu, mask=col_ok)
        tl.store(rstd + at, 1.0 / tl.sqrt(var + eps), mask=col_ok)

    @triton.jit
    def _combine_kernel(y0, table, pad, mean, rstd, out, K, B, T, C, eps,
                        NORM: tl.constexpr, FINAL: tl.constexpr, HAS_PAD: tl.constexpr,
                        KEEP_PAD: tl.constexpr, ALIGN: tl.constexpr, SUB: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # NORM / FINAL: 0 none, 1 layer, 2 instance (per layer only; a final instance norm is a
        # second call with the average as its one layer). A program owns SUB * BLOCK_R steps of one
        # sample, so the instance statistics it re-reads per sub-block come from L1.
        b = tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        for sub in range(SUB):
            ts = (tl.program_id(0) * SUB + sub) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_in = ts < T
            live = row_in
            if HAS_PAD and not KEEP_PAD:
                live = row_in & (tl.load(pad + b * T + ts, mask=row_in, other=1) == 0)
            ok = live[:, None] & col_ok[None, :]
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            for layer in range(K):
                offset = tl.multiple_of(tl.load(table + 3 * layer), ALIGN)
                stride_b = tl.multiple_of(tl.load(table + 3 * layer + 1), ALIGN)
                stride_t = tl.multiple_of(tl.load(table + 3 * layer + 2), ALIGN)
                at = y0 + offset + b * stride_b + ts[:, None] * stride_t + cols[None, :]
                x = tl.load(at, mask=ok, other=0.0).to(tl.float32)
                if NORM == 2:
                    stat_at = (layer * B + b) * C + cols
                    mu = tl.load(mean + stat_at, mask=col_ok, other=0.0)
                    inv = tl.load(rstd + stat_at, mask=col_ok, other=0.0)
                    x = (x - mu[None, :]) * inv[None, :]
                elif NORM == 1:
                    dev = tl.where(col_ok[None, :], x - (tl.sum(x, axis=1) / C)[:, None], 0.0)
                    x = dev / tl.sqrt(tl.sum(dev * dev, axis=1) / C + eps)[:, None]
                acc += x
            acc = acc / K
            if FINAL == 1:
                dev = tl.where(col_ok[None, :], acc - (tl.sum(acc, axis=1) / C)[:, None], 0.0)
                acc = dev / tl.sqrt(tl.sum(dev * dev, axis=1) / C + eps)[:, None]
            acc = tl.where(live[:, None], acc, 0.0)
            at = out + (b * T + ts).to(tl.int64)[:, None] * C + cols[None, :]
            tl.store(at, acc, mask=row_in[:, None] & col_ok[None, :])
