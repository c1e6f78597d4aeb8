"""Teacher-targets benchmark: ours (Triton, CUDA C++) vs the eager reference vs torch.compile(reference).

    python -m benchmarks.bench_targets [--tiny] [--json PATH] [--impls ours,triton,cuda,eager,compiled]
    python -m pytest benchmarks/bench_targets.py          (pytest-benchmark; never collected by
                                                           default: the file name is not test_*)

Each row reports milliseconds, GB/s against the minimal bytes (K bf16 layers read once + the fp32
target written once) and that as a fraction of the device-to-device copy bandwidth measured in the
same run (bytes read + written), and the DRAM bytes our kernels move for the case (the module
docstring's table of d2v_kernels/targets.py: the minimum for none / layer norms, + the statistics for
instance norm). "ours" is the public dispatcher (its "path" column says which of Triton and CUDA it
picked for the shape); "triton" and "cuda" force one path; the cuda rows appear only where the
extension loads (d2v_kernels/_cuda.py: installed or JIT-built). "compiled" is
torch.compile(reference, mode="max-autotune") on CUDA (the default mode on the CPU, where
max-autotune only adds compile time). Without CUDA, ours runs under TRITON_INTERPRET=1, so --tiny
shapes check the plumbing; only GPU timings mean anything.
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

from d2v_kernels import _cuda, targets  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    T: int
    C: int
    K: int
    layer_norm: str
    final_norm: str

    def minimal_bytes(self, in_bytes: int = 2) -> int:
        return self.B * self.T * self.C * (self.K * in_bytes + 4)

    def kernel_bytes(self, in_bytes: int = 2) -> int:
        """DRAM bytes our kernels move (d2v_kernels.targets.dram_bytes: an estimate)."""
        return targets.dram_bytes(self.B, self.T, self.C, self.K, in_bytes, self.layer_norm,
                                  self.final_norm)[1]


# Norms as in the data2vec configs: image v1 (none/layer), image v2 (instance/layer), audio
# (instance/none), text v1 (layer/none). Goals (issue 20, H100): image v1 and text >= 85% of copy
# bandwidth, >= 5x eager and >= 1.5x compiled; the instance cases >= 70%.
CASES = [
    Case("image_v1", 256, 197, 768, 6, "none", "layer"),
    Case("image_v2", 256, 197, 768, 8, "instance", "layer"),
    Case("audio", 16, 1000, 768, 8, "instance", "none"),
    Case("text", 64, 512, 768, 8, "layer", "none"),
]
TINY = [Case(c.name, 2, 33, 64, min(c.K, 3), c.layer_norm, c.final_norm) for c in CASES]
QUICK = ("image_v1", "audio")  # make gpu-check: the image and audio base configs' targets
IMPLS = ("ours", "triton", "cuda", "eager", "compiled")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _time_ms(fn, cuda: bool) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, a wall-clock loop on CPU."""
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device copy bandwidth, counting bytes read + written, in GB/s."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device.type == "cuda")
    return 2 * nbytes / ms / 1e6


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """K separate bf16 layers B x T x C (as the teacher returns them), non-zero mean and scale."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.T, case.C)
    return [(torch.randn(shape, generator=g, device=device) * (1 + l) + l).bfloat16()
            for l in range(case.K)]


def implementation(impl: str, case: Case):
    """A callable layers -> targets for one of IMPLS, with the case's norms bound."""
    kwargs = dict(layer_norm=case.layer_norm, final_norm=case.final_norm)
    if impl == "ours":
        return lambda layers: targets.teacher_targets(layers, None, **kwargs)
    if impl in ("triton", "cuda"):
        run = targets._RUNNERS[impl]
        return lambda layers: run(layers, None, case.layer_norm, case.final_norm, 1e-5, "exclude")
    if impl == "eager":
        return lambda layers: targets.teacher_targets_reference(layers, None, **kwargs)
    torch.compiler.reset()  # each case compiles for its own static shapes
    compiled = torch.compile(targets.teacher_targets_reference, mode=compile_mode())
    return lambda layers: compiled(layers, None, **kwargs)


def compile_mode() -> str:
    return "max-autotune" if torch.cuda.is_available() else "default"


def run_case(case: Case, impls, device: torch.device, copy_gbps: float):
    """Yields one row per implementation of `impls` as soon as it is measured."""
    layers = make_inputs(case, device)
    want = targets.teacher_targets_reference(layers, None, case.layer_norm, case.final_norm)
    for impl in impls:
        fn = implementation(impl, case)
        got = fn(layers)
        path = targets.last_backend() if impl == "ours" else impl
        err = ((got - want).abs().max() / want.abs().max()).item()
        ms = _time_ms(lambda: fn(layers), device.type == "cuda")
        gbps = case.minimal_bytes() / ms / 1e6
        yield dict(asdict(case), impl=impl, path=path, dtype="bfloat16", ms=ms, gbps=gbps,
                   copy_fraction=gbps / copy_gbps, minimal_bytes=case.minimal_bytes(),
                   kernel_bytes=case.kernel_bytes() if impl in ("ours", "triton", "cuda")
                   else None, max_rel_err=err)


