"""Which attention backend runs on CUDA: measured, not assumed.

The first call of each shape and feature set (the key: B, H, Tq, Tk, D, dtype, bias layout,
padding, dropout, skip_padded_queries, forward-only or forward+backward) times every candidate that
computes the same thing -- our Triton kernels, each SDPA kernel (flash, efficient, cuDNN, math),
FlexAttention (bias as score_mod, padding as a block mask; it has no dropout) and flash-attn (no
bias, no padding) -- and keeps the fastest for the rest of the process. A candidate that refuses
the arguments or fails is left out, with its reason recorded.

The candidates run on inputs made from the key alone (seeded random q, k, v and bias; with padding,
key lengths uniform in [T/2, T]; for forward+backward a seeded random output gradient, as a loss
gives, not an expanded stride-0 one), so a pick costs the same whether it is made in eager code or
while torch.compile traces (there the pick is a constant of the graph: each compiled shape picks
once, before its graph is built). Timing (`_timer`; tests replace it), after `WARMUP` calls: the
pick's time is `REPEATS` calls back to back between one CUDA event pair, per call -- what a
training step runs, whose launches queue behind the GPU's work, so the host's launch time (ours
are 4-5 Triton launches each way) overlaps the kernels; beside it, recorded as `single_ms`, the
median of single calls each between its own pair, which pays that launch time. D2V_ATTENTION_SKIP
=flex,... names candidates never timed (FlexAttention compiles a kernel per key: seconds per pick).

`picks()` is what env.json records and the start line shows (d2v_engine.runtime.backends); `pick_for` makes
the picks of the shapes a config will run before training starts, and `preload` gives a resumed
run the picks it recorded. Measuring leaves the random number generators as they were. Off CUDA
(and with D2V_ATTENTION set) attention_backend keeps its fixed order and nothing is measured.
Under several ranks every rank times the config's shapes at the same time, then all `adopt` rank
0's picks (d2v_engine.runtime.backends.share_attention_picks): every rank runs what env.json records, so
a resume gives each rank the backends it had. Shapes first met during training (audio and text
batches shorter than the longest crop) are timed by each process for itself.
"""
from __future__ import annotations

import math
import os
import statistics

import torch

from d2v_kernels import attention as attn

CANDIDATES = ("triton", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex",
              "flash_attn")
WARMUP, REPEATS = 3, 10
# key -> {"backend", "ms": {candidate: ms}, "single_ms": {candidate: ms}, "skipped": {candidate:
# reason}}
_picks: dict = {}
_preloaded: dict = {}  # described key -> backend: a resumed run's earlier picks


def attention_backend(q, k=None, v=None, key_padding_mask=None, attn_bias=None,
                      dropout_p=0.0, skip_padded_queries=False) -> str:
    """Which backend d2v_kernels.ops.attention takes for these arguments (k, v default to q's
    shape): the forced one (D2V_ATTENTION) when it supports them, on CUDA the measured pick, else
    the first of BACKENDS that supports them."""
    k = q if k is None else k
    v = k if v is None else v
    forced = os.environ.get("D2V_ATTENTION")
    if forced and forced not in attn.BACKENDS:
        raise ValueError(f"D2V_ATTENTION must be one of {attn.BACKENDS}, got {forced!r}")
    args = (q, k, v, key_padding_mask, attn_bias, dropout_p)
    if forced and attn.supports(forced, *args):
        return forced
    if measures(q.device):
        return pick(q, k, v, key_padding_mask, attn_bias, dropout_p, skip_padded_queries)
    for name in attn.BACKENDS:
        if name != "flex" and attn.supports(name, *args):
            return name
    return "sdpa"


