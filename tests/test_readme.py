"""README.md, command by command and claim by claim, in tiny form on the CPU.

CLAIMS below lists what the README says that a test checks: the README's own words (matched with
whitespace and line breaks ignored) and the test that checks them, here or in another test file.
When the README is reworded, test_the_readme_still_makes_every_checked_claim fails naming the
words that are gone and the check that lost its claim; a section added to the README breaks
nothing (its claims are not listed yet). Every figure carries its backing in the README as an
HTML comment, `<!-- backed: path, path::test -->`, which must point at files and tests that exist.

The commands run as a user runs them (the d2v-... console scripts or python -m ...,
TRITON_INTERPRET unset so the kernels' reference path runs as on any CPU), shortened (a few steps)
and on one thread.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from d2v_engine.checkpoint import list_checkpoints, load_checkpoint
from d2v_engine.config import load_config
from d2v_engine.data.loader import BatchPlan
from d2v_engine.cli.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TINY_RUNS = ROOT / "benchmarks/results/2026-11-27-cpu-tiny-runs.json"
LOADER_RUNS = ROOT / "benchmarks/results/2026-11-25-cpu-loader.json"
QUALITY = ROOT / "benchmarks/results/2026-11-27-cpu-quality.json"
QUALITY_SHORT = ROOT / "benchmarks/results/2026-11-27-cpu-quality-short.json"
QUALITY_TEXT_TRIALS = ROOT / "benchmarks/results/2026-11-27-cpu-quality-text-trials.json"
QUALITY_TEXT_CONTROLS = ROOT / "benchmarks/results/2026-11-27-cpu-quality-text-controls.json"
DEFAULT_RUN = ROOT / "benchmarks/results/2026-12-08-cpu-default-run.json"
HERE = "tests/test_readme.py"


@dataclass(frozen=True)
class Claim:
    says: str  # the README's words
    check: str  # a test of this file, or path::test of another


CLAIMS = [
    # Quick start
    Claim("make train # creates .venv, installs, pretrains tiny_image_v2 on the embedded data -> "
          "runs/tiny_image_v2/, # then prints a linear probe of the result",
          "test_make_train_runs_tiny_image_v2_and_probes"),
    Claim("each run took", "test_default_run_figures_are_the_measured_ones"),
    Claim("Both commands install the exact versions of `requirements-lock.txt`",
          "test_make_installs_the_lock_and_test_latest_the_newest_releases"),
    Claim("`make test-latest` builds a venv from nothing with every dependency at its newest "
          "release (no lock; torch stays the CPU 2.13.0 build), installs this project from a wheel "
          "and runs the tests marked `latest`",
          "test_make_installs_the_lock_and_test_latest_the_newest_releases"),
    Claim("`make lock` re-resolves", "test_make_installs_the_lock_and_test_latest_the_newest_releases"),
    Claim("The commands (console scripts in `.venv/bin`; each is also "
          "`python -m d2v_engine.cli.<name>`)", "tests/test_install.py::test_the_console_scripts_are_the_readmes"),
    Claim("make train CONFIG=configs/tiny_audio.yaml", "test_make_train_with_a_config_and_args"),
    Claim('make train CONFIG=configs/tiny_text.yaml ARGS="train.max_steps=50 seed=3"',
          "test_make_train_with_a_config_and_args"),
    Claim(".venv/bin/d2v-train configs/tiny_image.yaml train.max_steps=100 "
          "run.dir=runs/try1", "test_a_tiny_run_writes_what_the_readme_lists"),
    Claim("tiny_image (data2vec 1.0, 200 steps) takes its loss from",
          "test_quick_start_figures_are_the_measured_ones"),
    Claim("Compute per update of the tiny configs, in CPU seconds on one thread:",
          "test_quick_start_figures_are_the_measured_ones"),
    Claim("peak resident memory", "test_quick_start_figures_are_the_measured_ones"),
    # Configs
    Claim("An unknown key, a value of the wrong type or outside its choices is a one-line error "
          "naming the key and what is allowed.", "test_config_errors_are_one_line_naming_the_key"),
    Claim("the v2 families on CPU (200 steps, loss at step 1 -> step 200:",
          "test_v2_figures_are_the_measured_ones"),
    Claim("each config states its warmup and EMA anneal at `optim.schedule_reference_steps`, the "
          "paper's length, and a shorter or longer run scales them to the same fractions of the "
          "run; `optim.schedule_scaling=absolute` keeps fairseq's step counts; the plan prints them",
          "tests/test_schedule.py::test_a_20_step_run_follows_the_200_step_lr_and_ema_curves_at_"
          "the_same_fractions"),
    Claim("`train.stop_at=N` (checkpoint and exit at step N, schedules unchanged), "
          "`train.resume=true` (continue from the newest complete checkpoint in `run.dir`)",
          "test_a_tiny_run_writes_what_the_readme_lists"),
    # What a run writes
    Claim("`metrics.jsonl`: one JSON object per logged step (`step`, `loss`, `lr`, `ema_decay`, "
          "`samples_per_s`, `tflops_per_gpu`, `mfu`, `tokens_per_s` (see \"Compute and memory "
          "plan\"), `grad_norm`, `target_var`, `pred_var`, `skipped_steps`, `data_wait_frac`, "
          "`bad_files`, `bad_files_first`, `empty_steps`, ...)",
          "test_a_tiny_run_writes_what_the_readme_lists"),
    Claim("`stopped` (with the reason: `nonfinite`, `no_data`, `collapse`, `stop_at`)",
          "test_every_event_row_the_readme_names_is_written_somewhere"),
    Claim("`checkpoint_<step>.pt`: student, EMA teacher, optimizer, schedule, step, guard counters "
          "and every RNG state", "test_a_tiny_run_writes_what_the_readme_lists"),
    Claim("the newest `train.keep_last` are kept, and every `train.keep_every`-th step.",
          "test_a_tiny_run_writes_what_the_readme_lists"),
    Claim("`command.txt` (every command that ran in this directory, the original first)",
          "test_a_tiny_run_writes_what_the_readme_lists"),
    Claim("under `dispatch` which implementation each op of the step takes: targets, masking, "
          "attention, optimizer, EMA, loader", "test_a_tiny_run_writes_what_the_readme_lists"),
    Claim("Neither is required: missing or broken, it is reported in one line and the run goes on.",
          "test_a_tiny_run_writes_what_the_readme_lists"),
    # Data loading
    Claim("The start line says which loader runs and where it decodes.",
          "test_a_tiny_run_writes_what_the_readme_lists"),
    Claim("images DALI 589-674 vs torch 346-357 images/s (1.68-1.89x); audio DALI 13.8k-16.8k vs "
          "torch 9.0k-9.2k audio seconds/s (1.54-1.83x)",
          "test_loader_figures_are_the_measured_ones"),
    Claim("The pixels equal the PIL path's to one level of 255",
          "tests/test_dali.py::test_dali_cpu_images_are_the_pil_pixels"),
    Claim("`skip` leaves it out, prints its path, and counts it in `bad_files`, each file once over "
          "all ranks and the whole run, resumes included",
          "tests/test_run_messages.py::test_a_bad_file_counts_once_across_epochs_and_a_resume"),
    Claim("`data.on_bad_file: fail` stops at once with an error naming the file",
          "test_a_bad_file_stops_a_run_naming_it"),
    # Running for days
    Claim("`#SBATCH --signal=TERM@120`", "test_launch_scripts_do_what_the_readme_says"),
    Claim("waits `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds (default 30) before killing them, so the "
          "script raises it", "test_launch_scripts_do_what_the_readme_says"),
    Claim("SIGTERM or SIGUSR1 makes every rank finish its current step",
          "tests/test_ops.py::test_sigterm_checkpoints_exits_zero_and_resume_continues_exactly"),
    Claim("`objective.collapse_check_after` updates are done (5000)",
          "test_guard_defaults_are_the_readmes"),
    Claim("`train.max_bad_steps` in a row stop the run (exit 2)",
          "tests/test_ops.py::test_nonfinite_updates_in_a_row_stop_after_max_bad_steps"),
    # Your own data
    Claim("d2v-prepare audio /data/raw_speech /data/speech --valid-percent 0.01",
          "test_prepare_writes_the_manifests_and_report"),
    Claim("then data.path=/data/images", "test_prepare_writes_the_manifests_and_report"),
    Claim("It exits 2, writing no manifest, when nothing was accepted.",
          "test_prepare_writes_the_manifests_and_report"),
    Claim("A `--valid-percent` above 0 holds out at least one file.",
          "test_prepare_writes_the_manifests_and_report"),
    Claim("without it such files are rejected as `unsupported_encoding`",
          "tests/test_prepare.py::test_a_24_bit_wav_needs_soundfile_not_a_corrupt_verdict"),
    Claim("train.dry_run=true", "test_a_dry_run_prints_and_writes_the_plan"),
    Claim("the global batch = ranks x accumulation x micro-batch, the learning rate after scaling",
          "test_a_dry_run_prints_and_writes_the_plan"),
    Claim("A dry run ends saying that nothing was trained.",
          "test_a_dry_run_prints_and_writes_the_plan"),
    Claim("A dry run or a real run stops with an error naming the numbers when the filters leave "
          "less than one global batch, when `train.global_batch` is not divisible by "
          "`train.micro_batch` x world size, or when `train.world_size` (0 = any) differs from "
          "torchrun's.", "test_the_plan_refuses_what_cannot_run"),
    # Recipes
    Claim("| `image_base` | 2048 images (16 GPUs x 128), 375,300 updates, 5e-4 |",
          "test_the_recipe_table_is_the_configs_batch_arithmetic"),
    Claim("(tested: 1 rank x 2 accumulation = 2 ranks x 1, to 1e-5)",
          "tests/test_distributed.py::test_two_gloo_ranks_follow_one_rank_with_accumulation_two"),
    Claim("1 rank x micro-batch 16, 1 x 8 x accumulation 2 and 2 ranks x 8 give the same losses "
          "(tested, to 1e-5)", "tests/test_crop_groups.py::test_one_rank_micro_16_micro_8_x_2_and_"
          "two_ranks_x_8_follow_the_same_losses"),
    Claim("The micro-batch must divide the group (the plan says so otherwise).",
          "test_the_plan_refuses_what_cannot_run"),
    # Export and probe
    Claim(".venv/bin/d2v-export runs/tiny_image runs/tiny_image/hf",
          "test_export_and_probe_commands"),
    Claim("(max abs difference under 1e-4 in fp32; tested for each modality)",
          "tests/test_export.py::test_exported_model_matches_our_encoder"),
    Claim("it writes `<checkpoint>.probe.json` beside it", "test_export_and_probe_commands"),
    # Does pretraining learn?
    Claim("5-fold cross-validated linear probe accuracy, checkpoint vs the same encoder at random "
          "init:", "test_quality_figures_are_the_measured_ones"),
    Claim("`make test` runs a 60-update tiny_image_v2 run", "test_quality_figures_are_the_measured_ones"),
    # Continue from released weights
    Claim("It is not `train.resume=true` (continue this run), and using both is an error.",
          "test_config_errors_are_one_line_naming_the_key"),
    # Exact resume
    Claim("a resumed run logs exactly the losses of an uninterrupted one",
          "tests/test_train.py::test_resumed_run_logs_exactly_the_losses_of_an_uninterrupted_one"),
    # Embedded data
    Claim("Small real data shipped in `data/` (about 9 MB)", "test_the_embedded_data_is_as_counted"),
    Claim("1,797 handwritten digits", "test_the_embedded_data_is_as_counted"),
    Claim("17 natural photos", "test_the_embedded_data_is_as_counted"),
    Claim("400 spoken digits \"zero\"..\"nine\", 10 espeak-ng voices x 4 rate/pitch settings",
          "test_the_embedded_data_is_as_counted"),
    Claim("640 stdlib docstrings labelled by package (8 classes)",
          "test_the_embedded_data_is_as_counted"),
]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # in-process runs: the kernels' CPU reference


def _flat(text: str) -> str:
    return " ".join(text.split())


def _readme() -> str:
    return README.read_text()


def _prose() -> str:
    """The README without its HTML comments, whitespace collapsed."""
    return _flat(re.sub(r"<!--.*?-->", "", _readme(), flags=re.S))


def _test_exists(ref: str) -> bool:
    path, _, name = ref.rpartition("::") if "::" in ref else (HERE, "", ref)
    file = ROOT / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.says[:48])
def test_the_readme_still_makes_every_checked_claim(claim):
    assert _flat(claim.says) in _prose(), (
        f"README.md no longer says {claim.says!r}: the check {claim.check} lost its claim. "
        f"Reword the claim in {HERE} CLAIMS to the README's new words (the check still holds?), "
        f"or drop it with its check.")


def test_every_claim_names_a_check_that_exists():
    missing = [c.check for c in CLAIMS if not _test_exists(c.check)]
    assert not missing, f"CLAIMS name checks that do not exist: {missing}"


def test_every_backed_figure_points_at_files_and_tests_that_exist():
    refs = [r.strip() for block in re.findall(r"<!--\s*backed:(.*?)-->", _readme(), flags=re.S)
            for r in block.split(",")]
    assert refs, "the README's figures carry no <!-- backed: ... --> comments"
    for ref in refs:
        if "::" in ref:
            assert _test_exists(ref), f"<!-- backed: {ref} -->: no such test"
        else:
            assert (ROOT / ref).exists(), f"<!-- backed: {ref} -->: no such file"


# ---------------------------------------------------------------------------------------------
# Running the commands


@dataclass
class Ran:
    code: int
    out: str
    err: str
    peak_gb: float


def run(*args: str, timeout: float = 600) -> Ran:
    """`python -m ARGS` (or the console script ARGS[0], d2v-...) from the repository root, as a
    user runs it; its peak resident memory."""
    # One thread: on a shared machine, threads spin-waiting for cores held by other processes
    # multiply the time per step (benchmarks/tiny_runs.py says by how much).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        command = ([str(Path(sys.executable).with_name(args[0])), *args[1:]]
                   if args[0].startswith("d2v-") else [sys.executable, "-m", *args])
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        deadline = time.time() + timeout
        while True:  # os.wait4 gives this child's own rusage (its peak resident memory)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Ran(proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024 / 1e9)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """The README's tiny_image command, cut at step 4 by train.stop_at, then resumed to step 6."""
    run_dir = tmp_path_factory.mktemp("readme") / "try1"
    args = ["d2v-train", "configs/tiny_image.yaml", "train.max_steps=6", f"run.dir={run_dir}",
            "train.checkpoint_every=2", "train.keep_last=1", "train.keep_every=4",
            "train.log_every=1", "train.progress=false"]
    first = run(*args, "train.stop_at=4")
    second = run(*args, "train.resume=true")
    return run_dir, first, second


