"""Attention as training runs it: our Triton kernels vs every peer on the same inputs.

    python -m benchmarks.bench_attention [--tiny] [--quick] [--json PATH]

Cases (bf16, H = 12, D = 64): the training cases -- image v1 (B = 64, T = 197, BEiT's shared
relative position bias, its gradient included, dropout 0.05), audio (B = 16, T = 750, 25% of the
keys padded, dropout 0.1), text (B = 32, T = 512, 10% padded, dropout 0.1) -- each also without
dropout ("_p0", what dropout costs) and image v1 also without the bias ("_nobias", what the bias
and its gradient cost); and plain attention at T = 197, 512, 1024 (B * T^2 held at the image base
batch's 256 * 197^2). Padding: key lengths uniform in [T (1 - 2f), T], the first sample full.

Peers, each on the same tensors: every SDPA kernel (flash, cuDNN, efficient, math: the bias and
padding as an additive mask, which some refuse -- the row says why), FlexAttention (bias as a
score_mod, padding as a block mask; it has no dropout, so the dropout cases list it as refused),
flash-attn where installed (varlen on the unpadded tokens when padded; no bias), and "dispatch":
d2v_kernels.attention.attention, whatever the measured dispatcher picked -- its row names the
forward pick and the forward+backward pick (the one training takes), with every candidate's
back-to-back and single-call milliseconds (d2v_kernels.attention_dispatch). "ours" computes every query
row, as training does; "ours_skipq" skips padded queries (skip_padded_queries=True), which
flash-attn's varlen path also does.

run_all (cases(); make gpu-check) times ours and the SDPA kernels first and FlexAttention and the
dispatcher (which compile per shape key) after the other benchmarks' headline rows; each row is
emitted the moment it is measured.

FLOPs, as FlashAttention counts them: 4 * B * H * Tq * Tk * D for the forward and 3.5x that for
forward + backward (1 + 2.5), counting only the unpadded queries and keys (sum over samples of
4 * H * len^2 * D): the useful work, the same numerator for every peer. Timing: CUDA events via
triton.testing.do_bench (median); --tiny runs small fp32 cases on the CPU, where our kernels run
interpreted and timing is wall clock: it checks the suite, not the speed.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

if not torch.cuda.is_available():  # before triton is imported: the kernel runs interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from d2v_kernels import attention as attn  # noqa: E402
from d2v_kernels import ops  # noqa: E402

FWD_BWD_FLOPS = 3.5  # forward + backward per forward FLOP (FlashAttention's convention)

# (name, B, H, T, padded fraction, bias, dropout)
_BT = 256 * 197 * 197
CASES = [("image_v1", 64, 12, 197, 0.0, "shared", 0.05),
         ("image_v1_p0", 64, 12, 197, 0.0, "shared", 0.0),
         ("image_v1_nobias", 64, 12, 197, 0.0, None, 0.05),
         ("audio", 16, 12, 750, 0.25, None, 0.1),
         ("audio_p0", 16, 12, 750, 0.25, None, 0.0),
         ("text", 32, 12, 512, 0.10, None, 0.1),
         ("text_p0", 32, 12, 512, 0.10, None, 0.0)] + [
    (f"plain_{t}", max(1, _BT // (t * t)), 12, t, 0.0, None, 0.0) for t in (197, 512, 1024)]
QUICK = ("image_v1", "audio", "text", "plain_197")
TINY = [("image_v1", 2, 2, 19, 0.0, "shared", 0.05), ("audio", 2, 2, 37, 0.25, None, 0.1),
        ("plain_19", 2, 2, 19, 0.0, None, 0.0)]


def make_inputs(B, H, T, D, pad_frac, dtype, device, seed=0, bias=None):
    """(q, k, v, key padding mask or None, bias or None, per-sample lengths)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
               for _ in range(3))
    lengths = torch.full((B,), T)
    mask = None
    if pad_frac > 0:
        lengths = torch.randint(int(T * (1 - 2 * pad_frac)), T + 1, (B,), generator=g)
        lengths[0] = T
        mask = (torch.arange(T)[None, :] >= lengths[:, None]).to(device)
    b = None
    if bias == "shared":  # the model's relative position bias is an fp32 parameter
        b = torch.randn(H, T, T, generator=g).to(device=device)
    return q, k, v, mask, b, lengths


def useful_flops(H, D, lengths) -> float:
    """Forward FLOPs over the unpadded queries and keys: sum_b 4 * H * len_b^2 * D."""
    return float(4 * H * D * (lengths.double() ** 2).sum().item())


