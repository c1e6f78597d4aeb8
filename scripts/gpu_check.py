"""make gpu-check: one command that proves the engine on a GPU machine in under 9 minutes.

    python scripts/gpu_check.py [--cpu] [--fp32] [--budget-s 525] [--out DIR]  (PYTHONPATH=checkout)

It installs nothing: the GPU image (python 3.12, torch 2.11+cu130, triton 3.6, transformers, timm,
pytest, pytest-benchmark; no DALI, flash-attn or apex; no network) runs the checkout as it is.
Everything lands under --out (default: $OUT when set -- the folder a lent machine sends back --,
else gpu-check-out/<date-time>/), each file as it is written: info.log, extension.log, tests/
(each pytest process's log with --durations, its junit XML), bench/ (run_all's JSON, JSONL and
summary, each row written the moment it is measured), bench.log, summary.json (rewritten after
every phase). A run killed at any point leaves what it measured there. Stdout stays short (only
its tail may come back): a line or two per phase, failing tests one line each, the headline rows.

Compile caches live in the checkout's ignored .gpu-cache/ (TRITON_CACHE_DIR,
TORCHINDUCTOR_CACHE_DIR, TORCH_EXTENSIONS_DIR), so a second call on a warm machine compiles
nothing; TRITON_PRINT_AUTOTUNING=1 writes each autotune pick into the logs.

Phases, most information per second first, each timed and capped (a phase past its cap is killed
and reported, and the next one starts):
  info        GPU, driver (nvidia-smi), python, torch (its CUDA), triton, peers' versions, `which
              gcc g++ ninja nvcc`, nvcc's version
  extension   JIT-builds d2v_cuda (d2v_kernels/_cuda.py) in the background, beside the kernel
              tests; a failed build prints the compiler's error lines; no toolkit: skipped, why
  tests       tests/test_cuda_kernels.py without fp32 attention: compiled kernels on CUDA tensors
              vs float64 / the references, and tests/test_fast_path.py (two CUDA-graph replays
              draw different dropout masks), spread over several pytest processes (Triton compiles
              the autotune configs on several cores at once; the kernels land in the cache, where
              the benchmarks find them); then tests/test_targets_cuda.py once the build is done
  benchmarks  python -m benchmarks.run_all --quick (its QUICK_PLAN: attention at the training
              cases vs the SDPA kernels, the image v1 step vs SDPA + torch.compile, targets and
              masking without max-autotune peers, then FlexAttention / the dispatcher's pick, the
              image v2 and audio steps, the plain-PyTorch step, max-autotune), guarded per case
  fp32        (--fp32 only) the fp32 attention tests (marker fp32_attention)
Exit status 0 when every phase passed (a skipped extension passes); seconds per phase at the end.

Budget (default --budget-s 525: with python's start-up and the final summary under 9 minutes).
Estimates, nothing here has been timed on a GPU yet; the basis of each:
  phase        estimate  cap    basis
  info           5 s      -     torch import ~3 s, nvidia-smi and nvcc --version < 1 s each
  extension    (60 s)   240 s   beside the tests, so 0 s of wall time: nvcc of targets_kernels.cu
                                with torch's flags took 44 s on 2 cores here (make compile-check),
                                the torch binding ~30-60 s; ninja builds the two at once
  tests        150 s    210 s   the attention tests compile each autotune config once: the base
                                configs' 112 bf16 + fp16 attention compiles took 451 s of ptxas
                                on this 2-core CPU (median 3.7 s, max 11 s: compile_check
                                --dtypes bfloat16,float16), ~40 s over 12 processes, plus
                                autotuning and the float64 references; 2x for the unknown;
                                --durations in the logs records the real split
  ext tests     15 s     60 s   76 targets-extension tests of ms each, plus the load
  benchmarks   355 s    rest    run_all's per-case estimates (BenchCase.estimate_s), summed in
                                QUICK_PLAN order: attention 4 x 20 s, image v1 step 110 s,
                                targets 2 x 15 s, masking 4 x 10 s = 260 s of headline rows, then
                                flex/dispatch 4 x 45 s, image v2 + audio steps 2 x 110 s, plain
                                steps, max-autotune: cut by their guards when the time runs out
  total        525 s
  fp32        (opt-in)  300 s   4 shapes x ~25 spilling fp32 configs at 19-63 s of ptxas each
With --fp32 its cap is taken out of the benchmarks' time.

--cpu (CI, no GPU): the same phases with the kernels interpreted (TRITON_INTERPRET=1) and tiny
shapes (run_all --tiny --quick, no guards: a slow shared CPU must not fail the check), 1800 s of
budget: the extension says why it is unavailable and the CUDA tests are skipped ("needs CUDA").
It checks that the command keeps working.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".gpu-cache"
KERNEL_TESTS = ["tests/test_cuda_kernels.py", "tests/test_fast_path.py"]
EXTENSION_TESTS = ["tests/test_targets_cuda.py"]
FP32_MARK = "fp32_attention"
TESTS_CAP_S = 210
EXTENSION_TESTS_CAP_S = 60
FP32_CAP_S = 300
BENCH_MIN_S = 60  # the benchmarks always get at least this much
FAILURE_LINES = 25  # failing tests listed on stdout (all of them are in the logs)


def env(cpu: bool) -> dict:
    # Triton's compile cache carries the tests' compiled kernels to the benchmarks (and every
    # cache a second call on a warm machine); its autotuning cache stays off: timings taken while
    # several test processes share the GPU would pick the benchmarks' configs.
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "PYTHONUNBUFFERED": "1", "TRITON_PRINT_AUTOTUNING": "1",
         "TRITON_CACHE_DIR": str(CACHE / "triton"),
         "TORCHINDUCTOR_CACHE_DIR": str(CACHE / "inductor"),
         "TORCH_EXTENSIONS_DIR": str(CACHE / "torch_extensions")}
    if cpu:
        e["TRITON_INTERPRET"] = "1"
    return e


def start(cmd, cpu: bool, log: Path, **extra_env) -> subprocess.Popen:
    """cmd in its own process group, stdout and stderr into `log` as they come."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:  # the child holds its own descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env={**env(cpu), **extra_env},
                                start_new_session=True, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """proc's exit status, or 124 after killing its group past `timeout` s."""
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _run_text(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"


def phase_info(cpu: bool, out: Path) -> str:
    import torch
    lines = [f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}), triton {version('triton')}, numpy {version('numpy')}, "
             f"transformers {version('transformers')}, timm {version('timm')}, pytest "
             f"{version('pytest')}, flash-attn {version('flash-attn')}, apex {version('apex')}, "
             f"DALI {version('nvidia-dali-cuda130')}",
             "which: " + ", ".join(f"{tool} {shutil.which(tool) or 'MISSING'}"
                                   for tool in ("gcc", "g++", "ninja", "nvcc")),
             f"CUDA_HOME {os.environ.get('CUDA_HOME', 'unset')}; caches in {CACHE}"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        text = _run_text([nvcc, "--version"])
        lines.append(f"nvcc: {text.splitlines()[-1] if text else '?'}")
    full = ""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
        smi = shutil.which("nvidia-smi")
        if smi:
            lines.append("nvidia-smi: driver, max SM clock, power limit, persistence, MIG: "
                         + _run_text([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit,"
                                      "persistence_mode,mig.mode.current",
                                      "--format=csv,noheader"]))
            full = _run_text([smi])
    else:
        lines.append("GPU: none (CPU mode)" if cpu else "GPU: none, but not in --cpu mode")
    print("\n".join(lines))
    (out / "info.log").write_text("\n".join(lines) + "\n\n" + full + "\n")
    return "ok" if torch.cuda.is_available() != cpu else "FAILED"


