"""make gpu-check: one command that proves the engine on a GPU machine in under 9 minutes.

    python scripts/gpu_check.py [--cpu] [--budget-s 525] [--out DIR]      (PYTHONPATH=the checkout)

It installs nothing: the GPU image (python 3.12, torch 2.11+cu130, triton 3.6, transformers, timm,
pytest, pytest-benchmark; no DALI, flash-attn or apex; no network) runs the checkout as it is.
Phases, in order, each under a time guard, each timed:
  1 info        the GPU, driver, python, torch (its CUDA), triton, nvcc and the peers' versions
  2 extension   JIT-builds the d2v_cuda extension (d2v_kernels/_cuda.py; torch caches the build)
  3 tests       tests/test_cuda_kernels.py and tests/test_targets_cuda.py, compiled kernels on CUDA
                tensors vs float64 / the references; the test ids are spread over several pytest
                processes, so that Triton compiles the attention autotune configs (about 25 per
                dtype and shape, each seconds of ptxas) on several cores at once; their compiled
                kernels land in Triton's cache, where the benchmarks find them
  4 benchmarks  python -m benchmarks.run_all --quick --budget-s <seconds left>: targets (image,
                audio), attention (plain and training cases), masking (full base batches), the
                step of image v1, image v2 and audio v1 against the plain-PyTorch step and
                SDPA + torch.compile; writes benchmarks/results/<date>-<gpu>.json and .md
Exit status 0 when every phase passed; the seconds of each phase are printed at the end.

Budget (estimates: nothing here has been timed on a GPU yet): info ~5 s; extension ~60-90 s (nvcc
and the torch binding); tests ~60-120 s with the compiles spread over the cores; benchmarks get
the rest of --budget-s (default 525 s; with the start-up under 9 minutes): run_all divides it among
its entries (targets 10%, attention 10%, masking 8%, each step 24%, unused time passing on) and
cuts an entry that overruns. The extension and the tests are capped at 150 s and 210 s; a phase
past its cap is killed and reported, and the next one starts.

--cpu (CI, no GPU): the same phases with the kernels interpreted (TRITON_INTERPRET=1) and tiny
shapes (run_all --tiny, whose entries get no guards of their own), 1800 s of budget, results into
a temporary folder: the extension says why it is unavailable and the CUDA tests are skipped
("needs CUDA"). It checks that the command keeps working.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULES = ["tests/test_cuda_kernels.py", "tests/test_targets_cuda.py"]
EXTENSION_CAP_S = 150
TESTS_CAP_S = 210
BENCH_MIN_S = 60  # the benchmarks always get at least this much


def env(cpu: bool) -> dict:
    # Triton's compile cache (on by default) carries the tests' compiled kernels to the
    # benchmarks; its autotuning cache stays off: timings taken while several test processes
    # share the GPU would pick the benchmarks' configs.
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "PYTHONUNBUFFERED": "1"}
    if cpu:
        e["TRITON_INTERPRET"] = "1"
    return e


def run(cmd, timeout: float, cpu: bool, log=None) -> tuple[int, str]:
    """Runs cmd in its own process group; kills the group past `timeout` s. -> (rc, how)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(cpu), start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT if log else None)
    try:
        return proc.wait(timeout=max(timeout, 1)), "exited"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124, f"killed after {timeout:.0f} s"


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def phase_info(cpu: bool) -> bool:
    import torch
    print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}), triton {version('triton')}, transformers "
          f"{version('transformers')}, timm {version('timm')}, pytest {version('pytest')}, "
          f"flash-attn {version('flash-attn')}, apex {version('apex')}, "
          f"DALI {version('nvidia-dali-cuda130')}")
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        print(f"nvcc {nvcc}: {out.strip().splitlines()[-1] if out.strip() else '?'}")
    else:
        print("nvcc: not on PATH (the extension build looks under CUDA_HOME too)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{p.multi_processor_count} SMs")
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            print(f"nvidia-smi: driver, max SM clock, power limit: {out.stdout.strip()}")
        return not cpu
    print("GPU: none (CPU mode)" if cpu else "GPU: none, but not in --cpu mode")
    return cpu


EXTENSION = """
import sys, time, torch
from d2v_kernels import _cuda
start = time.perf_counter()
module, reason = _cuda.load()
print(f"d2v_cuda: {_cuda.status()} ({time.perf_counter() - start:.0f} s)")
sys.exit(0 if module is not None or not torch.cuda.is_available() else 1)
"""


def phase_extension(cpu: bool, cap: float) -> bool:
    rc, how = run([sys.executable, "-c", EXTENSION], cap, cpu)
    if rc == 124:
        print(f"extension: {how}")
    return rc == 0


