"""Our public kernels as torch custom ops (namespace `d2v`), so torch.compile keeps them in its graph.

Dynamo cannot trace into a Triton launch behind Python dispatch logic (device checks, interpreter
switches, `.min()` reductions feeding a second launch), and it graph-breaks at what it cannot trace.
A custom op is opaque to it instead: the compiler sees one node with a fake (meta) implementation
that gives the output shapes, and calls our dispatcher at run time.

  teacher_targets  d2v::teacher_targets   forward only (the teacher's outputs need no gradient)
  span_mask        d2v::span_mask         no gradient (bool output)
  block_mask       d2v::block_mask        no gradient; seeds must be a tensor (it fixes the device)
  token_mask       d2v::token_mask        no gradient
  attention        d2v::attention_forward + d2v::attention_backward, tied by register_autograd

FLOPs: torch.utils.flop_counter.FlopCounterMode sees the attention pair as two opaque nodes;
the formulas registered below count them as FlashAttention does (d2v_engine.planning.flops counts the plan's
step with them).

Attention. The op pair follows the flash-attention contract: forward(q, k, v, key_padding_mask,
attn_bias, scale, ...) -> (out, lse B x H x Tq fp32 (fp64 for fp64 inputs), keep),
backward(grad_out, q, k, v, out, lse, ..., keep) -> (dq, dk, dv, dbias). The op carries the name
of the implementation: "triton" (our flash kernels; `attention()` routes the Triton path through
the pair while torch.compile traces, since dynamo breaks the graph at the kernel launches behind
an autograd.Function), "math" (a plain-PyTorch forward that keeps the log-sum-exp and a
backward that recomputes the probabilities from it), or a pair plugged in with
`register_attention_kernel`. Because "math" materializes T x T scores, `attention()` takes the
custom-op path only when asked (impl=, use_custom_op=True) or once a kernel is registered;
otherwise it runs the dispatched backend (d2v_kernels.attention.run_backend), e.g. torch's
scaled_dot_product_attention plus elementwise ops that dynamo traces natively (no graph break, and
inductor picks SDPA's flash / efficient backends), with the "triton" pair while compiling. Dropout runs in the pair only with "triton": its forward draws the mask and
returns it bit-packed as `keep`, which the backward reads; with the other implementations dropout
takes that traced path. The mask's seed is drawn inside the forward op (flash_forward, on the
inputs' device, from torch's generator as eager does): the traced graph holds no random op, so no
CPU node that would keep CUDA graphs off (reduce-overhead) or freeze the seed at recording, and a
captured graph draws a fresh seed on every replay. The forward op is tagged nondeterministic_seeded,
so the partitioner never recomputes it with a new draw: under activation checkpointing it replays
it with the saved generator state (eager torch.utils.checkpoint restores that state itself). The
fakes declare the layouts the real ops return (`_out_like`, d2v_kernels.attention.new_like), so a
compiled graph copies nothing around the pair.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from d2v_kernels import attention as _attention
from d2v_kernels.attention_dispatch import attention_backend
from d2v_kernels import masking as _masking
from d2v_kernels import targets as _targets

# ---------------------------------------------------------------------------------------------
# Teacher targets


@torch.library.custom_op("d2v::teacher_targets", mutates_args=())
def _teacher_targets_op(layers: list[torch.Tensor], padding_mask: Optional[torch.Tensor],
                        layer_norm: str, final_norm: str, eps: float,
                        instance_norm_padding: str) -> torch.Tensor:
    return _targets.teacher_targets(layers, padding_mask, layer_norm, final_norm, eps,
                                    instance_norm_padding)


@_teacher_targets_op.register_fake
def _(layers, padding_mask, layer_norm, final_norm, eps, instance_norm_padding):
    return layers[0].new_empty(layers[0].shape, dtype=torch.float32)


def teacher_targets(layers, padding_mask=None, layer_norm="instance", final_norm="none", eps=1e-5,
                    instance_norm_padding="exclude"):
    """d2v_kernels.targets.teacher_targets as the custom op d2v::teacher_targets (same contract)."""
    if isinstance(layers, torch.Tensor):
        layers = list(layers.unbind(0))
    return _teacher_targets_op(list(layers), padding_mask, layer_norm, final_norm, float(eps),
                               instance_norm_padding)


# ---------------------------------------------------------------------------------------------
# Masks


@torch.library.custom_op("d2v::span_mask", mutates_args=())
def _span_mask_op(lengths: torch.Tensor, max_len: int, mask_prob: float, mask_length: int,
                  min_masks: int, seeds: torch.Tensor, require_same_masks: bool) -> torch.Tensor:
    return _masking.span_mask(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                              require_same_masks)


@_span_mask_op.register_fake
def _(lengths, max_len, mask_prob, mask_length, min_masks, seeds, require_same_masks):
    return lengths.new_empty((lengths.shape[0], max_len), dtype=torch.bool)


def span_mask(lengths, max_len, mask_prob, mask_length, min_masks=0, seed=None,
              require_same_masks=False):
    """d2v_kernels.masking.span_mask as d2v::span_mask; `seed` must be a B int64 tensor."""
    return _span_mask_op(lengths, int(max_len), float(mask_prob), int(mask_length),
                         int(min_masks), _seed_tensor(seed, "span_mask"), bool(require_same_masks))


@torch.library.custom_op("d2v::block_mask", mutates_args=())
def _block_mask_op(batch: int, grid: list[int], mask_ratio: float, seeds: torch.Tensor,
                   min_block: int, inverse: bool, inverse_length: int,
                   inverse_adjust: float) -> torch.Tensor:
    return _masking.block_mask(batch, tuple(grid), mask_ratio, seeds, min_block, inverse,
                               seeds.device, inverse_length, inverse_adjust)


@_block_mask_op.register_fake
def _(batch, grid, mask_ratio, seeds, min_block, inverse, inverse_length, inverse_adjust):
    return seeds.new_empty((batch, grid[0] * grid[1]), dtype=torch.bool)


def block_mask(batch, grid, mask_ratio, seed=None, min_block=16, inverse=False,
               inverse_length=3, inverse_adjust=0.07):
    """d2v_kernels.masking.block_mask as d2v::block_mask, on the seed tensor's device."""
    return _block_mask_op(int(batch), [int(g) for g in grid], float(mask_ratio),
                          _seed_tensor(seed, "block_mask"), int(min_block), bool(inverse),
                          int(inverse_length), float(inverse_adjust))


