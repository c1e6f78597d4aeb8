"""Masks for data2vec, computed on the tensors' device for the whole batch.

  span_mask   audio: spans of `mask_length` steps (fairseq compute_mask_indices, mask_type static,
              no_overlap False, min_space 0), per-sample lengths, min_masks, require_same_masks.
  block_mask  image: BEiT block-wise masking (data2vec 1.0), or data2vec 2.0 inverse block masking
              (blocks of kept patches); exactly round(mask_ratio * h * w) patches masked per sample.
  token_mask  text: BERT-style selection in whole spans of non-special tokens, then the
              [mask, random, keep] replacement rule.

Randomness. Every random number is a counter-based hash of (sample seed, stream, counter): no
generator state, so a sample's mask depends only on its own seed and inputs (never on the batch it
sits in, except through require_same_masks), and a Triton kernel can reproduce the reference bit
for bit. The hash is 32-bit integer arithmetic (Wellons' "lowbias32" mixer) kept in int64 tensors
with every product split so that nothing overflows int64:
    key  = mix(seed_hi + stream * 0x9E3779B9)     base = mix(seed_lo ^ key)
    bits(counter) = mix(mix(base ^ counter * 0x85EBCA6B) ^ key)          (all mod 2^32)
`seed` is an int (one per batch: row b gets a seed hashed from (seed, b)) or an int64 tensor of
shape B (one per sample; the trainer derives it from run seed, step and global sample index).
Uniform draws use the bits as integers: a draw among n items is (bits * n) >> 32, a
probabilistic rounding int(p * n + U) is (round(p * 2^32) * n + bits) >> 32, a Bernoulli with
probability p compares bits >> 8 with round(p * 2^24). Draws without replacement give each
candidate the unique key (bits << 31) | index and take the `num` smallest: a uniform subset.
No floating point anywhere: even BEiT's geometry (area, log-uniform aspect, round(sqrt)) is
fixed-point integer arithmetic with a correctly rounded aspect table (see _beit_blocks), so masks
are the same on every device and in the kernels.

Exact counts and other rules:
  span_mask   no count rule of its own: require_same_masks keeps, in every row, a uniform subset
              of its masked steps of the batch's smallest count (fairseq's rule). Unlike fairseq,
              a sample short enough to be masked whole is allowed (fairseq raises ValueError).
  block_mask  BEiT never overshoots its target; when its generator gives up short, the missing
              patches are the unmasked ones nearest (Manhattan) to the mask, smallest keys first:
              the 4-neighbour ring-by-ring growth, so the fill only enlarges existing blocks. The
              distance is kept per taken rectangle, so a kernel needs no neighbour lookups. Inverse: fairseq's
              require_same_masks rule, a uniform random set of kept (or masked) patches flips.
  token_mask  none: the selected count is the probabilistic rounding above, as fairseq's
              MaskTokensDataset; each selected token is replaced independently.

Paths: all three run Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1),
else span_mask_reference / block_mask_reference / token_mask_reference, plain PyTorch and the
ground truth; kernel and reference are bit-identical. BEiT is sequential within a sample (one
rectangle at a time, 10 tries each): the reference advances all samples in lockstep, the kernel
gives each sample a program that loops on its own (a data-dependent while loop, at most
11 * target draws), then selects the fill in registers. Inverse blocks and the exact-count flips
are one program per sample as well. Under the interpreter a BEiT sample costs about a second.
"""
from __future__ import annotations

import decimal
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: every call takes the reference path
    triton = None

_M32 = 0xFFFFFFFF
_INT64_MAX = torch.iinfo(torch.int64).max
_INDEX_BITS = 31  # a selection key is (bits << 31) | index: unique, and below 2^63

# Streams keep the independent random choices of one sample apart.
_SEED, _SPAN_COUNT, _SPAN_START, _SPAN_TRIM = 1, 2, 3, 4
_BLOCK_DRAW, _BLOCK_FILL = 5, 6
_TOKEN_COUNT, _TOKEN_START, _TOKEN_REPLACE, _TOKEN_RANDOM = 7, 8, 9, 10

# BEiT's MaskingGenerator: aspect ratio log-uniform in [0.3, 1/0.3], 10 tries per rectangle.
_MIN_ASPECT = 0.3
_BLOCK_TRIES = 10
_ASPECT_BITS = 10  # aspect ratios drawn from 2^10 levels (_aspect_levels)
_ASPECT_LEVELS = 1 << _ASPECT_BITS
_FAR = (1 << 14) - 1  # distance of a patch to an empty mask; fits the fill key's 14 bits


# ---------------------------------------------------------------------------------------------
# Counter-based hash RNG (int64 tensors holding uint32 values)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) and a 32-bit constant; no product reaches 2^63."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _stream(seeds: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (base, key), B x 1 int64 each, of one stream of B int64 seeds."""
    key = _mix32(((seeds >> 32) + stream * 0x9E3779B9) & _M32)
    base = _mix32((seeds & _M32) ^ key)
    return base[:, None], key[:, None]


def _bits(stream: tuple[torch.Tensor, torch.Tensor], counter: torch.Tensor) -> torch.Tensor:
    """B x N uint32 values (in int64) of a stream at counters N (or B x N) in [0, 2^32)."""
    base, key = stream
    return _mix32(_mix32(base ^ _mul32(counter, 0x85EBCA6B)) ^ key)


def _fixed32(p: float) -> int:
    """p in [0, 1] as a 32-bit fixed-point fraction."""
    return int(round(p * 2.0**32))