def measures(device: torch.device) -> bool:
    """Whether calls on `device` take the measured pick (CUDA, not interpreted)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def shape_key(q, k, v, key_padding_mask=None, attn_bias=None, dropout_p=0.0,
              skip_padded_queries=False, backward=None) -> tuple:
    """The dispatch key of a call: what the candidates' speed depends on."""
    if backward is None:
        tensors = [t for t in (q, k, v, attn_bias) if t is not None]
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    b, h, t_q, d = q.shape
    bias = "none" if attn_bias is None else ("shared" if attn_bias.ndim == 3 else "batched")
    bias_dtype = None if attn_bias is None else str(attn_bias.dtype).replace("torch.", "")
    return (str(q.device), b, h, t_q, k.shape[2], d, v.shape[-1],
            str(q.dtype).replace("torch.", ""), bias, bias_dtype, key_padding_mask is not None,
            float(dropout_p), bool(skip_padded_queries), bool(backward))


def describe_key(key: tuple) -> str:
    device, b, h, t_q, t_k, d, dv, dtype, bias, _, pad, p, skip, backward = key
    return (f"B={b} H={h} T={t_q}x{t_k} D={d} {dtype} bias={bias} pad={'yes' if pad else 'no'}"
            + (" skip_padded_queries" if skip else "") + f" dropout={p:g} "
            + ("fwd+bwd" if backward else "fwd"))


def pick(q, k, v, key_padding_mask=None, attn_bias=None, dropout_p=0.0,
         skip_padded_queries=False) -> str:
    """The measured backend for this call (measuring its key on first sight)."""
    key = shape_key(q, k, v, key_padding_mask, attn_bias, dropout_p, skip_padded_queries)
    if torch.compiler.is_compiling():
        return _pick_constant(key)
    return pick_for(key)


def pick_for(key: tuple) -> str:
    """The backend kept for `key`: preloaded, or timing the candidates the first time."""
    if key not in _picks:
        earlier = _preloaded.get(describe_key(key))
        _picks[key] = ({"backend": earlier, "ms": {}, "single_ms": {}, "skipped": {},
                         "preloaded": True}
                       if earlier else measure(key))
    return _picks[key]["backend"]


def preload(recorded: dict) -> None:
    """Takes the picks an earlier process recorded (env.json's attention_picks), so that a resumed
    run keeps its backends instead of re-timing them: its numerics do not depend on timing noise."""
    for desc, value in recorded.items():
        backend = value.get("backend") if isinstance(value, dict) else value
        if isinstance(backend, str):
            _preloaded[desc] = backend


def adopt(recorded: dict) -> int:
    """Takes another process's picks ({described key: backend}: rank 0's) for the keys this
    process has picked and for those it meets later; returns how many of its own it replaced."""
    preload(recorded)
    replaced = 0
    for key, value in _picks.items():
        backend = _preloaded.get(describe_key(key))
        if backend and backend != value["backend"]:
            _picks[key] = {**value, "backend": backend, "adopted": True}
            replaced += 1
    return replaced


@torch._dynamo.assume_constant_result
def _pick_constant(key: tuple) -> str:
    # runs for real while dynamo traces: the measured name enters the graph as a constant
    return pick_for(key)


def picks() -> dict:
    """{described key: {"backend", "ms", "single_ms", "skipped"}} of every pick made in this
    process."""
    return {describe_key(key): dict(value) for key, value in _picks.items()}


def reset() -> None:
    _picks.clear()
    _preloaded.clear()


def measure(key: tuple) -> dict:
    """Times each candidate on inputs made from `key`; the fastest is the pick. The process's
    random number generators are left as they were (Triton's dropout seed, SDPA's and
    flash-attn's dropout draw from them): measuring never shifts a training trajectory."""
    device = torch.device(key[0])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _measure(attn, key)


