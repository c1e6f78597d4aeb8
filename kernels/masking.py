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
Only the BEiT geometry (area, aspect, sqrt, round) uses float64, in block_mask, which has no kernel.

Exact counts and other rules:
  span_mask   no count rule of its own: require_same_masks keeps, in every row, a uniform subset
              of its masked steps of the batch's smallest count (fairseq's rule). Unlike fairseq,
              a sample short enough to be masked whole is allowed (fairseq raises ValueError).
  block_mask  BEiT never overshoots its target; when its generator gives up short, the missing
              patches are added among the unmasked 4-neighbours of the mask (smallest keys first,
              ring by ring), so the fill only enlarges existing blocks. Inverse: fairseq's
              require_same_masks rule, a uniform random set of kept (or masked) patches flips.
  token_mask  none: the selected count is the probabilistic rounding above, as fairseq's
              MaskTokensDataset; each selected token is replaced independently.

Paths: span_mask and token_mask run Triton kernels for CUDA tensors (and CPU tensors under
TRITON_INTERPRET=1), else span_mask_reference / token_mask_reference, plain PyTorch and the ground
truth; the two are bit-identical. block_mask is sequential by nature (BEiT adds one rectangle at a
time) and runs its vectorized PyTorch reference on the device.
"""
from __future__ import annotations

import math
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
        return seed.to(device).contiguous()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or an int64 tensor of shape B, got "
                         f"{type(seed).__name__}")
    s = seed % 2**64
    s = torch.tensor([s - 2**64 if s >= 2**63 else s], dtype=torch.int64, device=device)
    rows = torch.arange(batch, device=device)
    stream = _stream(s, _SEED)
    hi, lo = _bits(stream, 2 * rows)[0], _bits(stream, 2 * rows + 1)[0]
    return ((hi & 0x7FFFFFFF) << 32) | lo


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
              require_same_masks=False):
    """B int lengths -> B x max_len bool span mask (True = masked) on lengths.device."""
    lengths, seeds = _check_span(lengths, max_len, mask_prob, mask_length, min_masks, seed)
    if _use_triton(lengths.device) and lengths.numel():
        return _span_mask_triton(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                                 require_same_masks)
    return _span_reference(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                           require_same_masks)


def span_mask_reference(lengths, max_len, mask_prob, mask_length, min_masks=0, seed=0,
                        require_same_masks=False):
    """Plain-PyTorch ground truth of span_mask: same arguments, B x max_len bool.

    A sample of length L masks num = max(min_masks, int(mask_prob * L / mask_length + U)) spans
    of mask_length steps (they may overlap), their starts drawn without replacement from
    [0, L - mask_length), or from [0, num] when that range holds num or fewer; steps at or past
    L are never masked.
    """
    lengths, seeds = _check_span(lengths, max_len, mask_prob, mask_length, min_masks, seed)
    return _span_reference(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                           require_same_masks)


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
                    require_same_masks):
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
        mask = _trim_to_min(mask, seeds)
    return mask


def _trim_to_min(mask, seeds):
    """fairseq require_same_masks: keep a uniform subset of the batch's smallest masked count."""
    target = mask.sum(1).min().expand(mask.shape[0])
    t = torch.arange(mask.shape[1], device=mask.device)
    return _smallest(_bits(_stream(seeds, _SPAN_TRIM), t), mask, target)


# ---------------------------------------------------------------------------------------------
# Block masks (image)


def block_mask(batch, grid, mask_ratio, seed=0, min_block=16, inverse=False, device=None,
               inverse_length=3, inverse_adjust=0.07):
    """B x (h*w) bool block mask over an h x w patch grid, exactly round(ratio*h*w) True per row.

    BEiT rectangles (inverse=False) or data2vec 2.0 inverse blocks of side `inverse_length` with
    `inverse_adjust` (fairseq mask_length, mask_prob_adjust). No Triton kernel: the vectorized
    reference runs on `device` (default: the seed tensor's device, else CPU).
    """
    return block_mask_reference(batch, grid, mask_ratio, seed, min_block, inverse, device,
                                inverse_length, inverse_adjust)


def block_mask_reference(batch, grid, mask_ratio, seed=0, min_block=16, inverse=False,
                         device=None, inverse_length=3, inverse_adjust=0.07):
    """Plain-PyTorch ground truth of block_mask: same arguments, B x (h*w) bool."""
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
    if inverse:
        return _inverse_blocks(seeds, h, w, mask_ratio, target, inverse_length, inverse_adjust)
    return _beit_blocks(seeds, h, w, target, min_block)