EXTENSION = """
import sys, time, torch
from d2v_kernels import _cuda
start = time.perf_counter()
module, reason = _cuda.load()
print(f"d2v_cuda: {_cuda.status()} ({time.perf_counter() - start:.0f} s)", flush=True)
if module is None and _cuda.load_failed():
    sys.exit(1)
sys.exit(0 if module is not None else 3)  # 3: unavailable here, and why (not a failure)
"""


def extension_result(rc: int, log: Path, cap: float) -> str:
    """The extension phase's status from the build's exit status and log; prints its lines."""
    from d2v_kernels import _cuda
    text = log.read_text(errors="replace") if log.exists() else ""
    status = next((line for line in text.splitlines() if line.startswith("d2v_cuda:")), "")
    if rc == 0:
        print(status)
        return "ok"
    if rc == 3:
        print(f"{status} -> skipped")
        return "skipped"
    print(status or (f"d2v_cuda: the build was killed at its {cap:.0f} s cap" if rc == 124
                     else f"d2v_cuda: exited {rc}"))
    for line in _cuda.error_summary(text, limit=20).split("; "):
        print(f"  {line}")
    return "FAILED"


def collect_test_ids(files, marks: str, cpu: bool, cap: float) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "-m", marks, *files], cwd=ROOT, env=env(cpu),
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