def _per_sample_seeds(seed, batch: int, device) -> torch.Tensor:
    """B int64 seeds: the given tensor, or one hashed from (seed, row) per row for an int seed."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != (batch,):
            raise ValueError(f"seed tensor must be int64 of shape ({batch},), got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        return _from_host(seed, device).contiguous()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or an int64 tensor of shape B, got "
                         f"{type(seed).__name__}")
    s = seed % 2**64
    s = _from_host(torch.tensor([s - 2**64 if s >= 2**63 else s], dtype=torch.int64), device)
    rows = torch.arange(batch, device=device)
    stream = _stream(s, _SEED)
    hi, lo = _bits(stream, 2 * rows)[0], _bits(stream, 2 * rows + 1)[0]
    return ((hi & 0x7FFFFFFF) << 32) | lo


def _from_host(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`. From the host to CUDA through pinned memory with non_blocking=True: a copy
    from pageable memory would synchronize the host with the device (pinning is only asked for on
    a CUDA device, so a CPU-only torch never pins)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _smallest(bits: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """B x N bool: in each row the `count` (B) eligible positions with the smallest hashed keys."""
    n = bits.shape[1]
    index = torch.arange(n, device=bits.device)
    keys = torch.where(eligible, (bits << _INDEX_BITS) | index, _INT64_MAX)
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, index.expand_as(order).contiguous())
    return eligible & (rank < count[:, None])


def _spread(starts: torch.Tensor, length: int, width: int) -> torch.Tensor:
    """B x width bool: positions t with a start in (t - length, t], for B x N starts."""
    ends = torch.cumsum(starts, dim=1)
    ends = torch.nn.functional.pad(ends, (1, 0))
    t = torch.arange(width, device=starts.device)
    return ends[:, t + 1] > ends[:, (t + 1 - length).clamp_min(0)]


def _use_triton(device: torch.device) -> bool:
    """Whether `device` runs the Triton kernels: CUDA, or CPU under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return device.type == "cpu"
    return device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# Span masks (audio)


def span_mask(lengths, max_len, mask_prob, mask_length, min_masks=0, seed=0,
              require_same_masks=False, same_count=None):
    """B int lengths -> B x max_len bool span mask (True = masked) on lengths.device.

    same_count (with require_same_masks): a 1-element int64 tensor, the count every row keeps
    instead of the batch's smallest (the smallest of a larger group the batch is part of, as
    the trainer's audio crop groups); rows with fewer masked steps keep them all.
    """
    lengths, seeds = _check_span(lengths, max_len, mask_prob, mask_length, min_masks, seed)
    if _use_triton(lengths.device) and lengths.numel():
        return _span_mask_triton(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                                 require_same_masks, same_count=same_count)
    return _span_reference(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                           require_same_masks, same_count)


def span_mask_reference(lengths, max_len, mask_prob, mask_length, min_masks=0, seed=0,
                        require_same_masks=False, same_count=None):
    """Plain-PyTorch ground truth of span_mask: same arguments, B x max_len bool.

    A sample of length L masks num = max(min_masks, int(mask_prob * L / mask_length + U)) spans
    of mask_length steps (they may overlap), their starts drawn without replacement from
    [0, L - mask_length), or from [0, num] when that range holds num or fewer; steps at or past
    L are never masked.
    """
    lengths, seeds = _check_span(lengths, max_len, mask_prob, mask_length, min_masks, seed)
    return _span_reference(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                           require_same_masks, same_count)


def _check_span(lengths, max_len, mask_prob, mask_length, min_masks, seed):
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise ValueError("span_mask: lengths must be a 1-D integer tensor, got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} "
                         f"{tuple(getattr(lengths, 'shape', ()))}")
    _need_int("span_mask", "max_len", max_len, 0)
    _need_int("span_mask", "mask_length", mask_length, 1)
    _need_int("span_mask", "min_masks", min_masks, 0)
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"span_mask: mask_prob must be in [0, 1], got {mask_prob}")
    lengths = lengths.long()
    # Asynchronous on CUDA: the check costs no host synchronization.
    torch._assert_async(((lengths >= 0) & (lengths <= max_len)).all(),
                        f"span_mask: every length must be in [0, max_len={max_len}]")
    return lengths, _per_sample_seeds(seed, lengths.shape[0], lengths.device)