@torch.library.custom_op("d2v::token_mask", mutates_args=())
def _token_mask_op(tokens: torch.Tensor, mask_prob: float, special_mask: torch.Tensor,
                   mask_id: int, vocab_size: int, seeds: torch.Tensor, span: int,
                   replace: list[float], random_exclude: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    out, selected = _masking.token_mask(tokens, mask_prob, special_mask, mask_id, vocab_size,
                                        seeds, span, tuple(replace), random_exclude)
    return out, selected


@_token_mask_op.register_fake
def _(tokens, mask_prob, special_mask, mask_id, vocab_size, seeds, span, replace, random_exclude):
    return torch.empty_like(tokens), torch.empty_like(tokens, dtype=torch.bool)


def token_mask(tokens, mask_prob, special_mask, mask_id, vocab_size, seed=None, span=1,
               replace=(0.8, 0.1, 0.1), random_exclude=None):
    """d2v_kernels.masking.token_mask as d2v::token_mask; `seed` must be a B int64 tensor."""
    exclude = [int(mask_id)] if random_exclude is None else [int(i) for i in random_exclude]
    return _token_mask_op(tokens, float(mask_prob), special_mask, int(mask_id), int(vocab_size),
                          _seed_tensor(seed, "token_mask"), int(span),
                          [float(r) for r in replace], exclude)


def _seed_tensor(seed, op: str) -> torch.Tensor:
    # An int seed would be hashed per row on the host side of the op; a traced graph wants the
    # per-sample seeds as a tensor input (the trainer always has them).
    if not isinstance(seed, torch.Tensor):
        raise ValueError(f"d2v_kernels.ops.{op}: seed must be an int64 tensor of per-sample seeds, "
                         f"got {type(seed).__name__}")
    return seed


# ---------------------------------------------------------------------------------------------
# Attention

AttentionForward = Callable[..., tuple]  # (q, k, v, kpm, bias, scale) -> (out, lse)
AttentionBackward = Callable[..., tuple]  # (dout, q, k, v, out, lse, kpm, bias, scale) -> 4 grads


def attention_forward_math(q, k, v, key_padding_mask, attn_bias, scale):
    """Plain-PyTorch forward keeping the row log-sum-exp (fp32; +inf on rows with no key)."""
    s = _scores(q, k, key_padding_mask, attn_bias, scale)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)  # empty rows: p = exp(-inf) = 0
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p.to(v.dtype), v), lse


