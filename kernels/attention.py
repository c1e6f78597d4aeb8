"""Multi-head attention core: q, k, v B x H x T x D, key padding mask, additive bias.

    out = softmax(q k^T * scale + bias, padded keys -inf) v          (dropout on the probabilities)

`attention_reference` is the plain math (the ground truth). `attention` dispatches, in this order,
to the first path that supports the arguments (`attention_backend` says which one a call takes):
  "triton"      our flash kernels below: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
                fp16/bf16/fp32, D == Dv <= 128, any mask / bias / dropout;
  "flash_attn"  the flash-attn package when installed: CUDA fp16/bf16, no bias, no padding;
  "sdpa"        torch's scaled_dot_product_attention (everything else, e.g. float64, CPU).
Meta and fake tensors (the plan's FLOP and memory counts) take the d2v op pair of kernels.ops
instead. D2V_ATTENTION=triton|flash_attn|sdpa moves that path to the front (it still needs to
support the arguments). A query row whose every key is excluded (a fully padded sample, or a bias
row of -inf) attends to nothing: its output is 0, and neither its output nor its gradients are NaN.

Algorithm (FlashAttention-2 style, written for data2vec's shapes: no causal mask, T ~ 50-1000,
D = 64, large B*H):
  forward     grid (Tq / BLOCK_M, B*H). A program keeps its BLOCK_M queries on chip and streams
              the keys in BLOCK_N blocks with the online softmax (running max m, running sum l,
              rescaled accumulator), in base 2 (exp2 with log2(e) folded into the scale). It
              writes O and the log-sum-exp L = m + log2(l) (B x H x Tq fp32), nothing of size
              T x T: memory is O(B*H*T*D). A row with no admissible key stores L = +inf, so that
              every probability recomputed from it in the backward is exp2(s - inf) = 0.
  backward    delta = rowsum(dO * O) (B x H x Tq fp32), then
                _bwd_dkdv_kernel  grid (Tk / BLOCK_N, B*H): keys on chip, loops over query
                                  blocks; P = exp2(S - L), dV += P^T dO, dS = P (dO V^T - delta),
                                  dK += dS^T Q;
                _bwd_dq_kernel    grid (Tq / BLOCK_M, B*H): queries on chip, loops over key
                                  blocks; dQ += dS K.
              Recomputing S in both kernels (7 matmuls instead of 5) buys plain stores everywhere:
              no atomics, bit-reproducible gradients.
  bias grad   d(bias) = dS. A B x H x Tq x Tk bias owns one gradient element per dS element: the
              dK/dV kernel stores its dS tile there (the gradient itself, not a temporary). A bias
              shared over the batch (H x Tq x Tk, e.g. BEiT's relative position bias) needs the
              sum over b of dS: _bwd_dbias_kernel has grid (Tk / BLOCK_N, Tq / BLOCK_M, H) and each
              program loops over b, recomputing its S / dP tile, accumulating dS in fp32 registers
              and storing the H x Tq x Tk result once. No B x H x T x T buffer and no atomics (so
              the gradient is deterministic, which fp32 atomics into H x T x T would not be); the
              price is two more matmuls per tile (S and dP), about 2/9 more backward work, paid
              only when the shared bias requires grad.
  dropout     in-kernel: keep(b, h, i, j) = philox(seed + b*H + h, i*Tk + j) >= p, regenerated
              bit-identically in the backward; the seed is drawn from torch's CPU generator (so
              torch.manual_seed reproduces it, without a device sync).
  precision   fp32 accumulation and softmax statistics; fp32 inputs use IEEE fp32 dots
              (input_precision="ieee"), never TF32.
Block sizes are autotuned on CUDA (keyed on next_power_of_2(T), so variable-length audio does not
retune every batch); the interpreter uses INTERPRET_BLOCKS, by default one tile spanning the whole
sequence (up to 256).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: every call takes flash_attn or SDPA
    triton = None

BACKENDS = ("triton", "flash_attn", "sdpa")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 128
# (BLOCK_M, BLOCK_N) for every kernel under TRITON_INTERPRET=1. None: one tile spans the whole
# sequence (up to 256), so each program runs its loop once -- the interpreter's cost is per op, not
# per element, and the models run interpreted in the test suite. Tests set small blocks to cover the
# multi-block paths.
INTERPRET_BLOCKS = None
_INTERPRET_MAX_BLOCK = 256
_LOG2E = 1.4426950408889634


def _check(q, k, v, key_padding_mask, attn_bias):
    if q.ndim != 4 or k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: q, k, v must be B x H x T x D, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    if key_padding_mask is not None and (key_padding_mask.shape != (b, tk)
                                         or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"attention: key_padding_mask must be bool {b} x {tk}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if attn_bias is not None and (attn_bias.ndim not in (3, 4)
                                  or attn_bias.shape[-3:] != (h, tq, tk)
                                  or (attn_bias.ndim == 4 and attn_bias.shape[0] != b)):
        raise ValueError(f"attention: attn_bias must be {h} x {tq} x {tk} or {b} x {h} x {tq} x "
                         f"{tk}, got {tuple(attn_bias.shape)}")


def _additive_mask(q, key_padding_mask, attn_bias):
    """Float mask broadcastable to B x H x Tq x Tk (-inf at padded keys), or None."""
    mask = None if attn_bias is None else attn_bias.to(q.dtype)
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def attention_reference(q, k, v, key_padding_mask=None, attn_bias=None, scale=None,
                        dropout_p=0.0):
    """softmax(q k^T * scale + bias, padded keys -inf) v: B x H x Tq x Dv; empty rows give 0."""
    _check(q, k, v, key_padding_mask, attn_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = _additive_mask(q, key_padding_mask, attn_bias)
    if mask is not None:
        scores = scores + mask
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Rows with no admissible key are softmaxed over zeros and then zeroed: masked_fill cuts their
    # gradient too, which a NaN-then-nan_to_num softmax would not.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0).to(acc), dim=-1)
    probs = probs.masked_fill(empty, 0.0).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def attention(q, k, v, key_padding_mask=None, attn_bias=None, scale=None, dropout_p=0.0):
    """q, k, v B x H x T x D (fp16/bf16/fp32), B x Tk bool (True = ignore), bias H x Tq x Tk or
    B x H x Tq x Tk -> B x H x Tq x Dv in q's dtype; dispatched as attention_backend says."""
    _check(q, k, v, key_padding_mask, attn_bias)
    if _shape_only(q):
        # Meta or fake tensors: the plan counting FLOPs and memory (engine.flops). The d2v op
        # pair stands in for the flash kernels: one node each way, counted by FlashAttention's
        # convention (kernels.ops), saving what the kernels save (out and lse, no T x T scores).
        from kernels import ops
        return ops.attention(q, k, v, key_padding_mask, attn_bias, scale, dropout_p,
                             impl="triton")
    backend = attention_backend(q, k, v, key_padding_mask, attn_bias, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "triton":
        if torch.compiler.is_compiling():
            # dynamo breaks the graph at the launches inside _FlashAttention; the custom op pair
            # (kernels.ops) is one opaque node each way, running these same kernels.
            from kernels import ops
            return ops.attention(q, k, v, key_padding_mask, attn_bias, scale, dropout_p,
                                 impl="triton")
        seed = int(torch.randint(0, 2**30, ())) if dropout_p > 0 else 0
        return _FlashAttention.apply(q, k, v, key_padding_mask, attn_bias, scale,
                                     float(dropout_p), seed)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=dropout_p, softmax_scale=scale)
        return out.transpose(1, 2)
    return _sdpa(q, k, v, key_padding_mask, attn_bias, scale, dropout_p)


