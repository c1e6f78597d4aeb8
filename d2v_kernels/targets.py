"""Teacher targets: normalize each of the K top teacher layers, average them, normalize again.

    target = final_norm((1/K) * sum_l norm_l(y_l))        y_l: B x T x C, target: B x T x C fp32

`norm_l` / `final_norm` is "instance" (per channel over time, padded steps left out of the
statistics), "layer" (per step over channels, no affine) or "none"; statistics in fp32 with the
biased variance of F.instance_norm / F.layer_norm; padded steps of the target are 0.
`instance_norm_padding="include"` counts padded steps in the instance statistics, as fairseq's
F.instance_norm over the full T does.

Paths: `teacher_targets_reference` (plain PyTorch, the ground truth), two Triton kernels and their
CUDA C++ counterparts in csrc/ (module d2v_cuda, loaded by d2v_kernels/_cuda.py: the same tasks, one
or two warps per step holding the row in registers, fp32 accumulation, __launch_bounds__ for 4
blocks of 256 threads per SM at C = 768). `teacher_targets`
runs Triton for CPU tensors under TRITON_INTERPRET=1, the reference for other CPU tensors, and on
CUDA whichever of Triton and the extension measured faster for the shape (see _pick_backend;
`last_backend()` says which ran):
  _combine_kernel   per-layer norm none / layer. Per SUB tiles of BLOCK_R steps of one sample, all
                    C channels: C = NCH chunks of CW (768 = 3 x 256: no idle lane), a warp per
                    step; for each layer load (the next layer's loads issued before this one is
                    reduced), normalize per row, accumulate in fp32; / K; final layer norm; write.
  _instance_kernel  per-layer instance norm, one launch. Statistics tasks (layer, sample, channel
                    block, T chunk of STATS_ROWS steps: any batch fills the GPU) write partial
                    (count, mean, M2); the last task of a (layer, sample, block) merges them in
                    chunk order (Chan: deterministic, no atomics on values) into mean and 1/std.
                    Combine tasks (a BLOCK_R tile, as above) wait for their sample's statistics.
                    Tasks are taken in ticket order, a sample's combine `ahead` samples after its
                    statistics, so each layer is read from DRAM once and re-read from L2.
The K layers are never stacked (that copy would be a full extra pass): they are a tuple kernel
argument (K pointers and strides by value, like the CUDA path's table), so any list of same-dtype
views works, a K x B x T x C tensor included; only a layer whose channels are not unit-stride is
copied first. Forward only: teacher outputs need no gradient.

Bytes moved from DRAM, with N = B*T steps, s = bytes per input element, p = fraction of unpadded
steps. Minimal: K*s*N*C*p read + 4*N*C written (padded steps need not be read).
  per-layer norm   final norm     this module's Triton path
  none / layer     none / layer   K*s*N*C*p + 4*N*C                 (the minimum: one pass)
  instance         none / layer   K*s*N*C*p + 4*N*C + 8*K*B*C*(nj+1)  partial and final statistics
                                  (nj = T / STATS_ROWS chunks), if L2 holds the `ahead` + 1 samples'
                                  layers (L2_WINDOW_BYTES) between a sample's two reads; without
                                  the L2 hit, the second read comes from DRAM: 2*K*s*N*C*p + ...
  any              instance       the row above + 8*N*C             (the fp32 average read by its
                                  statistics and normalized in place: read, re-read from L2, write)
"include" reads the padded steps in the statistics (p = 1 there). Estimated, not measured: at
audio v1 (K = 8, T = 1000, bf16) the statistics add 8*K*C*(nj+1) = 0.44 MB per sample to its 15 MB,
so the instance path moves ~1.03x the minimum from DRAM when the second read hits L2; its combine
tasks also re-read K*C*8 bytes of statistics per BLOCK_R = 8 steps from L2 / L1. The CUDA path
(csrc/targets_kernels.cu) moves the same bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
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
# extension (d2v_kernels/_cuda.py) or Triton, whichever measured faster for the shape key: the first
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
    """One line for d2v_engine.runtime.backends: which path teacher_targets takes on `device`."""
    forced = os.environ.get("D2V_TARGETS_BACKEND", "auto")
    if device.type != "cuda":
        return "triton (interpreted)" if _use_triton_on(device) else "torch reference"
    from d2v_kernels import _cuda
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
            from d2v_kernels import _cuda
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
    from d2v_kernels import _cuda
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
    from d2v_kernels import _cuda
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


@dataclass(frozen=True)
class Plan:
    """Tiles and work split of one launch (see _plan)."""
    cw: int  # channels per chunk (a power of two); a row is nch chunks
    nch: int
    mask_c: bool  # the last chunk reaches past C (C has no power-of-two split)
    block_r: int  # rows of a combine tile
    sub: int  # row tiles per combine program (none / layer; an instance combine task has one)
    warps: int
    block_t: int = 1  # instance statistics: rows per tile,
    tchunk: int = 1  # rows per statistics task (T split in nj chunks),
    nj: int = 1
    ahead: int = 1  # and samples between a sample's statistics and its combine tasks


# An H100 holds 50 MB of L2; the instance path keeps the layers of `ahead` + 1 samples in flight
# between their statistics and their combine, so that the second read hits L2. Half of it is left
# to the fp32 targets being written and to the tasks of neighbouring samples.
L2_WINDOW_BYTES = 16 << 20
STATS_ROWS = 128  # steps per statistics task: its partial costs 8 / (2 * 128) = 3% of bf16 bytes


def _plan(B, T, C, K, elem, instance) -> Plan:
    """Tiles for C channels of `elem`-byte inputs: C = nch x cw exactly where C has a power-of-two
    factor of at least 16 (768 = 3 x 256), so no lane idles; a warp per row where the row allows
    (layer norms reduce by warp shuffles), ~24 elements of a layer's tile per thread, loaded 16
    bytes at a time, the next layer's tile in flight while this one is reduced."""
    cw = min(256, C & -C)
    if cw >= 16 and C // cw <= 8:
        nch, mask_c = C // cw, False
    else:
        cw, nch, mask_c = triton.next_power_of_2(C), 1, True
    warps = 8 if nch * cw >= 512 else 4
    vec = 16 // elem
    min_rows = max(1, warps * 32 * vec // cw)  # fewer rows would replicate the tile over threads
    block_r = max(min_rows, min(64, _pow2_floor(24 * 32 * warps // (nch * cw))))
    if _interpreted():  # the interpreter pays per program and op, not per element
        block_r = max(block_r, min(64, _pow2_floor(max(1, 8192 // (nch * cw)))))
    if not instance:
        sub = max(1, min(8, B * T // (block_r * 1000), triton.cdiv(T, block_r)))
        return Plan(cw, nch, mask_c, block_r, sub, warps)
    # One row tile per combine task: a loop over several would keep every layer's statistics
    # addresses live across it (ptxas: 180 registers instead of ~110 at K = 8).
    block_t = max(min_rows, 2048 // cw)  # taller statistics tiles: 120-220 registers
    rows = T if _interpreted() else STATS_ROWS
    nj = triton.cdiv(T, max(rows, block_t))
    tchunk = triton.cdiv(triton.cdiv(T, nj), block_t) * block_t
    nj = triton.cdiv(T, tchunk)
    ahead = max(1, min(B, L2_WINDOW_BYTES // max(1, K * T * C * elem)))
    return Plan(cw, nch, mask_c, block_r, 1, warps, block_t, tchunk, nj, ahead)


def dram_bytes(B, T, C, K, elem, layer_norm, final_norm, unpadded=1.0) -> tuple[int, int]:
    """(minimal, this module's GPU path) DRAM bytes of one call, as the module docstring's table
    counts them: an estimate that assumes the instance path's second read hits L2."""
    n = B * T
    minimal = int(K * elem * n * C * unpadded) + 4 * n * C
    ours = minimal
    stats = 8 * B * C * (triton.cdiv(T, STATS_ROWS) + 1) if triton is not None else 0
    if layer_norm == "instance":
        ours += K * stats
    if final_norm == "instance":
        ours += 8 * n * C + stats
    return minimal, ours


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _combine(ys, pad_bytes, out, eps, layer_norm, final_norm, count_pad, keep_pad):
    """One launch: normalize and average the layers into `out` (see the module docstring)."""
    ys = [y if y.stride(2) == 1 else y.contiguous() for y in ys]  # channels must be unit-stride
    K = len(ys)
    B, T, C = ys[0].shape
    instance = layer_norm == "instance"
    p = _plan(B, T, C, K, ys[0].element_size(), instance)
    has_pad = pad_bytes is not None
    pad_arg = pad_bytes if has_pad else out  # never read when has_pad is False
    layers = tuple(ys)  # by value: K pointers and strides are kernel arguments, no device table
    strides_b = tuple(y.stride(0) for y in ys)
    strides_t = tuple(y.stride(1) for y in ys)
    common = dict(FINAL=_NORM_CODE[final_norm], HAS_PAD=has_pad, KEEP_PAD=keep_pad,
                  BLOCK_R=p.block_r, CW=p.cw, NCH=p.nch, MASK_C=p.mask_c, num_warps=p.warps)
    if not instance:
        grid = (triton.cdiv(T, p.block_r * p.sub), B)
        _combine_kernel[grid](layers, strides_b, strides_t, pad_arg, out, B, T, C, eps,
                              NORM=_NORM_CODE[layer_norm], SUB=p.sub, **common)
        return
    ncb = triton.cdiv(C, p.cw)
    dev = out.device
    partial = torch.empty(2, B, K, p.nj, ncb * p.cw, dtype=torch.float32, device=dev)
    counts = torch.empty(B, K, ncb, p.nj, dtype=torch.float32, device=dev)
    # Rows of mean / 1/std 128-byte aligned: no cache line holds two samples' statistics, so none
    # can be cached by an SM before its sample's statistics are final.
    stat_ld = triton.cdiv(C, 32) * 32
    stats = torch.empty(2, K, B, stat_ld, dtype=torch.float32, device=dev)
    # [ticket, ready per sample, finished statistics tasks per (sample, layer, channel block)]
    sync = torch.zeros(1 + B + B * K * ncb, dtype=torch.int32, device=dev)
    nrg = triton.cdiv(T, p.block_r)  # combine tasks per sample
    tasks = B * (K * ncb * p.nj + nrg)
    _instance_kernel[(tasks,)](
        layers, strides_b, strides_t, pad_arg, partial[0], partial[1], counts, stats[0], stats[1],
        sync, out, B, T, C, stat_ld, eps, p.tchunk, p.nj, ncb, nrg, p.ahead,
        COUNT_PAD=count_pad, BLOCK_T=p.block_t, **common)


_RUNNERS = {
    "cuda": _teacher_targets_cuda,
    "triton": lambda *args: _teacher_targets_triton(*args),
    "reference": _reference,
}

if triton is not None:

    @triton.jit
    def _load_rows(ptr, row_off, live, cols, C, CW: tl.constexpr, NCH: tl.constexpr,
                   MASK_C: tl.constexpr):
        """The rows at ptr + row_off (int64, R) as NCH chunks R x CW in the input dtype; rows
        not `live` (and channels past C) read as 0 without touching memory."""
        tiles = ()
        for c in tl.static_range(NCH):
            ok = tl.broadcast_to(live[:, None], [live.shape[0], CW])
            if MASK_C:
                ok = ok & (c * CW + cols < C)[None, :]
            at = ptr + row_off[:, None] + (c * CW + cols)[None, :]
            tiles = tiles + (tl.load(at, mask=ok, other=0.0),)
        return tiles

    @triton.jit
    def _row_layer_norm(xs, cols, C, eps, CW: tl.constexpr, NCH: tl.constexpr,
                        MASK_C: tl.constexpr):
        """Layer norm (no affine) of rows held as NCH fp32 chunks R x CW. The chunks share one
        layout, so they are added in registers first: one warp reduction per moment, not NCH."""
        total = xs[0]
        for c in tl.static_range(1, NCH):
            total += xs[c]
        mu = tl.sum(total, axis=1) / C
        devs = ()
        for c in tl.static_range(NCH):
            d = xs[c] - mu[:, None]
            if MASK_C:
                d = tl.where((c * CW + cols < C)[None, :], d, 0.0)
            devs = devs + (d,)
        sq = devs[0] * devs[0]
        for c in tl.static_range(1, NCH):
            sq += devs[c] * devs[c]
        inv = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / C + eps)
        out = ()
        for c in tl.static_range(NCH):
            out = out + (devs[c] * inv[:, None],)
        return out

    @triton.jit
    def _layer(layers, strides_b, strides_t, l):
        """(first element, batch stride, time stride) of layer l, a run-time index: a chain of
        selects over the K kernel arguments (a tuple is indexed by constants only)."""
        zero = tl.zeros([], dtype=tl.int64)
        base = layers[0]
        stride_b = zero + strides_b[0]
        stride_t = zero + strides_t[0]
        for i in tl.static_range(1, len(layers)):
            if l == i:
                base = layers[i]
                stride_b = zero + strides_b[i]
                stride_t = zero + strides_t[i]
        return base, stride_b, stride_t

    @triton.jit
    def _combine_rows(layers, strides_b, strides_t, pad, mean, rstd, out, b, t0, B, T, C,
                      stat_ld, eps,
                      NORM: tl.constexpr, FINAL: tl.constexpr, HAS_PAD: tl.constexpr,
                      KEEP_PAD: tl.constexpr, BLOCK_R: tl.constexpr, CW: tl.constexpr,
                      NCH: tl.constexpr, MASK_C: tl.constexpr):
        """BLOCK_R steps t0.. of sample b: each layer loaded (the next one's loads issued before
        this one is reduced), normalized, summed in fp32; / K, final norm, one store. The layer
        loop is a run-time loop: unrolled, the compiler would hoist every layer's loads to the top
        (over 200 registers at K = 10)."""
        K: tl.constexpr = len(layers)
        ts = t0 + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, CW)
        row_in = ts < T
        live = row_in
        if HAS_PAD and not KEEP_PAD:
            live = row_in & (tl.load(pad + b * T + ts, mask=row_in, other=1) == 0)
        ts = ts.to(tl.int64)
        nxt = _load_rows(layers[0] + b * strides_b[0], ts * strides_t[0], live, cols, C, CW,
                         NCH, MASK_C)
        acc = ()
        for c in tl.static_range(NCH):
            acc = acc + (tl.zeros([BLOCK_R, CW], dtype=tl.float32),)
        for l in range(K):
            cur = nxt
            base, stride_b, stride_t = _layer(layers, strides_b, strides_t, l + 1)
            nxt = _load_rows(base + b * stride_b, ts * stride_t, live & (l + 1 < K), cols, C, CW,
                             NCH, MASK_C)
            xs = ()
            for c in tl.static_range(NCH):
                xs = xs + (cur[c].to(tl.float32),)
            if NORM == 2:
                normed = ()
                for c in tl.static_range(NCH):
                    at = (l * B + b) * stat_ld + c * CW + cols
                    ok = cols < CW
                    if MASK_C:
                        ok = c * CW + cols < C
                    mu = tl.load(mean + at, mask=ok, other=0.0)
                    inv = tl.load(rstd + at, mask=ok, other=0.0)
                    normed = normed + ((xs[c] - mu[None, :]) * inv[None, :],)
                xs = normed
            elif NORM == 1:
                xs = _row_layer_norm(xs, cols, C, eps, CW, NCH, MASK_C)
            summed = ()
            for c in tl.static_range(NCH):
                summed = summed + (acc[c] + xs[c],)
            acc = summed
        avg = ()
        for c in tl.static_range(NCH):
            avg = avg + (acc[c] / K,)
        if FINAL == 1:
            avg = _row_layer_norm(avg, cols, C, eps, CW, NCH, MASK_C)
        row_out = out + (b * T + ts) * C
        for c in tl.static_range(NCH):
            ok = tl.broadcast_to(row_in[:, None], [BLOCK_R, CW])
            if MASK_C:
                ok = ok & (c * CW + cols < C)[None, :]
            tl.store(row_out[:, None] + (c * CW + cols)[None, :],
                     tl.where(live[:, None], avg[c], 0.0), mask=ok)

    @triton.jit
    def _combine_kernel(layers, strides_b, strides_t, pad, out, B, T, C, eps,
                        NORM: tl.constexpr, FINAL: tl.constexpr, HAS_PAD: tl.constexpr,
                        KEEP_PAD: tl.constexpr, SUB: tl.constexpr, BLOCK_R: tl.constexpr,
                        CW: tl.constexpr, NCH: tl.constexpr, MASK_C: tl.constexpr):
        # NORM / FINAL: 0 none, 1 layer (instance goes to _instance_kernel). Program (i, b): SUB
        # row tiles of sample b.
        b = tl.program_id(1).to(tl.int64)
        for sub in range(SUB):
            t0 = (tl.program_id(0) * SUB + sub) * BLOCK_R
            _combine_rows(layers, strides_b, strides_t, pad, out, out, out, b, t0, B, T, C, C, eps,
                          NORM, FINAL, HAS_PAD, KEEP_PAD, BLOCK_R, CW, NCH, MASK_C)

    @triton.jit
    def _stats_task(layers, strides_b, strides_t, pad, part_mean, part_m2, counts, mean, rstd,
                    sync, b, l, j, cb, B, T, C, stat_ld, eps, TCHUNK, NJ, NCB,
                    COUNT_PAD: tl.constexpr,
                    HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr, CW: tl.constexpr):
        """Statistics of rows [j * TCHUNK, (j + 1) * TCHUNK) of layer l, sample b, channels of
        block cb: Chan merges of BLOCK_T x CW tiles (the next tile's loads in flight) -> a partial
        (count, mean, M2). The last of the NJ tasks of (b, l, cb) to finish merges the partials in
        chunk order (deterministic, no atomics on the values) into mean and 1/std, then counts
        itself in the sample's ready counter."""
        K: tl.constexpr = len(layers)
        base, stride_b, stride_t = _layer(layers, strides_b, strides_t, l)
        cols = tl.arange(0, CW)
        col_ok = cb * CW + cols < C
        base = base + b * stride_b + cb * CW
        t_lo = j * TCHUNK
        t_hi = tl.minimum(T, t_lo + TCHUNK)
        ts = t_lo + tl.arange(0, BLOCK_T)
        ok = ts < t_hi
        if HAS_PAD and not COUNT_PAD:
            ok = ok & (tl.load(pad + b * T + ts, mask=ok, other=1) == 0)
        nxt = tl.load(base + ts.to(tl.int64)[:, None] * stride_t + cols[None, :],
                      mask=ok[:, None] & col_ok[None, :], other=0.0)
        count = tl.zeros([], dtype=tl.float32)
        mu = tl.zeros([CW], dtype=tl.float32)
        m2 = tl.zeros([CW], dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            x = nxt.to(tl.float32)
            rows_ok = ok
            ts = t0 + BLOCK_T + tl.arange(0, BLOCK_T)
            ok = ts < t_hi
            if HAS_PAD and not COUNT_PAD:
                ok = ok & (tl.load(pad + b * T + ts, mask=ok, other=1) == 0)
            nxt = tl.load(base + ts.to(tl.int64)[:, None] * stride_t + cols[None, :],
                          mask=ok[:, None] & col_ok[None, :], other=0.0)
            # Chan's merge of the tile's (count, mean, M2) into the running ones: no
            # E[x^2] - E[x]^2 cancellation for channels with a large mean.
            n_tile = tl.sum(rows_ok.to(tl.float32))
            mu_tile = tl.sum(x, axis=0) / tl.maximum(n_tile, 1.0)
            dev = tl.where(rows_ok[:, None], x - mu_tile[None, :], 0.0)
            n_new = count + n_tile
            weight = n_tile / tl.maximum(n_new, 1.0)
            delta = mu_tile - mu
            mu = mu + delta * weight
            m2 = m2 + tl.sum(dev * dev, axis=0) + delta * delta * count * weight
            count = n_new
        row = ((b * K + l) * NJ + j) * NCB * CW + cb * CW + cols
        tl.store(part_mean + row, mu)
        tl.store(part_m2 + row, m2)
        tl.store(counts + ((b * K + l) * NCB + cb) * NJ + j, count)
        tl.debug_barrier()  # every thread's partial is written before the release below
        done = tl.atomic_add(sync + 1 + B + (b * K + l) * NCB + cb, 1, sem="acq_rel", scope="gpu")
        if done == NJ - 1:
            n = tl.zeros([], dtype=tl.float32)
            m = tl.zeros([CW], dtype=tl.float32)
            s = tl.zeros([CW], dtype=tl.float32)
            for jj in range(NJ):
                at = ((b * K + l) * NJ + jj) * NCB * CW + cb * CW + cols
                n_j = tl.load(counts + ((b * K + l) * NCB + cb) * NJ + jj, cache_modifier=".cg")
                m_j = tl.load(part_mean + at, cache_modifier=".cg")
                s_j = tl.load(part_m2 + at, cache_modifier=".cg")
                total = n + n_j
                weight = n_j / tl.maximum(total, 1.0)
                delta = m_j - m
                m = m + delta * weight
                s = s + s_j + delta * delta * n * weight
                n = total
            at = (l * B + b) * stat_ld + cb * CW + cols
            tl.store(mean + at, m, mask=col_ok)
            tl.store(rstd + at, 1.0 / tl.sqrt(s / tl.maximum(n, 1.0) + eps), mask=col_ok)
            tl.debug_barrier()
            tl.atomic_add(sync + 1 + b, 1, sem="release", scope="gpu")

    @triton.jit
    def _instance_kernel(layers, strides_b, strides_t, pad, part_mean, part_m2, counts, mean,
                         rstd, sync, out, B, T, C, stat_ld, eps, TCHUNK, NJ, NCB, NRG, AHEAD,
                         FINAL: tl.constexpr, HAS_PAD: tl.constexpr, COUNT_PAD: tl.constexpr,
                         KEEP_PAD: tl.constexpr, BLOCK_R: tl.constexpr, CW: tl.constexpr,
                         NCH: tl.constexpr, MASK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        """Per-layer instance norm in one launch, each layer read from DRAM once. Tasks, taken in
        ticket order: the statistics tasks of samples 0..AHEAD-1, then for each later sample s its
        statistics tasks followed by the combine tasks of sample s - AHEAD, then the last AHEAD
        samples' combine tasks. A combine task waits (acquire) until its sample's statistics are
        merged; every task it waits on took an earlier ticket, so it is already running and never
        waits itself: no deadlock whatever order the hardware starts programs in. Between the
        statistics and the combine of a sample only ~AHEAD samples' layers are read, so its second
        read finds them in L2. Partials are read from L2 (.cg); the mean and 1/std rows are
        128-byte aligned and read only once final, so no SM's L1 can hold a stale copy."""
        K: tl.constexpr = len(layers)
        task = tl.atomic_add(sync, 1).to(tl.int64)
        s1 = K * NCB * NJ  # statistics tasks per sample
        unit = s1 + NRG
        head = AHEAD * s1
        mid = (B - AHEAD) * unit
        r = task - head
        u = r // unit
        w = r - u * unit
        tail = r - mid
        in_head = task < head
        in_mid = (r >= 0) & (r < mid)
        is_stats = in_head | (in_mid & (w < s1))
        b = tl.where(in_head, task // s1,
                     tl.where(in_mid, tl.where(w < s1, AHEAD + u, u), B - AHEAD + tail // NRG))
        i = tl.where(in_head, task % s1,
                     tl.where(in_mid, tl.where(w < s1, w, w - s1), tail % NRG))
        if is_stats:
            l = i // (NCB * NJ)
            cb = (i // NJ) % NCB
            _stats_task(layers, strides_b, strides_t, pad, part_mean, part_m2, counts, mean, rstd,
                        sync, b, l, i % NJ, cb, B, T, C, stat_ld, eps, TCHUNK, NJ, NCB, COUNT_PAD,
                        HAS_PAD, BLOCK_T, CW)
        else:
            seen = tl.atomic_add(sync + 1 + b, 0, sem="acquire", scope="gpu")
            while seen < K * NCB:
                seen = tl.atomic_add(sync + 1 + b, 0, sem="acquire", scope="gpu")
            _combine_rows(layers, strides_b, strides_t, pad, mean, rstd, out, b, i * BLOCK_R, B, T,
                          C, stat_ld, eps, 2, FINAL, HAS_PAD, KEEP_PAD, BLOCK_R, CW, NCH, MASK_C)