def junit_results(path: Path) -> tuple[dict, list[str]]:
    """({passed, failed, errors, skipped}, ["test id: first line of the failure"]) of one junit
    XML file."""
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        kind = ("failed" if "failure" in kinds else "errors" if "error" in kinds
                else "skipped" if "skipped" in kinds else "passed")
        totals[kind] += 1
        if kind in ("failed", "errors"):
            node = case.find("failure") if kind == "failed" else case.find("error")
            message = (node.get("message") or node.text or "").strip().splitlines()
            failures.append(f"{test_id}: {message[0][:200] if message else '?'}")
    return totals, failures


def _finished_in_log(text: str) -> int:
    """Tests a -v pytest log reports as done (for a process killed before its junit XML)."""
    return len(re.findall(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text))


def phase_tests(name: str, files, marks: str, cpu: bool, cap: float, workers: int,
                out: Path, **extra_env) -> str:
    """The tests of `files` selected by the -m expression `marks`, over `workers` pytest
    processes (their environment plus `extra_env`); logs, --durations and junit XML under
    out/tests/."""
    begin = time.perf_counter()
    ids = collect_test_ids(files, marks, cpu, cap)
    if not ids:
        print(f"{name}: no test collected")
        return "FAILED"
    groups = spread(ids, workers)
    print(f"{name}: {len(ids)} tests of {', '.join(files)} ({marks}) in {len(groups)} pytest "
          "processes", flush=True)
    procs = []
    for n, group in enumerate(groups):
        xml = out / "tests" / f"{name}{n}.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "--tb=line", "-rs", "-p", "no:cacheprovider",
               "--durations=15", f"--junitxml={xml}", *group]
        procs.append((start(cmd, cpu, out / "tests" / f"{name}{n}.log", **extra_env), xml,
                      len(group)))
    totals = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, killed = [], []
    for n, (proc, xml, count) in enumerate(procs):
        rc = finish(proc, cap - (time.perf_counter() - begin))
        if rc == 124 or not xml.exists():
            log = (out / "tests" / f"{name}{n}.log").read_text(errors="replace")
            killed.append(f"{name}{n} ({_finished_in_log(log)} of {count} done)")
            continue
        got, fails = junit_results(xml)
        for k, v in got.items():
            totals[k] += v
        failures += fails
    print(f"{name}: " + ", ".join(f"{v} {k}" for k, v in totals.items() if v)
          + (f"; killed at the {cap:.0f} s cap: {', '.join(killed)}" if killed else ""))
    for line in failures[:FAILURE_LINES]:
        print(f"  FAILED {line}")
    if len(failures) > FAILURE_LINES:
        print(f"  ... {len(failures) - FAILURE_LINES} more in {out / 'tests'}")
    ok = not failures and not killed
    if cpu:  # no CUDA: every CUDA-numerics test must say it was skipped, none may pass vacuously
        ok = ok and totals["skipped"] > 0
    elif totals["skipped"]:  # on a GPU nothing should skip: the reasons are in the logs
        print(f"  {totals['skipped']} skipped: see 'SKIPPED' in {out / 'tests'}/{name}*.log")
    return "ok" if ok else "FAILED"


def phase_bench(cpu: bool, budget: float, out: Path, **extra_env) -> str:
    cmd = [sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out / "bench")]
    if cpu:  # CI: no per-case guards (a slow shared CPU must not fail the check), tiny shapes
        cmd.append("--tiny")
    else:  # 20 s for start-up and the files
        cmd += ["--budget-s", f"{max(budget - 20, 1):.0f}"]
    rc = finish(start(cmd, cpu, out / "bench.log", **extra_env), budget)
    results = sorted((out / "bench").glob("*.json"))
    if not results:
        print(f"benchmarks: no results (exit {rc}); see {out / 'bench.log'}")
        return "FAILED"
    result = json.loads(results[-1].read_text())
    print_headline(result)
    if rc == 124:
        print(f"benchmarks: killed at {budget:.0f} s; every row measured is in {out / 'bench'}")
    return "ok" if rc == 0 else "FAILED"