def attention_backend(q, k=None, v=None, key_padding_mask=None, attn_bias=None,
                      dropout_p=0.0) -> str:
    """Which of BACKENDS `attention` takes for these arguments (k, v default to q's shape)."""
    k = q if k is None else k
    v = k if v is None else v
    order = list(BACKENDS)
    forced = os.environ.get("D2V_ATTENTION")
    if forced and forced not in BACKENDS:
        raise ValueError(f"D2V_ATTENTION must be one of {BACKENDS}, got {forced!r}")
    if forced:
        order.remove(forced)
        order.insert(0, forced)
    for name in order:
        if name == "triton" and _triton_supports(q, k, v, attn_bias, dropout_p):
            return name
        if name == "flash_attn" and _flash_attn_supports(q, k, v, key_padding_mask, attn_bias):
            return name
        if name == "sdpa":
            return name
    return "sdpa"


def _shape_only(q: torch.Tensor) -> bool:
    """Tensors with shapes and no data (meta device, or FakeTensorMode's)."""
    if q.device.type == "meta":
        return True
    if torch.compiler.is_compiling():
        # dynamo traces with fake tensors too, and refuses to trace is_fake: a compiled graph
        # takes the backend's own branch below, which goes through the same op pair.
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(q)


def _triton_runs_on(device: torch.device) -> bool:
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return device.type == "cpu"
    return device.type == "cuda"