def _beit_blocks(seeds, h, w, target, min_block):
    """BEiT MaskingGenerator per sample (all samples advance together), then the exact fill.

    One draw (4 hashed numbers) per step: area ~ U(min_block, remaining), log-uniform aspect,
    height/width rounded half-to-even as Python's round, top/left uniform among the positions
    that fit; the rectangle is taken when it is smaller than the grid (strictly, as BEiT) and
    adds between 1 and `remaining` new patches. A sample stops at its target or after 10
    rejected draws in a row, as BEiT's generator gives up.
    """
    batch, device = seeds.shape[0], seeds.device
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    mask = torch.zeros(batch, h, w, dtype=torch.bool, device=device)
    count = torch.zeros(batch, dtype=torch.int64, device=device)
    rejected = torch.zeros_like(count)
    active = count < target
    stream = _stream(seeds, _BLOCK_DRAW)
    log_lo, log_span = math.log(_MIN_ASPECT), -2.0 * math.log(_MIN_ASPECT)
    draw = 0
    while True:
        if draw % 8 == 0 and not bool(active.any()):  # one host sync per 8 draws
            break
        bits = _bits(stream, torch.arange(4 * draw, 4 * draw + 4, device=device))
        u = bits[:, :2].double() * 2.0**-32
        remaining = target - count
        area = min_block + (remaining.double() - min_block) * u[:, 0]
        aspect = torch.exp(log_lo + log_span * u[:, 1])
        bh = torch.round(torch.sqrt(area * aspect)).long()
        bw = torch.round(torch.sqrt(area / aspect)).long()
        top = (bits[:, 2] * (h - bh + 1).clamp_min(1)) >> 32
        left = (bits[:, 3] * (w - bw + 1).clamp_min(1)) >> 32
        rect = ((rows >= top.view(-1, 1, 1)) & (rows < (top + bh).view(-1, 1, 1))
                & (cols >= left.view(-1, 1, 1)) & (cols < (left + bw).view(-1, 1, 1)))
        new = (rect & ~mask).sum((1, 2))
        take = active & (bh < h) & (bw < w) & (new > 0) & (new <= remaining)
        mask |= rect & take.view(-1, 1, 1)
        count += torch.where(take, new, 0)
        rejected = torch.where(take, 0, rejected + 1)
        active &= (count < target) & (rejected < _BLOCK_TRIES)
        draw += 1
    return _grow_to(mask, target - count, _bits(_stream(seeds, _BLOCK_FILL),
                                                torch.arange(h * w, device=device)))


def _grow_to(mask, deficit, keys):
    """Exact count for BEiT masks (which never overshoot): add the missing patches one ring at a
    time among the unmasked 4-neighbours of the mask, smallest hashed keys first, so the fill
    only enlarges existing blocks (an empty mask is seeded with its smallest-key patch)."""
    batch, h, w = mask.shape
    flat = mask.view(batch, h * w)
    while bool((deficit > 0).any()):
        near = mask.clone()
        near[:, 1:] |= mask[:, :-1]
        near[:, :-1] |= mask[:, 1:]
        near[:, :, 1:] |= mask[:, :, :-1]
        near[:, :, :-1] |= mask[:, :, 1:]
        empty = ~flat.any(1)
        frontier = (near.view(batch, h * w) | empty[:, None]) & ~flat
        add = _smallest(keys, frontier, torch.where(empty, deficit.clamp_max(1), deficit))
        flat |= add
        deficit = deficit - add.sum(1)
    return flat


def _inverse_blocks(seeds, h, w, mask_ratio, target, length, adjust):
    """data2vec 2.0 inverse block mask (fairseq compute_block_mask_2d, inverse_mask=True).

    int(n * (keep + adjust) / length^2) centers drawn uniformly with replacement, each keeping the
    length x length square around it (offset length // 2, cut at the grid's edges); then, as
    fairseq's require_same_masks, a uniform random set of kept (or masked) patches flips so that
    exactly n - target stay kept; the mask is the complement.
    """
    batch, device, n = seeds.shape[0], seeds.device, h * w
    keep = n - target
    centers = int(n * ((1.0 - mask_ratio + adjust) / length**2))
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
                      require_same_masks, out=None):
    """Checked span_mask arguments -> B x max_len bool by the kernels (into `out` when given)."""
    batch = lengths.shape[0]
    width = max(max_len, min_masks) + 1
    if width > _MAX_TRITON_WIDTH:
        return _span_reference(lengths, max_len, mask_prob, mask_length, min_masks, seeds,
                               require_same_masks)
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
        _trim_kernel[(batch,)](seeds, out.view(torch.uint8), counts.min().reshape(1), max_len,
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


def _warps(width: int) -> int:
    """Warps for a program holding `width` int64 keys: more for long rows, fewer registers each."""
    return 4 if width <= 1024 else 8


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
    def _select_tl(bits, index, eligible, count):
        """The `count` eligible positions with the smallest keys (bits << 31) | index.

        No sort (the interpreter's is a Python loop): the count-th smallest bits value is built
        from the top bit down (a bit is set while fewer than `count` values lie below the prefix
        with it); ties at that value, rare, are resolved by index the same way.
        """
        b = tl.where(eligible, bits, 0x100000000)
        kth = tl.zeros([], dtype=tl.int64)
        for i in range(32):
            trial = kth | (tl.full([], 1, tl.int64) << (31 - i))
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
