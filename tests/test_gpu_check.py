"""The GPU-proof tooling, checked on any machine: make gpu-check (scripts/gpu_check.py and
run_all --quick with its time guards) and the Hopper compile check (benchmarks.compile_check). Their
full runs are in .ci/run: `make gpu-check-cpu` and `make compile-check`."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run_all
from benchmarks import compile_check

ROOT = Path(__file__).resolve().parent.parent


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_gpu_check_installs_nothing_and_ci_runs_both_checks():
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^gpu-check:(.*)\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "Makefile has no gpu-check target"
    prerequisites, commands = recipe.group(1), recipe.group(2)
    assert prerequisites.strip() == "", "gpu-check must not depend on the venv (no network there)"
    assert "pip" not in commands and "venv" not in commands and "PYTHONPATH" in commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make gpu-check-cpu" in ci and "make compile-check" in ci


def test_tests_are_spread_with_the_attention_cases_dealt_first():
    gpu_check = load_gpu_check()
    ids = [f"t.py::test_other[{i}]" for i in range(5)] + \
        [f"t.py::test_attention_x[{i}]" for i in range(3)]
    groups = gpu_check.spread(ids, 4)
    assert [g[0] for g in groups[:3]] == [f"t.py::test_attention_x[{i}]" for i in range(3)]
    assert sorted(sum(groups, [])) == sorted(ids) and len(groups) == 4


def test_quick_plan_puts_the_headline_rows_first():
    """Most information per second first: attention against the SDPA kernels, the image v1 step
    against SDPA + compile, targets and masking (no max-autotune), then the slow peers."""
    entries = run_all.plan(quick=True, only=set())
    names = [(m.split(".")[-1], kw.get("half") or kw.get("peers") or kw.get("variants"))
             for m, kw in entries]
    assert names[:4] == [("bench_attention", "fast"), ("bench_step", ("ours", "sdpa_compile")),
                         ("bench_targets", ("eager", "cuda")), ("bench_masking", None)], names
    assert ("bench_attention", "slow") in names[4:] and ("bench_targets", ("compiled",)) == \
        names[-1], "flex / dispatch and max-autotune must come after the headline rows"
    assert entries[1][1]["modalities"] == ("image",)
    assert all(kw["quick"] for _, kw in entries)


def test_time_guard_cuts_an_entry_even_through_broad_excepts():
    start = time.perf_counter()
    with pytest.raises(run_all.BudgetExceeded, match="ran past its"):
        with run_all.time_guard(1.0, "slow bench"):
            while True:
                try:  # a benchmark's own catch-all must not swallow the guard
                    time.sleep(0.05)
                except Exception:
                    pass
    assert time.perf_counter() - start < 3


def test_summary_lists_records_failures_and_seconds():
    record = {"bench": "targets", "shape": "image_v1", "unit": "GB/s", "ours": 2000.0,
              "peer": "eager", "peer_value": 500.0, "ratio": 4.0, "fraction_of_peak": 0.6}
    text = run_all.summary_markdown({
        "date": "2026-01-01", "device": "NVIDIA H100", "quick": True, "torch": "2.11",
        "triton": "3.6.0", "commit": "abc", "copy_gbps": 3000.0, "matmul_tflops": 700.0,
        "matmul_dtype": "bfloat16", "records": [record], "seconds": {"targets": 12.3},
        "failed": {"step_audio_v1": "BudgetExceeded: ran past its 100 s budget"}})
    assert "| targets | image_v1 | GB/s | 2000 | eager | 500 | 4.00 | 60.0 |" in text
    assert "targets 12" in text and "FAILED step_audio_v1" in text


RECORD = {k: None for k in ("bench", "shape", "device", "ours", "peer", "peer_value", "unit",
                            "ratio", "fraction_of_peak", "torch", "triton", "commit")}


def _fake_bench(monkeypatch, cases):
    """run_all planning one fake module whose cases() returns `cases`."""
    import types
    module = types.ModuleType("d2v_fake_bench")
    module.cases = lambda tiny, **kwargs: cases
    monkeypatch.setitem(sys.modules, "d2v_fake_bench", module)
    monkeypatch.setattr(run_all, "plan", lambda quick, only: [("d2v_fake_bench", {})])


def test_a_cut_case_keeps_its_rows_and_says_which_it_did_not_measure(tmp_path, monkeypatch):
    from benchmarks.common import BenchCase

    def row(peer, value):
        return {**RECORD, "bench": "fake", "shape": "s", "ours": 1.0, "peer": peer,
                "peer_value": value, "unit": "ms"}

    def stuck(emit):
        emit(row(None, None))
        emit(row("peer_a", 2.0))
        while True:
            try:  # a benchmark's own catch-all must not swallow the guard
                time.sleep(0.05)
            except Exception:
                pass

    cases = [BenchCase("fake/stuck", stuck, (None, "peer_a", "peer_b"), estimate_s=0.5),
             BenchCase("fake/quick", lambda emit: emit(row("peer_a", 3.0)), ("peer_a",), 0.5),
             BenchCase("fake/long", stuck, (None, "peer_a", "peer_b"), estimate_s=1000.0),
             BenchCase("fake/late", lambda emit: emit(row("peer_a", 4.0)), ("peer_a",), 0.5)]
    _fake_bench(monkeypatch, cases)
    monkeypatch.setattr(run_all, "MIN_CASE_S", 2.0)
    start = time.perf_counter()
    path = run_all.main(["--tiny", "--budget-s", "8", "--out", str(tmp_path)])
    assert time.perf_counter() - start < 30
    result = json.loads(path.read_text())
    stuck_why = result["failed"]["fake/stuck"]
    assert "BudgetExceeded" in stuck_why and "2 rows measured (ours, peer_a)" in stuck_why
    assert stuck_why.endswith("not measured: peer_b"), stuck_why
    assert "fake/quick" not in result["failed"], "a cut must not stop the cases after it"
    assert "fake/long" in result["failed"], "the budget's end cuts the case that runs into it"
    assert result["skipped"] == ["fake/late"], result["skipped"]
    assert [r["peer_value"] for r in result["records"]] == [None, 2.0, 3.0, None, 2.0]
    lines = [json.loads(x) for x in path.with_suffix(".jsonl").read_text().splitlines()]
    assert "header" in lines[0] and lines[1:] == result["records"]
    assert "not started (no time left): fake/late" in path.with_suffix(".md").read_text()


def test_a_killed_run_leaves_every_measured_row_on_disk(tmp_path):
    """SIGKILL right after the first row lands: the JSONL and the JSON both parse, every row in
    them is complete, and the JSON holds the JSONL's rows (at most the last one missing: it is
    rewritten just after the line is appended)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.run_all", "--tiny", "--quick",
                             "--only", "bench_masking", "--out", str(tmp_path)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    lines = []
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list(tmp_path.glob("*.jsonl"))
            lines = found[0].read_text().splitlines() if found else []
            if len(lines) >= 2:  # the header and a first row
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(lines) >= 2, "no row landed within 300 s"
    rows = [json.loads(x) for x in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert "header" in rows[0] and rows[0]["header"]["device"]
    records = rows[1:]
    assert records and all(set(r) == set(RECORD) and r["bench"] == "masking" for r in records)
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())["records"]
    assert records[:len(saved)] == saved and len(records) - len(saved) <= 1, (records, saved)