def print_headline(result: dict) -> None:
    """One line per (bench, shape, unit): ours, then each peer's ratio (x > 1: ours is better;
    "-": the peer refused or failed); then the cut and never-started cases."""
    records = result["records"]
    print(f"benchmarks: {len(records)} rows; copy {result['copy_gbps']:.0f} GB/s, matmul "
          f"{result['matmul_tflops']:.0f} TFLOP/s ({result['matmul_dtype']})")
    groups: dict = {}
    for r in records:
        groups.setdefault((r["bench"], r["shape"], r["unit"]), [r["ours"], []])[1] += \
            [] if r["peer"] is None else [f"{r['peer']} " + (
                "-" if r["ratio"] is None else f"x{r['ratio']:.2f}")]
    for (bench, shape, unit), (ours, peers) in groups.items():
        print(f"  {bench} {shape[:60]}: {ours:.4g} {unit}" + (f"; {', '.join(peers)}"
                                                              if peers else ""))
    for name, why in result["failed"].items():
        print(f"  CUT/FAILED {name}: {why[:300]}")
    if result.get("skipped"):
        print(f"  not started: {', '.join(result['skipped'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CI mode: interpreted, tiny shapes")
    parser.add_argument("--fp32", action="store_true",
                        help=f"also run the fp32 attention tests (up to {FP32_CAP_S} s)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all phases together (default 525, under 9 minutes; "
                        "--cpu: 1800, the interpreter is slow)")
    parser.add_argument("--out", default=None, help="folder for every log and result (default: "
                        "$OUT when set, else gpu-check-out/<date-time>)")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest processes for the tests (default: cores - 2, 2 to 12)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.cpu else 525.0
    begin = time.perf_counter()
    workers = args.workers or max(2, min(12, (os.cpu_count() or 2) - 2))
    out = Path(args.out or os.environ.get("OUT") or ROOT / "gpu-check-out"
               / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: everything goes to {out}", flush=True)
    left = lambda: args.budget_s - (time.perf_counter() - begin)  # noqa: E731
    summary: dict = {"out": str(out), "budget_s": args.budget_s, "phases": {}}

    def record(name, status, t0):
        summary["phases"][name] = {"status": status, "seconds": round(time.perf_counter() - t0)}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"=== gpu-check {name}: {status} in {summary['phases'][name]['seconds']} s",
              flush=True)

    def guarded(name, fn):
        print(f"\n=== gpu-check {name} ({left():.0f} s of the budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            status = fn()
        except Exception as e:  # a broken phase is reported, the next one still runs
            print(f"{name}: {type(e).__name__}: {e}")
            status = "FAILED"
        record(name, status, t0)

    from d2v_kernels import _cuda
    guarded("info", lambda: phase_info(args.cpu, out))
    fp32_reserve = FP32_CAP_S if args.fp32 else 0
    build_start = time.perf_counter()
    build = start([sys.executable, "-c", EXTENSION], args.cpu, out / "extension.log",
                  D2V_CUDA_VERBOSE="1")
    guarded("tests", lambda: phase_tests(
        "tests", KERNEL_TESTS, f"not {FP32_MARK}", args.cpu,
        min(TESTS_CAP_S, left() - BENCH_MIN_S - fp32_reserve), workers, out))
    print(f"\n=== gpu-check extension (building for {time.perf_counter() - build_start:.0f} s)",
          flush=True)
    cap = _cuda.BUILD_CAP_S
    rc = finish(build, cap - (time.perf_counter() - build_start))
    built = extension_result(rc, out / "extension.log", cap)
    record("extension", built, build_start)
    # A build that did not succeed is reported above: the test processes and the benchmarks
    # must not each try it again (D2V_CUDA_JIT=0: the extension's CUDA tests skip, saying it is
    # not installed; the targets benchmark has no cuda peer).
    no_rebuild = {} if built == "ok" else {"D2V_CUDA_JIT": "0"}
    guarded("extension tests", lambda: phase_tests(
        "ext_tests", EXTENSION_TESTS, f"not {FP32_MARK}", args.cpu,
        min(EXTENSION_TESTS_CAP_S, left() - BENCH_MIN_S - fp32_reserve), workers, out,
        **no_rebuild))
    guarded("benchmarks", lambda: phase_bench(args.cpu, max(left() - fp32_reserve, BENCH_MIN_S),
                                              out, **no_rebuild))
    if args.fp32:
        guarded("fp32", lambda: phase_tests("fp32", KERNEL_TESTS, FP32_MARK, args.cpu,
                                            max(min(FP32_CAP_S, left()), 30), workers, out))
    total = time.perf_counter() - begin
    print("\ngpu-check seconds per phase: " + ", ".join(
        f"{name} {p['seconds']}" + ("" if p["status"] == "ok" else f" ({p['status']})")
        for name, p in summary["phases"].items()) + f"; total {total:.0f} s; everything in {out}")
    return 0 if all(p["status"] in ("ok", "skipped") for p in summary["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
