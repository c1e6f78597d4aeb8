"""d2v_kernels.masking: semantics against independent NumPy ports of the fairseq / BEiT algorithms,
structural properties, seeding, and the Triton kernels (interpreted on CPU) bit for bit against the
references."""
import math
import os
import random

# conftest.py sets TRITON_INTERPRET=1 (before triton is first imported) where no CUDA device
# exists; the kernel tests below need it and are skipped elsewhere.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from d2v_kernels import masking  # noqa: E402
from d2v_kernels.masking import (  # noqa: E402
    block_mask,
    block_mask_reference,
    span_mask,
    span_mask_reference,
    token_mask,
    token_mask_reference,
)

INTERPRETER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton interpreter on CPU tensors (set only "
                                 "without CUDA); tests/test_cuda_kernels.py runs these kernels "
                                 "compiled")


# ---------------------------------------------------------------------------------------------
# Independent NumPy ports of the reference algorithms (from their published semantics)


def fairseq_span_mask(lengths, max_len, mask_prob, mask_length, min_masks, same, rng):
    """fairseq compute_mask_indices: static lengths, no_overlap False, per-sample lengths."""
    mask = np.zeros((len(lengths), max_len), dtype=bool)
    chosen = []
    for size in lengths:
        num = max(min_masks, int(mask_prob * size / mask_length + rng.random()))
        keep_out = mask_length if size - mask_length > num else size - num - 1
        starts = rng.choice(size - keep_out, num, replace=False)
        idx = (starts[:, None] + np.arange(mask_length)[None, :]).ravel()
        chosen.append(np.unique(idx[idx < size]))
    target = min(len(c) for c in chosen) if same else None
    for i, idx in enumerate(chosen):
        if target is not None and len(idx) > target:
            idx = rng.choice(idx, target, replace=False)
        mask[i, idx] = True
    return mask


def beit_block_mask(h, w, target, min_block, rng):
    """BEiT MaskingGenerator (max block = the whole grid), then this module's fill rule: missing
    patches added at random among the unmasked 4-neighbours of the mask, ring by ring."""
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bh < h and bw < w:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = bh * bw - mask[top:top + bh, left:left + bw].sum()
                if 0 < new <= remaining:
                    mask[top:top + bh, left:left + bw] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    while count < target:
        near = dilate(mask) & ~mask if mask.any() else ~mask
        cells = list(np.flatnonzero(near))
        take = rng.sample(cells, min(len(cells), target - count) if mask.any() else 1)
        mask.flat[take] = True
        count += len(take)
    return mask


def d2v2_inverse_block_mask(h, w, mask_prob, length, adjust, rng):
    """data2vec 2.0 compute_block_mask_2d with inverse_mask: kept squares, exact kept count."""
    keep = 1 - mask_prob
    kept = np.zeros((h, w), dtype=bool)
    for _ in range(int(h * w * ((keep + adjust) / length**2))):
        c = rng.integers(h * w)
        r0, c0 = c // w - length // 2, c % w - length // 2
        kept[max(r0, 0):max(r0 + length, 0), max(c0, 0):max(c0 + length, 0)] = True
    want = h * w - int(mask_prob * h * w + 0.5)
    have = np.flatnonzero(kept)
    if len(have) > want:
        kept.flat[rng.choice(have, len(have) - want, replace=False)] = False
    elif len(have) < want:
        kept.flat[rng.choice(np.flatnonzero(~kept), want - len(have), replace=False)] = True
    return ~kept


def fairseq_token_selection(n, mask_prob, span, rng):
    """fairseq MaskTokensDataset selection over n maskable tokens (mask_multiple_length)."""
    num = int(mask_prob * n / span + rng.random())
    starts = rng.choice(n, num, replace=False)
    idx = (starts[:, None] + np.arange(span)[None, :]).ravel()
    sel = np.zeros(n, dtype=bool)
    sel[idx[idx < n]] = True
    return sel


# ---------------------------------------------------------------------------------------------
# Helpers


def dilate(m):
    near = m.copy()
    near[1:] |= m[:-1]
    near[:-1] |= m[1:]
    near[:, 1:] |= m[:, :-1]
    near[:, :-1] |= m[:, 1:]
    return near