def test_a_tiny_run_writes_what_the_readme_lists(image_run):
    run_dir, first, second = image_run
    assert first.code == 0 and second.code == 0, first.err[-2000:] + second.err[-2000:]
    assert "loader: DALI decoding on CPU" in first.err or "loader: torch DataLoader" in first.err
    rows = _rows(run_dir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "ema_decay", "samples_per_s", "tflops_per_gpu", "mfu",
                "tokens_per_s", "grad_norm", "target_var",
                "pred_var", "skipped_steps", "data_wait_frac", "bad_files", "bad_files_first",
                "empty_steps"):
        assert all(key in r for r in steps), key
    events = [(r["event"], r.get("reason")) for r in rows if "event" in r]
    assert events == [("stopped", "stop_at"), ("resume", None)], events
    # checkpoint_every 2, keep_last 1, keep_every 4: steps 2, 4, 6 written; 4 and 6 kept.
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 6]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["checkpoints"], plan["checkpoints_kept"]) == (3, 2)
    state = load_checkpoint(run_dir / "checkpoint_00000006.pt")
    for key in ("model", "teacher", "optimizer", "scheduler", "step", "guard", "rng"):
        assert key in state, key
    assert state["step"] == 6 and {"torch", "numpy", "python"} <= state["rng"].keys()
    commands = (run_dir / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and commands[0].endswith("train.stop_at=4")
    assert commands[1].endswith("train.resume=true")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 6
    dispatch = json.loads((run_dir / "env.json").read_text())["dispatch"]
    for op in ("teacher_targets", "masking", "attention", "optimizer", "ema", "loader"):
        assert op in dispatch, (op, dispatch)


def test_make_train_runs_tiny_image_v2_and_probes():
    make = (ROOT / "Makefile").read_text()
    assert "CONFIG ?= configs/tiny_image_v2.yaml" in make
    assert re.search(r"^train:.*\n\t\$\(PY\) -m d2v_engine\.cli\.train \$\(CONFIG\) train\.probe=true",
                     make, flags=re.M), "make train no longer runs the config with its probe"
    cfg = load_config(ROOT / "configs/tiny_image_v2.yaml")
    assert (cfg.run.name, cfg.objective.mode, cfg.train.max_steps) == ("tiny_image_v2", "v2", 200)


def _make_target(make: str, target: str) -> str:
    found = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", make, flags=re.M)
    assert found, f"the Makefile has no {target} target"
    return found.group(1)


def test_make_installs_the_lock_and_test_latest_the_newest_releases():
    make = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements-lock.txt" in make
    install = _make_target(make, "$(STAMP)")
    assert "pip install -q -r $(VENV)/lock.txt" in install and "--no-deps -e ." in install
    assert "grep -vE '^(torch|triton)==' $(LOCK)" in install  # with a GPU: the system's torch
    pins = [line for line in (ROOT / "requirements-lock.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[^=\s]+", line) for line in pins), pins
    names = {line.split("==")[0].lower() for line in pins}
    assert {"torch", "transformers", "kernels", "nvidia-dali-cuda130", "pytest"} <= names
    assert "torch==2.13.0" in pins and "d2v-engine" not in names
    latest = _make_target(make, "test-latest")
    assert "rm -rf $(LATEST_VENV)" in latest and "$(LOCK)" not in latest
    assert "torch==$(LATEST_TORCH) '.[$(EXTRAS)]'" in latest  # a wheel of this project, no -e
    assert "LATEST_TORCH := 2.13.0" in make
    assert "scripts/latest.py check" in latest
    assert "scripts/latest.py freeze --out $(LOCK)" in _make_target(make, "lock")
    assert re.search(r"^lock: test-latest$", make, flags=re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'step "make test-latest" make test-latest' in ci


def test_default_run_figures_are_the_measured_ones():
    record = json.loads(DEFAULT_RUN.read_text())
    assert f"CONFIG ?= {record['config']}" in (ROOT / "Makefile").read_text()
    # The command as it ran then (the entry point's module has moved since, the command not).
    assert f"train {record['config']} train.probe=true" in record["command"], record["command"]
    runs = record["runs"]
    cfg = load_config(ROOT / record["config"])
    assert all(r["steps"] == cfg.train.max_steps for r in runs)
    name, steps = _figures(r"The main job is data2vec 2.0 on the embedded handwritten digits "
                           r"\(`configs/(\w+)\.yaml`, (\d+) updates\)")
    assert (f"configs/{name}.yaml", int(steps)) == (record["config"], cfg.train.max_steps)
    got = _figures(r"seeds 1-(\d+)\): each run took ([\d.]+)-([\d.]+) s including its probe, and "
                   r"the probe \((\d+) train / (\d+) test digits\) gained (\d\.\d\d)-(\d\.\d\d) "
                   r"over the same encoder at random init, e\.g\. seed 1: (\d\.\d+) vs (\d\.\d+)\.")
    walls, gains = [r["wall_s"] for r in runs], [r["gain"] for r in runs]
    assert [r["seed"] for r in runs] == list(range(1, len(runs) + 1))
    assert got == (str(len(runs)), f"{min(walls):.1f}", f"{max(walls):.1f}",
                   str(runs[0]["num_train"]), str(runs[0]["num_test"]),
                   f"{min(gains):.2f}", f"{max(gains):.2f}",
                   f"{runs[0]['probe']:.3f}", f"{runs[0]['random_init']:.3f}")
    # What the main job must show a newcomer: learning on every seed, in about two minutes.
    assert len(runs) >= 3 and min(gains) >= 0.1 and max(walls) < 150, (gains, walls)
    assert min(r["min_target_var"] for r in runs) > 0.4  # not a collapse


@pytest.mark.parametrize("config,args", [("configs/tiny_audio.yaml", ["train.probe=false"]),
                                         ("configs/tiny_text.yaml", ["seed=3"])])
def test_make_train_with_a_config_and_args(config, args, tmp_path):
    """What `make train CONFIG=... ARGS=...` runs, 3 steps instead of 200 (or 50); the audio
    probe (400 clips to embed) is left to tests/test_export.py."""
    r = run("d2v_engine.cli.train", config, "train.probe=true", *args, "train.max_steps=3",
            f"run.dir={tmp_path}", "train.progress=false")
    assert r.code == 0, r.err[-2000:]
    probed = "train.probe=false" not in args
    assert probed == ("linear probe" in r.out) == (tmp_path / "probe.json").is_file(), r.out
    assert [row["step"] for row in _rows(tmp_path) if "loss" in row] == [3]  # log_every 5


def test_every_event_row_the_readme_names_is_written_somewhere():
    """Each event and stop reason of the README is written by the engine (the runs that produce
    them are in tests/test_ops.py and tests/test_run_messages.py)."""
    code = "\n".join(p.read_text() for p in (ROOT / "d2v_engine").rglob("*.py"))
    for event in ("resume", "preempted", "nonfinite", "no_data", "save_failed", "stopped"):
        assert f'"event": "{event}"' in code, event
    for reason in ("nonfinite", "no_data", "collapse", "stop_at"):
        assert f'"reason": "{reason}"' in code, reason


def _figures(pattern: str) -> tuple[str, ...]:
    found = re.search(pattern, _prose())
    assert found, f"README.md no longer has figures matching {pattern!r}"
    return found.groups()


def _tiny_runs() -> dict:
    return {Path(r["config"]).stem: r for r in json.loads(TINY_RUNS.read_text())["runs"]}


def test_quick_start_figures_are_the_measured_ones(image_run):
    runs = _tiny_runs()
    image = runs["tiny_image"]
    first, first_logged, step_logged, last, step_last = _figures(
        r"takes its loss from ([\d.]+) at step 1 \(([\d.]+) at step (\d+), its first logged row\) "
        r"to ([\d.]+) at step (\d+)")
    assert (first, first_logged, last) == tuple(
        f"{image[k]:.2f}" for k in ("loss_step_1", "loss_first_logged", "loss_last"))
    assert (int(step_logged), int(step_last)) == (image["first_logged_step"], image["steps"])
    timings = _figures(r"in CPU seconds on one thread: image ([\d.]+) \(32 images\), "
                       r"audio ([\d.]+) \(16 utterances\), text ([\d.]+) \(16 x 64 tokens\)")
    assert timings == tuple(f"{runs[f'tiny_{m}']['cpu_seconds_per_update']:.2f}"
                            for m in ("image", "audio", "text"))
    low, high = map(float, _figures(r"peak resident memory ([\d.]+)-([\d.]+) GB"))
    peaks = [runs[f"tiny_{m}"]["peak_rss_gb"] for m in ("image", "audio", "text")]
    assert (low, high) == (math.floor(min(peaks) * 10) / 10, math.ceil(max(peaks) * 10) / 10)
    # The short tiny_image run here stays within the bound the README gives for other machines.
    (bound,) = map(float, _figures(r"Other machines differ in the loader's buffers: plan for up to "
                                   r"([\d.]+) GB"))
    _, short, _ = image_run
    assert 0 < short.peak_gb <= bound, f"tiny_image peaked at {short.peak_gb:.2f} GB"


def test_v2_figures_are_the_measured_ones():
    runs = _tiny_runs()
    figures = _figures(r"\(200 steps, loss at step 1 -> step 200: image ([\d.]+) -> ([\d.]+), "
                       r"audio ([\d.]+) -> ([\d.]+), text ([\d.]+) -> ([\d.]+)\)")
    want = []
    for m in ("image", "audio", "text"):
        r = runs[f"tiny_{m}_v2"]
        assert r["steps"] == 200
        want += [f"{r['loss_step_1']:.1f}", f"{r['loss_last']:.1f}"]
    assert figures == tuple(want)


def test_loader_figures_are_the_measured_ones():
    rows = json.loads(LOADER_RUNS.read_text())
    text = json.dumps(rows)
    assert "dali" in text.lower() and "torch" in text.lower()

    def values(modality, loader, key):
        found = []

        def walk(x):
            if isinstance(x, dict):
                if x.get("modality") == modality and x.get("loader") == loader and key in x:
                    found.append(float(x[key]))
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(rows)
        return found

    img_dali, img_torch = values("image", "dali", "per_s"), values("image", "torch", "per_s")
    aud_dali, aud_torch = values("audio", "dali", "per_s"), values("audio", "torch", "per_s")
    assert img_dali and img_torch and aud_dali and aud_torch, "the rows' keys changed"
    assert (round(min(img_dali)), round(max(img_dali))) == (589, 674)
    assert (round(min(img_torch)), round(max(img_torch))) == (346, 357)
    assert (round(min(aud_dali) / 1e3, 1), round(max(aud_dali) / 1e3, 1)) == (13.8, 16.8)
    assert (round(min(aud_torch) / 1e3, 1), round(max(aud_torch) / 1e3, 1)) == (9.0, 9.2)


def test_quality_figures_are_the_measured_ones():
    record = json.loads(QUALITY.read_text())
    runs = record["runs"]
    budget = _figures(r"budgets of image (\d+) / (\d+), audio (\d+) / (\d+), text (\d+) / (\d+) "
                      r"updates \(v1 / v2\)")
    assert budget == tuple(str(runs[f"tiny_{m}{v}"]["steps"]) for m in ("image", "audio", "text")
                           for v in ("", "_v2"))
    minutes, jobs, low, high = _figures(r"took ([\d.]+) min with (\d+) runs side by side, one "
                                        r"thread each \(load average ([\d.]+) -> ([\d.]+)\)")
    assert (minutes, int(jobs)) == (f"{record['total_s'] / 60:.1f}", record["jobs"])
    assert (low, high) == (f"{record['load_before'][0]:.1f}", f"{record['load_after'][0]:.1f}")
    for m in ("image", "audio", "text"):
        v1, v2 = runs[f"tiny_{m}"], runs[f"tiny_{m}_v2"]
        got = _figures(rf"{m} v1 ([\d.]+) vs ([\d.]+) \(([+-][\d.]+)\), v2 ([\d.]+) vs ([\d.]+) "
                       rf"\(([+-][\d.]+)\), raw input (\d\.\d\d)")
        want = []
        for r in (v1, v2):
            last = r["points"][-1]["probe"]
            want += [f"{last:.2f}", f"{r['random_init']:.2f}", f"{last - r['random_init']:+.2f}"]
        assert got == (*want, f"{v1['raw_input']:.2f}"), m
    trials = json.loads(QUALITY_TEXT_TRIALS.read_text())["trials"]
    gains = [t["gain"] for t in trials]
    assert _figures(r"kept the gain between ([+-][\d.]+) and ([+-][\d.]+)") == (
        f"{min(gains):+.2f}", f"{max(gains):+.2f}")
    (smallest,) = _figures(r"the smallest `target_var` logged was ([\d.]+) \(")
    assert smallest == f"{min(r['min_target_var'] for r in runs.values()):.2f}"
    short = json.loads(QUALITY_SHORT.read_text())
    steps, seeds, low, high = _figures(r"`make test` runs a (\d+)-update tiny_image_v2 run .*? "
                                       r"seeds 1-(\d+) gained (\d\.\d\d)-(\d\.\d\d)\)")
    assert (int(steps), int(seeds)) == (short["steps"], len(short["runs"]))
    assert (low, high) == tuple(f"{g:.2f}" for g in short["gain"])


def test_text_control_figures_are_the_measured_ones():
    from benchmarks.text_controls import TOP_TOKENS

    record = json.loads(QUALITY_TEXT_CONTROLS.read_text())
    quality = json.loads(QUALITY.read_text())["runs"]
    v1, v2 = record["configs"]["tiny_text"], record["configs"]["tiny_text_v2"]
    assert record["steps"] == {c: quality[c]["steps"] for c in ("tiny_text", "tiny_text_v2")}

    def spread(entry):
        values = entry["layers"].values()
        return f"{min(values):.2f}", f"{max(values):.2f}"

    got = _figures(r"probes better than at init \((\d\.\d\d)-(\d\.\d\d) from the embeddings to the\s+"
                   r"final output, against (\d\.\d\d)-(\d\.\d\d)\), nor of v2 \((\d\.\d\d)-(\d\.\d\d)\)")
    assert got == (*spread(v1["checkpoint"]), *spread(v1["random_init"]), *spread(v2["checkpoint"]))
    got = _figures(r"which of the\s+(\d+) most frequent tokens stood at a `<mask>` \((\d\.\d\d); at init "
                   r"(\d\.\d\d); the most frequent token alone\s+(\d\.\d\d)\)")
    trained, init = v1["checkpoint"]["masked_token"], v1["random_init"]["masked_token"]
    assert got == (str(TOP_TOKENS), f"{trained['accuracy']:.2f}", f"{init['accuracy']:.2f}",
                   f"{trained['majority']:.2f}")
    got = _figures(r"(\d+)% of the v1 teacher targets' variance is the mean target of their position "
                   r"\((\d+)% at\s+init\).*?v2's instance-normed targets: (\d+)%\)")
    assert got == tuple(f"{100 * e['target_position_share']:.0f}" for e in (
        v1["checkpoint"], v1["random_init"], v2["checkpoint"]))
    short, long = record["mlm_control"]["runs"]
    got = _figures(r"its loss falls to ([\d.]+) nats\s+after (\d+) updates, under the unigram entropy "
                   r"of ([\d.]+)\), yet its document probe stays level too\s+\(([+-][\d.]+) after "
                   r"(\d+) updates, ([+-][\d.]+) after (\d+)\)")
    assert got == (f"{long['points'][-1]['loss']:.2f}", str(long["steps"]),
                   f"{long['unigram_entropy']:.2f}", f"{short['gain']:+.2f}", str(short["steps"]),
                   f"{long['gain']:+.2f}", str(long["steps"]))


def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys):
    cases = [
        (["model.depthh=2"], "unknown config key 'model.depthh'; choices at this level:"),
        (["train.max_steps=many"], "config key 'train.max_steps': got 'many', expected int"),
        (["data.loader=fast"], "config key 'data.loader': got 'fast', expected one of 'auto'"),
        (["train.resume=true", f"model.init_from={tmp_path}"], "config key 'model.init_from'"),
    ]
    for overrides, message in cases:
        assert train_main(["configs/tiny_image.yaml", f"run.dir={tmp_path / 'r'}",
                           *overrides]) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_the_plan_refuses_what_cannot_run(tmp_path, capsys):
    dry = ["train.dry_run=true", f"run.dir={tmp_path / 'r'}"]
    cases = [
        ("configs/tiny_image.yaml", ["train.global_batch=10", "train.micro_batch=4"],
         "10 is not divisible by train.micro_batch (4) x world size (1)"),
        ("configs/tiny_image.yaml", ["train.world_size=8"],
         "config key 'train.world_size': 8, but this run has 1 rank(s)"),
        ("configs/tiny_audio.yaml", ["data.min_sample_size=99999"],
         "config key 'data.min_sample_size': 99999 samples (6.25 s) leaves 0 of the"),
        ("configs/tiny_image.yaml", ["train.global_batch=4096", "train.micro_batch=32"],
         "config key 'train.global_batch': 4096 is more than the 1797 samples left"),
        ("configs/audio_base.yaml", ["data.path=data/audio/train.tsv", "data.min_sample_size=0",
                                     "train.global_batch=32", "train.micro_batch=32"],
         "train.micro_batch=32 must divide 16"),
    ]
    for config, overrides, message in cases:
        assert train_main([config, *dry, *overrides]) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    audio = run("d2v-prepare", "audio", "data/audio/wav", str(out / "speech"),
                "--valid-percent", "0.01", "--min-seconds", "0.5", "--quiet")
    image = run("d2v-prepare", "image", "data/images/digits", str(out / "images"), "--quiet")
    return out, audio, image


def test_prepare_writes_the_manifests_and_report(prepared, tmp_path):
    out, audio, image = prepared
    assert audio.code == 0 and image.code == 0, audio.err + image.err
    report = json.loads((out / "speech" / "report.json").read_text())
    for key in ("accepted", "rejected", "rejected_files", "total_seconds", "lengths"):
        assert key in report, key
    assert set(report["lengths"]) == {"min", "p50", "p95", "max"}
    train_rows = (out / "speech" / "train.tsv").read_text().splitlines()[1:]
    valid_rows = (out / "speech" / "valid.tsv").read_text().splitlines()[1:]
    held_out = max(1, round(report["accepted"] * 0.01))
    assert len(valid_rows) == held_out and len(train_rows) + held_out == report["accepted"]
    assert (out / "images" / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    from d2v_engine.config import DataConfig
    from d2v_engine.data import build_dataset

    assert len(build_dataset(DataConfig(path=str(out / "images")), "image")) == 1797
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"RIFF junk")
    nothing = run("d2v_engine.cli.prepare", "audio", str(bad), str(tmp_path / "o"), "--quiet")
    assert nothing.code == 2 and "no file accepted" in nothing.err
    assert not (tmp_path / "o" / "train.tsv").exists()


def test_a_dry_run_prints_and_writes_the_plan(prepared):
    out, _, _ = prepared
    r = run("d2v_engine.cli.train", "configs/audio_base.yaml", f"data.path={out / 'speech'}",
            "train.dry_run=true", f"run.dir={out / 'plan'}", "data.min_sample_size=0",
            "train.global_batch=32", "train.max_steps=1000")
    assert r.code == 0, r.err[-2000:]
    assert "global batch 32 = 1 rank(s) x 2 accumulation step(s) x 16 micro-batch" in r.out
    assert "learning rate 6.25e-05 = optim.lr 0.0005 at batch 256, linear scaling" in r.out
    assert "lr tri_stage: warmup 30, hold 900, decay 70 steps; EMA decay 0.999 -> 0.9999 by " \
           "step 75" in r.out, r.out
    assert "audio crop groups of 16 clips" in r.out
    assert "nothing was trained" in r.err and not (out / "plan" / "metrics.jsonl").exists()
    plan = json.loads((out / "plan" / "plan.json").read_text())
    assert (plan["world_size"], plan["accumulation"], plan["micro_batch"]) == (1, 2, 16)
    samples = len((out / "speech" / "train.tsv").read_text().splitlines()) - 1
    assert plan["schedule"]["ema_anneal_end_step"] == 75 and plan["data"]["samples"] == samples


def test_export_and_probe_commands(image_run, tmp_path):
    run_dir, _, _ = image_run
    exported = run("d2v-export", str(run_dir), str(tmp_path / "hf"))
    assert exported.code == 0, exported.err[-2000:]
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    probe = run("d2v-probe", str(run_dir), "--max-samples", "100")
    assert probe.code == 0, probe.err[-2000:]
    saved = json.loads((run_dir / "probe.json").read_text())
    assert saved["checkpoint"].endswith("checkpoint_00000006.pt")
    from d2v_engine.handoff.probe import run_probe

    run_probe(run_dir / "checkpoint_00000004.pt", max_samples=100)
    assert json.loads((run_dir / "probe.json").read_text()) == saved, "probe.json overwritten"
    beside = json.loads((run_dir / "checkpoint_00000004.probe.json").read_text())
    assert beside["checkpoint"].endswith("checkpoint_00000004.pt")


def test_a_bad_file_stops_a_run_naming_it(tmp_path, capsys):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for src in sorted((ROOT / "data/images/digits/1").glob("*.jpg"))[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code = train_main(["configs/tiny_image.yaml", f"data.path={tmp_path / 'images'}",
                       f"run.dir={tmp_path / 'run'}", "train.global_batch=4", "train.max_steps=1",
                       "train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "broken.jpg" in err and "data.on_bad_file=skip" in err, err


def test_the_recipe_table_is_the_configs_batch_arithmetic():
    table = {}
    for line in _readme().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("image_base", "audio_base", "text_base"):
            table[cells[0]] = cells
    assert set(table) == {"image_base", "audio_base", "text_base"}
    for name, (_, paper, one, eight, sixty_four) in table.items():
        cfg = load_config(ROOT / f"configs/{name}.yaml")
        t = cfg.train
        batch = re.match(r"([\d,]+)", paper).group(1).replace(",", "")
        assert int(batch) == t.global_batch, (name, paper)
        steps = re.search(r"([\d,.]+)(k|M)? updates", paper)
        scale = {"k": 1e3, "M": 1e6, None: 1}[steps.group(2)]
        assert float(steps.group(1).replace(",", "")) * scale == t.max_steps, (name, paper)
        assert float(paper.rsplit(", ", 1)[1]) == cfg.optim.lr, (name, paper)
        for world, cell in ((1, one), (8, eight), (64, sixty_four)):
            micro, accum = map(int, re.findall(r"micro(?:_batch=)?\s*(\d+).*accumulation (\d+)",
                                               cell)[0])
            assert BatchPlan.make(t.global_batch, micro, world).accumulation == accum, (name, cell)
            if "train.micro_batch=" not in cell:  # else the cell names the override
                assert micro == t.micro_batch, (name, cell)
    assert load_config(ROOT / "configs/audio_base.yaml").data.crop_group == 16


def test_guard_defaults_are_the_readmes():
    assert load_config(None).objective.collapse_check_after == 5000


def test_launch_scripts_do_what_the_readme_says():
    slurm = (ROOT / "scripts/train.slurm").read_text()
    assert "#SBATCH --signal=TERM@120" in slurm
    raised = re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=\$\{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)\}",
                       slurm)
    assert raised and int(raised.group(1)) > 30


def test_the_embedded_data_is_as_counted():
    data = ROOT / "data"
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert round(size / 1e6) == 9, size
    digits = list((data / "images/digits").rglob("*.jpg"))
    assert len(digits) == 1797 and len({p.parent.name for p in digits}) == 10
    assert len([p for p in (data / "images/photos").iterdir() if p.is_file()]) == 17
    wavs = sorted((data / "audio/wav").glob("*.wav"))
    names = [p.stem.rsplit("_", 3) for p in wavs]  # voice[_variant], rate, pitch, digit
    voices, settings = {n[0] for n in names}, {(n[1], n[2]) for n in names}
    assert len(wavs) == 400 and len(voices) == 10 and len(settings) == 4, (voices, settings)
    labels = (data / "text/probe.label").read_text().split()
    assert len(labels) == 640 and len(set(labels)) == 8
    assert json.loads((data / "text/tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_the_plan_example_prints_what_the_readme_shows(tmp_path):
    """The README's image_base dry run (FLOPs, memory at the auto micro-batch) prints its lines."""
    block = re.search(r"```sh\nd2v-train configs/image_base.yaml train.dry_run=true "
                      r"\\\n\s+(.*?)\n(#.*?)```", README.read_text(), re.S)
    assert block, "README.md no longer shows the image_base dry run"
    args = block.group(1).split()
    shown = [line.lstrip("#").strip() for line in block.group(2).splitlines()]
    ran = run("d2v-train", "configs/image_base.yaml", "train.dry_run=true", *args,
              f"run.dir={tmp_path / 'plan'}")
    assert ran.code == 0, ran.err[-2000:]
    printed = " ".join((ran.out + ran.err).split())
    flops, memory, memory_rest, auto = shown
    assert flops in printed
    assert f"{memory} {memory_rest}" in printed
    head, tail = auto.split(" ...: ")
    assert head.split(" [")[0] in printed and tail in printed


def test_every_results_file_the_readme_names_exists():
    named = set(re.findall(r"benchmarks/results/([\w.-]+\.(?:json|md|png))", README.read_text()))
    assert named, "README.md names no results file"
    missing = sorted(n for n in named if not (ROOT / "benchmarks/results" / n).is_file())
    assert not missing, f"README.md names results files that do not exist: {missing}"


def test_the_attention_estimates_table_is_the_sass_counts():
    rows = json.loads((ROOT / "benchmarks/results/2026-11-27-attention-sm90-sass.json"
                       ).read_text())["rows"]
    table = (ROOT / "benchmarks/results/2026-11-27-attention-sm90.md").read_text()
    for r in rows:
        assert (f"| {r['kernel']} | {r['tile']} | {r['loop']} | {r['loop_with_dropout']} | "
                f"{r['ratio']:.2f} |") in table, r