def test_gpu_check_killed_mid_benchmark_leaves_every_measured_row_on_disk(tmp_path):
    """make gpu-check-cpu's own command, SIGKILLed (its whole process group) once the benchmark
    phase has written its first row: every row on disk parses and is complete."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--cpu",
                             "--out", str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 900
    lines = []
    try:
        while time.time() < deadline and proc.poll() is None:
            found = sorted((tmp_path / "bench").glob("*.jsonl")) if (tmp_path / "bench").is_dir() \
                else []
            lines = found[0].read_text().splitlines() if found else []
            if len(lines) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(lines) >= 2, "no benchmark row landed within 900 s"
    rows = [json.loads(x) for x in next((tmp_path / "bench").glob("*.jsonl")).read_text()
            .splitlines()]
    assert "header" in rows[0] and rows[1:], rows
    assert all(set(r) == set(RECORD) for r in rows[1:]), rows[1:]
    saved = json.loads(next((tmp_path / "bench").glob("*.json")).read_text())["records"]
    assert rows[1:][:len(saved)] == saved and len(rows) - 1 - len(saved) <= 1


def test_the_budget_table_sums_to_the_default_budget_under_nine_minutes():
    """The docstring's table: the phases that take wall time (not the background build in
    parentheses, not the opt-in fp32) sum to its total, which is the default --budget-s and
    leaves start-up and the summary inside 9 minutes; every row states its basis."""
    gpu_check = load_gpu_check()
    doc = gpu_check.__doc__
    table = doc[doc.index("  phase        estimate"):doc.index("With --fp32")].splitlines()[1:]
    rows = {}
    for line in table:
        m = re.match(r"  (\w[\w ]*?)\s{2,}(\(?\d+ s\)?|\(opt-in\))\s*(.*)$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    assert set(rows) == {"info", "extension", "tests", "ext tests", "benchmarks", "total",
                         "fp32"}, rows
    counted = [int(v[0].split()[0]) for k, v in rows.items()
               if k not in ("total", "fp32") and not v[0].startswith("(")]
    total = int(rows["total"][0].split()[0])
    assert sum(counted) == total, (counted, total)
    assert total <= 540 - 15, f"{total} s leaves no room for start-up in 9 minutes"
    assert rows["fp32"][0] == "(opt-in)" and rows["extension"][0].startswith("(")
    for name, (_, rest) in rows.items():
        if name != "total":
            assert len(rest.split()) >= 3, f"{name}: no basis stated"
    parser_default = re.search(r"args.budget_s = 1800.0 if args.cpu else (\d+)\.0",
                               (ROOT / "scripts" / "gpu_check.py").read_text())
    assert parser_default and int(parser_default.group(1)) == total


def test_fp32_attention_is_opt_in():
    gpu_check = load_gpu_check()
    kernel_tests = (ROOT / "tests" / "test_cuda_kernels.py").read_text()
    assert "pytest.param(torch.float32, marks=fp32_attention)" in kernel_tests
    source = (ROOT / "scripts" / "gpu_check.py").read_text()
    assert 'f"not {FP32_MARK}"' in source and "if args.fp32:" in source
    assert gpu_check.FP32_MARK == "fp32_attention"


def test_junit_results_count_every_outcome_and_keep_one_line_per_failure(tmp_path):
    gpu_check = load_gpu_check()
    xml = tmp_path / "t.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_x" name="test_ok"/>
<testcase classname="tests.test_x" name="test_bad[bf16]"><failure message="AssertionError: out rel err 3.1e-02 &gt;= 2e-2&#10;assert 0.031 &lt; 0.02">long traceback</failure></testcase>
<testcase classname="tests.test_x" name="test_skip"><skipped message="needs CUDA"/></testcase>
<testcase classname="tests.test_x" name="test_err"><error message="fixture blew up"/></testcase>
</testsuite></testsuites>""")
    totals, failures = gpu_check.junit_results(xml)
    assert totals == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert failures == ["tests.test_x::test_bad[bf16]: AssertionError: out rel err 3.1e-02 >= 2e-2",
                        "tests.test_x::test_err: fixture blew up"]