def _triton_supports(q, k, v, attn_bias, dropout_p) -> bool:
    return (_triton_runs_on(q.device) and q.dtype in TRITON_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] == v.shape[-1] <= MAX_TRITON_HEAD_DIM
            and (attn_bias is None or attn_bias.is_floating_point())
            # dropout offsets i*Tk + j are int32 within a head
            and (dropout_p == 0 or q.shape[2] * k.shape[2] < 2**31))


def _flash_attn_supports(q, k, v, key_padding_mask, attn_bias) -> bool:
    return (q.device.type == "cuda" and key_padding_mask is None and attn_bias is None
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and q.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and importlib.util.find_spec("flash_attn") is not None)


def _sdpa(q, k, v, key_padding_mask, attn_bias, scale, dropout_p):
    mask = _additive_mask(q, key_padding_mask, attn_bias)
    empty = None
    if mask is not None:
        # SDPA's softmax over an all -inf row is NaN (and so are its gradients); such rows attend
        # to everything instead and are zeroed afterwards.
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
        mask = mask.masked_fill(empty, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, attn_bias, scale, dropout_p, seed):
        out, lse = flash_forward(q, k, v, key_padding_mask, attn_bias, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, key_padding_mask, attn_bias, out, lse)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pad, bias, out, lse = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias = flash_backward(dout, q, k, v, pad, bias, out, lse, ctx.scale,
                                           ctx.dropout_p, ctx.seed, need_bias)
        return dq, dk, dv, None, dbias, None, None, None


# ----------------------------------------------------------------------------- launchers


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _head_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _t_bucket(t: int) -> int:
    return max(16, triton.next_power_of_2(t))


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(key_padding_mask, like):
    """uint8 view of the B x Tk mask and its strides (a dummy pointer when absent)."""
    if key_padding_mask is None:
        return like, 0, 0
    pad = key_padding_mask.view(torch.uint8)
    return pad, pad.stride(0), pad.stride(1)


def _bias_args(attn_bias, like):
    """Bias pointer and (b, h, m, n) strides; a shared H x Tq x Tk bias has batch stride 0."""
    if attn_bias is None:
        return like, 0, 0, 0, 0
    if attn_bias.ndim == 3:
        return (attn_bias, 0) + attn_bias.stride()
    return (attn_bias,) + attn_bias.stride()


def _dot_args(dtype) -> dict:
    """tl.dot operand dtype and input precision: IEEE for fp32 (never TF32; ignored by the MMA for
    16-bit inputs). The interpreter's bf16 tl.dot is wrong (triton 3.9), so there bf16 operands are
    widened to fp32 first -- exactly, so the products are those of the bf16 MMA; compiled code casts
    to the operands' own dtype, a no-op."""
    if dtype == torch.bfloat16 and _interpret():
        return dict(PRECISION="ieee", DOT_DTYPE=tl.float32)
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_DTYPE=_TL_DTYPES[dtype])


def _launch(kernel, grid, args, t_q, t_k, **meta):
    """Interpreter: the raw kernel with INTERPRET_BLOCKS (or whole-sequence tiles); CUDA: its
    autotuned twin picks blocks."""
    if _interpret():
        block_m, block_n = INTERPRET_BLOCKS or (min(_t_bucket(t_q), _INTERPRET_MAX_BLOCK),
                                                min(_t_bucket(t_k), _INTERPRET_MAX_BLOCK))
        kernel.fn[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **meta)
    else:
        kernel[grid](*args, **meta)