def _measure(attn, key):
    q, k, v, pad, bias = inputs_for(key)
    p, skip, backward = key[11], key[12], key[13]
    ms, single, skipped = {}, {}, {}
    unwanted = {n.strip() for n in os.environ.get("D2V_ATTENTION_SKIP", "").split(",")}
    for name in CANDIDATES:
        if name in unwanted:
            skipped[name] = "D2V_ATTENTION_SKIP"
            continue
        with torch.set_grad_enabled(backward):
            leaves = [t.detach().requires_grad_(backward) if t is not None else None
                      for t in (q, k, v, bias)]
            ok = attn.supports(name, *leaves[:3], pad, leaves[3], p)
        if not ok:
            skipped[name] = "does not compute these arguments"
            continue
        try:
            ms[name], single[name] = _timer(name, _step(attn, name, q, k, v, pad, bias, p, skip,
                                                        backward))
        except Exception as e:  # a kernel that refuses the arguments is a skipped candidate
            skipped[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" \
                if str(e).strip() else type(e).__name__
            if q.is_cuda:
                torch.cuda.empty_cache()
    if not ms:
        return {"backend": "sdpa", "ms": {}, "single_ms": {}, "skipped": skipped}
    best = min(ms, key=ms.get)
    return {"backend": best, "ms": ms, "single_ms": single, "skipped": skipped}


def inputs_for(key: tuple, seed: int = 0):
    """Seeded random (q, k, v, key_padding_mask, bias) of a key's shapes and kinds."""
    device, b, h, t_q, t_k, d, dv, dtype, bias_kind, bias_dtype, pad, _, _, _ = key
    dtype = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h, t_q, d, generator=g).to(device, dtype)
    k = torch.randn(b, h, t_k, d, generator=g).to(device, dtype)
    v = torch.randn(b, h, t_k, dv, generator=g).to(device, dtype)
    mask = None
    if pad:
        lengths = torch.randint(max(1, t_k // 2), t_k + 1, (b,), generator=g)
        mask = (torch.arange(t_k)[None, :] >= lengths[:, None]).to(device)
    bias = None
    if bias_kind != "none":
        shape = (h, t_q, t_k) if bias_kind == "shared" else (b, h, t_q, t_k)
        bias = torch.randn(shape, generator=g).to(device, getattr(torch, bias_dtype))
    return q, k, v, mask, bias


def _step(attn, name, q, k, v, pad, bias, p, skip, backward):
    """One call of candidate `name` (forward, or forward + backward into fresh leaves)."""
    scale = q.shape[-1] ** -0.5
    if not backward:
        def run():
            with torch.no_grad():
                attn.run_backend(name, q, k, v, pad, bias, scale, p, skip)
        return run
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    bias_leaf = None if bias is None else bias.detach().requires_grad_()
    # a real gradient: a stride-0 expanded one would let a kernel read one value per row
    g = torch.Generator(device="cpu").manual_seed(1)
    grad = torch.randn(*q.shape[:3], v.shape[-1], generator=g).to(q.device, q.dtype)

    def run():
        with torch.enable_grad():
            out = attn.run_backend(name, *leaves, pad, bias_leaf, scale, p, skip)
            out.backward(grad)
        for t in leaves + [bias_leaf]:
            if t is not None:
                t.grad = None
    return run


def _cuda_event_ms(name: str, fn) -> tuple[float, float]:
    """(ms per call of REPEATS calls of candidate `name`'s fn() back to back between one CUDA
    event pair, median ms of one call alone between its own pair), after WARMUP calls."""
    def event():
        return torch.cuda.Event(enable_timing=True)

    with torch.autocast("cuda", enabled=False):
        for _ in range(WARMUP):
            fn()
        start, end = event(), event()
        start.record()
        for _ in range(REPEATS):
            fn()
        end.record()
        end.synchronize()
        together = start.elapsed_time(end) / REPEATS
        alone = []
        for _ in range(REPEATS):
            start, end = event(), event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            alone.append(start.elapsed_time(end))
    single = statistics.median(alone)
    if not (math.isfinite(together) and math.isfinite(single)):
        raise RuntimeError("non-finite time")
    return together, single


_timer = _cuda_event_ms