def environment(device: torch.device, copy_gbps: float) -> dict:
    import importlib.util
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton
        triton_version = triton.__version__
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "copy_gbps": copy_gbps,
        "compile_mode": compile_mode(),
        "cuda_extension": _cuda.status(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.bench_targets"]
                            + sys.argv[1:]),
    }


def print_table(env: dict, rows) -> None:
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"copy {env['copy_gbps']:.0f} GB/s (read + write)  cuda ext {env['cuda_extension']}  "
          f"compiled: {env['compile_mode']}")
    print(f"{'case':<10}{'B':>5}{'T':>6}{'C':>6}{'K':>4}  {'norms':<16}{'impl':<10}{'path':<10}"
          f"{'ms':>9}{'GB/s':>9}{'%copy':>7}{'min MB':>8}{'ours MB':>8}{'rel err':>10}")
    for r in rows:
        norms = f"{r['layer_norm']}/{r['final_norm']}"
        ours_mb = "" if r["kernel_bytes"] is None else f"{r['kernel_bytes'] / 1e6:.1f}"
        print(f"{r['name']:<10}{r['B']:>5}{r['T']:>6}{r['C']:>6}{r['K']:>4}  {norms:<16}"
              f"{r['impl']:<10}{r['path']:<10}{r['ms']:>9.3f}{r['gbps']:>9.1f}"
              f"{100 * r['copy_fraction']:>6.1f}%{r['minimal_bytes'] / 1e6:>8.1f}{ours_mb:>8}"
              f"{r['max_rel_err']:>10.1e}")


def available(impls) -> list:
    """`impls` without "cuda" where our CUDA extension cannot load (saying so)."""
    if "cuda" in impls and _cuda.load()[0] is None:
        print(f"no cuda column: the CUDA extension is {_cuda.status()}")
        return [i for i in impls if i != "cuda"]
    return list(impls)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of IMPLS")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    impls = available(impls)
    cases = TINY if args.tiny else CASES
    if args.cases:
        cases = [c for c in cases if c.name in args.cases.split(",")]
    device = _device()
    copy_gbps = copy_bandwidth_gbps(device)
    env = environment(device, copy_gbps)
    rows = [row for case in cases for row in run_case(case, impls, device, copy_gbps)]
    print_table(env, rows)
    for key, choice in targets.measured_backends().items():
        ms = ", ".join(f"{b} {t:.3f} ms" for b, t in choice["ms"].items())
        print(f"dispatcher measured {key}: {ms} -> {choice['chosen']}")
    env["dispatcher"] = {str(k): v for k, v in targets.measured_backends().items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


# Expected seconds of one case on an H100 (estimates): do_bench ~0.15 s per implementation, the
# Triton kernels' compile (cached by the tests phase) and the dispatcher's timing ~5 s; the
# max-autotune compile of the reference ~60-120 s (inductor benchmarks its template choices).
ESTIMATE_S = {"fast": 15.0, "compiled": 120.0}
_ours: dict = {}  # case -> our row, measured once for the headline and the compiled halves


def cases(tiny: bool = False, quick: bool = False, peers=("eager", "cuda", "compiled")) -> list:
    """run_all's interface: one BenchCase per case (quick: the QUICK cases), ours (the public
    dispatcher) first, a row of its own, then ours against each of `peers` (the cuda extension
    where it loads), fraction_of_peak = ours / measured copy bandwidth. "compiled" is
    torch.compile(reference, mode="max-autotune") on CUDA: give it a case of its own
    (peers=("compiled",)) after the headline rows."""
    from benchmarks import common
    device = _device()
    copy_gbps = copy_bandwidth_gbps(device)
    impls = available(("ours",) + tuple(peers))

    def shape(case, ours):
        return (f"{case.name} K={case.K} B={case.B} T={case.T} C={case.C} bf16 "
                f"({ours['path']}, {case.kernel_bytes() / 1e6:.0f} MB)")

    def run(emit, case):
        todo = [i for i in impls if i != "ours" or case not in _ours]
        for row in run_case(case, todo, device, copy_gbps):
            if row["impl"] == "ours":
                _ours[case] = row
            ours = _ours[case]
            emit(common.record("targets", shape(case, ours), ours["gbps"],
                               None if row["impl"] == "ours" else row["impl"],
                               None if row["impl"] == "ours" else row["gbps"], "GB/s",
                               ours["copy_fraction"], device))

    label = "" if "eager" in peers else " " + "+".join(peers)
    return [common.BenchCase(f"targets/{case.name}{label}", lambda emit, case=case: run(emit, case),
                             (None,) + tuple(i for i in impls if i != "ours"),
                             ESTIMATE_S["compiled" if "compiled" in peers else "fast"])
            for case in (TINY if tiny else CASES) if not quick or case.name in QUICK]


@pytest.mark.benchmark(group="targets")
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "cuda" or _cuda.load()[0] is not None])
@pytest.mark.parametrize("case", CASES if torch.cuda.is_available() else TINY, ids=lambda c: c.name)
def test_bench_targets(benchmark, case, impl):
    device = _device()
    layers = make_inputs(case, device)
    fn = implementation(impl, case)
    fn(layers)

    def step():
        fn(layers)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(asdict(case), minimal_bytes=case.minimal_bytes())
    benchmark.pedantic(step, rounds=20 if device.type == "cuda" else 3, warmup_rounds=1)


if __name__ == "__main__":
    main()