def collect_test_ids(cpu: bool, cap: float) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *TEST_MODULES], cwd=ROOT, env=env(cpu),
                         capture_output=True, text=True, timeout=cap)
    return [line.strip() for line in out.stdout.splitlines() if "::" in line]


def spread(ids: list[str], workers: int) -> list[list[str]]:
    """Test ids over `workers` groups: the attention cases (the ones with long compiles) dealt
    out first, one per group, then the rest round-robin."""
    heavy = [i for i in ids if "test_attention" in i]
    rest = [i for i in ids if i not in heavy]
    groups = [[] for _ in range(workers)]
    for n, test_id in enumerate(heavy + rest):
        groups[n % workers].append(test_id)
    return [g for g in groups if g]


def phase_tests(cpu: bool, cap: float, workers: int) -> bool:
    start = time.perf_counter()
    ids = collect_test_ids(cpu, cap)
    if not ids:
        print("tests: no test collected")
        return False
    groups = spread(ids, workers)
    print(f"tests: {len(ids)} tests of {', '.join(TEST_MODULES)} in {len(groups)} pytest "
          "processes", flush=True)
    with tempfile.TemporaryDirectory(prefix="d2v-gpu-check-") as tmp:
        procs = []
        for n, group in enumerate(groups):
            log = open(Path(tmp) / f"tests{n}.log", "w+")
            cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *group]
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env(cpu), stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True),
                          log))
        ok = True
        totals: dict[str, int] = {}
        for proc, log in procs:
            left = cap - (time.perf_counter() - start)
            try:
                rc = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = 124
            log.seek(0)
            text = log.read()
            log.close()
            for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text):
                totals[word] = totals.get(word, 0) + int(count)
            if rc not in (0, 5):
                ok = False
                print(text[-6000:] if rc != 124 else f"a pytest process was killed at the "
                      f"{cap:.0f} s cap; its output:\n{text[-3000:]}")
            elif not cpu and "SKIPPED" in text:  # on a GPU nothing should skip: say why
                print(text[text.find("short test summary"):][-2000:])
    print("tests: " + ", ".join(f"{n} {w}" for w, n in totals.items()))
    if cpu:  # no CUDA: every CUDA-numerics test must say it was skipped, none may pass vacuously
        ok = ok and totals.get("skipped", 0) > 0 and not totals.get("failed")
    return ok and not totals.get("failed") and not totals.get("error") \
        and not totals.get("errors")


def phase_bench(cpu: bool, budget: float, out: str) -> bool:
    cmd = [sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", out]
    if cpu:  # CI: no per-entry guards (a slow shared CPU must not fail the check), tiny shapes
        cmd.append("--tiny")
    else:  # 20 s for start-up and the files
        cmd += ["--budget-s", f"{max(budget - 20, 1):.0f}"]
    rc, how = run(cmd, budget, cpu)
    if rc == 124:
        print(f"benchmarks: {how}")
    return rc == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CI mode: interpreted, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all phases together (default 525, under 9 minutes; "
                        "--cpu: 1800, the interpreter is slow)")
    parser.add_argument("--out", default=None, help="results folder (default "
                        "benchmarks/results; --cpu: a temporary folder)")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest processes for the tests (default: cores - 2, 2 to 12)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.cpu else 525.0
    start = time.perf_counter()
    workers = args.workers or max(2, min(12, (os.cpu_count() or 2) - 2))
    tmp = tempfile.TemporaryDirectory(prefix="d2v-gpu-check-results-") if args.cpu else None
    out = args.out or (tmp.name if tmp else str(ROOT / "benchmarks" / "results"))
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    phases = [
        ("info", lambda: phase_info(args.cpu)),
        ("extension", lambda: phase_extension(args.cpu, min(EXTENSION_CAP_S,
                                                            left() - BENCH_MIN_S))),
        ("tests", lambda: phase_tests(args.cpu, min(TESTS_CAP_S, left() - BENCH_MIN_S),
                                      workers)),
        ("benchmarks", lambda: phase_bench(args.cpu, left(), out)),
    ]
    results = {}
    for name, fn in phases:
        print(f"\n=== gpu-check {name} ({left():.0f} s of the budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            ok = fn()
        except Exception as e:  # a broken phase is reported, the next one still runs
            print(f"{name}: {type(e).__name__}: {e}")
            ok = False
        results[name] = (ok, time.perf_counter() - t0)
        print(f"=== gpu-check {name}: {'ok' if ok else 'FAILED'} in {results[name][1]:.0f} s",
              flush=True)
    total = time.perf_counter() - start
    print("\ngpu-check seconds per phase: " + ", ".join(
        f"{name} {secs:.0f}{'' if ok else ' (FAILED)'}" for name, (ok, secs) in results.items())
          + f"; total {total:.0f} s" + (f"; results in {out}" if not args.cpu else ""))
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(ok for ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
