"""Sequence-length buckets: a compiled encoder sees a few shapes instead of one per batch.

torch.compile (dynamic=False) specializes a graph on every input shape, and audio batches (cropped
to their shortest sample) or text batches (padded to their longest) would otherwise bring a new
length, hence a recompile, almost every step. Lengths are snapped to a geometric ladder of at most
`count` sizes between `min_len` and `max_len`:

  crop (audio, data.pad_audio=false)  down to the largest bucket <= length: the reference already
      crops a batch to its shortest sample, so this only crops a little more, by at most the ratio
      between neighbouring buckets (max_len / min_len) ** (1 / (count - 1)).
  pad  (text, audio with data.pad_audio=true)  up to the smallest bucket >= length, extending the
      padding mask: padded positions are excluded from attention, masks, targets and the loss, so
      the step computes the same loss (up to float rounding).
Lengths outside [min_len, max_len] are left as they are (one more shape, not an error).
"""
from __future__ import annotations

import bisect
import math

import torch


def bucket_sizes(max_len: int, count: int = 16, min_len: int = 1, multiple: int = 1) -> list[int]:
    """Ascending geometric ladder of at most `count` lengths in [min_len, max_len], each a
    multiple of `multiple` (except max_len itself, always included)."""
    if max_len < 1 or count < 1 or multiple < 1:
        raise ValueError(f"bucket_sizes: need max_len, count, multiple >= 1, got {max_len}, "
                         f"{count}, {multiple}")
    min_len = max(1, min(min_len, max_len))
    if count == 1 or min_len == max_len:
        return [max_len]
    ratio = (max_len / min_len) ** (1.0 / (count - 1))
    sizes = {max_len}
    for i in range(count - 1):
        size = int(math.floor(min_len * ratio ** i / multiple)) * multiple
        if size >= 1:
            sizes.add(min(size, max_len))
    return sorted(sizes)


def bucket_floor(length: int, buckets: list[int]) -> int:
    """Largest bucket <= length; `length` itself when every bucket is longer."""
    i = bisect.bisect_right(buckets, length)
    return buckets[i - 1] if i else length


def bucket_ceil(length: int, buckets: list[int]) -> int:
    """Smallest bucket >= length; `length` itself when every bucket is shorter."""
    i = bisect.bisect_left(buckets, length)
    return buckets[i] if i < len(buckets) else length


def bucket_batch(batch: dict, buckets: list[int], pad_value=0) -> dict:
    """Snaps a collated batch's "source" (B x L) to a bucket: crop without a padding mask, pad
    (with `pad_value`, mask True) with one. Other keys are kept."""
    source, pad = batch["source"], batch.get("padding_mask")
    length = source.shape[1]
    if pad is None:
        target = bucket_floor(length, buckets)
        if target == length:
            return batch
        return {**batch, "source": source[:, :target].contiguous()}
    target = bucket_ceil(length, buckets)
    if target == length:
        return batch
    extra = target - length
    source = torch.nn.functional.pad(source, (0, extra), value=pad_value)
    pad = torch.nn.functional.pad(pad, (0, extra), value=True)
    return {**batch, "source": source, "padding_mask": pad}


def describe_buckets(cfg, buckets: list[int]) -> str:
    """Why a run has the buckets it has: fewer than train.length_buckets when rounding to the
    multiple (the conv stride for audio, 8 tokens for text) merges neighbouring sizes."""
    if not buckets:
        return "no length buckets" + (" (images: static shapes)" if cfg.modality == "image"
                                      else " (train.length_buckets=0)")
    multiple = _multiple(cfg)
    merged = "" if len(buckets) == cfg.train.length_buckets else (
        f"; train.length_buckets={cfg.train.length_buckets} geometric sizes rounded down to "
        f"multiples of {multiple} leave {len(buckets)} distinct")
    return f"{len(buckets)} length buckets {buckets[0]}..{buckets[-1]}{merged}"


def _multiple(cfg) -> int:
    # A multiple of the conv stack's total stride keeps the frame count an exact function.
    if cfg.modality == "audio":
        return math.prod(s for _, _, s in cfg.model.conv_layers)
    return 8


def buckets_for(cfg) -> list[int]:
    """The ladder for a run: audio samples between data.min_sample_size and max_sample_size,
    text tokens up to data.max_tokens; [] for images (static shapes) or train.length_buckets=0."""
    count = cfg.train.length_buckets
    if count <= 0 or cfg.modality == "image":
        return []
    if cfg.modality == "audio":
        low = cfg.data.min_sample_size or cfg.data.max_sample_size // 8
        return bucket_sizes(cfg.data.max_sample_size, count, low, _multiple(cfg))
    return bucket_sizes(cfg.data.max_tokens, count, min(16, cfg.data.max_tokens), _multiple(cfg))