def components(m):
    """Sizes of the 4-connected components of a 2-D bool array."""
    h, w = m.shape
    seen = np.zeros_like(m)
    sizes = []
    for i, j in zip(*np.nonzero(m)):
        if seen[i, j]:
            continue
        stack, n = [(i, j)], 0
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            n += 1
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < h and 0 <= d < w and m[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
        sizes.append(n)
    return sizes


def boundary(m):
    """Masked/unmasked 4-neighbour pairs of a 2-D bool array: how blocky (low) or scattered."""
    return int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())


def runs(row):
    """(start, length) of each run of True in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[::2], edges[1::2] - edges[::2]))


def seeds(n, offset=0):
    return torch.arange(n, dtype=torch.int64) * 1_000_003 + offset


def assert_close_mean(got, want, se, what, z=5.0):
    assert abs(got - want) < z * se, f"{what}: ours {got:.4f} vs reference {want:.4f} " \
        f"(tolerance {z * se:.4f})"


# ---------------------------------------------------------------------------------------------
# Span masks


@pytest.mark.parametrize("length,mask_prob,mask_length,min_masks", [
    (200, 0.65, 10, 0),   # data2vec audio
    (120, 0.5, 5, 1),     # data2vec 2.0 audio
    (15, 0.65, 10, 2),    # short: the start range is clamped
    (40, 0.3, 1, 0),
])
def test_span_mask_masked_fraction_matches_fairseq(length, mask_prob, mask_length, min_masks):
    n = 4000
    ours = span_mask_reference(torch.full((n,), length), length, mask_prob, mask_length,
                               min_masks=min_masks, seed=seeds(n)).sum(1).double()
    rng = np.random.default_rng(0)
    theirs = fairseq_span_mask([length] * n, length, mask_prob, mask_length, min_masks, False,
                               rng).sum(1)
    se = math.sqrt((ours.var().item() + theirs.var()) / n) + 1e-9
    assert_close_mean(ours.mean().item() / length, theirs.mean() / length, se / length,
                      f"masked fraction L={length}")
    assert_close_mean(ours.var().item(), theirs.var(), 0.1 * theirs.var() + 1e-3,
                      f"variance of the masked count L={length}", z=1.0)


def test_span_mask_same_masks_count_matches_fairseq_over_mixed_lengths():
    g = torch.Generator().manual_seed(1)
    batches, b = 300, 8
    ours, theirs = [], []
    rng = np.random.default_rng(1)
    for i in range(batches):
        lengths = torch.randint(60, 250, (b,), generator=g)
        m = span_mask_reference(lengths, 250, 0.65, 10, seed=seeds(b, 7 * i),
                                require_same_masks=True)
        ours.append(m.sum(1)[0].item())
        theirs.append(fairseq_span_mask(lengths.tolist(), 250, 0.65, 10, 0, True, rng)[0].sum())
    se = math.sqrt((np.var(ours) + np.var(theirs)) / batches)
    assert_close_mean(float(np.mean(ours)), float(np.mean(theirs)), se,
                      "common masked count per batch")


def test_span_mask_never_masks_padding():
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(0, 300, (64,), generator=g)
    lengths[:4] = torch.tensor([0, 1, 2, 11])
    for same in (False, True):
        m = span_mask_reference(lengths, 300, 0.65, 10, min_masks=2, seed=seeds(64),
                                require_same_masks=same)
        beyond = m & (torch.arange(300)[None, :] >= lengths[:, None])
        assert not beyond.any(), f"same={same}: {beyond.sum().item()} padded steps masked"


def test_span_mask_runs_are_whole_spans_unless_cut_at_the_end():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(5, 200, (128,), generator=g)
    m = span_mask_reference(lengths, 200, 0.65, 10, min_masks=1, seed=seeds(128)).numpy()
    short = [(b, s, n) for b in range(128) for s, n in runs(m[b])
             if n < 10 and s + n != lengths[b].item()]
    assert not short, f"runs shorter than mask_length not at the sample's end: {short[:5]}"
    assert m.any(1).all(), "min_masks=1 left a sample without any masked step"


def test_span_mask_require_same_masks_trims_to_the_smallest_count():
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(50, 300, (16,), generator=g)
    free = span_mask_reference(lengths, 300, 0.65, 10, seed=seeds(16))
    same = span_mask_reference(lengths, 300, 0.65, 10, seed=seeds(16), require_same_masks=True)
    counts = same.sum(1)
    assert (counts == free.sum(1).min()).all(), f"counts {counts.tolist()}, free min " \
        f"{free.sum(1).min().item()}"
    assert not (same & ~free).any(), "trimming added masked steps"


def test_span_mask_per_sample_seed_ignores_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(20, 150, (12,), generator=g)
    s = seeds(12, 99)
    batch = span_mask(lengths, 150, 0.65, 10, min_masks=1, seed=s)
    for i in (0, 5, 11):
        alone = span_mask_reference(lengths[i:i + 1], lengths[i].item(), 0.65, 10,
                                    min_masks=1, seed=s[i:i + 1])
        assert torch.equal(alone[0], batch[i, :lengths[i]]), f"sample {i} changed with its batch"


def test_span_mask_is_deterministic_and_seed_dependent():
    lengths = torch.full((8,), 120)
    a = span_mask(lengths, 120, 0.65, 10, seed=7)
    assert torch.equal(a, span_mask(lengths, 120, 0.65, 10, seed=7)), "same seed, other mask"
    assert not torch.equal(a, span_mask(lengths, 120, 0.65, 10, seed=8)), "seed ignored"
    assert len({tuple(r.tolist()) for r in a}) == 8, "int seed gave equal rows to equal lengths"


@INTERPRETER
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("mask_length,min_masks", [(10, 0), (1, 0), (10, 3), (64, 2), (7, 40)])
def test_span_mask_triton_is_bit_identical_to_reference(mask_length, min_masks, same):
    g = torch.Generator().manual_seed(mask_length + min_masks)
    lengths = torch.randint(0, 197, (9,), generator=g)
    lengths[0] = 197
    s = torch.randint(-2**62, 2**62, (9,), generator=g)
    args = (lengths, 197, 0.65, mask_length, min_masks, s, same)
    out = torch.full((9, 197), 2, dtype=torch.uint8).view(torch.bool)  # poison: not 0 or 1
    got = masking._span_mask_triton(*args, out=out)
    assert got.view(torch.uint8).max() <= 1, "kernel left poisoned elements"
    want = span_mask_reference(lengths, 197, 0.65, mask_length, min_masks, s, same)
    assert torch.equal(got, want), f"{(got != want).sum().item()} elements differ"


# ---------------------------------------------------------------------------------------------
# Block masks


@pytest.mark.parametrize("grid", [(14, 14), (7, 9)])
@pytest.mark.parametrize("inverse,ratio", [(False, 75 / 196), (False, 0.6), (True, 0.8),
                                           (True, 0.5)])
def test_block_mask_masks_exactly_the_rounded_count(grid, inverse, ratio):
    # The batched reference (bit-identical to the kernel, see the Triton test below): the
    # interpreter costs about a second per sample.
    m = block_mask_reference(64, grid, ratio, seed=seeds(64), inverse=inverse)
    want = int(ratio * grid[0] * grid[1] + 0.5)
    assert m.shape == (64, grid[0] * grid[1]) and m.dtype == torch.bool
    counts = m.sum(1)
    assert (counts == want).all(), f"want {want}, got {sorted(set(counts.tolist()))}"


@pytest.mark.parametrize("grid,ratio", [((14, 14), 75 / 196), ((7, 9), 0.4)])
def test_beit_blocks_match_the_beit_generator_and_stay_rectangular(grid, ratio):
    h, w = grid
    n = 2000
    ours = block_mask_reference(n, grid, ratio, seed=seeds(n)).view(n, h, w).numpy()
    rng = random.Random(0)
    theirs = [beit_block_mask(h, w, int(ratio * h * w + 0.5), 16, rng) for _ in range(n)]
    # Block shapes: the boundary grows with the number and elongation of the rectangles, the
    # rows plus columns they span with their elongation (log-uniform aspect in [0.3, 1/0.3]).
    for name, stat in (("boundary length", boundary),
                       ("rows + columns spanned", lambda m: m.any(0).sum() + m.any(1).sum())):
        a = np.array([stat(m) for m in ours], dtype=float)
        b = np.array([stat(m) for m in theirs], dtype=float)
        se = math.sqrt((a.var() + b.var()) / n)
        assert_close_mean(a.mean(), b.mean(), se, f"mask {name} {grid}")
    # Blocks of >= 16 patches: single-patch islands come only from BEiT's own small late
    # rectangles, which are rare.
    sizes = [components(m) for m in ours[:500]]
    singles = sum(s == 1 for c in sizes for s in c) / 500
    assert singles < 0.1, f"{singles:.3f} isolated single patches per sample"
    assert np.mean([len(c) for c in sizes]) < 2.0, "masks are not blocky"


@pytest.mark.parametrize("grid", [(14, 14), (7, 9)])
def test_inverse_blocks_match_data2vec2(grid):
    h, w = grid
    n = 1000
    ours = block_mask_reference(n, grid, 0.8, seed=seeds(n), inverse=True).view(n, h, w).numpy()
    rng = np.random.default_rng(0)
    theirs = [d2v2_inverse_block_mask(h, w, 0.8, 3, 0.07, rng) for _ in range(n)]
    a = np.array([boundary(m) for m in ours], dtype=float)
    b = np.array([boundary(m) for m in theirs], dtype=float)
    se = math.sqrt((a.var() + b.var()) / n)
    assert_close_mean(a.mean(), b.mean(), se, f"mask boundary length {grid}")
    scattered = np.array([boundary(m.ravel()[np.random.default_rng(i).permutation(h * w)]
                                   .reshape(h, w)) for i, m in enumerate(ours[:50])])
    assert a.mean() < 0.8 * scattered.mean(), "kept patches are no more grouped than at random"


@INTERPRETER
@pytest.mark.parametrize("grid,ratio,inverse", [
    ((14, 14), 0.6, False),     # data2vec image v1 (BEiT blocks)
    ((14, 14), 0.8, True),      # data2vec 2.0 image (inverse blocks)
    ((7, 9), 0.4, False),
    ((7, 9), 0.5, True),
    ((3, 4), 0.1, False),       # target below min_block: no rectangle fits, the fill does it all
    ((5, 5), 1.0, False),       # BEiT never covers the grid: most of it is the fill
    ((4, 4), 0.0, True),
])
def test_block_mask_triton_is_bit_identical_to_reference(grid, ratio, inverse):
    s = seeds(3, 17)
    h, w = grid
    args = masking._check_block(3, grid, ratio, s, 16, inverse, None, 3, 0.07)
    out = torch.full((3, h * w), 0xAA, dtype=torch.uint8)  # poison: neither False nor True
    masking._block_mask_triton(*args, out=out.view(torch.bool))
    want = block_mask_reference(3, grid, ratio, seed=s, inverse=inverse)
    assert torch.equal(out, want.to(torch.uint8)), f"{grid} {ratio} inverse={inverse}"


@INTERPRETER
def test_block_mask_dispatches_to_the_kernel_under_the_interpreter(monkeypatch):
    calls = []
    launcher = masking._block_mask_triton

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(masking, "_block_mask_triton", spy)
    got = block_mask(2, (6, 6), 0.5, seed=9, min_block=4)
    assert calls == [(2,)], calls
    assert torch.equal(got, block_mask_reference(2, (6, 6), 0.5, seed=9, min_block=4))


def test_beit_masks_are_made_of_blocks_not_scattered_patches():
    n, h, w = 120, 14, 14
    m = block_mask_reference(n, (h, w), 0.4, seed=seeds(n, 3)).view(n, h, w).numpy()
    row_runs = [length for mask in m for r in mask for _, length in runs(r)]
    col_runs = [length for mask in m for r in mask.T for _, length in runs(r)]
    # A random set of 78 of 196 patches has mean run length about 1.7; BEiT rectangles of >= 16
    # patches with aspect in [0.3, 3.3] give runs of several patches in both directions.
    assert np.mean(row_runs) > 3.0 and np.mean(col_runs) > 3.0, (np.mean(row_runs),
                                                                   np.mean(col_runs))
    biggest = np.array([max(components(mask)) for mask in m[:40]])
    assert np.mean(biggest >= 16) > 0.9, "most masks must hold a block of at least min_block"


def test_beit_geometry_is_exact_integer_rounding():
    levels = masking._aspect_levels()
    assert len(levels) == 1024 and levels[0] < levels[-1]
    assert abs(levels[0] / 2**16 - 0.3) < 1e-3 and abs(levels[-1] / 2**16 - 1 / 0.3) < 4e-3
    for i in (0, 100, 511, 900):  # level 1023 - i is the reciprocal of level i
        assert abs(levels[i] * levels[1023 - i] / 2**32 - 1.0) < 1e-4
    # round(sqrt(x)) as a count of (j - 1/2)^2 <= x agrees with float rounding off the ties.
    x = torch.randint(1, 200 << 32, (5000,), generator=torch.Generator().manual_seed(0))
    side = torch.arange(1, 20)
    counted = (((2 * side - 1) ** 2 << 30) <= x[:, None]).sum(1)
    rounded = torch.tensor([round(math.sqrt(v / 2**32)) for v in x.tolist()])
    assert torch.equal(counted, rounded.clamp_max(19))


def test_block_mask_per_sample_seed_ignores_the_rest_of_the_batch():
    s = seeds(4, 5)
    for inverse in (False, True):
        batch = block_mask(4, (14, 14), 0.6, seed=s, inverse=inverse)
        for i in (0, 3):
            alone = block_mask(1, (14, 14), 0.6, seed=s[i:i + 1], inverse=inverse)
            assert torch.equal(alone[0], batch[i]), f"inverse={inverse}: sample {i} changed"


def test_block_mask_is_deterministic_and_seed_dependent():
    a = block_mask(4, (14, 14), 0.6, seed=3)
    assert torch.equal(a, block_mask(4, (14, 14), 0.6, seed=3)), "same seed, different mask"
    assert torch.equal(a, block_mask_reference(4, (14, 14), 0.6, seed=3, device="cpu"))
    assert not torch.equal(a, block_mask(4, (14, 14), 0.6, seed=4)), "seed ignored"
    assert len({tuple(r.tolist()) for r in a}) == 4, "int seed gave equal rows"


# ---------------------------------------------------------------------------------------------
# Token masks


def text_batch(b, t, seed, vocab=1000):
    """Tokens in [5, vocab - 1) with bos at 0, eos at the end of each row's length, pad after."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, vocab - 1, (b, t), generator=g)
    lengths = torch.randint(t // 3, t + 1, (b,), generator=g)
    pos = torch.arange(t)[None, :]
    special = (pos == 0) | (pos >= lengths[:, None] - 1)
    return tokens, special


def test_token_mask_never_selects_specials_and_leaves_the_rest_alone():
    tokens, special = text_batch(64, 97, 0)
    special |= torch.rand(64, 97, generator=torch.Generator().manual_seed(1)) < 0.1
    new, sel = token_mask_reference(tokens, 0.15, special, 999, 1000, seed=seeds(64))
    assert not (sel & special).any(), f"{(sel & special).sum().item()} specials selected"
    assert torch.equal(new[~sel], tokens[~sel]), "unselected tokens changed"


@pytest.mark.parametrize("mask_prob,span", [(0.15, 1), (0.35, 4), (0.48, 1)])
def test_token_mask_selected_fraction_matches_fairseq(mask_prob, span):
    b, t = 2000, 66
    tokens = torch.randint(5, 999, (b, t))
    special = torch.zeros(b, t, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    _, sel = token_mask_reference(tokens, mask_prob, special, 999, 1000, seed=seeds(b),
                                  span=span)
    ours = sel.sum(1).double()
    rng = np.random.default_rng(0)
    theirs = np.array([fairseq_token_selection(t - 2, mask_prob, span, rng).sum()
                       for _ in range(b)], dtype=float)
    se = math.sqrt((ours.var().item() + theirs.var()) / b)
    assert_close_mean(ours.mean().item(), theirs.mean(), se, f"selected per row, span {span}")


def test_token_mask_replacement_proportions_are_80_10_10():
    b, t, vocab = 1024, 128, 1000
    tokens = torch.randint(5, vocab - 1, (b, t))
    special = torch.zeros(b, t, dtype=torch.bool)
    new, sel = token_mask_reference(tokens, 0.15, special, vocab - 1, vocab, seed=seeds(b))
    n = sel.sum().item()
    was, now = tokens[sel], new[sel]
    masked = (now == vocab - 1).double().mean().item()
    kept = (now == was).double().mean().item()
    random_ = ((now != was) & (now != vocab - 1)).double().mean().item()
    # A random replacement equal to the original token counts as kept: 0.1 / 999 of them.
    for name, got, want in (("mask", masked, 0.8), ("keep", kept, 0.1 + 0.1 / (vocab - 1)),
                            ("random", random_, 0.1 * (1 - 1 / (vocab - 1)))):
        assert_close_mean(got, want, math.sqrt(want * (1 - want) / n), f"{name} share of {n}")


def test_token_mask_random_ids_avoid_excluded_ids():
    b, t = 128, 64
    tokens = torch.randint(5, 20, (b, t))
    special = torch.zeros(b, t, dtype=torch.bool)
    excl = (0, 1, 2, 3, 19)
    new, sel = token_mask_reference(tokens, 0.5, special, 19, 20, seed=seeds(b),
                                    replace=(0, 1, 0), random_exclude=excl)
    drawn = set(new[sel].tolist())
    assert drawn == set(range(4, 19)), f"random ids drawn: {sorted(drawn)}"
    new, sel = token_mask_reference(tokens, 0.5, special, 19, 20, seed=seeds(b),
                                    replace=(0, 1, 0))
    assert 19 not in new[sel].tolist(), "a random replacement drew mask_id"


def test_token_mask_span_4_selects_whole_spans_of_mask_id_only():
    tokens, special = text_batch(128, 80, 1)
    new, sel = token_mask_reference(tokens, 0.35, special, 999, 1000, seed=seeds(128), span=4,
                                    replace=(1.0, 0.0, 0.0))
    assert (new[sel] == 999).all(), "replace (1, 0, 0) left a selected token unmasked"
    assert torch.equal(new[~sel], tokens[~sel]), "unselected tokens changed"
    cut = special.numpy()
    short = [(b, s, n) for b in range(128) for s, n in runs(sel[b].numpy())
             if n < 4 and not cut[b, s + n]]
    assert not short, f"runs shorter than 4 not cut by a special token: {short[:5]}"


def test_token_mask_per_sample_seed_ignores_the_rest_of_the_batch():
    tokens, special = text_batch(10, 60, 2)
    s = seeds(10, 3)
    new, sel = token_mask(tokens, 0.15, special, 999, 1000, seed=s)
    for i in (0, 4, 9):
        n = int((~special[i]).nonzero().max()) + 2  # the row without its trailing padding
        a_new, a_sel = token_mask_reference(tokens[i:i + 1, :n], 0.15, special[i:i + 1, :n],
                                            999, 1000, seed=s[i:i + 1])
        assert torch.equal(a_sel[0], sel[i, :n]) and torch.equal(a_new[0], new[i, :n]), \
            f"sample {i} changed with its batch"


def test_token_mask_is_deterministic_and_seed_dependent():
    tokens, special = text_batch(6, 64, 3)
    a = token_mask(tokens, 0.15, special, 999, 1000, seed=1)
    b = token_mask(tokens, 0.15, special, 999, 1000, seed=1)
    c = token_mask(tokens, 0.15, special, 999, 1000, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "same seed, other mask"
    assert not torch.equal(a[1], c[1]), "seed ignored"


@INTERPRETER
@pytest.mark.parametrize("span,replace,exclude", [(1, (0.8, 0.1, 0.1), None),
                                                  (4, (1.0, 0.0, 0.0), None),
                                                  (3, (0.5, 0.3, 0.2), (0, 1, 2, 3, 999))])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_token_mask_triton_is_bit_identical_to_reference(span, replace, exclude, dtype):
    tokens, special = text_batch(7, 131, span)
    tokens = tokens.to(dtype)
    s = torch.randint(-2**62, 2**62, (7,), generator=torch.Generator().manual_seed(span))
    args = masking._check_token(tokens, 0.35, special, 999, 1000, s, span, replace, exclude)
    out = torch.full_like(tokens, -1)
    sel = torch.full((7, 131), 2, dtype=torch.uint8).view(torch.bool)
    got, got_sel = masking._token_mask_triton(*args, out=out, selected=sel)
    assert (got >= 0).all() and got_sel.view(torch.uint8).max() <= 1, "poisoned elements left"
    want, want_sel = token_mask_reference(tokens, 0.35, special, 999, 1000, s, span, replace,
                                          exclude)
    assert got.dtype == dtype and torch.equal(got, want), f"{(got != want).sum()} tokens differ"
    assert torch.equal(got_sel, want_sel), f"{(got_sel != want_sel).sum()} selections differ"


# ---------------------------------------------------------------------------------------------
# Seeds and arguments


def test_hash_multiply_equals_uint32_arithmetic():
    x = torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(0))
    for c in (0x7FEB352D, 0x846CA68B, 0x85EBCA6B):
        want = [(v * c) % 2**32 for v in x.tolist()]
        assert masking._mul32(x, c).tolist() == want, f"_mul32 wrong for {c:#x}"


if masking.triton is not None:
    tl = masking.tl

    @masking.triton.jit
    def _select_probe(bits, eligible, count, out, N: tl.constexpr):
        i = tl.arange(0, N).to(tl.int64)
        ok = tl.load(eligible + i) != 0
        chosen = masking._select_tl(tl.load(bits + i), i, ok, tl.load(count))
        tl.store(out + i, chosen.to(tl.uint8))


@INTERPRETER
@pytest.mark.parametrize("count", [0, 1, 5, 17, 40, 64])
def test_kernel_selection_breaks_ties_by_index_like_the_reference(count):
    g = torch.Generator().manual_seed(count)
    bits = torch.randint(0, 4, (1, 64), generator=g) * 0x55555555  # many equal values
    eligible = torch.rand(1, 64, generator=g) < 0.7
    out = torch.full((64,), 2, dtype=torch.uint8)
    _select_probe[(1,)](bits[0], eligible[0].view(torch.uint8), torch.tensor([count]), out, N=64)
    want = masking._smallest(bits, eligible, torch.tensor([count]))[0]
    assert torch.equal(out.bool(), want), f"count {count}: kernel {out.nonzero().ravel()} vs " \
        f"reference {want.nonzero().ravel()}"


def test_public_ops_reject_bad_arguments():
    with pytest.raises(ValueError, match="lengths"):
        span_mask(torch.ones(2, 3), 3, 0.5, 2)
    with pytest.raises(ValueError, match="seed tensor"):
        span_mask(torch.tensor([3, 3]), 3, 0.5, 2, seed=torch.tensor([1]))
    with pytest.raises(RuntimeError, match="max_len"):
        span_mask(torch.tensor([4]), 3, 0.5, 2)
    with pytest.raises(ValueError, match="grid"):
        block_mask(2, (14,), 0.5)
    with pytest.raises(ValueError, match="replace"):
        token_mask(torch.zeros(2, 3, dtype=torch.long), 0.5, torch.zeros(2, 3, dtype=torch.bool),
                   4, 5, replace=(0.5, 0.5, 0.5))


@INTERPRETER
def test_interpreted_kernels_loop_over_runtime_scalar_bounds():
    """range() over a scalar argument and over a value computed from one, as the mask, target
    and attention kernels loop: triton 3.6's interpreter converted such a bound with
    int(1-element array), which numpy 2.4 refuses; d2v_kernels._interpreter squeezes it first
    (make gpu-check-cpu-image runs the suite's kernels under that triton)."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang_tensor, "d2v_squeezes_index", False)

    @triton.jit
    def count(out, n, step):
        acc = tl.zeros([], dtype=tl.int64)
        for i in range(n):
            acc += i
        for j in range(0, n * 2, step):
            acc += 1000
        tl.store(out, acc)

    out = torch.full((1,), -1, dtype=torch.int64)
    count[(1,)](out, 7, 3)
    assert out.item() == sum(range(7)) + 1000 * len(range(0, 14, 3)), out.item()