def attention_backward_math(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, scale):
    """Gradients from the saved lse: P recomputed from the scores, dS = P * (dP - rowsum(dO * O))."""
    f32 = _acc(q)
    p = torch.exp(_scores(q, k, key_padding_mask, attn_bias, scale) - lse.to(f32)[..., None])
    go = grad_out.to(f32)
    dv = torch.matmul(p.transpose(-1, -2), go)
    dp = torch.matmul(go, v.to(f32).transpose(-1, -2))
    delta = (go * out.to(f32)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(f32)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(f32)) * scale
    dbias = None
    if attn_bias is not None:
        dbias = (ds.sum(0) if attn_bias.ndim == 3 else ds).to(attn_bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _scores(q, k, key_padding_mask, attn_bias, scale):
    acc = _acc(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(acc)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return s


def triton_attention_forward(q, k, v, key_padding_mask, attn_bias, scale, dropout_p=0.0,
                             skip_padded_queries=False):
    """The Triton flash forward (d2v_kernels.attention) behind the op pair -> (out, lse, keep); its
    lse is base 2 and keep the bit-packed dropout mask (its seed drawn on q's device), which only
    its own backward reads."""
    return _attention.flash_forward(q, k, v, key_padding_mask, attn_bias, scale, dropout_p,
                                    skip_padded_queries=skip_padded_queries)


def triton_attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, scale,
                              dropout_p=0.0, keep=None, skip_padded_queries=False):
    return _attention.flash_backward(grad_out, q, k, v, key_padding_mask, attn_bias, out, lse,
                                     scale, dropout_p, keep,
                                     need_bias_grad=attn_bias is not None,
                                     skip_padded_queries=skip_padded_queries)


# The implementations the op pair can run, by name; the op carries the name, so the forward and
# the backward of one call always come from the same pair.
_kernels: dict = {"math": (attention_forward_math, attention_backward_math),
                  "triton": (triton_attention_forward, triton_attention_backward)}
_default: dict = {"impl": None}  # set by register_attention_kernel


def register_attention_kernel(forward: AttentionForward, backward: AttentionBackward) -> None:
    """Plugs a fused attention behind d2v::attention_* as the default of attention().

    forward(q, k, v, key_padding_mask, attn_bias, scale) -> (out B x H x Tq x D, lse B x H x Tq
    fp32, +inf or any value with exp(s - lse) = 0 on rows with no key);
    backward(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, scale) -> (dq, dk, dv,
    dbias or None). From then on attention() takes the custom-op path by default.
    """
    _kernels["registered"] = (forward, backward)
    _default["impl"] = "registered"


def reset_attention_kernel() -> None:
    """Back to the plain-PyTorch pair, and attention() back to the traced SDPA path."""
    _kernels.pop("registered", None)
    _default["impl"] = None


# What each op returns, as its fake declares it (the real op returns exactly these layouts, so
# torch.compile inserts no copy): out and the q/k/v gradients take d2v_kernels.attention.new_like of
# the input -- a transposed B x T x H x D projection stays in that memory order, as the Triton
# kernels write it -- lse, keep and the bias gradient are contiguous.


def _out_like(q, v):
    if v.shape[-1] == q.shape[-1]:
        return _attention.new_like(q)
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def _keep_like(q, k, impl, dropout_p):
    if impl == "triton" and dropout_p > 0:
        b, h, tq, _ = q.shape
        return q.new_empty(_attention.dropout_mask_shape(b, h, tq, k.shape[2]), dtype=torch.uint8)
    return q.new_empty((0,), dtype=torch.uint8)


def _as_declared(t, declared):
    """t in the declared layout: t itself when its strides match (the Triton impl), else copied
    (the plain-PyTorch pair, whose matmuls return contiguous tensors)."""
    return t if t.stride() == declared.stride() else declared.copy_(t)


@torch.library.custom_op("d2v::attention_forward", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_padding_mask: Optional[torch.Tensor],
                          attn_bias: Optional[torch.Tensor], scale: float, impl: str,
                          dropout_p: float, skip_padded_queries: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl == "triton":
        out, lse, keep = triton_attention_forward(
            q, k, v, key_padding_mask, attn_bias, scale, dropout_p, skip_padded_queries)
        return out, lse, keep if keep is not None else _keep_like(q, k, impl, 0.0)
    out, lse = _kernels[impl][0](q, k, v, key_padding_mask, attn_bias, scale)
    if skip_padded_queries:  # the math pair: padded queries attend to nothing
        dead = key_padding_mask[:, None, :]
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, float("inf"))
    return _as_declared(out, _out_like(q, v)), lse.contiguous(), _keep_like(q, k, impl, 0.0)


@_attention_forward_op.register_fake
def _(q, k, v, key_padding_mask, attn_bias, scale, impl, dropout_p, skip_padded_queries):
    b, h, tq, _ = q.shape
    return (_out_like(q, v), q.new_empty((b, h, tq), dtype=_acc(q)),
            _keep_like(q, k, impl, dropout_p))


@torch.library.custom_op("d2v::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           key_padding_mask: Optional[torch.Tensor],
                           attn_bias: Optional[torch.Tensor], scale: float, impl: str,
                           dropout_p: float, keep: torch.Tensor, skip_padded_queries: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if impl == "triton":
        dq, dk, dv, dbias = triton_attention_backward(
            grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, scale, dropout_p,
            keep if dropout_p > 0 else None, skip_padded_queries)
    else:
        dq, dk, dv, dbias = _kernels[impl][1](grad_out, q, k, v, out, lse, key_padding_mask,
                                              attn_bias, scale)
        dq, dk, dv = (_as_declared(g, _attention.new_like(x)) for g, x in ((dq, q), (dk, k),
                                                                             (dv, v)))
    if dbias is None:  # a custom op returns tensors: an empty one stands for "no bias"
        dbias = q.new_empty((0,))
    return dq, dk, dv, _as_declared(dbias, dbias.new_empty(dbias.shape))


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, scale, impl, dropout_p, keep,
      skip_padded_queries):
    dbias = q.new_empty((0,)) if attn_bias is None else attn_bias.new_empty(attn_bias.shape)
    return (_attention.new_like(q), _attention.new_like(k), _attention.new_like(v), dbias)


def _attention_setup(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_bias, scale, impl, dropout_p, skip = inputs
    out, lse, keep = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, attn_bias, keep)
    ctx.scale, ctx.impl, ctx.dropout_p, ctx.skip = scale, impl, dropout_p, skip


def _attention_backward(ctx, grad_out, grad_lse, grad_keep):
    q, k, v, out, lse, key_padding_mask, attn_bias, keep = ctx.saved_tensors
    dq, dk, dv, dbias = _attention_backward_op(grad_out, q, k, v, out, lse, key_padding_mask,
                                               attn_bias, ctx.scale, ctx.impl, ctx.dropout_p,
                                               keep, ctx.skip)
    return dq, dk, dv, None, (dbias if attn_bias is not None else None), None, None, None, None


_attention_forward_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention_flops(q_shape, k_shape, v_shape) -> int:
    """FlashAttention's count for one forward: S = Q K^T and O = P V, 2 FLOPs per multiply-add,
    so 4 * B * H * Tq * Tk * D when Dv = D (softmax and masking not counted)."""
    b, h, tq, d = q_shape
    return 2 * b * h * tq * k_shape[2] * (d + v_shape[3])


# torch.utils.flop_counter.FlopCounterMode sees the op pair as two opaque nodes: these formulas
# count them, the backward as 2.5 x the forward (FlashAttention's convention: its backward
# recomputes S, then dV, dP, dQ, dK: 5 matmuls against the forward's 2).
@register_flop_formula(torch.ops.d2v.attention_forward)
def _attention_forward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(q, k, v)


@register_flop_formula(torch.ops.d2v.attention_backward)
def _attention_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 5 * attention_flops(q, k, v) // 2


def attention(q, k, v, key_padding_mask=None, attn_bias=None, scale=None, dropout_p=0.0,
              skip_padded_queries=False, use_custom_op=None, impl=None):
    """The attention call: q, k, v B x H x T x D (fp16/bf16/fp32), key_padding_mask B x Tk bool
    (True = ignore), attn_bias H x Tq x Tk or B x H x Tq x Tk -> B x H x Tq x Dv in q's dtype.

    By default it runs the backend d2v_kernels.attention_dispatch.attention_backend picks
    (d2v_kernels.attention.run_backend), eagerly and under torch.compile alike (dynamo traces
    SDPA natively); our Triton kernels go through the d2v::attention_* pair while compiling (dynamo
    breaks the graph at launches behind an autograd.Function; the pair is one opaque node each way,
    running the same kernels), and meta / fake tensors take the pair too (the plan's FLOP and
    memory counts: counted by FlashAttention's convention, saving what the kernels save, no
    T x T scores). The pair runs `impl` ("math", "triton" or a registered pair) when asked:
    impl=, use_custom_op=True ("math"), or once a pair is registered; dropout only with "triton",
    skip_padded_queries with "triton" and "math"."""
    if impl is None and use_custom_op is not False:
        impl = _default["impl"] or ("math" if use_custom_op else None)
    skip = bool(skip_padded_queries and key_padding_mask is not None)
    if impl is None or (dropout_p > 0 and impl != "triton") or (skip and impl == "registered"):
        _attention._check(q, k, v, key_padding_mask, attn_bias, skip_padded_queries)
        if _attention._shape_only(q):
            impl = "triton"
        else:
            backend = attention_backend(q, k, v, key_padding_mask, attn_bias, dropout_p, skip)
            if backend != "triton" or not torch.compiler.is_compiling():
                return _attention.run_backend(backend, q, k, v, key_padding_mask, attn_bias,
                                              scale, dropout_p, skip)
            impl = "triton"
    if impl not in _kernels:
        raise ValueError(f"attention impl must be one of {sorted(_kernels)}, got {impl!r}")
    _attention._check(q, k, v, key_padding_mask, attn_bias, skip)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _, _ = _attention_forward_op(q, k, v, key_padding_mask, attn_bias, scale, impl,
                                      float(dropout_p), skip)
    return out
