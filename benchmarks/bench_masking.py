"""Masking benchmark: the public mask ops vs their PyTorch references vs a per-sample NumPy loop.

    python -m benchmarks.bench_masking [--tiny] [--json PATH] [--impls ours,reference,numpy]
    python -m pytest benchmarks/bench_masking.py          (pytest-benchmark; never collected by
                                                           default: the file name is not test_*)

Each row reports microseconds per batch, the speed-up over the NumPy baseline, the bytes our
kernels read and write with that as a fraction of the device copy bandwidth measured in the same run
(masks are latency-bound: the fraction only shows how far), and the fraction of a training step
(--step-ms; default the base image step of shared/reference/performance.md, the only documented
one, also used for audio and text). On CUDA each case also measures what drawing the masks on a side
stream adds to a step (d2v_engine/run/mask_ahead.py): a ~1 ms stand-in step of bf16 matmuls timed alone and
with the masks launched beside it on a second stream, the step waiting for their event at its end;
the difference is the "ahead" column (goal: 0 us). `ours` is the public op on the device (all
three take their Triton kernels on CUDA), `reference` the op's *_reference on the device, `numpy`
a compact per-sample port of what data2vec's reference code runs in its data loader, on the CPU:
fairseq compute_mask_indices (span), BEiT's MaskingGenerator loop and data2vec 2.0's
compute_block_mask_2d (block), MaskTokensDataset's selection (text), each sample with its own
generator seeded from its int64 seed. The baseline fills a rectangle with one slice where BEiT loops
over cells, and leaves out the host-to-device copy of the mask, so the speed-ups are lower bounds.

On CUDA the ops are timed with triton.testing.do_bench after warm-up; on the CPU (and the NumPy
baseline always) with time.perf_counter over repeats. Without CUDA the public ops take their
reference path unless TRITON_INTERPRET=1 is set before the run (then the kernels run interpreted,
which is slow: use --tiny); so CPU rows check the plumbing, only GPU timings of ours mean anything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch

from d2v_kernels import masking

# Context from shared/reference/performance.md: the base image step (ViT-B, B=256, ~36 TFLOP)
# takes >= ~45 ms on an H100 at 100% MFU (790 TFLOP/s bf16 dense).
IMAGE_STEP_MS = 45.0
IMAGE_STEP_SOURCE = "shared/reference/performance.md: base image step >= ~45 ms on H100 at 100% MFU"

# RoBERTa dictionary as data2vec text uses it: bos 0, pad 1, eos 2, unk 3, <mask> last.
VOCAB, BOS, PAD, EOS, UNK, MASK_ID = 50265, 0, 1, 2, 3, 50264


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "block", "span" or "token"
    B: int
    T: int  # positions per sample (h * w for block)
    grid: tuple = ()
    mask_prob: float = 0.0
    mask_length: int = 1  # span length (audio, text); unused for BEiT blocks
    min_masks: int = 0
    min_block: int = 16
    inverse: bool = False
    replace: tuple = (0.8, 0.1, 0.1)


# data2vec base settings: image v1 (BEiT blocks), image v2 (inverse blocks), audio (fairseq spans,
# min_masks 2 as data2vec_audio's apply_mask), text (spans of 4 whole tokens, all -> <mask>).
CASES = [
    Case("image_v1", "block", 256, 196, grid=(14, 14), mask_prob=0.6, min_block=16),
    Case("image_v2", "block", 256, 196, grid=(14, 14), mask_prob=0.8, inverse=True),
    Case("audio", "span", 16, 1000, mask_prob=0.65, mask_length=10, min_masks=2),
    Case("text", "token", 64, 512, mask_prob=0.35, mask_length=4, replace=(1.0, 0.0, 0.0)),
]


def _tiny(c: Case) -> Case:
    if c.op == "block":
        return Case(c.name, c.op, 4, 49, (7, 7), c.mask_prob, c.mask_length, c.min_masks,
                    c.min_block, c.inverse, c.replace)
    return Case(c.name, c.op, 4, 64, c.grid, c.mask_prob, c.mask_length, c.min_masks,
                c.min_block, c.inverse, c.replace)


TINY = [_tiny(c) for c in CASES]
IMPLS = ("ours", "reference", "numpy")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _time_us(fn, cuda: bool, min_s: float = 0.2) -> float:
    """Median microseconds of fn(): triton.testing.do_bench on CUDA, a wall-clock loop on CPU
    (after one warm-up call: at least 3 and at most 50 repeats, until min_s seconds have passed)."""
    if cuda:
        import triton.testing
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    total = 0.0
    while len(times) < 3 or (total < min_s and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return 1e6 * statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Inputs


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Per-sample int64 seeds, and the op's tensors: varied audio lengths (one at T), text rows
    of varied length (bos, tokens, eos, padding). CPU copies for the NumPy baseline."""
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**62, (case.B,), generator=g, dtype=torch.int64)
    inputs = {"seeds": seeds.to(device), "np_seeds": seeds.tolist()}
    if case.op == "span":
        lengths = torch.randint(case.T // 2, case.T + 1, (case.B,), generator=g)
        lengths[0] = case.T
        inputs.update(lengths=lengths.to(device), np_lengths=lengths.tolist())
    elif case.op == "token":
        tokens = torch.randint(EOS + 2, MASK_ID, (case.B, case.T), generator=g)
        lengths = torch.randint(case.T // 2, case.T + 1, (case.B,), generator=g)
        lengths[0] = case.T
        pos = torch.arange(case.T)[None, :]
        tokens[:, 0] = BOS
        tokens = torch.where(pos == lengths[:, None] - 1, EOS, tokens)
        tokens = torch.where(pos >= lengths[:, None], PAD, tokens)
        special = (tokens == BOS) | (tokens == EOS) | (tokens == PAD)
        inputs.update(tokens=tokens.to(device), special=special.to(device),
                      np_tokens=tokens.numpy(), np_special=special.numpy())
    return inputs


# ---------------------------------------------------------------------------------------------
# NumPy baselines: per sample, on the CPU, as the reference implementations' data loaders


def numpy_span_mask(lengths, max_len, mask_prob, mask_length, min_masks, seeds):
    """fairseq compute_mask_indices (mask_type static, no_overlap False, min_space 0) with
    per-sample lengths, one generator per sample and require_same_masks."""
    mask = np.zeros((len(lengths), max_len), dtype=bool)
    chosen, rngs = [], []
    for size, seed in zip(lengths, seeds):
        rng = np.random.default_rng(seed)
        num = max(min_masks, int(mask_prob * size / float(mask_length) + rng.random()))
        keep_out = mask_length if size - mask_length > num else size - num - 1
        starts = rng.choice(size - keep_out, num, replace=False)
        idx = np.asarray([starts[j] + o for j in range(len(starts)) for o in range(mask_length)])
        chosen.append(np.unique(idx[idx < size]))
        rngs.append(rng)
    target = min(len(c) for c in chosen)
    for i, idx in enumerate(chosen):
        if len(idx) > target:
            idx = rngs[i].choice(idx, target, replace=False)
        mask[i, idx] = True
    return mask


def _beit_generator(h, w, target, min_block, rng):
    """BEiT MaskingGenerator.__call__ (max block = the target), Python `random` as BEiT."""
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_block, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bh < h and bw < w:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= remaining:
                    mask[top:top + bh, left:left + bw] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def _d2v2_inverse(h, w, mask_prob, length, adjust, rng):
    """data2vec 2.0 compute_block_mask_2d, inverse_mask=True, require_same_masks: kept squares
    around centers drawn with replacement, then an exact kept count; the mask is the complement."""
    n = h * w
    kept = np.zeros((h, w), dtype=bool)
    for c in rng.integers(0, n, int(n * ((1 - mask_prob + adjust) / length**2))):
        r0, c0 = c // w - length // 2, c % w - length // 2
        kept[max(r0, 0):max(r0 + length, 0), max(c0, 0):max(c0 + length, 0)] = True
    want = n - int(mask_prob * n + 0.5)
    have = np.flatnonzero(kept)
    if len(have) > want:
        kept.flat[rng.choice(have, len(have) - want, replace=False)] = False
    elif len(have) < want:
        kept.flat[rng.choice(np.flatnonzero(~kept), want - len(have), replace=False)] = True
    return ~kept.ravel()


def numpy_block_mask(batch, grid, mask_ratio, min_block, inverse, seeds):
    h, w = grid
    target = int(mask_ratio * h * w + 0.5)
    rows = []
    for seed in seeds:
        if inverse:
            rows.append(_d2v2_inverse(h, w, mask_ratio, 3, 0.07, np.random.default_rng(seed)))
        else:
            rows.append(_beit_generator(h, w, target, min_block, random.Random(seed)).ravel())
    return np.stack(rows)


def numpy_token_mask(tokens, special, mask_prob, span, replace, seeds):
    """fairseq MaskTokensDataset.__getitem__ per row (mask_multiple_length = span), selection
    among the non-special positions; -> (new tokens, selected)."""
    out, selected = tokens.copy(), np.zeros(tokens.shape, dtype=bool)
    p_mask, p_random, p_keep = replace
    weights = np.ones(VOCAB)
    weights[[BOS, PAD, EOS, UNK, MASK_ID]] = 0
    weights /= weights.sum()
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        normal = np.flatnonzero(~special[i])
        n = len(normal)
        num = int(mask_prob * n / float(span) + rng.random())
        starts = rng.choice(n, num, replace=False)
        idx = np.concatenate([starts + k for k in range(span)])
        sel = np.zeros(n, dtype=bool)
        sel[idx[idx < n]] = True
        mask = sel.copy()
        rand = None
        if p_random + p_keep > 0:
            decide = sel & (rng.random(n) < p_random + p_keep)
            if p_random == 0:
                mask ^= decide
            elif p_keep == 0:
                mask ^= decide
                rand = decide
            else:
                coin = rng.random(n) < p_random / (p_random + p_keep)
                mask ^= decide
                rand = decide & coin
        row = out[i, normal]
        row[mask] = MASK_ID
        if rand is not None and rand.any():
            row[rand] = rng.choice(VOCAB, int(rand.sum()), p=weights)
        out[i, normal] = row
        selected[i, normal] = sel
    return out, selected


# ---------------------------------------------------------------------------------------------
# Implementations


def implementation(impl: str, case: Case, inputs: dict):
    """A callable () -> mask (B x T bool; for token, the selected positions) for one of IMPLS."""
    s = inputs["seeds"]
    if case.op == "span":
        if impl == "numpy":
            return lambda: numpy_span_mask(inputs["np_lengths"], case.T, case.mask_prob,
                                           case.mask_length, case.min_masks, inputs["np_seeds"])
        fn = masking.span_mask if impl == "ours" else masking.span_mask_reference
        return lambda: fn(inputs["lengths"], case.T, case.mask_prob, case.mask_length,
                          min_masks=case.min_masks, seed=s, require_same_masks=True)
    if case.op == "block":
        if impl == "numpy":
            return lambda: numpy_block_mask(case.B, case.grid, case.mask_prob, case.min_block,
                                            case.inverse, inputs["np_seeds"])
        fn = masking.block_mask if impl == "ours" else masking.block_mask_reference
        return lambda: fn(case.B, case.grid, case.mask_prob, seed=s, min_block=case.min_block,
                          inverse=case.inverse, device=s.device)
    if impl == "numpy":
        return lambda: numpy_token_mask(inputs["np_tokens"], inputs["np_special"],
                                        case.mask_prob, case.mask_length, case.replace,
                                        inputs["np_seeds"])[1]
    fn = masking.token_mask if impl == "ours" else masking.token_mask_reference
    return lambda: fn(inputs["tokens"], case.mask_prob, inputs["special"], MASK_ID, VOCAB,
                      seed=s, span=case.mask_length, replace=case.replace,
                      random_exclude=(BOS, PAD, EOS, UNK, MASK_ID))[1]


def path(impl: str, case: Case, device: torch.device) -> str:
    """What actually runs: the Triton kernels, the PyTorch reference, or NumPy."""
    if impl == "numpy":
        return "numpy"
    if impl == "ours" and masking._use_triton(device):
        return "triton-interp" if device.type == "cpu" else "triton"
    return "torch"


def kernel_bytes(case: Case) -> int:
    """Bytes our kernels read and write for one batch: seeds and inputs in, the mask (and for text
    the new ids) out; require_same_masks' trim reads and rewrites the mask."""
    n = case.B * case.T
    if case.op == "block":
        return 8 * case.B + n
    if case.op == "span":
        return 16 * case.B + n + 2 * n
    return 8 * case.B + 8 * n + n + 8 * n + n  # seeds, ids, special in; ids, selected out


def side_stream_overhead_us(fn, device: torch.device) -> float | None:
    """Microseconds that running fn() on a side stream adds to a ~1 ms stand-in step (bf16
    matmuls) that waits for its event at the end, as the trainer's next micro-batch does; None
    without CUDA."""
    if device.type != "cuda":
        return None
    import triton.testing
    x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def step():
        for _ in range(4):
            torch.matmul(x, x)

    side = torch.cuda.Stream(device)

    def step_with_masks():
        with torch.cuda.stream(side):
            fn()
            done = torch.cuda.Event()
            done.record(side)
        step()
        torch.cuda.current_stream(device).wait_event(done)

    alone = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    beside = triton.testing.do_bench(step_with_masks, warmup=25, rep=200, return_mode="median")
    return 1e3 * (beside - alone)


def run_case(case: Case, impls, device: torch.device, tiny: bool = False,
             copy_gbps: float | None = None):
    """Yields one row per implementation of `impls` as soon as it is measured."""
    inputs = make_inputs(case, device)
    cuda = device.type == "cuda"
    want = implementation("reference", case, inputs)() if "ours" in impls else None
    for impl in impls:
        fn = implementation(impl, case, inputs)
        got = fn()
        got = torch.as_tensor(got)
        on = "cpu" if impl == "numpy" else device.type
        match = None
        if impl == "ours":
            match = bool(torch.equal(got, want))
        us = _time_us(fn, cuda and impl != "numpy", 0.05 if tiny else 0.3)
        row = dict(asdict(case), impl=impl, on=on, path=path(impl, case, device), us=us,
                   masked_frac=got.float().mean().item(), matches_reference=match,
                   bytes=None, copy_fraction=None, ahead_us=None)
        if impl == "ours":
            row["bytes"] = kernel_bytes(case)
            if copy_gbps:
                row["copy_fraction"] = row["bytes"] / us / 1e3 / copy_gbps
            row["ahead_us"] = side_stream_overhead_us(fn, device)
        yield row


def context(rows, step_ms: float = IMAGE_STEP_MS) -> dict:
    """Share of a training step (default: the base image step, >= ~45 ms on an H100 at 100% MFU)
    spent making masks, per case and implementation; also stored in each row as step_fraction."""
    source = IMAGE_STEP_SOURCE if step_ms == IMAGE_STEP_MS else f"--step-ms {step_ms}"
    out = {"image_step_ms": step_ms, "source": source, "cases": {}}
    for r in rows:
        r["step_fraction"] = r["us"] / (step_ms * 1e3)
        out["cases"].setdefault(r["name"], {})[r["impl"]] = r["step_fraction"]
    return out


def environment(device: torch.device) -> dict:
    import importlib.util
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton
        triton_version = triton.__version__
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": np.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_threads": torch.get_num_threads(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.bench_masking"]
                            + sys.argv[1:]),
    }


def print_table(env: dict, rows, ctx: dict) -> None:
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"numpy {env['numpy']}  interpret {env['triton_interpret']}  "
          f"cpu threads {env['cpu_threads']}")
    print(f"copy bandwidth {env['copy_gbps']:.0f} GB/s (read + write)")
    print(f"{'case':<10}{'op':<7}{'B':>5}{'T':>6}  {'impl':<11}{'on':<6}{'path':<15}"
          f"{'us/batch':>12}{'x numpy':>9}{'masked':>8}{'=ref':>6}{'KB':>8}{'%copy':>8}"
          f"{'ahead us':>9}")
    for r in rows:
        x = r["speedup_vs_numpy"]
        speed = "-" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"
        match = {None: "-", True: "yes", False: "NO"}[r["matches_reference"]]
        kb = "" if r["bytes"] is None else f"{r['bytes'] / 1e3:.1f}"
        frac = "" if r["copy_fraction"] is None else f"{100 * r['copy_fraction']:.3f}%"
        ahead = "" if r["ahead_us"] is None else f"{r['ahead_us']:.1f}"
        print(f"{r['name']:<10}{r['op']:<7}{r['B']:>5}{r['T']:>6}  {r['impl']:<11}{r['on']:<6}"
              f"{r['path']:<15}{r['us']:>12.1f}{speed:>9}{r['masked_frac']:>8.3f}{match:>6}"
              f"{kb:>8}{frac:>8}{ahead:>9}")
    note = "" if env["device"] != "cpu" else "  (these are CPU timings: not comparable)"
    print(f"context: {ctx['source']}{note}")
    for name, shares in ctx["cases"].items():
        parts = ", ".join(f"{impl} {100 * share:.3f}%" for impl, share in shares.items())
        print(f"  {name}: mask generation = {parts} of a {ctx['image_step_ms']:.0f} ms step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of IMPLS")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--step-ms", type=float, default=IMAGE_STEP_MS,
                        help=f"training step time for the step fraction (default {IMAGE_STEP_MS}: "
                             f"{IMAGE_STEP_SOURCE})".replace("%", "%%"))  # argparse %-formats help
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    cases = TINY if args.tiny else CASES
    if args.cases:
        cases = [c for c in cases if c.name in args.cases.split(",")]
    device = _device()
    env = environment(device)
    from benchmarks import common
    env["copy_gbps"] = common.copy_bandwidth_gbps(device.type)
    rows = [row for case in cases
            for row in run_case(case, impls, device, args.tiny, env["copy_gbps"])]
    for row in rows:
        numpy_us = next((r["us"] for r in rows if r["name"] == row["name"]
                         and r["impl"] == "numpy"), None)
        row["speedup_vs_numpy"] = numpy_us / row["us"] if numpy_us else None
    ctx = context(rows, args.step_ms)
    print_table(env, rows, ctx)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "context": ctx, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