def _flash_attn(device):
    if device.type != "cuda":
        return None
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None

    def run(q, k, v, mask, bias, p, skip):
        if bias is not None:
            raise RuntimeError("flash-attn takes no additive bias")
        if mask is None:
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   dropout_p=p).transpose(1, 2)
        # varlen: only the unpadded tokens (the padded queries are skipped, as in ours_skipq)
        B, H, T, D = q.shape
        keep = ~mask
        lens = keep.sum(1, dtype=torch.int32)
        cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        packed = [x.transpose(1, 2)[keep] for x in (q, k, v)]  # total x H x D
        out = flash_attn_varlen_func(*packed, cu, cu, T, T, dropout_p=p)
        full = q.new_zeros(B, T, H, D)
        full[keep] = out
        return full.transpose(1, 2)
    return run


def implementations(device: torch.device) -> dict:
    """name -> fn(q, k, v, key_padding_mask, bias, dropout_p, skip_padded_queries)."""
    def backend(name, skip=None):
        return lambda q, k, v, m, b, p, s: attn.run_backend(
            name, q, k, v, m, b, None, p, s if skip is None else skip)
    impls = {"ours": backend("triton", False), "ours_skipq": backend("triton", True),
             "dispatch": lambda q, k, v, m, b, p, s: ops.attention(
                 q, k, v, key_padding_mask=m, attn_bias=b, dropout_p=p)}
    if device.type == "cuda":
        for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math"):
            impls[name] = backend(name, False)
    else:
        impls["sdpa"] = backend("sdpa", False)
    impls["flex"] = _flex_impl
    flash = _flash_attn(device)
    if flash is not None:
        impls["flash_attn"] = flash
    return impls


def _flex_impl(q, k, v, m, b, p, s):
    if p > 0:
        raise RuntimeError("FlexAttention has no dropout: not the same computation")
    return attn.run_backend("flex", q, k, v, m, b, None, 0.0, False)


def measure(fn, inputs, p: float, device, backward: bool, tiny: bool) -> float:
    """Median ms of the forward (no grad) or forward + backward (q, k, v and the bias as leaves,
    as in training where the relative-position bias is learned)."""
    q, k, v, mask, bias, _ = inputs
    skip = False  # each impl fixes its own (ours_skipq: True)
    if backward:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        bias_leaf = None if bias is None else bias.detach().requires_grad_()
        wrt = leaves + ([bias_leaf] if bias_leaf is not None else [])
        dout = torch.randn_like(q)

        def step():
            out = fn(*leaves, mask, bias_leaf, p, skip)
            torch.autograd.grad(out, wrt, dout)
    else:
        def step():
            with torch.no_grad():
                fn(q, k, v, mask, bias, p, skip)
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    from benchmarks.common import time_ms
    return time_ms(step, device, repeats=2 if tiny else 5, warmup=1)


