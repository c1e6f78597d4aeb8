"""Multi-head attention core: q, k, v B x H x T x D, key padding mask, additive bias.

    out = softmax(q k^T * scale + bias, padded keys -inf) v          (dropout on the probabilities)

`attention_reference` is the plain math (the ground truth). The public call,
d2v_kernels.ops.attention, runs one of BACKENDS here (`run_backend`; which one a call takes:
d2v_kernels.attention_dispatch.attention_backend):
  "triton"      our flash kernels below: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
                fp16/bf16/fp32, D == Dv <= 128, any mask / bias / dropout;
  "flash_attn"  the flash-attn package when installed: CUDA fp16/bf16, no bias, no padding;
  "sdpa"        torch's scaled_dot_product_attention (everything, e.g. float64, CPU);
  "flex"        torch's FlexAttention: the bias as a score_mod, the padding as a block mask; no
                dropout.
Meta and fake tensors (the plan's FLOP and memory counts), and the Triton path while torch.compile
traces, take the d2v op pair of d2v_kernels.ops instead. On CUDA the choice is measured (d2v_kernels.attention_dispatch): the first call of each shape and
feature set times every candidate that computes the same thing (ours, each SDPA backend,
FlexAttention, flash-attn) and keeps the fastest. Elsewhere the first supporting path in the order
above is taken. D2V_ATTENTION=triton|flash_attn|sdpa|flex forces one (when it supports the
arguments). A query row whose every key is excluded (a fully padded sample, or a bias row of -inf)
attends to nothing: its output is 0, and neither its output nor its gradients are NaN.
`skip_padded_queries=True` (self-attention, Tq == Tk) makes the queries at padded positions
padding too: their rows attend to nothing (output 0, no gradient), and cost nothing -- for callers
that never read the outputs at padded positions.

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
  padding     each program reads its sample's row of the key padding mask once: n = 1 + the last
              admissible key. Key blocks at or past n are never visited (their dK, dV are 0), the
              blocks below n run unmasked and only the block holding n applies the mask -- unless
              the row has padded keys below n (not a right-padding mask: a "hole"), when every
              block loads its mask slice (the general path, a runtime branch per block). dK/dV
              need no key mask at all: a padded key's column of P only reaches its own dK/dV
              row, which is stored as 0. With skip_padded_queries, query blocks at or past n
              store 0 and L = +inf at once, and the backward loops stop at n too.
  bias grad   d(bias) = dS. A B x H x Tq x Tk bias owns one gradient element per dS element: the
              dK/dV kernel stores its dS tile there (the gradient itself, not a temporary). A bias
              shared over the batch (H x Tq x Tk, e.g. BEiT's relative position bias) needs the
              sum over b of dS: _bwd_dbias_kernel has grid (tiles of Tq x Tk, H, C) and each
              program loops over the samples of one of C batch chunks, recomputing its S / dP
              tile (the bias tile is loaded once), summing dS in fp32 registers and storing the
              chunk's partial once. The C partials (C x H x Tq x Tk fp32) are summed in a fixed
              order (torch.sum over the chunk dimension): no atomics, a deterministic gradient.
              C fills whole waves (bias_chunks: the grid's time in waves x samples per chunk,
              minimized; one program per SM is a wave). Folding the
              sum into the dK/dV kernel (which has dS already) was measured by registers and
              instructions on sm_90: its per-sample loop needs the dS sums of all query blocks
              at once -- in registers only 64 x 16 tiles fitted (255 registers, spilling with
              triton 3.6), about twice dK/dV's instructions per element; in memory (a read-
              modify-write of the partial per tile) every tile config spilled. The separate
              kernel costs two more matmuls per tile, about a dQ kernel's work (an estimate).
  dropout     the forward draws the keep mask and stores it bit-packed (B x H x Tq x Tk / 8
              bytes, the tiles' bit order below), the backward kernels read it back: the same
              mask bit for bit, no random numbers regenerated. One Philox-4x32-10 call (key =
              seed, counter = (byte index, b*H + h, 0, 0)) gives 8 16-bit uniforms: bit k of a
              byte is lo/hi half (k // 4) of word k % 4 >= round(p * 65536). So p is rounded to a
              multiple of 2^-16 (|error| <= 7.6e-6) and the kept probabilities are scaled by
              1 / (1 - that p): exactly unbiased. A byte covers rows {r, r + 8} x keys {c, c + 1,
              c + 8, c + 9} (r = 16a + (0..7), c = 16g + 2 * (0..3)): the eight elements one thread
              holds in the MMA accumulator layout, so the bits unpack in registers, with no shared
              memory round trip. The seed is a 1-element int64 tensor on the inputs' device,
              drawn by flash_forward from that device's torch generator (torch.manual_seed
              reproduces it) and read by the kernel: no device sync, no CPU op in a compiled graph
              (the draw happens inside the d2v op, so CUDA graphs replay it afresh each step).
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
import weakref

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: every call takes flash_attn, SDPA or flex
    triton = None

BACKENDS = ("triton", "flash_attn", "sdpa", "flex")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 128
# (BLOCK_M, BLOCK_N) for every kernel under TRITON_INTERPRET=1. None: one tile spans the whole
# sequence (up to 256), so each program runs its loop once -- the interpreter's cost is per op, not
# per element, and the models run interpreted in the test suite. Tests set small blocks to cover the
# multi-block paths.
INTERPRET_BLOCKS = None
_INTERPRET_MAX_BLOCK = 256
_LOG2E = 1.4426950408889634


def _check(q, k, v, key_padding_mask, attn_bias, skip_padded_queries=False):
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
    if skip_padded_queries and tq != tk:
        raise ValueError(f"attention: skip_padded_queries needs self-attention (Tq == Tk), got "
                         f"Tq={tq}, Tk={tk}")


def _additive_mask(q, key_padding_mask, attn_bias):
    """Float mask broadcastable to B x H x Tq x Tk (-inf at padded keys), or None."""
    mask = None if attn_bias is None else attn_bias.to(q.dtype)
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def _zero_padded_queries(out, key_padding_mask, skip_padded_queries):
    if skip_padded_queries and key_padding_mask is not None:
        return out.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return out


def attention_reference(q, k, v, key_padding_mask=None, attn_bias=None, scale=None,
                        dropout_p=0.0, skip_padded_queries=False):
    """softmax(q k^T * scale + bias, padded keys -inf) v: B x H x Tq x Dv; empty rows give 0."""
    _check(q, k, v, key_padding_mask, attn_bias, skip_padded_queries)
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
    return _zero_padded_queries(torch.matmul(probs, v), key_padding_mask, skip_padded_queries)


def run_backend(backend, q, k, v, key_padding_mask=None, attn_bias=None, scale=None,
                dropout_p=0.0, skip_padded_queries=False):
    """One call of `backend` (a name of BACKENDS, or "sdpa_<flash|efficient|cudnn|math>": SDPA
    restricted to that kernel), with d2v_kernels.ops.attention's contract."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "triton":  # eager; while torch.compile traces, d2v_kernels.ops.attention
        return _FlashAttention.apply(q, k, v, key_padding_mask, attn_bias, scale,
                                     float(dropout_p), skip_padded_queries)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=dropout_p, softmax_scale=scale)
        return out.transpose(1, 2)
    if backend == "flex":
        return _flex(q, k, v, key_padding_mask, attn_bias, scale, skip_padded_queries)
    if backend.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, _SDPA_KERNELS[backend])]):
            return _sdpa(q, k, v, key_padding_mask, attn_bias, scale, dropout_p,
                         skip_padded_queries)
    return _sdpa(q, k, v, key_padding_mask, attn_bias, scale, dropout_p, skip_padded_queries)