def test_a_failed_build_prints_the_compilers_error_lines(tmp_path, capsys):
    gpu_check = load_gpu_check()
    log = tmp_path / "extension.log"
    log.write_text("[1/3] /usr/local/cuda/bin/nvcc -D__CUDA_NO_HALF_CONVERSIONS__ -c x.cu -o x.o\n"
                   "x.cu(171): error: no instance of constructor \"__half::__half\"\n"
                   "1 error detected in the compilation of \"x.cu\".\n"
                   "d2v_cuda: unavailable: build failed (80 s)\n")
    assert gpu_check.extension_result(1, log, 240) == "FAILED"
    printed = capsys.readouterr().out
    assert 'x.cu(171): error: no instance of constructor "__half::__half"' in printed
    assert "-D__CUDA_NO_HALF_CONVERSIONS__" not in printed, "printed the nvcc command line"
    log.write_text("d2v_cuda: unavailable: no nvcc (CUDA_HOME unset and nvcc not on PATH)\n")
    assert gpu_check.extension_result(3, log, 240) == "skipped"


def test_compile_caches_and_outputs_live_in_ignored_folders_of_the_checkout():
    gpu_check = load_gpu_check()
    e = gpu_check.env(cpu=False)
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR"):
        assert Path(e[var]).is_relative_to(ROOT / ".gpu-cache"), (var, e[var])
    assert e["TRITON_PRINT_AUTOTUNING"] == "1"
    ignore = (ROOT / ".gitignore").read_text().split()
    assert "/.gpu-cache/" in ignore and "/gpu-check-out/" in ignore