def _case_setup(tiny: bool, dtype=None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype, 32 if tiny else 64


def measure_rows(case: tuple, impls, tiny: bool, dtype=None):
    """Yields one row per implementation of `impls` (names of implementations()) as soon as it
    is measured: fwd and fwd+bwd ms and TFLOP/s of useful work, or the error it raised."""
    device, dtype, D = _case_setup(tiny, dtype)
    name_, B, H, T, pad, bias_kind, p = case
    inputs = make_inputs(B, H, T, D, pad, dtype, device, bias=bias_kind)
    flops = useful_flops(H, D, inputs[5])
    available = implementations(device)
    for name in impls:
        if name not in available or (name == "ours_skipq" and pad == 0):
            continue  # not installed here; or the same as "ours" without padding
        fn = available[name]
        row = {"case": name_, "B": B, "H": H, "T": T, "D": D, "pad": pad, "bias": bias_kind,
               "dropout": p, "dtype": str(dtype), "impl": name, "useful_gflop": flops / 1e9}
        if name == "dispatch" and device.type == "cuda":
            from d2v_kernels import attention_dispatch as dispatch
            for backward, label in ((False, "fwd"), (True, "fwd_bwd")):  # training: fwd_bwd
                key = dispatch.shape_key(*inputs[:3], inputs[3], inputs[4], p, backward=backward)
                row[f"picked_{label}"] = dispatch.pick_for(key)
                row[f"dispatch_{label}"] = dispatch.picks()[dispatch.describe_key(key)]
        try:
            for phase, backward, mult in (("fwd", False, 1.0), ("fwd_bwd", True, FWD_BWD_FLOPS)):
                ms = measure(fn, inputs, p, device, backward, tiny)
                row[f"{phase}_ms"] = ms
                row[f"{phase}_tflops"] = mult * flops / ms / 1e9
        except Exception as e:  # a backend that refuses these arguments is a row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}" \
                if str(e).strip() else type(e).__name__
            if device.type == "cuda":
                torch.cuda.empty_cache()
        yield row


def case_list(tiny: bool, quick: bool = False, only: tuple = ()) -> list[tuple]:
    cases = TINY if tiny else [c for c in CASES if not quick or c[0] in QUICK]
    return [c for c in cases if not only or c[0] in only]


def run_rows(tiny: bool, quick: bool = False, only: tuple = (), dtype=None) -> list[dict]:
    impls = list(implementations(_case_setup(tiny)[0]))
    return [row for case in case_list(tiny, quick, only)
            for row in measure_rows(case, impls, tiny, dtype)]


def _shape(r) -> str:
    return (f"{r['case']} B={r['B']} H={r['H']} T={r['T']} D={r['D']} pad={r['pad']:.0%}"
            + (f" bias={r['bias']}" if r["bias"] else "") + (f" p={r['dropout']:g}"
                                                             if r["dropout"] else "")
            + f" {r['dtype'].replace('torch.', '')}")


# The peers timed first (each a few seconds: no compile of its own) and those timed after the
# other benchmarks' headline rows: FlexAttention compiles a kernel per shape key, and "dispatch"
# runs the dispatcher's measurement, which times every candidate, flex included.
FAST_PEERS = ("ours_skipq", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "sdpa",
              "flash_attn")
SLOW_PEERS = ("flex", "dispatch")
_ours: dict = {}  # case tuple -> our row, shared by a case's fast and slow halves


def _records(ours: dict, peer: dict | None, device, peak: float) -> list[dict]:
    """fwd and fwd+bwd records of ours against `peer` (None: ours alone); the dispatcher's row
    names its pick for that phase ("dispatch (sdpa_flash)": fwd+bwd is the training pick)."""
    from benchmarks import common

    def name(phase):
        if peer is None:
            return None
        picked = peer.get(f"picked_{phase}")
        return peer["impl"] + (f" ({picked})" if picked else "")
    return [common.record(f"attention_{phase}", _shape(ours), ours[f"{phase}_tflops"],
                          name(phase), None if peer is None else peer.get(f"{phase}_tflops"),
                          "TFLOP/s", ours[f"{phase}_tflops"] / peak, device)
            for phase in ("fwd", "fwd_bwd")]


# Expected seconds of one case on an H100 with the compiles cached by the tests phase (estimates:
# do_bench spends ~0.15 s per timing, 2 per peer; autotuning our 3-4 kernels ~2-5 s; a
# FlexAttention compile per key ~10-20 s, the dispatcher's own timing of every candidate ~5 s).
ESTIMATE_S = {"fast": 20.0, "slow": 45.0}


def cases(tiny: bool = False, quick: bool = False, half: str | None = None, dtype=None,
          only: tuple = ()) -> list:
    """run_all's interface: one BenchCase per attention case, ours first (a row of its own, once
    per case and dtype whichever half comes first), then each peer against it: half "fast" the
    FAST_PEERS, "slow" the SLOW_PEERS, None both; `dtype` (default bf16 on CUDA, fp32 on the
    CPU) is the inputs' dtype."""
    from benchmarks import common
    device = common.device()
    peak, _ = common.matmul_peak_tflops(device.type)
    peers = {"fast": FAST_PEERS, "slow": SLOW_PEERS, None: FAST_PEERS + SLOW_PEERS}[half]
    slow = half != "fast"
    label = ("" if dtype is None else f" {str(dtype).replace('torch.', '')}") + (
        " flex+dispatch" if half == "slow" else "")

    def run(emit, case):
        key = (case, dtype)
        if key not in _ours:
            ours = next(measure_rows(case, ["ours"], tiny, dtype))
            if "error" in ours:
                raise RuntimeError(f"ours failed on {case[0]}: {ours['error']}")
            _ours[key] = ours
            for rec in _records(ours, None, device, peak):
                emit(rec)
        for row in measure_rows(case, peers, tiny, dtype):
            for rec in _records(_ours[key], row, device, peak):
                emit(rec)

    return [common.BenchCase(f"attention/{case[0]}{label}",
                             lambda emit, case=case: run(emit, case), (None,) + tuple(peers),
                             ESTIMATE_S["slow" if slow else "fast"])
            for case in case_list(tiny, quick, only)]


def print_rows(rows) -> None:
    print("TFLOP/s of useful work: forward 4*B*H*Tq*Tk*D, forward+backward 3.5x that, over the "
          "unpadded queries and keys only")
    print(f"{'case':<16}{'impl':<16}{'fwd ms':>9}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<16}{r['impl']:<16}  {r['error']}")
            continue
        print(f"{r['case']:<16}{r['impl']:<16}{r['fwd_ms']:>9.3f}{r['fwd_tflops']:>9.3g}"
              f"{r['fwd_bwd_ms']:>12.3f}{r['fwd_bwd_tflops']:>9.3g}"
              + (f"  (picked {r['picked_fwd']}, fwd+bwd {r['picked_fwd_bwd']})"
                 if r.get("picked_fwd") else ""))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--quick", action="store_true", help="make gpu-check's cases")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = run_rows(args.tiny, args.quick, tuple(c for c in args.cases.split(",") if c))
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "cpu", "torch": torch.__version__,
                       "flops": "useful: 4*H*D*sum(len^2) forward, x3.5 forward+backward",
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
