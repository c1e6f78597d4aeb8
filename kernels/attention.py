"""Multi-head attention core: q, k, v B x H x T x D, key padding mask, additive bias.

`attention_reference` is the plain math (the ground truth); `attention` dispatches to torch's
scaled_dot_product_attention (a Triton flash kernel arrives with its own issue).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(q, k, v, key_padding_mask, attn_bias):
    if q.ndim != 4 or k.shape != q.shape[:2] + k.shape[2:] or v.shape != k.shape:
        raise ValueError(f"attention: q, k, v must be B x H x T x D, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, _, _ = q.shape
    tk = k.shape[2]
    if key_padding_mask is not None and (key_padding_mask.shape != (b, tk)
                                         or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"attention: key_padding_mask must be bool {b} x {tk}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if attn_bias is not None and attn_bias.shape[-3:] != (h, q.shape[2], tk):
        raise ValueError(f"attention: attn_bias must be H x T x T or B x H x T x T, got "
                         f"{tuple(attn_bias.shape)}")


def attention_reference(q, k, v, key_padding_mask=None, attn_bias=None, scale=None,
                        dropout_p=0.0):
    """softmax(q k^T * scale + bias, padded keys excluded) v; fully padded rows give 0."""
    _check(q, k, v, key_padding_mask, attn_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        scores = scores + attn_bias
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores.to(acc), dim=-1).nan_to_num(0.0).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def attention(q, k, v, key_padding_mask=None, attn_bias=None, scale=None, dropout_p=0.0):
    """Same contract as attention_reference, computed by scaled_dot_product_attention."""
    _check(q, k, v, key_padding_mask, attn_bias)
    if attn_bias is not None and q.device.type == "cpu":
        # torch's CPU SDPA with a float mask is several times slower than the plain math.
        return attention_reference(q, k, v, key_padding_mask, attn_bias, scale, dropout_p)
    mask = None
    if attn_bias is not None:
        mask = attn_bias.to(q.dtype)
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        mask = pad if mask is None else mask + pad
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         scale=scale)
    if key_padding_mask is not None:
        # SDPA gives NaN where every key is padded; such rows attend to nothing.
        empty = key_padding_mask.all(dim=1)
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out
