"""Attention benchmark: our Triton flash kernel vs every SDPA backend and flash-attn, one run.

    python -m benchmarks.bench_attention [--quick] [--json PATH] [--impls ours,sdpa_flash,...]
    python -m pytest benchmarks/bench_attention.py         (pytest-benchmark; never collected by
                                                            default: the file name is not test_*)

Forward and forward+backward TFLOP/s for B x H x T x D bf16, D = 64, H = 12, B*T ~ 32k tokens
(B*H fills the device), T in {197, 256, 512, 1024}, with 0% and ~30% key padding. FLOPs are counted
as in the FlashAttention papers: 4*B*H*T*T*D forward, 2.5x that forward+backward, whatever padding
removes; the fraction is against a bf16 matmul measured in the same run. An implementation that
cannot take the arguments (e.g. SDPA's flash backend with a mask) is recorded as skipped with the
reason. Without CUDA, ours runs under TRITON_INTERPRET=1 and --quick shapes check the plumbing; only
GPU timings mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():  # before triton is imported: the interpreter runs ours on CPU
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kernels import attention as attn  # noqa: E402

SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
IMPLS = ("ours", *SDPA_BACKENDS, "flash_attn")
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    T: int
    D: int
    pad: float  # mean fraction of padded keys

    @property
    def name(self) -> str:
        return f"T{self.T}-pad{round(100 * self.pad)}"

    def flops(self, direction: str) -> float:
        fwd = 4 * self.B * self.H * self.T * self.T * self.D
        return fwd if direction == "fwd" else 2.5 * fwd


TOKENS = 32768
CASES = [Case(max(1, TOKENS // t), 12, t, 64, pad) for t in (197, 256, 512, 1024)
         for pad in (0.0, 0.3)]
QUICK = [Case(2, 2, t, 64, pad) for t in (19, 37) for pad in (0.0, 0.3)]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _time_ms(fn, cuda: bool) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, a wall-clock loop on CPU."""
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_tflops(device: torch.device) -> float:
    """Measured bf16 matmul TFLOP/s (the peak the fractions are against)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b, device.type == "cuda")
    return 2 * n**3 / ms / 1e9


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """q, k, v B x H x T x D bf16 (requires grad), dout, and the B x T key padding mask or None."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.H, case.T, case.D)
    q, k, v, dout = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    pad = None
    if case.pad > 0:
        # lengths uniform in [(1 - 2 pad) T, T]: a mean of (1 - pad) T valid keys
        low = max(1, round((1 - 2 * case.pad) * case.T))
        lengths = torch.randint(low, case.T + 1, (case.B,), generator=g, device=device)
        pad = torch.arange(case.T, device=device)[None, :] >= lengths[:, None]
    return [x.requires_grad_() for x in (q, k, v)], dout, pad


def implementation(impl: str, pad):
    """(q, k, v) -> B x H x T x D for one of IMPLS, or raises if it cannot take the arguments."""
    if impl == "ours":
        if not attn._triton_runs_on(pad.device if pad is not None else _device()):
            raise RuntimeError("Triton not available on this device")
        return lambda q, k, v: attn._FlashAttention.apply(q, k, v, pad, None, q.shape[-1] ** -0.5,
                                                          0.0, 0)
    if impl in SDPA_BACKENDS:
        mask = None if pad is None else ~pad[:, None, None, :]
        backend = SDPA_BACKENDS[impl]

        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return run
    return _flash_attn(pad)