def flash_forward(q, k, v, key_padding_mask=None, attn_bias=None, scale=None, dropout_p=0.0,
                  seed=0, out=None, lse=None):
    """Triton forward: -> (out B x H x Tq x D in q's dtype, lse B x H x Tq fp32, base 2)."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    pad, spb, spn = _mask_args(key_padding_mask, q)
    bias, sbb, sbh, sbm, sbn = _bias_args(attn_bias, q)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_fwd_kernel, grid, (
        q, k, v, bias, pad, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        sbb, sbh, sbm, sbn, spb, spn,
        H, Tq, Tk, D, scale * _LOG2E, dropout_p, seed, _t_bucket(max(Tq, Tk))), Tq, Tk,
        HAS_BIAS=attn_bias is not None, HAS_PAD=key_padding_mask is not None,
        DROPOUT=dropout_p > 0, **_dot_args(q.dtype), BLOCK_D=_head_block(D))
    return out, lse


def flash_backward(dout, q, k, v, key_padding_mask, attn_bias, out, lse, scale, dropout_p=0.0,
                   seed=0, need_bias_grad=False, dq=None, dk=None, dv=None, dbias=None):
    """Triton backward: -> (dq, dk, dv, dbias or None), dbias in the bias's shape and dtype."""
    q, k, v, out, dout = (_last_dim_contiguous(x) for x in (q, k, v, out, dout))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    need_bias_grad = need_bias_grad and attn_bias is not None
    if need_bias_grad and dbias is None:
        dbias = torch.empty(attn_bias.shape, dtype=attn_bias.dtype, device=q.device)
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    block_d = _head_block(D)
    _delta_kernel[(triton.cdiv(Tq, 64), B * H)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], H, Tq, D,
        BLOCK_M=64, BLOCK_D=block_d)
    pad, spb, spn = _mask_args(key_padding_mask, q)
    bias, sbb, sbh, sbm, sbn = _bias_args(attn_bias, q)
    batched_bias_grad = need_bias_grad and attn_bias.ndim == 4
    dbias_arg = dbias if batched_bias_grad else q
    sdb = dbias.stride() if batched_bias_grad else (0, 0, 0, 0)
    common = (
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        sbb, sbh, sbm, sbn, spb, spn,
        H, Tq, Tk, D, scale * _LOG2E, dropout_p, seed, _t_bucket(max(Tq, Tk)))
    meta = dict(HAS_BIAS=attn_bias is not None, HAS_PAD=key_padding_mask is not None,
                DROPOUT=dropout_p > 0, **_dot_args(q.dtype), BLOCK_D=block_d)
    _launch(_bwd_dkdv_kernel,
            lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), B * H),
            (q, k, v, bias, pad, dout, lse, delta, dk, dv, dbias_arg,
             *dk.stride()[:3], *dv.stride()[:3], *sdb, scale, *common), Tq, Tk,
            BIAS_GRAD=batched_bias_grad, **meta)
    _launch(_bwd_dq_kernel,
            lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), B * H),
            (q, k, v, bias, pad, dout, lse, delta, dq, *dq.stride()[:3], scale, *common), Tq, Tk,
            **meta)
    if need_bias_grad and not batched_bias_grad:
        _launch(_bwd_dbias_kernel,
                lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), triton.cdiv(Tq, m["BLOCK_M"]), H),
                (q, k, v, bias, pad, dout, lse, delta, dbias, *dbias.stride(), B, *common),
                Tq, Tk, **meta)
    return dq, dk, dv, (dbias if need_bias_grad else None)


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

    def _configs(shapes):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in shapes]

    def _shape(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    def _prune(configs, named_args, plain_only=frozenset(), **kwargs):
        """Drop blocks far larger than the sequence (T=197 needs no 256 x 256 tiles of work), and
        the `plain_only` tiles where there is a bias or dropout."""
        bucket = named_args["T_BUCKET"]
        plain = not kwargs.get("HAS_BIAS") and not kwargs.get("DROPOUT")
        kept = [c for c in configs
                if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(bucket, 64)
                and (plain or _shape(c) not in plain_only)]
        return kept or configs[:1]

    # Each list holds only configs that compile for the H100 (sm_90) without register spills at
    # the base configs' launches (python -m kernels.compile_check, with triton 3.6 and 3.9). With
    # the relative-position bias and dropout (image v1's student) the 128-row tiles and the
    # 64 x 64 tiles with 4 warps spilled in the forward, dK/dV and d(bias) kernels (255 registers,
    # 0.1-4 KB of spill stores), 64 x 256 everywhere, 32 x 128 (dQ) and 32 x 64 (forward) at
    # text's shapes: the lists hold 32- and 64-row tiles, 8 warps for a 64 x 64 forward, and keep
    # the larger forward tiles (the second list of _tuned) for launches without bias and dropout
    # (the EMA teacher, image v2). The first config of a list is _prune's fallback.
    _FWD_CONFIGS = [(64, 64, 8, 3), (64, 32, 4, 3)], [(128, 64, 8, 3), (128, 128, 8, 2)]
    _DKDV_CONFIGS = [(32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)], []
    _DQ_CONFIGS = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)], []
    _DBIAS_CONFIGS = [(64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)], []
    _KEY = ["T_BUCKET", "BLOCK_D", "HAS_BIAS", "HAS_PAD", "DROPOUT"]

    def _tuned(lists):
        """Autotuned on _KEY over everywhere + plain-only configs (see _prune)."""
        everywhere, plain_only = lists
        prune = functools.partial(_prune, plain_only=frozenset(plain_only))

        def wrap(fn):
            return triton.autotune(_configs(everywhere + plain_only), key=_KEY,
                                   prune_configs_by={"early_config_prune": prune})(fn)
        return wrap

    @triton.jit
    def _scores(q, k, bias_ptrs, pad_ptrs, row_ok, key_ok, qk_scale, HAS_BIAS: tl.constexpr,
                HAS_PAD: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """BLOCK_M x BLOCK_N base-2 logits (q k^T * scale + bias) * log2(e); -inf where excluded."""
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k).to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_ptrs, mask=row_ok[:, None] & key_ok[None, :],
                         other=0.0).to(tl.float32) * 1.4426950408889634
        if HAS_PAD:
            key_ok = key_ok & (tl.load(pad_ptrs, mask=key_ok, other=1) == 0)
        return tl.where(key_ok[None, :], s, float("-inf"))

    @triton.jit
    def _keep(seed, bh, offs_m, offs_n, T_K, dropout_p):
        """The dropout keep mask of one tile: philox keyed by (seed, b*H + h), counter i*Tk + j."""
        offsets = (offs_m[:, None] * T_K + offs_n[None, :]).to(tl.int32)
        return tl.rand(seed + bh, offsets) >= dropout_p

    @triton.jit
    def _tile_grads(q, k, v, do, lse, delta, bias_ptrs, pad_ptrs, offs_m, offs_n, row_ok, key_ok,
                    seed, bh, T_K, qk_scale, dropout_p, HAS_BIAS: tl.constexpr,
                    HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                    DOT_DTYPE: tl.constexpr):
        """One tile's (P after dropout, dS = d loss / d logits): both BLOCK_M x BLOCK_N fp32."""
        s = _scores(q, k, bias_ptrs, pad_ptrs, row_ok, key_ok, qk_scale, HAS_BIAS, HAS_PAD,
                    PRECISION, DOT_DTYPE)
        # L = +inf on rows without keys (and on rows past T_Q): P = 0 there, never NaN.
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v).to(DOT_DTYPE), input_precision=PRECISION)
        p_drop = p
        if DROPOUT:
            keep = _keep(seed, bh, offs_m, offs_n, T_K, dropout_p)
            p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        return p_drop, p * (dp - delta[:, None])

    @triton.jit
    def _fwd_kernel(
        Q, K, V, Bias, Pad, Out, Lse,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        H, T_Q, T_K, HEAD_DIM, qk_scale, dropout_p, seed, T_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
        PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        row_ok = offs_m < T_Q
        d_ok = offs_d < HEAD_DIM
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_ptrs = K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :]
        v_ptrs = V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :]
        bias_ptrs = Bias + b * s_bb + h * s_bh + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn
        pad_ptrs = Pad + b * s_pb + offs_n * s_pn
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, T_K, BLOCK_N):
            key_ok = offs_n < T_K - start_n
            kv_ok = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
            s = _scores(q, k, bias_ptrs, pad_ptrs, row_ok, key_ok, qk_scale, HAS_BIAS, HAS_PAD,
                        PRECISION, DOT_DTYPE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Until a row has seen an admissible key its max is -inf; subtracting 0 instead keeps
            # exp2(-inf - -inf) = NaN out (p and alpha are then exactly 0).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_keep(seed, bh, offs_m, start_n + offs_n, T_K, dropout_p), p, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE),
                                                input_precision=PRECISION)
            m_i = m_new
            k_ptrs += BLOCK_N * s_kn
            v_ptrs += BLOCK_N * s_vn
            bias_ptrs += BLOCK_N * s_bn
            pad_ptrs += BLOCK_N * s_pn
        empty = l_i == 0.0
        inv_l = 1.0 / tl.where(empty, 1.0, l_i)
        if DROPOUT:
            inv_l = inv_l / (1.0 - dropout_p)
        out = tl.where(empty[:, None], 0.0, acc * inv_l[:, None])
        tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Lse + bh.to(tl.int64) * T_Q + offs_m, lse, mask=row_ok)

    @triton.jit
    def _delta_kernel(Out, dOut, Delta, s_ob, s_oh, s_om, s_db, s_dh, s_dm, H, T_Q, HEAD_DIM,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        ok = (offs_m < T_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :],
                    mask=ok, other=0.0)
        do = tl.load(dOut + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :],
                     mask=ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta + bh.to(tl.int64) * T_Q + offs_m, delta, mask=offs_m < T_Q)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, Bias, Pad, dOut, Lse, Delta, dK, dV, dBias,
        s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn, s_gb, s_gh, s_gm, s_gn, scale,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        H, T_Q, T_K, HEAD_DIM, qk_scale, dropout_p, seed, T_BUCKET,
        BIAS_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = offs_d < HEAD_DIM
        key_ok = offs_n < T_K
        kv_ok = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :],
                    mask=kv_ok, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :],
                    mask=kv_ok, other=0.0)
        q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
        do_ptrs = dOut + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :]
        bias_ptrs = Bias + b * s_bb + h * s_bh + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn
        dbias_ptrs = dBias + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_n[None, :] * s_gn
        pad_ptrs = Pad + b * s_pb + offs_n * s_pn
        lse_ptrs = Lse + bh.to(tl.int64) * T_Q + offs_m
        delta_ptrs = Delta + bh.to(tl.int64) * T_Q + offs_m
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, T_Q, BLOCK_M):
            row_ok = offs_m < T_Q - start_m
            q_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptrs, mask=q_ok, other=0.0)
            do = tl.load(do_ptrs, mask=q_ok, other=0.0)
            lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
            p_drop, ds = _tile_grads(q, k, v, do, lse, delta, bias_ptrs, pad_ptrs,
                                     start_m + offs_m, offs_n, row_ok, key_ok, seed, bh, T_K,
                                     qk_scale, dropout_p, HAS_BIAS, HAS_PAD, DROPOUT, PRECISION,
                                     DOT_DTYPE)
            dv += tl.dot(tl.trans(p_drop.to(do.dtype)).to(DOT_DTYPE), do.to(DOT_DTYPE),
                         input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)).to(DOT_DTYPE), q.to(DOT_DTYPE),
                         input_precision=PRECISION)
            if BIAS_GRAD:
                tl.store(dbias_ptrs, ds.to(dBias.dtype.element_ty),
                         mask=row_ok[:, None] & key_ok[None, :])
            q_ptrs += BLOCK_M * s_qm
            do_ptrs += BLOCK_M * s_om
            bias_ptrs += BLOCK_M * s_bm
            dbias_ptrs += BLOCK_M * s_gm
            lse_ptrs += BLOCK_M
            delta_ptrs += BLOCK_M
        tl.store(dK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :],
                 (dk * scale).to(dK.dtype.element_ty), mask=kv_ok)
        tl.store(dV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :],
                 dv.to(dV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, Bias, Pad, dOut, Lse, Delta, dQ, s_dqb, s_dqh, s_dqm, scale,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        H, T_Q, T_K, HEAD_DIM, qk_scale, dropout_p, seed, T_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
        PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        row_ok = offs_m < T_Q
        d_ok = offs_d < HEAD_DIM
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :],
                    mask=q_ok, other=0.0)
        do = tl.load(dOut + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :],
                     mask=q_ok, other=0.0)
        lse = tl.load(Lse + bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0)
        k_ptrs = K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :]
        v_ptrs = V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :]
        bias_ptrs = Bias + b * s_bb + h * s_bh + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn
        pad_ptrs = Pad + b * s_pb + offs_n * s_pn
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, T_K, BLOCK_N):
            key_ok = offs_n < T_K - start_n
            kv_ok = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
            _, ds = _tile_grads(q, k, v, do, lse, delta, bias_ptrs, pad_ptrs, offs_m,
                                start_n + offs_n, row_ok, key_ok, seed, bh, T_K, qk_scale,
                                dropout_p, HAS_BIAS, HAS_PAD, DROPOUT, PRECISION, DOT_DTYPE)
            dq += tl.dot(ds.to(k.dtype).to(DOT_DTYPE), k.to(DOT_DTYPE), input_precision=PRECISION)
            k_ptrs += BLOCK_N * s_kn
            v_ptrs += BLOCK_N * s_vn
            bias_ptrs += BLOCK_N * s_bn
            pad_ptrs += BLOCK_N * s_pn
        tl.store(dQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :],
                 (dq * scale).to(dQ.dtype.element_ty), mask=q_ok)

    @triton.jit
    def _bwd_dbias_kernel(
        Q, K, V, Bias, Pad, dOut, Lse, Delta, dBias, s_gh, s_gm, s_gn, B,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        H, T_Q, T_K, HEAD_DIM, qk_scale, dropout_p, seed, T_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
        PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """d(bias) of a bias shared over the batch: one BLOCK_M x BLOCK_N tile, summed over b."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        h = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
        row_ok = offs_m < T_Q
        key_ok = offs_n < T_K
        d_ok = offs_d < HEAD_DIM
        q_ok = row_ok[:, None] & d_ok[None, :]
        kv_ok = key_ok[:, None] & d_ok[None, :]
        q_ptrs = Q + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :]
        do_ptrs = dOut + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :]
        k_ptrs = K + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :]
        v_ptrs = V + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :]
        bias_ptrs = Bias + h * s_bh + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn
        pad_ptrs = Pad + offs_n * s_pn
        lse_ptrs = Lse + h * T_Q + offs_m
        delta_ptrs = Delta + h * T_Q + offs_m
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for b in range(0, B):
            q = tl.load(q_ptrs, mask=q_ok, other=0.0)
            do = tl.load(do_ptrs, mask=q_ok, other=0.0)
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
            lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
            _, ds = _tile_grads(q, k, v, do, lse, delta, bias_ptrs, pad_ptrs, offs_m, offs_n,
                                row_ok, key_ok, seed, b * H + h, T_K, qk_scale, dropout_p,
                                HAS_BIAS, HAS_PAD, DROPOUT, PRECISION, DOT_DTYPE)
            acc += ds
            q_ptrs += s_qb
            do_ptrs += s_ob
            k_ptrs += s_kb
            v_ptrs += s_vb
            pad_ptrs += s_pb
            lse_ptrs += H * T_Q
            delta_ptrs += H * T_Q
        tl.store(dBias + h * s_gh + offs_m[:, None] * s_gm + offs_n[None, :] * s_gn,
                 acc.to(dBias.dtype.element_ty), mask=row_ok[:, None] & key_ok[None, :])

    _fwd_kernel = _tuned(_FWD_CONFIGS)(_fwd_kernel)
    _bwd_dkdv_kernel = _tuned(_DKDV_CONFIGS)(_bwd_dkdv_kernel)
    _bwd_dq_kernel = _tuned(_DQ_CONFIGS)(_bwd_dq_kernel)
    _bwd_dbias_kernel = _tuned(_DBIAS_CONFIGS)(_bwd_dbias_kernel)
