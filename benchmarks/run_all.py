"""Runs every benchmark in one process: python -m benchmarks.run_all [--tiny] [--quick] [--out DIR].

Each module in MODULES has `cases(tiny, **kwargs) -> list[benchmarks.common.BenchCase]`: named
units, each measuring some rows and handing every row to `emit` the moment it has it. Rows are
records in the format of benchmarks.common.record ({"bench", "shape", "device", "ours", "peer",
"peer_value", "unit", "ratio", "fraction_of_peak", "torch", "triton", "commit"}; ratio > 1: ours
is better). Each row lands on disk at once: appended (flushed, fsynced) to DIR/<date>-<device>.jsonl
(its first line the header)
and DIR/<date>-<device>.json rewritten (atomically: a temporary file renamed over it) = the device
header (measured copy bandwidth and matmul peak, versions, commit) + "records" + "failed",
"skipped", "seconds"; a short DIR/<date>-<device>.md summary follows each case. A run killed at any
point (SIGKILL included) leaves every row it measured in both files. On a machine without a GPU
use --tiny: it checks the suite itself, not the speed. --only bench_step,bench_targets runs a
subset.

--quick (make gpu-check): QUICK_PLAN, most information per second first: attention at the training
cases against the SDPA kernels; the image v1 step, ours against SDPA + torch.compile; targets
(image, audio) against eager and the CUDA extension; masking (full base batches); then FlexAttention
and the dispatcher's own pick (a compile per shape key), the image v2 and audio v1 steps, the
plain-PyTorch step peers and torch.compile(max-autotune) of the targets reference.

Time guards are per case (--budget-s N): a case may run GUARD_FACTOR x its
estimate, and never past the budget's end; one that overruns is cut -- "failed" names it, how long
it ran, which of its rows it measured and which it did not -- and the run goes on with the next.
Cases that never started for lack of time are listed in "skipped".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import re
import signal
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: our kernels run interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import common  # noqa: E402

# Each entry: a module with cases(tiny, ...) -> list[BenchCase]. Add new benchmarks here.
MODULES = [
    "benchmarks.bench_step",
    "benchmarks.bench_targets",
    "benchmarks.bench_masking",
    "benchmarks.bench_v2",
    "benchmarks.bench_loader",
    "benchmarks.bench_attention",
]

# --quick: (module, keyword arguments of its cases()), in the order they run.
QUICK_PLAN = [
    ("benchmarks.bench_attention", {"half": "fast"}),
    ("benchmarks.bench_step", {"modalities": ("image",), "variants": ("ours", "sdpa_compile")}),
    ("benchmarks.bench_targets", {"peers": ("eager", "cuda")}),
    ("benchmarks.bench_masking", {}),
    ("benchmarks.bench_attention", {"half": "slow"}),
    ("benchmarks.bench_step", {"modalities": ("image_v2", "audio"),
                               "variants": ("ours", "sdpa_compile")}),
    ("benchmarks.bench_step", {"modalities": ("image", "image_v2", "audio"),
                               "variants": ("plain",)}),
    ("benchmarks.bench_targets", {"peers": ("compiled",)}),
]
GUARD_FACTOR = 2.0  # a case may take this many times its estimate before it is cut
MIN_CASE_S = 5.0  # a case is not started with less time than this left


class BudgetExceeded(BaseException):
    """A time guard fired: a BaseException, so the benchmarks' own `except Exception` (a backend
    that refuses some arguments is a row, not a crash) cannot swallow it."""


@contextlib.contextmanager
def time_guard(seconds: float | None, what: str):
    """Raises BudgetExceeded in the main thread after `seconds` (None: no guard)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise BudgetExceeded(f"{what} ran past its {seconds:.0f} s guard")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def plan(quick: bool, only: set[str]) -> list[tuple[str, dict]]:
    """(module, cases() keyword arguments) of each entry to run."""
    if quick:
        entries = [(m, {**kw, "quick": True}) for m, kw in QUICK_PLAN]
    else:
        entries = [(m, {}) for m in MODULES]
    return [e for e in entries if not only or e[0] in only]


