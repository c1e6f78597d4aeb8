"""Multi-head attention core: q, k, v B x H x T x D, key padding mask, additive bias.

`attention_reference` is the plain math (the ground truth); `attention` dispatches to torch's
scaled_dot_product_attention (a Triton flash kernel arrives with its own issue). A query row whose
every key is excluded (a fully padded sample) attends to nothing: its output is 0, and neither its
output nor its gradients are NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(q, k, v, key_padding_mask, attn_bias):
    if q.ndim != 4 or k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or v.shape[:3] != k.shape[:3]:
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
    """Same contract as attention_reference, computed by scaled_dot_product_attention."""
    _check(q, k, v, key_padding_mask, attn_bias)
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
