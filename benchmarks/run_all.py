"""Runs every benchmark in one process: python -m benchmarks.run_all [--tiny] [--quick] [--out DIR].

Each module in MODULES has `run(tiny: bool) -> list[dict]` returning records in the format of
benchmarks.common.record ({"bench", "shape", "device", "ours", "peer", "peer_value", "unit",
"ratio", "fraction_of_peak", "torch", "triton", "commit"}; ratio > 1: ours is better). This writes
DIR/<date>-<device>.json = the device header (measured copy bandwidth and matmul peak, versions,
commit) + "records" (rewritten after each benchmark, so a run cut short keeps what it measured),
a short DIR/<date>-<device>.md summary, and prints one table. On a machine without a GPU use
--tiny: it checks the suite itself, not the speed. --only bench_step,bench_targets runs a subset.

--quick (make gpu-check): the headline shapes only, QUICK_PLAN: targets (image, audio), attention
(plain and training cases), masking (full base batches), and the step of image v1, image v2 and
audio v1 against the plain-PyTorch step and SDPA + torch.compile, each step its own entry.
--budget-s N gives each entry a time guard: its share of the seconds left (an entry that finishes
early leaves its time to the later ones); one that overruns is recorded as failed and the run
goes on with the next.
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

# Each entry: a module with run(tiny: bool) -> list[dict]. Add new benchmarks here.
MODULES = [
    "benchmarks.bench_step",
    "benchmarks.bench_targets",
    "benchmarks.bench_masking",
    "benchmarks.bench_v2",
    "benchmarks.bench_loader",
    "benchmarks.bench_attention",
]


# --quick: (name, module, keyword arguments of its run(), share of the time budget).
QUICK_PLAN = [
    ("targets", "benchmarks.bench_targets", {}, 0.10),
    ("attention", "benchmarks.bench_attention", {}, 0.10),
    ("masking", "benchmarks.bench_masking", {}, 0.08),
    ("step_image_v1", "benchmarks.bench_step", {"modalities": ("image",)}, 0.24),
    ("step_image_v2", "benchmarks.bench_step", {"modalities": ("image_v2",)}, 0.24),
    ("step_audio_v1", "benchmarks.bench_step", {"modalities": ("audio",)}, 0.24),
]


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
        raise BudgetExceeded(f"{what} ran past its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def plan(quick: bool, only: set[str]) -> list[tuple]:
    """(name, module, kwargs, budget share) of each entry to run."""
    if quick:
        entries = [(n, m, {**kw, "quick": True}, share) for n, m, kw, share in QUICK_PLAN]
    else:
        entries = [(m.split(".")[-1], m, {}, 1.0 / len(MODULES)) for m in MODULES]
    return [e for e in entries if not only or e[1] in only]


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
    lines += ["", "Seconds per entry: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                   r["seconds"].items())]
    for name, why in r["failed"].items():
        lines.append(f"- FAILED {name}: {why}")
    return "\n".join(lines) + "\n"


def result_path(out: Path, device_name: str, date: datetime.date | None = None) -> Path:
    date = date or datetime.date.today()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    return out / f"{date.isoformat()}-{slug}.json"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--quick", action="store_true", help="headline shapes only (QUICK_PLAN)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all entries together (each gets a time guard)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
    args = parser.parse_args(argv)
    only = {f"benchmarks.{m.strip()}" for m in args.only.split(",") if m.strip()}
    entries = plan(args.quick, only)
    start = time.perf_counter()
    head = common.header(tiny=args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, head["device"])
    result = {**head, "date": datetime.date.today().isoformat(), "quick": args.quick,
              "modules": [e[0] for e in entries], "failed": {}, "seconds": {}, "records": []}
    for i, (name, module, kwargs, share) in enumerate(entries):
        budget = None
        if args.budget_s:
            left = args.budget_s - (time.perf_counter() - start)
            budget = max(1.0, left * share / sum(e[3] for e in entries[i:]))
        t0 = time.perf_counter()
        try:
            with time_guard(budget, name):
                result["records"] += importlib.import_module(module).run(args.tiny, **kwargs)
        except (Exception, BudgetExceeded) as e:  # one broken bench must not lose the others'
            result["failed"][name] = f"{type(e).__name__}: {e}"
            print(f"run_all: {name} failed: {result['failed'][name]}", flush=True)
        result["seconds"][name] = time.perf_counter() - t0
        print(f"run_all: {name} took {result['seconds'][name]:.0f} s"
              + (f" (budget {budget:.0f} s)" if budget else ""), flush=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    md = path.with_suffix(".md")
    md.write_text(summary_markdown(result))
    print(f"device {head['device']}  torch {head['torch']}  triton {head['triton']}  commit "
          f"{head['commit']}  copy {head['copy_gbps']:.0f} GB/s  matmul {head['matmul_tflops']:.1f} "
          f"TFLOP/s ({head['matmul_dtype']})")
    common.print_records(result["records"])
    print(f"wrote {path} and {md}")
    return path


if __name__ == "__main__":
    # exit 1 when an entry failed or ran out of time (make gpu-check reports the phase as failed)
    raise SystemExit(1 if json.loads(main().read_text())["failed"] else 0)
