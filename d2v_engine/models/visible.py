"""data2vec 2.0 student encoding: the context encoder runs on the visible tokens only.

encode_visible(encoder, x, padding_mask, mask, keep) takes the feature encoder's output x
(B x T x C, `encoder.embed`), adds the positional information on the full grid / sequence, gathers
the visible tokens by `keep` (B x V ascending indices, the same V in every row) and runs the blocks
on B x (E + V) tokens (E = encoder.num_extra_tokens: the image CLS goes first). keep=None is the
reference of the same computation: the blocks run on all T tokens and the masked ones are removed
from attention as keys (tests compare the two at the visible positions).

Per modality, before the gather:
  image  learned absolute positions (when model.rel_pos_bias is false) are added to the patches;
         with the relative bias, its rows and columns are gathered per sample (B x H x V' x V').
         The data2vec 2.0 layout's input LayerNorm acts per token, after the gather.
  audio  padded and masked frames are zeroed (fairseq encoder_zero_mask), then the convolutional
         positions are computed over the full length and added; post-LN's first norm and dropout
         act per position, so they run after the gather.
  text   the embedding (tokens + learned positions) already holds the positions.
Padded positions may be visible (the masks only choose among real tokens, so every row has the
same number of masked tokens): they stay in the gathered padding mask and attend to nothing.
"""
from __future__ import annotations

import torch

from d2v_engine.models.encoders import AudioEncoder, EncoderOutput, ImageEncoder, TextEncoder


def row_count_range(mask: torch.Tensor) -> torch.Tensor:
    """[min, max] of a B x T bool mask's per-row counts, on its device (no host read)."""
    counts = mask.sum(1)
    if not mask.shape[0]:
        return counts.new_zeros(2)
    return torch.stack([counts.min(), counts.max()])


def shared_count(count_range) -> int:
    """The masked count every row shares, from row_count_range's [min, max] (ValueError if the
    rows differ). From a device tensor this is a host read: the count sets the shape of
    everything after it. Drawn a micro-batch ahead (d2v_engine.run.mask_ahead), the range is copied to the
    host on the side stream and read a whole step later, so the step never waits for it."""
    lo, hi = count_range.tolist()
    if lo != hi:
        raise ValueError(f"split_indices: every row needs the same masked count, got {lo}..{hi}")
    return int(lo)


def split_indices(mask: torch.Tensor, masked: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """B x T bool mask (True = masked, the same count per row) -> (keep B x V, masked B x (T - V)),
    each row's visible and masked positions in ascending order. `masked`: the rows' count when
    already known (shared_count), else read here."""
    if masked is None:
        masked = shared_count(row_count_range(mask))
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    visible = mask.shape[1] - masked
    return order[:, :visible], order[:, visible:]


def keep_indices(mask: torch.Tensor) -> torch.Tensor:
    """B x V ascending visible indices of a mask with the same masked count per row."""
    return split_indices(mask)[0]


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x B x T x C (or B x T) at keep B x V -> B x V x C (B x V)."""
    if x.ndim == 2:
        return torch.gather(x, 1, keep)
    return torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(visible: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Inverse of gather_tokens: `fill` (B x T x C) with the rows at keep replaced by `visible`."""
    index = keep[..., None].expand(-1, -1, visible.shape[-1])
    return fill.scatter(1, index, visible.to(fill.dtype))


def encode_visible(encoder, x, padding_mask, mask, keep=None, return_layers=False,
                   skip_padded_queries=False) -> EncoderOutput:
    """Student context encoder on the visible tokens (see the module docstring).
    skip_padded_queries (with keep: the gathered path, whose key mask is the padding alone):
    attention skips the padded tokens' queries (their outputs are then not the unskipped ones;
    the decoder input zeroes them)."""
    encoder._check_encode(x, padding_mask, mask)
    if mask is None:
        raise ValueError("encode_visible: mask (B x T bool, True = masked) is required")
    if keep is not None and (keep.ndim != 2 or keep.shape[0] != x.shape[0]):
        raise ValueError(f"encode_visible: keep must be B x V indices, got {tuple(keep.shape)}")
    if isinstance(encoder, ImageEncoder):
        return _image(encoder, x, mask, keep, return_layers)
    # Without keep the key mask also hides the masked tokens, whose queries are needed.
    skip = skip_padded_queries and keep is not None
    if isinstance(encoder, AudioEncoder):
        return _audio(encoder, x, padding_mask, mask, keep, return_layers, skip)
    if isinstance(encoder, TextEncoder):
        return _text(encoder, x, padding_mask, mask, keep, return_layers, skip)
    raise TypeError(f"encode_visible: no visible-only path for {type(encoder).__name__}")


def _attend(padding_mask, mask, keep):
    """The blocks' key padding mask: gathered padding (visible path) or padding | masked."""
    if keep is None:
        return mask if padding_mask is None else padding_mask | mask
    if padding_mask is None:
        return None
    return gather_tokens(padding_mask, keep)


def _image(enc: ImageEncoder, x, mask, keep, return_layers):
    cls = enc.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
    if enc.pos_embed is not None:
        x = x + enc.pos_embed[:, 1:]
        cls = cls + enc.pos_embed[:, :1]
    bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
    attend = _attend(None, mask, keep)
    if keep is not None:
        x = gather_tokens(x, keep)
        if bias is not None:
            index = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)  # CLS first
            bias = bias[:, index[:, :, None], index[:, None, :]].transpose(0, 1)
    else:
        attend = torch.cat([attend.new_zeros(attend.shape[0], 1), attend], dim=1)
    x = torch.cat([cls, x], dim=1)
    x, ffn, blocks = enc.run_blocks(x, attend, bias, return_layers)
    return EncoderOutput(x, attend, ffn, blocks)


def _audio(enc: AudioEncoder, x, padding_mask, mask, keep, return_layers, skip):
    x = enc.dropout_input(x)
    hidden = mask if padding_mask is None else mask | padding_mask
    x = x.masked_fill(hidden[..., None], 0.0)
    x = x + enc.pos_conv(x)
    attend = _attend(padding_mask, mask, keep)
    if keep is not None:
        x = gather_tokens(x, keep)
    if not enc.layer_norm_first:
        x = enc.norm(x)
    x = enc.dropout(x)
    x, ffn, blocks = enc.blocks(x, attend, None, return_layers, skip)
    if enc.layer_norm_first:
        x = enc.norm(x)
    return EncoderOutput(x, attend, ffn, blocks)


def _text(enc: TextEncoder, x, padding_mask, mask, keep, return_layers, skip):
    if padding_mask is not None:
        x = x.masked_fill(padding_mask[..., None], 0.0)
    attend = _attend(padding_mask, mask, keep)
    if keep is not None:
        x = gather_tokens(x, keep)
    x, ffn, blocks = enc.blocks(x, attend, None, return_layers, skip)
    if enc.final_norm is not None:
        x = enc.final_norm(x)
    return EncoderOutput(x, attend, ffn, blocks)