def summary_markdown(result: dict) -> str:
    """The short human summary of one results file."""
    r = result
    lines = [f"# {r['date']} {r['device']}" + (" (quick)" if r.get("quick") else ""), "",
             f"torch {r['torch']}, triton {r['triton']}, commit {r['commit']}; measured copy "
             f"{r['copy_gbps']:.0f} GB/s, matmul {r['matmul_tflops']:.1f} TFLOP/s "
             f"({r['matmul_dtype']}). ratio > 1: ours is better.", "",
             "| bench | shape | unit | ours | peer | peer value | ratio | % of peak |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for rec in r["records"]:
        peer_value = "" if rec["peer_value"] is None else f"{rec['peer_value']:.4g}"
        ratio = "" if rec["ratio"] is None else f"{rec['ratio']:.2f}"
        frac = "" if rec["fraction_of_peak"] is None else f"{100 * rec['fraction_of_peak']:.1f}"
        lines.append(f"| {rec['bench']} | {rec['shape']} | {rec['unit']} | {rec['ours']:.4g} | "
                     f"{rec['peer'] or ''} | {peer_value} | {ratio} | {frac} |")
    lines += ["", "Seconds per case: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                  r["seconds"].items())]
    for name, why in r["failed"].items():
        lines.append(f"- FAILED {name}: {why}")
    if r.get("skipped"):
        lines.append(f"- not started (no time left): {', '.join(r['skipped'])}")
    return "\n".join(lines) + "\n"


def result_path(out: Path, device_name: str, date: datetime.date | None = None) -> Path:
    date = date or datetime.date.today()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    return out / f"{date.isoformat()}-{slug}.json"


class Sink:
    """Where rows land the moment they are measured: the JSONL appended, the JSON rewritten."""

    def __init__(self, path: Path, result: dict):
        self.path, self.result = path, result
        self.lines = path.with_suffix(".jsonl").open("w", buffering=1)
        self._append({"header": {k: v for k, v in result.items() if k != "records"}})
        self.save()

    def emit(self, rec: dict) -> None:
        self.result["records"].append(rec)
        self._append(rec)
        self.save()

    def _append(self, obj: dict) -> None:
        self.lines.write(json.dumps(obj) + "\n")  # one write of a whole line
        self.lines.flush()
        os.fsync(self.lines.fileno())

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, self.path)  # readers see the old file or the new one, never a torn one


def _cut_message(case, err: BaseException, secs: float, rows: list[dict]) -> str:
    """What a failed or cut case measured and what it did not."""
    done = [r["peer"] for r in rows]
    missing = [str(p) if p is not None else "ours" for p in case.peers if p not in done]
    measured = sorted({str(p) if p is not None else "ours" for p in done})
    return (f"{type(err).__name__}: {err} after {secs:.0f} s; {len(rows)} rows measured"
            + (f" ({', '.join(measured)})" if measured else "")
            + (f"; not measured: {', '.join(missing)}" if missing else ""))


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--quick", action="store_true", help="headline shapes only (QUICK_PLAN)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all cases together (each gets a time guard)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
    args = parser.parse_args(argv)
    only = {f"benchmarks.{m.strip()}" for m in args.only.split(",") if m.strip()}
    start = time.perf_counter()
    head = common.header(tiny=args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, head["device"])
    cases = [case for module, kwargs in plan(args.quick, only)
             for case in importlib.import_module(module).cases(args.tiny, **kwargs)]
    result = {**head, "date": datetime.date.today().isoformat(), "quick": args.quick,
              "cases": [c.name for c in cases], "failed": {}, "skipped": [], "seconds": {},
              "records": []}
    sink = Sink(path, result)
    md = path.with_suffix(".md")
    print(f"run_all: {len(cases)} cases -> {path} (+ .jsonl, .md)", flush=True)
    for case in cases:
        guard = None
        if args.budget_s:
            left = args.budget_s - (time.perf_counter() - start)
            if left < MIN_CASE_S:
                result["skipped"].append(case.name)
                sink.save()
                continue
            guard = min(GUARD_FACTOR * case.estimate_s, left)
        rows: list[dict] = []

        def emit(rec, rows=rows):
            rows.append(rec)
            sink.emit(rec)

        t0 = time.perf_counter()
        try:
            with time_guard(guard, case.name):
                case.run(emit)
        except (Exception, BudgetExceeded) as e:  # one broken case must not lose the others'
            result["failed"][case.name] = _cut_message(case, e, time.perf_counter() - t0, rows)
            print(f"run_all: {case.name} failed: {result['failed'][case.name]}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        result["seconds"][case.name] = time.perf_counter() - t0
        print(f"run_all: {case.name}: {len(rows)} rows in {result['seconds'][case.name]:.0f} s"
              + (f" (guard {guard:.0f} s)" if guard else ""), flush=True)
        sink.save()
        md.write_text(summary_markdown(result))
    md.write_text(summary_markdown(result))
    if result["skipped"]:
        print(f"run_all: not started (no time left): {', '.join(result['skipped'])}")
    print(f"device {head['device']}  torch {head['torch']}  triton {head['triton']}  commit "
          f"{head['commit']}  copy {head['copy_gbps']:.0f} GB/s  matmul {head['matmul_tflops']:.1f} "
          f"TFLOP/s ({head['matmul_dtype']})")
    common.print_records(result["records"])
    print(f"wrote {path}, {path.with_suffix('.jsonl').name} and {md.name}")
    return path


if __name__ == "__main__":
    # exit 1 when a case failed or was cut (make gpu-check reports the phase as failed)
    raise SystemExit(1 if json.loads(main().read_text())["failed"] else 0)
