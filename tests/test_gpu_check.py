"""The GPU-proof tooling, checked on any machine: make gpu-check (scripts/gpu_check.py and
run_all --quick with its time guards) and the Hopper compile check (d2v_kernels.compile_check). Their
full runs are in .ci/run: `make gpu-check-cpu` and `make compile-check`."""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import run_all
from d2v_kernels import compile_check

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


def test_quick_plan_is_the_headline_set_and_shares_the_budget():
    entries = run_all.plan(quick=True, only=set())
    names = [e[0] for e in entries]
    assert names == ["targets", "attention", "masking", "step_image_v1", "step_image_v2",
                     "step_audio_v1"]
    assert all(e[2]["quick"] for e in entries)
    assert abs(sum(e[3] for e in entries) - 1.0) < 1e-9


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


# ---------------------------------------------------------------------------------------------
# d2v_kernels.compile_check


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
    out = subprocess.run([sys.executable, "-m", "d2v_kernels.compile_check", "--list"], cwd=ROOT,
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