_SDPA_KERNELS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}


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


def supports(name, q, k, v, key_padding_mask=None, attn_bias=None, dropout_p=0.0) -> bool:
    """Whether backend `name` computes attention() for these arguments."""
    if name == "triton":
        return _triton_supports(q, k, v, attn_bias, dropout_p)
    if name == "flash_attn":
        return _flash_attn_supports(q, k, v, key_padding_mask, attn_bias)
    if name == "flex":
        return _flex_supports(q, k, v, attn_bias, dropout_p)
    return name == "sdpa" or name in _SDPA_KERNELS


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
            and 0 <= dropout_p < 1
            # Philox counters (a head's dropout byte index) are 32-bit
            and (dropout_p == 0 or q.shape[2] * k.shape[2] < 2**34))


def _flash_attn_supports(q, k, v, key_padding_mask, attn_bias) -> bool:
    return (q.device.type == "cuda" and key_padding_mask is None and attn_bias is None
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and q.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and importlib.util.find_spec("flash_attn") is not None)


def _flex_supports(q, k, v, attn_bias, dropout_p) -> bool:
    """FlexAttention has no dropout, needs a head dim >= 16 and has no backward on CPU."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, attn_bias))
    return (dropout_p == 0 and q.dtype != torch.float64 and k.dtype == v.dtype == q.dtype
            and (q.device.type == "cuda" or not needs_grad)
            and q.shape[-1] == v.shape[-1] and q.shape[-1] >= 16
            and (attn_bias is None or attn_bias.is_floating_point())
            and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None)


def _sdpa(q, k, v, key_padding_mask, attn_bias, scale, dropout_p, skip_padded_queries=False):
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
    return _zero_padded_queries(out, key_padding_mask, skip_padded_queries)


# FlexAttention: eager calls go through one torch.compile'd flex_attention (eager flex is a slow
# reference); the block mask of the last padding mask seen is reused (every layer of a forward
# passes the same mask tensor).
_flex_state: dict = {}


def _flex(q, k, v, key_padding_mask, attn_bias, scale, skip_padded_queries=False):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()  # CPU flex refuses leaves, even in no_grad
    score_mod = None
    if attn_bias is not None:
        bias = attn_bias.to(torch.float32)
        if bias.ndim == 3:
            def score_mod(score, b, h, i, j):
                return score + bias[h, i, j]
        else:
            def score_mod(score, b, h, i, j):
                return score + bias[b, h, i, j]
    block_mask = None
    if key_padding_mask is not None:
        block_mask = _flex_block_mask(key_padding_mask, q.shape[2], skip_padded_queries,
                                      create_block_mask)
    fn = flex_attention
    if not torch.compiler.is_compiling() and q.device.type == "cuda":
        fn = _flex_state.get("compiled")
        if fn is None:
            fn = _flex_state["compiled"] = torch.compile(flex_attention, dynamic=False)
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    # rows with no admissible key: flex gives 0 there already (its lse is -inf); a fully masked
    # sample's rows may still carry NaN through a -inf bias row, as in SDPA
    return _zero_padded_queries(out, key_padding_mask, skip_padded_queries)


def _flex_block_mask(key_padding_mask, t_q, skip_padded_queries, create_block_mask):
    cached = _flex_state.get("mask")
    if cached is not None and cached[0]() is key_padding_mask and cached[1] == (
            t_q, skip_padded_queries):
        return cached[2]
    pad = key_padding_mask

    if skip_padded_queries:
        def mask_mod(b, h, i, j):
            return ~pad[b, j] & ~pad[b, i]
    else:
        def mask_mod(b, h, i, j):
            return ~pad[b, j]
    block_mask = create_block_mask(mask_mod, pad.shape[0], None, t_q, pad.shape[1],
                                   device=pad.device)
    if not torch.compiler.is_compiling():
        _flex_state["mask"] = (weakref.ref(pad), (t_q, skip_padded_queries), block_mask)
    return block_mask


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, attn_bias, scale, dropout_p,
                skip_padded_queries):
        out, lse, keep = flash_forward(q, k, v, key_padding_mask, attn_bias, scale, dropout_p,
                                       skip_padded_queries=skip_padded_queries)
        ctx.save_for_backward(q, k, v, key_padding_mask, attn_bias, out, lse, keep)
        ctx.scale, ctx.dropout_p, ctx.skip = scale, dropout_p, skip_padded_queries
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pad, bias, out, lse, keep = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias = flash_backward(dout, q, k, v, pad, bias, out, lse, ctx.scale,
                                           ctx.dropout_p, keep, need_bias,
                                           skip_padded_queries=ctx.skip)
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


def new_like(x, dtype=None):
    """An empty tensor shaped like x with the strides the kernels' outputs take: x's own when its
    last dimension is contiguous (a B x T x H x D projection viewed as B x H x T x D stays in that
    memory order, so the caller's transpose back is free), else contiguous. d2v_kernels.ops' fake
    implementations declare exactly these strides."""
    if x.stride(-1) == 1:
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


def dropout_threshold(dropout_p: float) -> tuple[int, float]:
    """(16-bit threshold, scale of the kept probabilities): an element is kept when its 16-bit
    uniform is >= the threshold, so the realized drop probability is threshold / 65536."""
    thr = min(65535, int(round(dropout_p * 65536)))
    return thr, 1.0 / (1.0 - thr / 65536)


def dropout_mask_shape(b: int, h: int, t_q: int, t_k: int) -> tuple[int, int, int, int]:
    """B x H x R x C bytes of a bit-packed keep mask: 8 bits per 2 rows x 4 keys (see the module
    docstring), both lengths rounded up to 16."""
    return b, h, triton.cdiv(t_q, 16) * 8, triton.cdiv(t_k, 16) * 4


def unpack_dropout_mask(keep: torch.Tensor, t_q: int, t_k: int) -> torch.Tensor:
    """The B x H x Tq x Tk bool keep mask a bit-packed one stands for (a reference for tests)."""
    b, h, r8, c4 = keep.shape
    bits = (keep[..., None].to(torch.int32) >> torch.arange(8, device=keep.device)) & 1
    # bit k = e + 2 * b + 4 * f of byte (16a + c, 4g + d) is row 16a + 8b + c, key 16g + 8f + 2d + e
    bits = bits.view(b, h, r8 // 8, 8, c4 // 4, 4, 2, 2, 2)  # a, c, g, d, f, b, e
    bits = bits.permute(0, 1, 2, 7, 3, 4, 6, 5, 8)  # a, b, c, g, f, d, e
    return bits.reshape(b, h, r8 * 2, c4 * 4)[:, :, :t_q, :t_k].bool()


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


def _interpret_blocks(t_q, t_k):
    return INTERPRET_BLOCKS or (min(_t_bucket(t_q), _INTERPRET_MAX_BLOCK),
                                min(_t_bucket(t_k), _INTERPRET_MAX_BLOCK))


def _launch(kernel, grid, args, t_q, t_k, **meta):
    """Interpreter: the raw kernel with INTERPRET_BLOCKS (or whole-sequence tiles); CUDA: its
    autotuned twin picks blocks (those `meta` fixes excepted)."""
    if _interpret():
        block_m, block_n = _interpret_blocks(t_q, t_k)
        kernel.fn[grid](*args, **{"BLOCK_M": block_m, "BLOCK_N": block_n, **meta})
    else:
        kernel[grid](*args, **meta)


def _flags(q, key_padding_mask, attn_bias, dropout_p, skip_padded_queries) -> dict:
    d = q.shape[-1]
    return dict(HAS_BIAS=attn_bias is not None, HAS_PAD=key_padding_mask is not None,
                SKIP_PAD_Q=bool(skip_padded_queries and key_padding_mask is not None),
                DROPOUT=dropout_p > 0, **_dot_args(q.dtype), HEAD_DIM=d, BLOCK_D=_head_block(d))


def flash_forward(q, k, v, key_padding_mask=None, attn_bias=None, scale=None, dropout_p=0.0,
                  seed=None, out=None, lse=None, keep=None, skip_padded_queries=False):
    """Triton forward -> (out B x H x Tq x D in q's dtype (new_like(q)), lse B x H x Tq fp32 in
    base 2, keep: the bit-packed dropout mask (dropout_mask_shape uint8) or None without
    dropout). seed: the dropout mask's Philox key, None (drawn here on q's device from torch's
    generator), an int (a fixed key, for tests) or a 1-element int64 tensor on q's device."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if out is None:
        out = new_like(q)
    if lse is None:
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    thr, drop_scale = dropout_threshold(dropout_p)
    if dropout_p > 0 and keep is None:
        keep = torch.empty(dropout_mask_shape(B, H, Tq, Tk), dtype=torch.uint8, device=q.device)
    seed = _seed_tensor(seed, q.device) if dropout_p > 0 else q  # q: a pointer never loaded
    pad, spb, spn = _mask_args(key_padding_mask, q)
    bias, sbb, sbh, sbm, sbn = _bias_args(attn_bias, q)
    _, _, r8, c4 = dropout_mask_shape(B, H, Tq, Tk)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_fwd_kernel, grid, (
        q, k, v, bias, pad, out, lse, q if keep is None else keep, seed,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        sbb, sbh, sbm, sbn, spb, spn,
        H, Tq, Tk, scale * _LOG2E, thr, drop_scale, r8, c4, _t_bucket(max(Tq, Tk))),
        Tq, Tk, **_flags(q, key_padding_mask, attn_bias, dropout_p, skip_padded_queries))
    return out, lse, keep


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The dropout key as the 1-element int64 device tensor the forward kernel loads."""
    if seed is None:  # a device op: captured into a CUDA graph, it draws afresh on each replay
        return torch.randint(0, 2**30, (1,), device=device)
    if isinstance(seed, torch.Tensor):
        if seed.shape != (1,) or seed.dtype != torch.int64 or seed.device != device:
            raise ValueError(f"flash_forward: seed must be a 1-element int64 tensor on {device}, "
                             f"got {tuple(seed.shape)} {seed.dtype} on {seed.device}")
        return seed
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


# The shared bias gradient's grid: 64 x 64 tiles x H x C batch chunks, each program looping over
# its chunk's samples. Its configs hold one 8-warp program per H100 SM, or two of 4 warps at
# about half the speed each (python -m benchmarks.compile_check --match _bwd_dbias: 145-248
# registers), so one program per SM is a wave. DBIAS_OVERHEAD: a program's fixed work (the bias
# tile loaded once, the fp32 partial stored once: 16 KB each) in units of one sample's work (four
# 8 KB operand tiles, S and dP recomputed): an estimate.
DBIAS_OVERHEAD = 0.5


def wave_chunks(b: int, per_chunk: int, wave: int) -> int:
    """The chunk count C in 1..b minimizing the grid's time, waves x work per program:
    ceil(per_chunk * C / wave) * (ceil(b / C) + DBIAS_OVERHEAD); ties go to the fewest chunks
    (fewer fp32 partials to write and sum), then C is evened out so that no chunk is empty.
    E.g. b = 128, 192 programs per chunk (H = 12, T = 197), 132 SMs: C = 2, 2.9 waves, 4% above
    the work / SMs bound; about 4 programs per SM (C = 3, the rule before) ran 4.4 waves (the
    fifth 36% full), 17% above it."""
    best = min(range(1, b + 1), key=lambda c: (
        triton.cdiv(per_chunk * c, wave) * (triton.cdiv(b, c) + DBIAS_OVERHEAD), c))
    return triton.cdiv(b, triton.cdiv(b, best))


def bias_chunks(b: int, h: int, t_q: int, t_k: int, device: torch.device) -> int:
    """How many batch chunks share a bias gradient's work (wave_chunks, one program per SM a
    wave); 2 when interpreted."""
    if device.type != "cuda":
        return min(b, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return wave_chunks(b, h * triton.cdiv(t_q, 64) * triton.cdiv(t_k, 64), sms)


def flash_backward(dout, q, k, v, key_padding_mask, attn_bias, out, lse, scale, dropout_p=0.0,
                   keep=None, need_bias_grad=False, dq=None, dk=None, dv=None, dbias=None,
                   skip_padded_queries=False, dbias_partial=None):
    """Triton backward: -> (dq, dk, dv (new_like q, k, v), dbias or None in the bias's shape and
    dtype). `keep`: the forward's bit-packed dropout mask. A shared bias's gradient is summed from
    C fp32 partials; `dbias_partial` (C x H x Tq x Tk fp32) receives them (tests), C from its
    shape, else bias_chunks decides."""
    q, k, v, out, dout = (_last_dim_contiguous(x) for x in (q, k, v, out, dout))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq = new_like(q) if dq is None else dq
    dk = new_like(k) if dk is None else dk
    dv = new_like(v) if dv is None else dv
    need_bias_grad = need_bias_grad and attn_bias is not None
    shared_bias_grad = need_bias_grad and attn_bias.ndim == 3
    batched_bias_grad = need_bias_grad and attn_bias.ndim == 4
    if batched_bias_grad:
        if dbias is None:
            dbias = torch.empty(attn_bias.shape, dtype=attn_bias.dtype, device=q.device)
        if key_padding_mask is not None:
            dbias.zero_()  # the blocks the padding skips are never visited
    if dropout_p > 0 and keep is None:
        raise ValueError("flash_backward: dropout_p > 0 needs the forward's keep mask")
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    block_d = _head_block(D)
    _delta_kernel[(triton.cdiv(Tq, 64), B * H)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], H, Tq, D,
        BLOCK_M=64, BLOCK_D=block_d)
    pad, spb, spn = _mask_args(key_padding_mask, q)
    bias, sbb, sbh, sbm, sbn = _bias_args(attn_bias, q)
    _, drop_scale = dropout_threshold(dropout_p)
    _, _, r8, c4 = dropout_mask_shape(B, H, Tq, Tk)
    common = (
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        sbb, sbh, sbm, sbn, spb, spn,
        B, H, Tq, Tk, scale * _LOG2E, scale, drop_scale, r8, c4, _t_bucket(max(Tq, Tk)))
    flags = _flags(q, key_padding_mask, attn_bias, dropout_p, skip_padded_queries)
    drop = q if keep is None else keep
    g = dbias if batched_bias_grad else q
    sdb = dbias.stride() if batched_bias_grad else (0, 0, 0, 0)
    _launch(_bwd_dkdv_kernel,
            lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), B * H),
            (q, k, v, bias, pad, dout, lse, delta, drop, dk, dv, g,
             *dk.stride()[:3], *dv.stride()[:3], *sdb, *common), Tq, Tk,
            BIAS_GRAD=batched_bias_grad, **flags)
    if shared_bias_grad:
        dbias = _shared_bias_backward(q, k, v, bias, pad, dout, lse, delta, drop, dbias,
                                      dbias_partial, attn_bias, common, flags)
    _launch(_bwd_dq_kernel,
            lambda m: (triton.cdiv(Tq, m["BLOCK_M"]), B * H),
            (q, k, v, bias, pad, dout, lse, delta, drop, dq, *dq.stride()[:3], *common), Tq, Tk,
            **flags)
    return dq, dk, dv, (dbias if need_bias_grad else None)


def _shared_bias_backward(q, k, v, bias, pad, dout, lse, delta, drop, dbias, partial,
                          attn_bias, common, flags):
    """The H x Tq x Tk gradient of a bias shared over the batch: C chunk partials (the module
    docstring), summed in a fixed order."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    if partial is None:
        chunks = bias_chunks(B, H, Tq, Tk, q.device)
        partial = torch.empty(chunks, H, Tq, Tk, dtype=torch.float32, device=q.device)
    chunks = partial.shape[0]
    grid = lambda m: (triton.cdiv(Tq, m["BLOCK_M"]) * triton.cdiv(Tk, m["BLOCK_N"]),  # noqa
                      H, chunks)
    _launch(_bwd_dbias_kernel, grid, (q, k, v, bias, pad, dout, lse, delta, drop, partial,
                                      *partial.stride(), triton.cdiv(B, chunks), *common),
            Tq, Tk, **flags)
    total = partial[0] if chunks == 1 else partial.sum(0)
    if dbias is None:
        return total.to(attn_bias.dtype)
    return dbias.copy_(total)


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

    def _configs(shapes):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in shapes]

    def _shape(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    def _prune(configs, named_args, no_bias=frozenset(), plain=frozenset(), **kwargs):
        """Drop blocks far larger than the sequence (T=197 needs no 256 x 256 tiles of work), the
        `no_bias` tiles where there is a bias and the `plain` ones where there is a bias or
        dropout."""
        bucket = named_args["T_BUCKET"]
        has_bias, dropout = kwargs.get("HAS_BIAS"), kwargs.get("DROPOUT")

        def allowed(c):
            if _shape(c) in plain:
                return not has_bias and not dropout
            return not has_bias or _shape(c) not in no_bias
        kept = [c for c in configs
                if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(bucket, 64) and allowed(c)]
        return kept or configs[:1]

    # (BLOCK_M, BLOCK_N, warps, stages): configs everywhere, without a bias, without bias and
    # dropout. Each compiles for the H100 (sm_90) without register spills at the base configs'
    # launches where _prune keeps it (python -m benchmarks.compile_check, triton 3.6 and 3.9: 64 x 128
    # tiles spilled with the bias, 128 x 128 with bias or dropout, dK/dV on 4 warps with the bias,
    # 64 x 128 dK/dV everywhere). The first config is _prune's fallback.
    _FWD_CONFIGS = ([(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
                    [(64, 128, 8, 2)], [(128, 128, 8, 2)])
    _DKDV_CONFIGS = [(128, 64, 8, 2), (64, 64, 8, 2)], [(64, 64, 4, 2), (32, 64, 4, 2)], []
    _DQ_CONFIGS = [(128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2)], [(64, 128, 8, 2)], []
    # The shared bias's gradient (S and dP recomputed, an fp32 tile summed over samples).
    _DBIAS_CONFIGS = [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)], [], []
    _KEY = ["T_BUCKET", "BLOCK_D", "HAS_BIAS", "HAS_PAD", "SKIP_PAD_Q", "DROPOUT"]

    def _tuned(lists, **kwargs):
        """Autotuned on _KEY over the three lists (see _prune)."""
        everywhere, no_bias, plain = lists
        prune = functools.partial(_prune, no_bias=frozenset(no_bias), plain=frozenset(plain))

        def wrap(fn):
            return triton.autotune(_configs(everywhere + no_bias + plain), key=_KEY,
                                   prune_configs_by={"early_config_prune": prune}, **kwargs)(fn)
        return wrap

    @triton.jit
    def _key_extent(pad_row, s_pn, T_K, HAS_PAD: tl.constexpr):
        """(n, holes) of one sample: keys [n, T_K) are all padding (n = 1 + the last admissible
        key, 0 when none), holes = some key below n is padding too (not a right-padding row)."""
        if HAS_PAD:
            last = tl.full([], 0, tl.int32)
            count = tl.full([], 0, tl.int32)
            for j0 in range(0, T_K, 256):
                offs = j0 + tl.arange(0, 256)
                ok = tl.load(pad_row + offs * s_pn, mask=offs < T_K, other=1) == 0
                last = tl.maximum(last, tl.max(tl.where(ok, offs + 1, 0), 0))
                count += tl.sum(ok.to(tl.int32), 0)
            return last, count < last
        else:
            return T_K, T_K < 0

    @triton.jit
    def _load_rows(ptrs, rows_ok, d_ok, ROWS: tl.constexpr, COLS: tl.constexpr):
        """A rows x D tile; ROWS / COLS: whether the row / head-dim bounds need a mask."""
        if ROWS:
            if COLS:
                return tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            if COLS:
                return tl.load(ptrs, mask=d_ok[None, :], other=0.0)
            else:
                return tl.load(ptrs)

    @triton.jit
    def _drop_bytes(start_m, start_n, R8, C4, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Offsets (within a head) and bounds of the keep-mask bytes of a tile, dims [a, c, g, d]:
        byte (16a + c, 4g + d) holds rows start_m + 16a + {c, c + 8}, keys start_n + 16g +
        {2d, 2d + 1, 2d + 8, 2d + 9}."""
        a = tl.arange(0, BLOCK_M // 16)[:, None, None, None]
        c = tl.arange(0, 8)[None, :, None, None]
        g = tl.arange(0, BLOCK_N // 16)[None, None, :, None]
        d = tl.arange(0, 4)[None, None, None, :]
        r8 = (start_m // 16 + a) * 8 + c
        c4 = (start_n // 16 + g) * 4 + d
        return r8 * C4 + c4, (r8 < R8) & (c4 < C4)

    @triton.jit
    def _unpack_keep(byte, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """[a, c, g, d] bytes -> the BLOCK_M x BLOCK_N keep mask: bit e + 2b + 4f of byte
        (a, c, g, d) is row 16a + 8b + c, key 16g + 8f + 2d + e. The joined dimensions are those a
        thread holds in the MMA accumulator layout: no data moves between threads."""
        x = byte.to(tl.int32)
        lo = tl.join(tl.join((x & 1) != 0, (x & 2) != 0), tl.join((x & 4) != 0, (x & 8) != 0))
        hi = tl.join(tl.join((x & 16) != 0, (x & 32) != 0),
                     tl.join((x & 64) != 0, (x & 128) != 0))
        keep = tl.permute(tl.join(lo, hi), (0, 5, 1, 2, 6, 3, 4))  # a, b, c, g, f, d, e
        return tl.reshape(keep, (BLOCK_M, BLOCK_N))

    @triton.jit
    def _draw_keep(drop_ptr, seed, bh, start_m, start_n, R8, C4, thr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Draws a tile's keep mask, stores its bytes and returns it unpacked (the backward reads
        the bytes). Byte i of head bh: Philox-4x32-10(key seed, counter (i, bh, 0, 0)) -> words
        w0..w3; bit k = (half k // 4 of word k % 4) >= thr."""
        offs, ok = _drop_bytes(start_m, start_n, R8, C4, BLOCK_M, BLOCK_N)
        z = tl.zeros_like(offs).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, offs.to(tl.uint32), z + bh.to(tl.uint32), z, z)
        t = thr.to(tl.uint32)
        byte = (((w0 & 0xFFFF) >= t).to(tl.int32) | (((w1 & 0xFFFF) >= t).to(tl.int32) << 1)
                | (((w2 & 0xFFFF) >= t).to(tl.int32) << 2)
                | (((w3 & 0xFFFF) >= t).to(tl.int32) << 3)
                | (((w0 >> 16) >= t).to(tl.int32) << 4) | (((w1 >> 16) >= t).to(tl.int32) << 5)
                | (((w2 >> 16) >= t).to(tl.int32) << 6) | (((w3 >> 16) >= t).to(tl.int32) << 7))
        tl.store(drop_ptr + offs, byte.to(tl.uint8), mask=ok)
        return _unpack_keep(byte, BLOCK_M, BLOCK_N)

    @triton.jit
    def _read_keep(drop_ptr, start_m, start_n, R8, C4, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        offs, ok = _drop_bytes(start_m, start_n, R8, C4, BLOCK_M, BLOCK_N)
        return _unpack_keep(tl.load(drop_ptr + offs, mask=ok, other=0), BLOCK_M, BLOCK_N)

    @triton.jit
    def _key_block_scores(q, k_ptrs, v_ptrs, bias_ptrs, pad_row, start_n, offs_n, d_ok, row_ok,
                          kv_end, holes, T_K, s_kn, s_vn, s_bn, s_pn, qk_scale,
                          HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, MASKED: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          D_MASKED: tl.constexpr):
        """A key block's K, V and base-2 scores of the resident queries (the forward's and dQ's
        inner loop): bias added, keys past the sequence or padded set to -inf. MASKED: the block
        holding the sequence's end (or any block of a mask with holes) is checked key by key."""
        cols = start_n + offs_n
        in_k = cols < T_K
        k = _load_rows(k_ptrs + start_n * s_kn, in_k, d_ok, MASKED, D_MASKED)
        v = _load_rows(v_ptrs + start_n * s_vn, in_k, d_ok, MASKED, D_MASKED)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k).to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            b_ok = row_ok[:, None]
            if MASKED:
                b_ok = b_ok & in_k[None, :]
            s += tl.load(bias_ptrs + start_n * s_bn, mask=b_ok, other=0.0).to(tl.float32) \
                * 1.4426950408889634
        if MASKED:
            ok = cols < kv_end
            if HAS_PAD:
                ok = ok & (tl.load(pad_row + cols * s_pn, mask=in_k, other=1) == 0)
            s = tl.where(ok[None, :], s, float("-inf"))
        else:
            if HAS_PAD:
                if holes:
                    ok = tl.load(pad_row + cols * s_pn) == 0
                    s = tl.where(ok[None, :], s, float("-inf"))
        return s, k, v

    @triton.jit
    def _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, pad_row, drop_ptr, start_m,
                   start_n, offs_n, d_ok, row_ok, kv_end, holes, T_K, s_kn, s_vn, s_bn, s_pn,
                   qk_scale, seed, bh, thr, R8, C4, HAS_BIAS: tl.constexpr,
                   HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                   PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, D_MASKED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One key block of the online softmax; MASKED: the block holding the sequence's end."""
        s, k, v = _key_block_scores(q, k_ptrs, v_ptrs, bias_ptrs, pad_row, start_n, offs_n, d_ok,
                                    row_ok, kv_end, holes, T_K, s_kn, s_vn, s_bn, s_pn, qk_scale,
                                    HAS_BIAS, HAS_PAD, MASKED, PRECISION, DOT_DTYPE, D_MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Until a row has seen an admissible key its max is -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out (p and alpha are then exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _draw_keep(drop_ptr, seed, bh, start_m, start_n, R8, C4, thr, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE),
                                            input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_kernel(
        Q, K, V, Bias, Pad, Out, Lse, Drop, Seed,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        H, T_Q, T_K, qk_scale, thr, drop_scale, R8, C4, T_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SKIP_PAD_Q: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        D_MASKED: tl.constexpr = BLOCK_D != HEAD_DIM
        pad_row = Pad + b * s_pb
        n_keys, holes = _key_extent(pad_row, s_pn, T_K, HAS_PAD)
        q_end = T_Q
        if SKIP_PAD_Q:
            q_end = tl.minimum(n_keys, T_Q)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < q_end
        d_ok = offs_d < HEAD_DIM
        # a block of padded queries (skip_padded_queries) visits no key: it stores 0 and L = inf
        kv_end = tl.where(start_m < q_end, n_keys, 0)
        q = _load_rows(Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qm
                       + offs_d[None, :], row_ok, d_ok, True, D_MASKED)
        k_ptrs = K + b * s_kb + h * s_kh + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :]
        v_ptrs = V + b * s_vb + h * s_vh + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :]
        bias_ptrs = (Bias + b * s_bb + h * s_bh + offs_m[:, None].to(tl.int64) * s_bm
                     + offs_n[None, :] * s_bn)
        drop_ptr = Drop + bh.to(tl.int64) * R8 * C4
        seed = 0
        if DROPOUT:  # a device scalar, so that a CUDA graph replays a fresh draw (flash_forward)
            seed = tl.load(Seed)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = kv_end // BLOCK_N * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, pad_row,
                                       drop_ptr, start_m, start_n, offs_n, d_ok, row_ok, kv_end,
                                       holes, T_K, s_kn, s_vn, s_bn, s_pn, qk_scale, seed, bh,
                                       thr, R8, C4, HAS_BIAS, HAS_PAD, DROPOUT, False, PRECISION,
                                       DOT_DTYPE, D_MASKED, BLOCK_M, BLOCK_N)
        if n_full < kv_end:
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, pad_row,
                                       drop_ptr, start_m, n_full, offs_n, d_ok, row_ok, kv_end,
                                       holes, T_K, s_kn, s_vn, s_bn, s_pn, qk_scale, seed, bh,
                                       thr, R8, C4, HAS_BIAS, HAS_PAD, DROPOUT, True, PRECISION,
                                       DOT_DTYPE, D_MASKED, BLOCK_M, BLOCK_N)
        empty = (l_i == 0.0) | (offs_m >= q_end)
        if SKIP_PAD_Q:
            if holes:
                empty = empty | (tl.load(pad_row + offs_m * s_pn, mask=offs_m < T_Q, other=1) != 0)
        inv_l = 1.0 / tl.where(empty, 1.0, l_i)
        if DROPOUT:
            inv_l = inv_l * drop_scale
        out = tl.where(empty[:, None], 0.0, acc * inv_l[:, None])
        in_q = offs_m < T_Q
        o_ptrs = Out + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :]
        if D_MASKED:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_q[:, None] & d_ok[None, :])
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_q[:, None])
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Lse + bh.to(tl.int64) * T_Q + offs_m, lse, mask=in_q)

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
    def _probs_and_ds(s, lse, do, v, delta, drop_ptr, start_m, start_n, drop_scale, R8, C4,
                      DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(P after dropout, dS = d loss / d logits) of a tile from its base-2 logits s."""
        # L = +inf on rows without keys (and on rows past T_Q): P = 0 there, never NaN.
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v).to(DOT_DTYPE), input_precision=PRECISION)
        p_drop = p
        if DROPOUT:
            keep = _read_keep(drop_ptr, start_m, start_n, R8, C4, BLOCK_M, BLOCK_N)
            p_drop = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        return p_drop, p * (dp - delta[:, None])

    @triton.jit
    def _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, bias_ptrs, g_ptrs,
                    drop_ptr, start_m, start_n, offs_m0, offs_n, d_ok, in_k, key_valid, T_Q,
                    s_qm, s_om, s_bm, s_gm, qk_scale, drop_scale, R8, C4,
                    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    D_MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One query block against the program's keys; BIAS_GRAD: store dS there too (the
        gradient of a B x H x Tq x Tk bias)."""
        offs_m = start_m + offs_m0
        rows_ok = offs_m < T_Q
        q = _load_rows(q_ptrs + start_m * s_qm, rows_ok, d_ok, MASKED, D_MASKED)
        do = _load_rows(do_ptrs + start_m * s_om, rows_ok, d_ok, MASKED, D_MASKED)
        if MASKED:
            lse = tl.load(lse_ptr + offs_m, mask=rows_ok, other=float("inf"))
            delta = tl.load(delta_ptr + offs_m, mask=rows_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m)
            delta = tl.load(delta_ptr + offs_m)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k).to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            b_ok = in_k[None, :]
            if MASKED:
                b_ok = b_ok & rows_ok[:, None]
            s += tl.load(bias_ptrs + start_m * s_bm, mask=b_ok, other=0.0).to(tl.float32) \
                * 1.4426950408889634
        # no key mask: a padded key's column of P and dS only reaches its own dK / dV row (stored
        # as 0) -- and the bias gradient, masked below
        p_drop, ds = _probs_and_ds(s, lse, do, v, delta, drop_ptr, start_m, start_n, drop_scale,
                                   R8, C4, DROPOUT, PRECISION, DOT_DTYPE, BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)).to(DOT_DTYPE), do.to(DOT_DTYPE),
                     input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)).to(DOT_DTYPE), q.to(DOT_DTYPE),
                     input_precision=PRECISION)
        if BIAS_GRAD:
            tl.store(g_ptrs + start_m * s_gm,
                     tl.where(key_valid[None, :], ds, 0.0).to(g_ptrs.dtype.element_ty),
                     mask=rows_ok[:, None] & in_k[None, :])
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, Bias, Pad, dOut, Lse, Delta, Drop, dK, dV, dBias,
        s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn, s_gb, s_gh, s_gm, s_gn,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        B, H, T_Q, T_K, qk_scale, scale, drop_scale, R8, C4, T_BUCKET,
        BIAS_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
        SKIP_PAD_Q: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        DOT_DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """grid (Tk / BLOCK_N, B*H): dK, dV of a key block; BIAS_GRAD: dBias is B x H x Tq x Tk
        and gets dS."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        D_MASKED: tl.constexpr = BLOCK_D != HEAD_DIM
        pad_row = Pad + b * s_pb
        n_keys, holes = _key_extent(pad_row, s_pn, T_K, HAS_PAD)
        q_end = T_Q
        if SKIP_PAD_Q:
            q_end = tl.minimum(n_keys, T_Q)
        start_n = pid_n * BLOCK_N
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        in_k = offs_n < T_K
        key_valid = offs_n < n_keys
        if HAS_PAD:
            key_valid = key_valid & (tl.load(pad_row + offs_n * s_pn, mask=in_k, other=1) == 0)
        k = _load_rows(K + b * s_kb + h * s_kh + offs_n[:, None].to(tl.int64) * s_kn
                       + offs_d[None, :], in_k, d_ok, True, D_MASKED)
        v = _load_rows(V + b * s_vb + h * s_vh + offs_n[:, None].to(tl.int64) * s_vn
                       + offs_d[None, :], in_k, d_ok, True, D_MASKED)
        q_ptrs = Q + b * s_qb + h * s_qh + offs_m0[:, None].to(tl.int64) * s_qm + offs_d[None, :]
        do_ptrs = (dOut + b * s_ob + h * s_oh + offs_m0[:, None].to(tl.int64) * s_om
                   + offs_d[None, :])
        bias_ptrs = (Bias + b * s_bb + h * s_bh + offs_m0[:, None].to(tl.int64) * s_bm
                     + offs_n[None, :] * s_bn)
        g_ptrs = (dBias + b * s_gb + h * s_gh + offs_m0[:, None].to(tl.int64) * s_gm
                  + offs_n[None, :] * s_gn)
        lse_ptr = Lse + bh.to(tl.int64) * T_Q
        delta_ptr = Delta + bh.to(tl.int64) * T_Q
        drop_ptr = Drop + bh.to(tl.int64) * R8 * C4
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # key blocks past the last admissible key see no query: dK = dV = 0
        m_end = tl.where(start_n < n_keys, q_end, 0)
        m_full = m_end // BLOCK_M * BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, bias_ptrs,
                                 g_ptrs, drop_ptr, start_m, start_n, offs_m0, offs_n, d_ok, in_k,
                                 key_valid, T_Q, s_qm, s_om, s_bm, s_gm, qk_scale, drop_scale, R8,
                                 C4, HAS_BIAS, BIAS_GRAD, DROPOUT, False, PRECISION, DOT_DTYPE,
                                 D_MASKED, BLOCK_M, BLOCK_N)
        if m_full < m_end:
            dk, dv = _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, bias_ptrs,
                                 g_ptrs, drop_ptr, m_full, start_n, offs_m0, offs_n, d_ok, in_k,
                                 key_valid, T_Q, s_qm, s_om, s_bm, s_gm, qk_scale, drop_scale, R8,
                                 C4, HAS_BIAS, BIAS_GRAD, DROPOUT, True, PRECISION, DOT_DTYPE,
                                 D_MASKED, BLOCK_M, BLOCK_N)
        st_ok = in_k[:, None]
        if D_MASKED:
            st_ok = st_ok & d_ok[None, :]
        dk = tl.where(key_valid[:, None], dk * scale, 0.0)
        dv = tl.where(key_valid[:, None], dv, 0.0)
        tl.store(dK + b * s_dkb + h * s_dkh + offs_n[:, None].to(tl.int64) * s_dkn
                 + offs_d[None, :], dk.to(dK.dtype.element_ty), mask=st_ok)
        tl.store(dV + b * s_dvb + h * s_dvh + offs_n[:, None].to(tl.int64) * s_dvn
                 + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=st_ok)

    @triton.jit
    def _bwd_dbias_kernel(
        Q, K, V, Bias, Pad, dOut, Lse, Delta, Drop, Partial, s_gc, s_gh, s_gm, s_gn, SAMPLES,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        B, H, T_Q, T_K, qk_scale, scale, drop_scale, R8, C4, T_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SKIP_PAD_Q: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """grid (Tq / BLOCK_M * Tk / BLOCK_N, H, chunks): Partial[chunk, h] on one tile = the sum
        over the chunk's samples of dS, a bias shared over the batch (its S and dP recomputed per
        sample; the bias tile is loaded once)."""
        n_blocks = tl.cdiv(T_K, BLOCK_N)
        start_m = tl.program_id(0) // n_blocks * BLOCK_M
        start_n = tl.program_id(0) % n_blocks * BLOCK_N
        h = tl.program_id(1).to(tl.int64)
        chunk = tl.program_id(2)
        D_MASKED: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < T_Q
        in_k = offs_n < T_K
        tile_ok = row_ok[:, None] & in_k[None, :]
        bias = tl.load(Bias + h * s_bh + offs_m[:, None].to(tl.int64) * s_bm
                       + offs_n[None, :] * s_bn, mask=tile_ok, other=0.0).to(tl.float32)
        bias = bias * 1.4426950408889634
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        b_lo = chunk * SAMPLES
        for b32 in range(b_lo, tl.minimum(B, b_lo + SAMPLES)):
            b = tl.cast(b32, tl.int64)
            bh = b * H + h
            pad_row = Pad + b * s_pb
            n_keys, holes = _key_extent(pad_row, s_pn, T_K, HAS_PAD)
            q_end = T_Q
            if SKIP_PAD_Q:
                q_end = tl.minimum(n_keys, T_Q)
            # a tile of padded keys (or of padded queries) adds nothing: skipped
            if (start_n < n_keys) & (start_m < q_end):
                key_valid = offs_n < n_keys
                if HAS_PAD:
                    key_valid = key_valid & (tl.load(pad_row + offs_n * s_pn, mask=in_k,
                                                     other=1) == 0)
                q = _load_rows(Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qm
                               + offs_d[None, :], row_ok, d_ok, True, D_MASKED)
                do = _load_rows(dOut + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om
                                + offs_d[None, :], row_ok, d_ok, True, D_MASKED)
                k = _load_rows(K + b * s_kb + h * s_kh + offs_n[:, None].to(tl.int64) * s_kn
                               + offs_d[None, :], in_k, d_ok, True, D_MASKED)
                v = _load_rows(V + b * s_vb + h * s_vh + offs_n[:, None].to(tl.int64) * s_vn
                               + offs_d[None, :], in_k, d_ok, True, D_MASKED)
                lse = tl.load(Lse + bh * T_Q + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(Delta + bh * T_Q + offs_m, mask=row_ok, other=0.0)
                s = tl.dot(q.to(DOT_DTYPE), tl.trans(k).to(DOT_DTYPE),
                           input_precision=PRECISION) * qk_scale + bias
                _, ds = _probs_and_ds(s, lse, do, v, delta, Drop + bh * R8 * C4, start_m,
                                      start_n, drop_scale, R8, C4, DROPOUT, PRECISION, DOT_DTYPE,
                                      BLOCK_M, BLOCK_N)
                acc += tl.where(key_valid[None, :], ds, 0.0)
        tl.store(Partial + chunk.to(tl.int64) * s_gc + h * s_gh
                 + offs_m[:, None].to(tl.int64) * s_gm + offs_n[None, :] * s_gn, acc,
                 mask=tile_ok)

    @triton.jit
    def _dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, pad_row, drop_ptr, start_m,
                  start_n, offs_n, d_ok, row_ok, kv_end, holes, T_K, s_kn, s_vn, s_bn, s_pn,
                  qk_scale, drop_scale, R8, C4, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
                  DROPOUT: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, D_MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
        s, k, v = _key_block_scores(q, k_ptrs, v_ptrs, bias_ptrs, pad_row, start_n, offs_n, d_ok,
                                    row_ok, kv_end, holes, T_K, s_kn, s_vn, s_bn, s_pn, qk_scale,
                                    HAS_BIAS, HAS_PAD, MASKED, PRECISION, DOT_DTYPE, D_MASKED)
        _, ds = _probs_and_ds(s, lse, do, v, delta, drop_ptr, start_m, start_n, drop_scale, R8,
                              C4, DROPOUT, PRECISION, DOT_DTYPE, BLOCK_M, BLOCK_N)
        return dq + tl.dot(ds.to(k.dtype).to(DOT_DTYPE), k.to(DOT_DTYPE),
                           input_precision=PRECISION)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, Bias, Pad, dOut, Lse, Delta, Drop, dQ, s_dqb, s_dqh, s_dqm,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
        s_bb, s_bh, s_bm, s_bn, s_pb, s_pn,
        B, H, T_Q, T_K, qk_scale, scale, drop_scale, R8, C4, T_BUCKET,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SKIP_PAD_Q: tl.constexpr,
        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        D_MASKED: tl.constexpr = BLOCK_D != HEAD_DIM
        pad_row = Pad + b * s_pb
        n_keys, holes = _key_extent(pad_row, s_pn, T_K, HAS_PAD)
        q_end = T_Q
        if SKIP_PAD_Q:
            q_end = tl.minimum(n_keys, T_Q)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < T_Q
        d_ok = offs_d < HEAD_DIM
        kv_end = tl.where(start_m < q_end, n_keys, 0)
        q = _load_rows(Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qm
                       + offs_d[None, :], row_ok, d_ok, True, D_MASKED)
        do = _load_rows(dOut + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_om
                        + offs_d[None, :], row_ok, d_ok, True, D_MASKED)
        lse = tl.load(Lse + bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0)
        k_ptrs = K + b * s_kb + h * s_kh + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :]
        v_ptrs = V + b * s_vb + h * s_vh + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :]
        bias_ptrs = (Bias + b * s_bb + h * s_bh + offs_m[:, None].to(tl.int64) * s_bm
                     + offs_n[None, :] * s_bn)
        drop_ptr = Drop + bh.to(tl.int64) * R8 * C4
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = kv_end // BLOCK_N * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, pad_row, drop_ptr,
                           start_m, start_n, offs_n, d_ok, row_ok, kv_end, holes, T_K, s_kn, s_vn,
                           s_bn, s_pn, qk_scale, drop_scale, R8, C4, HAS_BIAS, HAS_PAD, DROPOUT,
                           False, PRECISION, DOT_DTYPE, D_MASKED, BLOCK_M, BLOCK_N)
        if n_full < kv_end:
            dq = _dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, bias_ptrs, pad_row, drop_ptr,
                           start_m, n_full, offs_n, d_ok, row_ok, kv_end, holes, T_K, s_kn, s_vn,
                           s_bn, s_pn, qk_scale, drop_scale, R8, C4, HAS_BIAS, HAS_PAD, DROPOUT,
                           True, PRECISION, DOT_DTYPE, D_MASKED, BLOCK_M, BLOCK_N)
        dq_ptrs = (dQ + b * s_dqb + h * s_dqh + offs_m[:, None].to(tl.int64) * s_dqm
                   + offs_d[None, :])
        if D_MASKED:
            tl.store(dq_ptrs, (dq * scale).to(dQ.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])
        else:
            tl.store(dq_ptrs, (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])

    _fwd_kernel = _tuned(_FWD_CONFIGS)(_fwd_kernel)
    _bwd_dkdv_kernel = _tuned(_DKDV_CONFIGS)(_bwd_dkdv_kernel)
    _bwd_dq_kernel = _tuned(_DQ_CONFIGS)(_bwd_dq_kernel)
    _bwd_dbias_kernel = _tuned(_DBIAS_CONFIGS)(_bwd_dbias_kernel)