# Expected seconds of one case on an H100 (estimates): do_bench ~0.15 s per op, the side-stream
# measurement ~1 s, the NumPy loop over a base batch ~1-3 s, the kernels' compile (cached by the
# tests phase) ~2 s.
ESTIMATE_S = 10.0


def cases(tiny: bool = False, quick: bool = False) -> list:
    """run_all's interface: one BenchCase per case, our masks (device kernel) first, a row of its
    own, then against the torch reference and the NumPy loop, fraction_of_peak = our bytes /
    measured copy bandwidth; on CUDA also what the side stream adds to a step ("masking_ahead":
    ours = added us, peer = the masks' time in the step). quick: the same cases, the base
    configs' full batches, are already the headline ones."""
    from benchmarks import common
    device = _device()
    copy_gbps = common.copy_bandwidth_gbps(device.type)

    def run(emit, case):
        ours = None
        for row in run_case(case, IMPLS, device, tiny, copy_gbps):
            ours = ours or row  # IMPLS starts with ours
            shape = (f"{case.name} {ours['op']} B={ours['B']} T={ours['T']} ({ours['path']}, "
                     f"{ours['bytes'] / 1e3:.0f} KB)")
            peer = None if row is ours else row["impl"]
            emit(common.record("masking", shape, ours["us"], peer,
                               None if peer is None else row["us"], "us", ours["copy_fraction"],
                               device))
            if row is ours and ours["ahead_us"] is not None:
                emit(common.record("masking_ahead", shape, max(ours["ahead_us"], 0.0),
                                   "in the step", ours["us"], "us", None, device))

    return [common.BenchCase(f"masking/{case.name}", lambda emit, case=case: run(emit, case),
                             (None, "in the step") + IMPLS[1:], ESTIMATE_S)
            for case in (TINY if tiny else CASES)]


@pytest.mark.benchmark(group="masking")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES if torch.cuda.is_available() else TINY, ids=lambda c: c.name)
def test_bench_masking(benchmark, case, impl):
    device = _device()
    inputs = make_inputs(case, device)
    fn = implementation(impl, case, inputs)
    mask = torch.as_tensor(fn())
    assert mask.shape == (case.B, case.T) and mask.dtype == torch.bool

    def step():
        fn()
        if device.type == "cuda" and impl != "numpy":
            torch.cuda.synchronize()

    benchmark.extra_info.update(asdict(case), impl=impl, path=path(impl, case, device))
    benchmark.pedantic(step, rounds=20 if device.type == "cuda" else 3, warmup_rounds=1)


if __name__ == "__main__":
    main()