def test_ci_runs_gpu_check_cpu_under_the_gpu_images_triton():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'^step "make gpu-check-cpu-image" make gpu-check-cpu-image$', ci, re.M), ci
    recipe = re.search(r"^gpu-check-cpu-image:(.*)\n((?:\t.*\n)+)",
                       (ROOT / "Makefile").read_text(), re.M)
    assert recipe and "$(TRITON_STAMP)" in recipe.group(1)
    assert "$(TRITON_VENV)/bin/python scripts/gpu_check.py --cpu" in recipe.group(2)
    assert "--upgrade numpy" in recipe.group(2)


# ---------------------------------------------------------------------------------------------
# benchmarks.compile_check


def test_ptxas_log_gives_registers_and_spills():
    log = ("ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _fwd_kernel\n"
           "    24 bytes stack frame, 20 bytes spill stores, 28 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 496 bytes cmem[0]\n")
    assert compile_check.parse_ptxas_log(log) == {"regs": 255, "spill_stores": 20,
                                                  "spill_loads": 28}
    assert compile_check.parse_ptxas_log("no log") is None


def job(group, config):
    return compile_check.Job("_fwd_kernel", "image_base student", None, (), {}, config, group,
                             users=[(group, "image_base student")])


def result(spills=0, shared=64 * 1024):
    return {"regs": 128, "spill_stores": spills, "spill_loads": spills, "shared": shared,
            "seconds": 1.0}


def test_compile_check_fails_only_where_it_must():
    jobs = [job(0, "64x64"), job(0, "128x128")]
    assert compile_check.summarize(jobs, [result(), result(spills=64)]) == [], \
        "one spill-free config per launch is enough"
    failures = compile_check.summarize(jobs, [result(spills=8), result(spills=64)])
    assert failures == ["every config spills or overflows: _fwd_kernel [image_base student]"]
    failures = compile_check.summarize(jobs, [result(), result(shared=228 * 1024)])
    assert len(failures) == 1 and "> 227 KB" in failures[0]
    failures = compile_check.summarize(jobs, [result(), {"error": "boom", "seconds": 0.1}])
    assert len(failures) == 1 and failures[0].startswith("compile error")


def test_occupancy_counts_blocks_per_sm_from_registers_threads_and_shared_memory():
    # H100: 64K registers per SM in warp units of 256, 2048 threads, 32 blocks, 228 KB shared.
    assert compile_check.occupancy(64, 256, 0) == {"blocks_per_sm": 4, "occupancy": 0.5}
    assert compile_check.occupancy(92, 256, 0)["blocks_per_sm"] == 2  # 96 per thread after rounding
    assert compile_check.occupancy(32, 256, 0) == {"blocks_per_sm": 8, "occupancy": 1.0}
    assert compile_check.occupancy(40, 32, 0)["blocks_per_sm"] == 32  # the 32-block cap
    assert compile_check.occupancy(32, 256, 100 * 1024)["blocks_per_sm"] == 2  # shared memory


def test_compile_check_covers_every_kernel_at_the_base_shapes():
    """--list runs the launchers on empty CPU tensors with recorders (no compile): every kernel
    of d2v_kernels/ is launched by some base config, with the bias gradient of image v1 and at least
    one config per autotuned launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--list"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("_")}
    assert kernels >= {"_fwd_kernel", "_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                       "_bwd_dbias_kernel", "_instance_kernel", "_combine_kernel", "_span_kernel",
                       "_trim_kernel", "_token_kernel", "_beit_block_kernel",
                       "_inverse_block_kernel"}, kernels
    dbias = [line for line in out.stdout.splitlines() if line.startswith("_bwd_dbias_kernel")]
    assert dbias and all("image_base student" in line for line in dbias)
    for name in ("image_base", "image_v2", "audio_base", "audio_v2", "text_base", "text_v2"):
        assert f"{name} student" in out.stdout and f"{name} teacher" in out.stdout, name