def _need_int(op, name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{op}: {name} must be an int >= {low}, got {value!r}")


def _span_reference(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                    require_same_masks, same_count=None):
    batch, device = lengths.shape[0], lengths.device
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    u = _bits(_stream(seeds, _SPAN_COUNT), zero)[:, 0]
    num = ((_fixed32(mask_prob / mask_length) * lengths + u) >> 32).clamp_min(min_masks)
    # fairseq draws starts from [0, L - mask_length); when that leaves num or fewer candidates it
    # draws from num + 1 of them instead (spans then reach, and are cut at, the sample's end).
    room = lengths - mask_length
    candidates = torch.where(room > num, room, num + 1)
    width = max(max_len, min_masks) + 1
    c = torch.arange(width, device=device)
    starts = _smallest(_bits(_stream(seeds, _SPAN_START), c), c < candidates[:, None], num)
    mask = _spread(starts.long(), mask_length, max_len)
    mask &= torch.arange(max_len, device=device) < lengths[:, None]
    if require_same_masks and batch:
        mask = _trim_to_min(mask, seeds, same_count)
    return mask


def _trim_to_min(mask, seeds, same_count=None):
    """fairseq require_same_masks: keep a uniform subset of the batch's smallest masked count
    (or of same_count)."""
    target = mask.sum(1).min() if same_count is None else same_count.reshape(()).to(mask.device)
    target = target.expand(mask.shape[0])
    t = torch.arange(mask.shape[1], device=mask.device)
    return _smallest(_bits(_stream(seeds, _SPAN_TRIM), t), mask, target)


# ---------------------------------------------------------------------------------------------
# Block masks (image)


def block_mask(batch, grid, mask_ratio, seed=0, min_block=16, inverse=False, device=None,
               inverse_length=3, inverse_adjust=0.07):
    """B x (h*w) bool block mask over an h x w patch grid, exactly round(ratio*h*w) True per row.

    BEiT rectangles (inverse=False) or data2vec 2.0 inverse blocks of side `inverse_length` with
    `inverse_adjust` (fairseq mask_length, mask_prob_adjust), made on `device` (default: the seed
    tensor's device, else CPU): one Triton program per sample on CUDA (and on CPU under
    TRITON_INTERPRET=1), else the reference; the two are bit-identical.
    """
    args = _check_block(batch, grid, mask_ratio, seed, min_block, inverse, device, inverse_length,
                        inverse_adjust)
    seeds = args[0]
    h, w = grid
    if _use_triton(seeds.device) and batch and h * w <= _MAX_TRITON_WIDTH:
        return _block_mask_triton(*args)
    return _block_reference(*args)


def block_mask_reference(batch, grid, mask_ratio, seed=0, min_block=16, inverse=False,
                         device=None, inverse_length=3, inverse_adjust=0.07):
    """Plain-PyTorch ground truth of block_mask: same arguments, B x (h*w) bool."""
    return _block_reference(*_check_block(batch, grid, mask_ratio, seed, min_block, inverse,
                                          device, inverse_length, inverse_adjust))


def _check_block(batch, grid, mask_ratio, seed, min_block, inverse, device, inverse_length,
                 inverse_adjust):
    _need_int("block_mask", "batch", batch, 0)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"block_mask: grid must be two positive ints (h, w), got {grid!r}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"block_mask: mask_ratio must be in [0, 1], got {mask_ratio}")
    _need_int("block_mask", "min_block", min_block, 1)
    _need_int("block_mask", "inverse_length", inverse_length, 1)
    if not inverse_adjust >= 0.0:
        raise ValueError(f"block_mask: inverse_adjust must be >= 0, got {inverse_adjust}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu")
    seeds = _per_sample_seeds(seed, batch, device)
    h, w = grid
    target = int(mask_ratio * h * w + 0.5)
    return seeds, h, w, mask_ratio, target, min_block, bool(inverse), inverse_length, inverse_adjust


def _block_reference(seeds, h, w, mask_ratio, target, min_block, inverse, length, adjust):
    if inverse:
        return _inverse_blocks(seeds, h, w, mask_ratio, target, length, adjust)
    return _beit_blocks(seeds, h, w, target, min_block)


def _beit_blocks(seeds, h, w, target, min_block):
    """BEiT MaskingGenerator per sample (all samples advance together), then the exact fill.

    One draw (4 hashed numbers) per step, in integers only so that every device and the kernel
    agree bit for bit: area = min_block + (remaining - min_block) * u0 in Q16 (u0: 16 bits),
    aspect from a 2^10-entry Q16 table of the log-uniform [0.3, 1/0.3] (_aspect_table),
    height = round(sqrt(area * aspect)) as the count of j >= 1 with (j - 1/2)^2 <= area * aspect
    (exact; halves round up), width likewise with 1/aspect; top/left uniform among the positions
    that fit. The rectangle is taken when it is smaller than the grid (strictly, as BEiT) and
    adds between 1 and `remaining` new patches. A sample stops at its target or after 10
    rejected draws in a row, as BEiT's generator gives up.
    """
    batch, device = seeds.shape[0], seeds.device
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    side = torch.arange(1, max(h, w) + 1, device=device)
    side_sq = (2 * side - 1) ** 2 << 30  # (j - 1/2)^2 in Q32
    table = _aspect_table(device)
    mask = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    dist = torch.full((batch, h, w), _FAR, dtype=torch.int64, device=device)
    count = torch.zeros(batch, dtype=torch.int64, device=device)
    rejected = torch.zeros_like(count)
    active = count < target
    stream = _stream(seeds, _BLOCK_DRAW)
    draw = 0
    while True:
        if draw % 8 == 0 and not bool(active.any()):  # one host sync per 8 draws
            break
        bits = _bits(stream, torch.arange(4 * draw, 4 * draw + 4, device=device))
        remaining = target - count
        area = (min_block << 16) + (remaining - min_block) * (bits[:, 0] >> 16)
        aspect = bits[:, 1] >> (32 - _ASPECT_BITS)
        tall = area * table[aspect]
        wide = area * table[_ASPECT_LEVELS - 1 - aspect]
        bh = ((side_sq <= tall[:, None]) & (side <= h)).sum(1)
        bw = ((side_sq <= wide[:, None]) & (side <= w)).sum(1)
        top = ((bits[:, 2] * (h - bh + 1).clamp_min(1)) >> 32).view(-1, 1, 1)
        left = ((bits[:, 3] * (w - bw + 1).clamp_min(1)) >> 32).view(-1, 1, 1)
        bottom, right = top + bh.view(-1, 1, 1), left + bw.view(-1, 1, 1)
        rect = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        new = (rect & ~mask).sum((1, 2))
        take = active & (bh < h) & (bw < w) & (new > 0) & (new <= remaining)
        mask |= rect & take.view(-1, 1, 1)
        # Manhattan distance to the rectangle, kept as the distance to the union of the taken ones.
        away = ((top - rows).clamp_min(0) + (rows - bottom + 1).clamp_min(0)
                + (left - cols).clamp_min(0) + (cols - right + 1).clamp_min(0))
        dist = torch.where(take.view(-1, 1, 1), torch.minimum(dist, away), dist)
        count += torch.where(take, new, 0)
        rejected = torch.where(take, 0, rejected + 1)
        active &= (count < target) & (rejected < _BLOCK_TRIES)
        draw += 1
    keys = _bits(_stream(seeds, _BLOCK_FILL), torch.arange(h * w, device=device))
    return _grow_to(mask.view(batch, h * w), dist.view(batch, h * w), target - count, keys, w)


def _inverse_centers(n, mask_ratio, length, adjust) -> int:
    return int(n * ((1.0 - mask_ratio + adjust) / length**2))


def _grow_to(mask, dist, deficit, keys, w):
    """Exact count for BEiT masks (which never overshoot): the missing patches are the unmasked
    ones nearest (Manhattan) to the mask, smallest hashed key, then index, first among equals.
    That is the 4-neighbour ring-by-ring growth of the mask, so the fill only enlarges existing
    blocks; an empty mask grows from its smallest-key patch."""
    n = mask.shape[1]
    index = torch.arange(n, device=mask.device)
    first = ((keys << _INDEX_BITS) | index).argmin(1, keepdim=True)
    from_first = (index // w - first // w).abs() + (index % w - first % w).abs()
    empty = ~mask.any(1, keepdim=True)
    dist = torch.where(empty, from_first, dist)
    return mask | _smallest_key(dist << 32 | keys, ~mask, deficit)


def _smallest_key(keys: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """B x N bool: the `count` eligible positions with the smallest int64 keys, ties by index."""
    index = torch.arange(keys.shape[1], device=keys.device)
    order = torch.where(eligible, keys, _INT64_MAX).sort(dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, index.expand_as(order).contiguous())
    return eligible & (rank < count[:, None])


@functools.lru_cache(maxsize=None)
def _aspect_levels() -> tuple[int, ...]:
    """Q16 aspect ratios exp(log 0.3 + (i + 1/2) / 2^10 * 2 log(1/0.3)), i < 2^10: the midpoints
    of 2^10 equal steps of BEiT's log-uniform aspect. decimal's exp is correctly rounded, so the
    table is the same on every machine; level 2^10 - 1 - i is the reciprocal of level i."""
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        lo = decimal.Decimal(_MIN_ASPECT).ln()
        step = -2 * lo / _ASPECT_LEVELS
        return tuple(int(((lo + (i + decimal.Decimal("0.5")) * step).exp() * 2**16)
                         .to_integral_value(decimal.ROUND_HALF_EVEN))
                     for i in range(_ASPECT_LEVELS))


_ASPECT_TABLES: dict[torch.device, torch.Tensor] = {}


def _aspect_table(device) -> torch.Tensor:
    """_aspect_levels as an int64 tensor on `device`, made once per device."""
    device = torch.device(device)
    if device not in _ASPECT_TABLES:
        table = torch.tensor(_aspect_levels(), dtype=torch.int64)
        if device.type == "cuda":  # pinned + non_blocking: no host synchronization
            table = table.pin_memory().to(device, non_blocking=True)
        _ASPECT_TABLES[device] = table.to(device)
    return _ASPECT_TABLES[device]


def _inverse_blocks(seeds, h, w, mask_ratio, target, length, adjust):
    """data2vec 2.0 inverse block mask (fairseq compute_block_mask_2d, inverse_mask=True).

    int(n * (keep + adjust) / length^2) centers drawn uniformly with replacement, each keeping the
    length x length square around it (offset length // 2, cut at the grid's edges); then, as
    fairseq's require_same_masks, a uniform random set of kept (or masked) patches flips so that
    exactly n - target stay kept; the mask is the complement.
    """
    batch, device, n = seeds.shape[0], seeds.device, h * w
    keep = n - target
    centers = _inverse_centers(n, mask_ratio, length, adjust)
    c = (_bits(_stream(seeds, _BLOCK_DRAW), torch.arange(centers, device=device)) * n) >> 32
    lo_r = (c // w - length // 2)[..., None, None]
    lo_c = (c % w - length // 2)[..., None, None]
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, 1, w)
    kept = ((rows >= lo_r) & (rows < lo_r + length) & (cols >= lo_c) & (cols < lo_c + length))
    kept = kept.any(1).view(batch, n)
    excess = kept.sum(1) - keep
    keys = _bits(_stream(seeds, _BLOCK_FILL), torch.arange(n, device=device))
    flip = _smallest(keys, torch.where(excess[:, None] > 0, kept, ~kept), excess.abs())
    return ~(kept ^ flip)


# ---------------------------------------------------------------------------------------------
# Token masks (text)


def token_mask(tokens, mask_prob, special_mask, mask_id, vocab_size, seed=0, span=1,
               replace=(0.8, 0.1, 0.1), random_exclude=None):
    """B x T int tokens -> (new tokens B x T same dtype, selected B x T bool), BERT-style."""
    args = _check_token(tokens, mask_prob, special_mask, mask_id, vocab_size, seed, span, replace,
                        random_exclude)
    if _use_triton(tokens.device) and tokens.numel():
        return _token_mask_triton(*args)
    return _token_reference(*args)


def token_mask_reference(tokens, mask_prob, special_mask, mask_id, vocab_size, seed=0, span=1,
                         replace=(0.8, 0.1, 0.1), random_exclude=None):
    """Plain-PyTorch ground truth of token_mask: same arguments and results.

    `mask_prob` of each row's non-special tokens are selected in spans of `span` (starts drawn
    without replacement among the non-special positions; a span covers the next `span`
    positions, special ones excepted); each selected token independently becomes `mask_id`,
    a random id or stays, with probabilities `replace` = (mask, random, keep). Random ids are
    uniform over [0, vocab_size) without `random_exclude` (default: mask_id alone).
    """
    args = _check_token(tokens, mask_prob, special_mask, mask_id, vocab_size, seed, span, replace,
                        random_exclude)
    return _token_reference(*args)


def _check_token(tokens, mask_prob, special_mask, mask_id, vocab_size, seed, span, replace,
                 random_exclude):
    if (not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point()
            or tokens.dtype == torch.bool):
        raise ValueError("token_mask: tokens must be a B x T integer tensor, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                         f"{tuple(getattr(tokens, 'shape', ()))}")
    if (not isinstance(special_mask, torch.Tensor) or special_mask.dtype != torch.bool
            or special_mask.shape != tokens.shape or special_mask.device != tokens.device):
        raise ValueError(f"token_mask: special_mask must be bool {tuple(tokens.shape)} on "
                         f"{tokens.device}, got {getattr(special_mask, 'dtype', None)} "
                         f"{tuple(getattr(special_mask, 'shape', ()))}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"token_mask: mask_prob must be in [0, 1], got {mask_prob}")
    _need_int("token_mask", "vocab_size", vocab_size, 1)
    _need_int("token_mask", "span", span, 1)
    _need_int("token_mask", "mask_id", mask_id, 0)
    if mask_id >= vocab_size:
        raise ValueError(f"token_mask: mask_id {mask_id} must be below vocab_size {vocab_size}")
    replace = tuple(float(r) for r in replace)
    if len(replace) != 3 or min(replace) < 0 or abs(sum(replace) - 1.0) > 1e-6:
        raise ValueError("token_mask: replace must be 3 non-negative fractions [mask, random, "
                         f"keep] summing to 1, got {replace}")
    exclude = sorted({mask_id} if random_exclude is None else {int(i) for i in random_exclude})
    if any(not 0 <= i < vocab_size for i in exclude):
        raise ValueError(f"token_mask: random_exclude ids must be in [0, {vocab_size}), got "
                         f"{exclude}")
    if replace[1] > 0 and len(exclude) >= vocab_size:
        raise ValueError("token_mask: random replacement needs an id outside random_exclude")
    seeds = _per_sample_seeds(seed, tokens.shape[0], tokens.device)
    # Integer thresholds on 24 random bits: the same comparisons in the reference and the kernel.
    keep_below = int(round(replace[2] * 2**24))
    random_below = keep_below + int(round(replace[1] * 2**24))
    return (tokens, special_mask, seeds, _fixed32(mask_prob / span), span, mask_id,
            keep_below, random_below, vocab_size - len(exclude), tuple(exclude))


def _token_reference(tokens, special, seeds, rate, span, mask_id, keep_below, random_below,
                     choices, exclude):
    device, length = tokens.device, tokens.shape[1]
    normal = ~special
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    u = _bits(_stream(seeds, _TOKEN_COUNT), zero)[:, 0]
    num = (rate * normal.sum(1) + u) >> 32
    t = torch.arange(length, device=device)
    starts = _smallest(_bits(_stream(seeds, _TOKEN_START), t), normal, num)
    selected = _spread(starts.long(), span, length) & normal
    draw = _bits(_stream(seeds, _TOKEN_REPLACE), t) >> 8
    new_id = (_bits(_stream(seeds, _TOKEN_RANDOM), t) * choices) >> 32
    for e in exclude:  # ascending: the k-th allowed id skips every excluded id at or below it
        new_id += (new_id >= e).long()
    out = torch.where(draw >= random_below, mask_id, new_id.to(tokens.dtype))
    out = torch.where(selected & (draw >= keep_below), out, tokens)
    return out, selected


# ---------------------------------------------------------------------------------------------
# data2vec 2.0 helpers: exact-count random masks and per-clone seeds

_RANDOM_MASK, _CLONE = 11, 12


def random_mask(eligible, mask_prob, seed=0, same_count=True):
    """B x T bool eligible (True = may be masked) -> B x T bool mask, True = masked.

    data2vec 2.0 with mask_length 1 (fairseq's MAE-style random_masking): a row with c eligible
    positions masks c - int(c * (1 - mask_prob)) of them, a uniform subset; with same_count every
    row masks the batch's smallest such count, so the visible tokens batch densely. Plain PyTorch
    on the tensors' device (one argsort per row); no Triton kernel.
    """
    if (not isinstance(eligible, torch.Tensor) or eligible.dtype != torch.bool
            or eligible.dim() != 2):
        raise ValueError("random_mask: eligible must be a B x T bool tensor, got "
                         f"{getattr(eligible, 'dtype', type(eligible).__name__)} "
                         f"{tuple(getattr(eligible, 'shape', ()))}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"random_mask: mask_prob must be in [0, 1], got {mask_prob}")
    batch, length = eligible.shape
    seeds = _per_sample_seeds(seed, batch, eligible.device)
    count = eligible.sum(1)
    num = count - torch.floor(count.double() * (1.0 - mask_prob)).long()
    if same_count and batch:
        num = num.min().expand(batch)
    t = torch.arange(length, device=eligible.device)
    return _smallest(_bits(_stream(seeds, _RANDOM_MASK), t), eligible, num)


def clone_seeds(seed, clones):
    """B int64 per-sample seeds -> B * clones int64 seeds, row b * clones + m for clone m of sample
    b (data2vec 2.0's clone_batch: each clone of a sample gets its own mask)."""
    _need_int("clone_seeds", "clones", clones, 1)
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.dim() != 1:
        raise ValueError("clone_seeds: seed must be a 1-D int64 tensor, got "
                         f"{getattr(seed, 'dtype', type(seed).__name__)}")
    m = torch.arange(clones, device=seed.device)
    stream = _stream(seed, _CLONE)
    hi, lo = _bits(stream, 2 * m), _bits(stream, 2 * m + 1)
    return (((hi & 0x7FFFFFFF) << 32) | lo).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Triton kernels: one program per sample holds its whole row (keys, selection, spans).

_MAX_TRITON_WIDTH = 8192  # longer rows take the reference path (still on the device)


def _span_mask_triton(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                      require_same_masks, out=None, same_count=None):
    """Checked span_mask arguments -> B x max_len bool by the kernels (into `out` when given)."""
    batch = lengths.shape[0]
    width = max(max_len, min_masks) + 1
    if width > _MAX_TRITON_WIDTH:
        return _span_reference(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                               require_same_masks, same_count)
    if out is None:
        out = torch.empty(batch, max_len, dtype=torch.bool, device=lengths.device)
    assert out.shape == (batch, max_len) and out.dtype == torch.bool and out.is_contiguous()
    counts = torch.empty(batch, dtype=torch.int64, device=lengths.device)
    _span_kernel[(batch,)](
        seeds, lengths.contiguous(), out.view(torch.uint8), counts, max_len, min_masks,
        _fixed32(mask_prob / mask_length), _salt(_SPAN_COUNT), _salt(_SPAN_START),
        MASK_LENGTH=mask_length, BLOCK=triton.next_power_of_2(width),
        num_warps=_warps(width),
    )
    if require_same_masks and max_len:
        target = counts.min().reshape(1) if same_count is None else \
            same_count.reshape(1).to(device=lengths.device, dtype=torch.int64)
        _trim_kernel[(batch,)](seeds, out.view(torch.uint8), target, max_len,
                               _salt(_SPAN_TRIM), BLOCK=triton.next_power_of_2(max_len),
                               num_warps=_warps(max_len))
    return out


def _token_mask_triton(tokens, special, seeds, rate, span, mask_id, keep_below, random_below,
                       choices, exclude, out=None, selected=None):
    """Checked token_mask arguments -> (new tokens, selected) by the kernel."""
    batch, length = tokens.shape
    if length > _MAX_TRITON_WIDTH:
        return _token_reference(tokens, special, seeds, rate, span, mask_id, keep_below,
                                random_below, choices, exclude)
    if out is None:
        out = torch.empty_like(tokens, memory_format=torch.contiguous_format)
    if selected is None:
        selected = torch.empty(batch, length, dtype=torch.bool, device=tokens.device)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype and out.is_contiguous()
    assert selected.shape == tokens.shape and selected.dtype == torch.bool
    table = torch.tensor(exclude + (0,), dtype=torch.int64)
    if tokens.is_cuda:  # pinned + non_blocking: no host synchronization
        table = table.pin_memory().to(tokens.device, non_blocking=True)
    _token_kernel[(batch,)](
        seeds, tokens.contiguous(), special.contiguous().view(torch.uint8), out,
        selected.view(torch.uint8), table, len(exclude), length, rate, mask_id, keep_below,
        random_below, choices, _salt(_TOKEN_COUNT), _salt(_TOKEN_START), _salt(_TOKEN_REPLACE),
        _salt(_TOKEN_RANDOM), SPAN=span, BLOCK=triton.next_power_of_2(length),
        num_warps=_warps(length),
    )
    return out, selected


def _block_mask_triton(seeds, h, w, mask_ratio, target, min_block, inverse, length, adjust,
                       out=None):
    """Checked block_mask arguments -> B x (h*w) bool by one program per sample."""
    batch, n = seeds.shape[0], h * w
    if out is None:
        out = torch.empty(batch, n, dtype=torch.bool, device=seeds.device)
    assert out.shape == (batch, n) and out.dtype == torch.bool and out.is_contiguous()
    block = triton.next_power_of_2(n)
    if inverse:
        _inverse_block_kernel[(batch,)](
            seeds, out.view(torch.uint8), h, w, n - target,
            _inverse_centers(n, mask_ratio, length, adjust), length,
            _salt(_BLOCK_DRAW), _salt(_BLOCK_FILL), BLOCK=block, num_warps=_warps(n))
    else:
        _beit_block_kernel[(batch,)](
            seeds, _aspect_table(seeds.device), out.view(torch.uint8), h, w, target, min_block,
            _salt(_BLOCK_DRAW), _salt(_BLOCK_FILL), FAR=_FAR, TRIES=_BLOCK_TRIES,
            ASPECT_BITS=_ASPECT_BITS, FILL_BITS=32 + (h + w).bit_length(), BLOCK=block,
            SIDE=triton.next_power_of_2(max(h, w)), num_warps=_warps(n))
    return out


def _warps(width: int) -> int:
    """Warps for a program holding a row of `width` int64 keys: 8 per thread of one warp up to 256
    (the 14 x 14 image grid), so that every reduction of the BEiT loop is a warp shuffle with no
    block barrier (130 registers, no spill on sm_90); one more warp per 256 above, up to 8 (a
    512-token text row: 2 warps, 80 registers; 4 warps spilled)."""
    return max(1, min(8, triton.next_power_of_2(width) // 256))


def _salt(stream: int) -> int:
    """The stream's term added to the seed's high word, as _stream adds it."""
    return (stream * 0x9E3779B9) & _M32


if triton is not None:

    @triton.jit
    def _mix32_tl(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _stream_tl(seed, salt):
        """(base, key) uint32 of one sample's stream: _stream in uint32 arithmetic."""
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        key = _mix32_tl(hi + salt.to(tl.uint32))
        base = _mix32_tl((seed & 0xFFFFFFFF).to(tl.uint32) ^ key)
        return base, key

    @triton.jit
    def _bits_tl(base, key, counter):
        """uint32 bits at int counters, widened to int64 as the reference holds them."""
        x = _mix32_tl(_mix32_tl(base ^ (counter.to(tl.uint32) * 0x85EBCA6B)) ^ key)
        return x.to(tl.int64)

    @triton.jit
    def _max_tl(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _select_tl(bits, index, eligible, count, KEY_BITS: tl.constexpr = 32):
        """The `count` eligible positions with the smallest keys (bits << 31) | index, where
        bits are non-negative below 2^KEY_BITS.

        No sort (the interpreter's is a Python loop): the count-th smallest bits value is built
        from the top bit down (a bit is set while fewer than `count` values lie below the prefix
        with it); ties at that value, rare, are resolved by index the same way.
        """
        b = tl.where(eligible, bits, tl.full([], 1, tl.int64) << KEY_BITS)
        kth = tl.zeros([], dtype=tl.int64)
        for i in range(KEY_BITS):
            trial = kth | (tl.full([], 1, tl.int64) << (KEY_BITS - 1 - i))
            kth = tl.where(tl.sum((b < trial).to(tl.int32)) < count, trial, kth)
        ties = b == kth
        need = count - tl.sum((b < kth).to(tl.int32))
        last = tl.full([], 0x7FFFFFFF, tl.int64)
        if tl.sum(ties.to(tl.int32)) > need:
            last = tl.zeros([], dtype=tl.int64)
            for i in range(31):
                trial = last | (tl.full([], 1, tl.int64) << (30 - i))
                below = tl.sum((ties & (index < trial)).to(tl.int32))
                last = tl.where(below < need, trial, last)
        return ((b < kth) | (ties & (index <= last))) & (count > 0)

    @triton.jit
    def _spread_tl(starts, index, LENGTH: tl.constexpr):
        """Positions with a start in (t - LENGTH, t]: the last start so far is within reach."""
        last = tl.associative_scan(tl.where(starts, index, -LENGTH), 0, _max_tl)
        return index - last < LENGTH

    @triton.jit
    def _span_kernel(seeds, lengths, out, counts, max_len, min_masks, rate, salt_count,
                     salt_start, MASK_LENGTH: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        seed = tl.load(seeds + b)
        length = tl.load(lengths + b)
        base, key = _stream_tl(seed, salt_count)
        u = _bits_tl(base, key, tl.zeros([1], dtype=tl.int64))
        num = tl.maximum((rate * length + tl.sum(u)) >> 32, min_masks)
        room = length - MASK_LENGTH
        candidates = tl.where(room > num, room, num + 1)
        c = tl.arange(0, BLOCK).to(tl.int64)
        base, key = _stream_tl(seed, salt_start)
        starts = _select_tl(_bits_tl(base, key, c), c, c < candidates, num)
        mask = _spread_tl(starts, c, MASK_LENGTH) & (c < length)
        tl.store(out + b.to(tl.int64) * max_len + c, mask.to(tl.uint8), mask=c < max_len)
        tl.store(counts + b, tl.sum(mask.to(tl.int64)))

    @triton.jit
    def _trim_kernel(seeds, out, target, max_len, salt, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.arange(0, BLOCK).to(tl.int64)
        row = out + b.to(tl.int64) * max_len + t
        mask = tl.load(row, mask=t < max_len, other=0) != 0
        base, key = _stream_tl(tl.load(seeds + b), salt)
        keep = _select_tl(_bits_tl(base, key, t), t, mask, tl.load(target))
        tl.store(row, keep.to(tl.uint8), mask=t < max_len)

    @triton.jit
    def _token_kernel(seeds, tokens, special, out, selected, exclude, n_exclude, length, rate,
                      mask_id, keep_below, random_below, choices, salt_count, salt_start,
                      salt_replace, salt_random, SPAN: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        seed = tl.load(seeds + b)
        t = tl.arange(0, BLOCK).to(tl.int64)
        inside = t < length
        at = b.to(tl.int64) * length + t
        normal = inside & (tl.load(special + at, mask=inside, other=1) == 0)
        base, key = _stream_tl(seed, salt_count)
        u = _bits_tl(base, key, tl.zeros([1], dtype=tl.int64))
        num = (rate * tl.sum(normal.to(tl.int64)) + tl.sum(u)) >> 32
        base, key = _stream_tl(seed, salt_start)
        starts = _select_tl(_bits_tl(base, key, t), t, normal, num)
        chosen = _spread_tl(starts, t, SPAN) & normal
        base, key = _stream_tl(seed, salt_replace)
        draw = _bits_tl(base, key, t) >> 8
        base, key = _stream_tl(seed, salt_random)
        new_id = (_bits_tl(base, key, t) * choices) >> 32
        for i in range(n_exclude):
            new_id += (new_id >= tl.load(exclude + i)).to(tl.int64)
        old = tl.load(tokens + at, mask=inside, other=0)
        new = tl.where(draw >= random_below, mask_id, new_id).to(old.dtype)
        new = tl.where(chosen & (draw >= keep_below), new, old)
        tl.store(out + at, new, mask=inside)
        tl.store(selected + at, chosen.to(tl.uint8), mask=inside)

    @triton.jit
    def _beit_block_kernel(seeds, aspect, out, h, w, target, min_block, salt_draw, salt_fill,
                           FAR: tl.constexpr, TRIES: tl.constexpr, ASPECT_BITS: tl.constexpr,
                           FILL_BITS: tl.constexpr, BLOCK: tl.constexpr, SIDE: tl.constexpr):
        """_beit_blocks for one sample: the same integer draws, in a loop of its own."""
        b = tl.program_id(0)
        seed = tl.load(seeds + b)
        h = h.to(tl.int64)
        w = w.to(tl.int64)
        target = target.to(tl.int64)
        min_block = min_block.to(tl.int64)
        n = h * w
        index = tl.arange(0, BLOCK).to(tl.int64)
        inside = index < n
        row = index // w
        col = index % w
        side = tl.arange(0, SIDE).to(tl.int64) + 1
        side_sq = ((2 * side - 1) * (2 * side - 1)) << 30
        base, key = _stream_tl(seed, salt_draw)
        mask = index < 0
        dist = tl.full([BLOCK], FAR, tl.int64)
        count = tl.zeros([], dtype=tl.int64)
        rejected = tl.zeros([], dtype=tl.int64)
        draw = tl.zeros([], dtype=tl.int64)
        active = count < target
        while active:
            b0 = _bits_tl(base, key, 4 * draw)
            b1 = _bits_tl(base, key, 4 * draw + 1)
            b2 = _bits_tl(base, key, 4 * draw + 2)
            b3 = _bits_tl(base, key, 4 * draw + 3)
            remaining = target - count
            area = (min_block << 16) + (remaining - min_block) * (b0 >> 16)
            level = b1 >> (32 - ASPECT_BITS)
            tall = area * tl.load(aspect + level)
            wide = area * tl.load(aspect + ((1 << ASPECT_BITS) - 1 - level))
            bh = tl.sum(((side_sq <= tall) & (side <= h)).to(tl.int64))
            bw = tl.sum(((side_sq <= wide) & (side <= w)).to(tl.int64))
            top = (b2 * tl.maximum(h - bh + 1, 1)) >> 32
            left = (b3 * tl.maximum(w - bw + 1, 1)) >> 32
            bottom = top + bh
            right = left + bw
            rect = inside & (row >= top) & (row < bottom) & (col >= left) & (col < right)
            new = tl.sum((rect & ~mask).to(tl.int64))
            take = (bh < h) & (bw < w) & (new > 0) & (new <= remaining)
            mask = mask | (rect & take)
            away = (tl.maximum(top - row, 0) + tl.maximum(row - bottom + 1, 0)
                    + tl.maximum(left - col, 0) + tl.maximum(col - right + 1, 0))
            dist = tl.where(take, tl.minimum(dist, away), dist)
            count += tl.where(take, new, 0)
            rejected = tl.where(take, 0, rejected + 1)
            draw += 1
            active = (count < target) & (rejected < TRIES)
        # The exact fill (_grow_to): nearest unmasked patches first, then key, then index.
        base, key = _stream_tl(seed, salt_fill)
        keys = _bits_tl(base, key, index)
        first = tl.min(tl.where(inside, (keys << 31) | index, 0x7FFFFFFFFFFFFFFF)) & 0x7FFFFFFF
        from_first = tl.abs(row - first // w) + tl.abs(col - first % w)
        dist = tl.where(count == 0, from_first, dist)
        # Unmasked patches lie within h + w of the mask: their keys fit FILL_BITS bits.
        fill = _select_tl((dist << 32) | keys, index, inside & ~mask, target - count, FILL_BITS)
        tl.store(out + b.to(tl.int64) * n + index, (mask | fill).to(tl.uint8), mask=inside)

    @triton.jit
    def _inverse_block_kernel(seeds, out, h, w, keep, centers, length, salt_draw, salt_fill,
                              BLOCK: tl.constexpr):
        """_inverse_blocks for one sample."""
        b = tl.program_id(0)
        seed = tl.load(seeds + b)
        w = w.to(tl.int64)
        n = h.to(tl.int64) * w
        length = length.to(tl.int64)
        index = tl.arange(0, BLOCK).to(tl.int64)
        inside = index < n
        row = index // w
        col = index % w
        base, key = _stream_tl(seed, salt_draw)
        kept = index < 0
        for i in range(centers):
            c = (_bits_tl(base, key, tl.full([], i, tl.int64)) * n) >> 32
            lo_r = c // w - length // 2
            lo_c = c % w - length // 2
            kept = kept | ((row >= lo_r) & (row < lo_r + length) & (col >= lo_c)
                           & (col < lo_c + length))
        kept = kept & inside
        excess = tl.sum(kept.to(tl.int64)) - keep
        base, key = _stream_tl(seed, salt_fill)
        candidates = tl.where(excess > 0, kept, inside & ~kept)
        flip = _select_tl(_bits_tl(base, key, index), index, candidates, tl.abs(excess))
        tl.store(out + b.to(tl.int64) * n + index, (inside & (kept == flip)).to(tl.uint8),
                 mask=inside)