def _flash_attn(pad):
    try:
        import flash_attn
    except ImportError as e:
        raise RuntimeError("flash_attn is not installed") from e
    if pad is None:
        return lambda q, k, v: flash_attn.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    # Padding: the varlen kernel over the unpadded tokens (queries and keys both unpadded, as an
    # encoder would run it); the gather is inside the timed region, as our kernel needs none.
    lengths = (~pad).sum(1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    keep = ~pad
    max_len = int(lengths.max())

    def run(q, k, v):
        qu, ku, vu = (x.transpose(1, 2)[keep] for x in (q, k, v))  # N x H x D
        o = flash_attn.flash_attn_varlen_func(qu, ku, vu, cu, cu, max_len, max_len)
        out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
        out[keep] = o
        return out.transpose(1, 2)
    return run


def _reference_error(fn, q, k, v, pad) -> float:
    """Max error of fn's output on the first sample(s), relative to the max of the reference."""
    n = min(2, q.shape[0])
    sub = [x[:n].detach() for x in (q, k, v)]
    sub_pad = None if pad is None else pad[:n]
    want = attn.attention_reference(*(x.float() for x in sub), key_padding_mask=sub_pad)
    got = fn(*sub).float()
    if sub_pad is not None:  # flash_attn varlen leaves padded query rows 0: compare valid rows
        rows = ~sub_pad[:, None, :, None]
        want, got = want * rows, got * rows
    return ((got - want).abs().max() / want.abs().max()).item()


def run_case(case: Case, impls, device: torch.device, peak: float):
    (q, k, v), dout, pad = make_inputs(case, device)
    cuda = device.type == "cuda"
    rows = []
    for impl in impls:
        base = dict(asdict(case), name=case.name, impl=impl, dtype="bfloat16")
        try:
            fn = implementation(impl, pad)
            err = _reference_error(fn, q, k, v, pad)
            timings = {"fwd": _time_ms(lambda: fn(q, k, v), cuda)}

            def fwd_bwd():
                torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
            timings["fwd+bwd"] = _time_ms(fwd_bwd, cuda)
        except Exception as e:  # a backend that rejects the arguments is recorded, not fatal
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            rows += [dict(base, **{"pass": p}, ms=None, tflops=None, peak_fraction=None,
                          max_rel_err=None, skipped=reason) for p in PASSES]
            if cuda:
                torch.cuda.empty_cache()
            continue
        for p in PASSES:
            tflops = case.flops(p) / timings[p] / 1e9
            rows.append(dict(base, **{"pass": p}, ms=timings[p], tflops=tflops,
                             peak_fraction=tflops / peak, max_rel_err=err, skipped=None))
    return rows


def environment(device: torch.device, peak: float) -> dict:
    import importlib.util
    versions = {}
    for module in ("triton", "flash_attn"):
        if importlib.util.find_spec(module) is not None:
            versions[module] = getattr(__import__(module), "__version__", "installed")
        else:
            versions[module] = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        **versions,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "matmul_bf16_tflops": peak,
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.bench_attention"]
                            + sys.argv[1:]),
    }


def run(quick: bool = False, impls=IMPLS, cases=None) -> dict:
    """All cases x impls x passes: {environment..., "rows": [one dict per (case, impl, pass)]}."""
    device = _device()
    peak = matmul_tflops(device)
    chosen = cases if cases is not None else (QUICK if quick else CASES)
    rows = [row for case in chosen for row in run_case(case, impls, device, peak)]
    return {**environment(device, peak), "rows": rows}


def print_table(result: dict) -> None:
    print(f"device {result['device']}  torch {result['torch']}  triton {result['triton']}  "
          f"flash_attn {result['flash_attn']}  bf16 matmul {result['matmul_bf16_tflops']:.1f} "
          "TFLOP/s")
    print(f"{'case':<12}{'B':>5}{'H':>4}{'T':>6}{'D':>4}  {'impl':<16}{'pass':<9}{'ms':>9}"
          f"{'TFLOP/s':>9}{'%peak':>7}{'rel err':>9}")
    for r in result["rows"]:
        head = (f"{r['name']:<12}{r['B']:>5}{r['H']:>4}{r['T']:>6}{r['D']:>4}  {r['impl']:<16}"
                f"{r['pass']:<9}")
        if r["skipped"]:
            print(f"{head}skipped ({r['skipped']})")
        else:
            print(f"{head}{r['ms']:>9.3f}{r['tflops']:>9.3g}{100 * r['peak_fraction']:>6.1f}%"
                  f"{r['max_rel_err']:>9.1e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", "--tiny", action="store_true", dest="quick",
                        help="small shapes (CPU check of the suite itself)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of IMPLS")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    result = run(args.quick, impls)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES if torch.cuda.is_available() else QUICK,
                         ids=lambda c: c.name)
def test_bench_attention(benchmark, case, impl):
    device = _device()
    (q, k, v), dout, pad = make_inputs(case, device)
    try:
        fn = implementation(impl, pad)
        fn(q, k, v)
    except Exception as e:
        pytest.skip(f"{impl} cannot run {case.name}: {type(e).__name__}")

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(asdict(case), flops=case.flops("fwd+bwd"))
    benchmark.pedantic(step, rounds=20 if device.type == "cuda" else 2, warmup_rounds=1)


if __name__ == "__main__":
    main()
