"""Operating a run for days, on CPU: preemption, elastic restart, guards, checkpoint retention and
failed saves, and what the run directory holds. Tiny text config (the fastest), few steps."""
import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from d2v_engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from d2v_engine.config import load_config
from d2v_engine.errors import CheckpointError, D2VError, TrainingError
from d2v_engine.run.preemption import restart_checkpoint
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
FAST = ["train.progress=false", "train.log_every=1", "train.global_batch=4",
        "train.checkpoint_every=0", "run.tensorboard=false"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels are tested on their own; see test_train


def _cfg(run_dir, *overrides):
    return load_config(ROOT / "configs/tiny_text.yaml", [f"run.dir={run_dir}", *FAST, *overrides])


def _rows(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")]


def _step_rows(run_dir):
    return [r for r in _rows(run_dir) if "event" not in r]


def _events(run_dir, name):
    return [r for r in _rows(run_dir) if r.get("event") == name]


def _env(threads=None):
    # Bit-exact comparisons with in-process runs need the same intra-op thread count.
    threads = threads or str(torch.get_num_threads())
    return {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": threads}


def _assert_same_state(a: dict, b: dict, where: str):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs"


# --- preemption ---------------------------------------------------------------------------------

def test_sigterm_checkpoints_exits_zero_and_resume_continues_exactly(tmp_path):
    common = ["train.max_steps=200"]  # the schedules' length; the runs stop far earlier
    run = tmp_path / "preempted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "d2v_engine.cli.train", "configs/tiny_text.yaml", f"run.dir={run}", *FAST,
         *common], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_step_rows(run)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    (k, _), = list_checkpoints(run)
    assert 2 <= k < 200, k
    assert [e["step"] for e in _events(run, "preempted")] == [k], _rows(run)
    assert _events(run, "preempted")[0]["signal"] == "SIGTERM"
    assert f"checkpoint at step {k} written" in err

    before = [r["loss"] for r in _step_rows(run)]
    after = train(_cfg(run, *common, "train.resume=true", f"train.stop_at={k + 3}"))["losses"]
    reference = train(_cfg(tmp_path / "straight", *common, f"train.stop_at={k + 3}"))["losses"]
    assert before == reference[:k], (before, reference)
    assert after == reference[k:], f"resumed {after} vs uninterrupted {reference[k:]}"


def test_signals_during_a_save_leave_it_whole_and_stop_after_the_next_step(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_while_signalled(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 1:  # SLURM's TERM, then an impatient second one, in the middle of a save
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_save(obj, f, *args, **kwargs)

    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(torch, "save", save_while_signalled)
    out = train(_cfg(tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    assert out["preempted"] and out["step"] == 3 and calls == [2, 3], (out, calls)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    for _, path in list_checkpoints(tmp_path):
        assert load_checkpoint(path)["step"] == int(path.stem.split("_")[1])
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert signal.getsignal(signal.SIGTERM) is handler_before


# --- elastic restart ----------------------------------------------------------------------------

def test_killed_rank_under_torchrun_max_restarts_resumes_and_finishes(tmp_path):
    run = tmp_path / "elastic"
    common = ["train.max_steps=6", "train.micro_batch=2", "train.checkpoint_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "d2v_engine.cli.train",
           "configs/tiny_text.yaml", f"run.dir={run}", *FAST, *common]
    env = {**_env(threads="1"), "D2V_TEST_KILL_AT_STEP": "1:3"}  # rank 1 SIGKILLs itself before step 4
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [s for s, _ in list_checkpoints(run)][-1] == 6
    resumes = _events(run, "resume")
    assert [(e["step"], e["restart"]) for e in resumes] == [(2, 1)], _rows(run)
    rows = _rows(run)
    after = [r["loss"] for r in rows[rows.index(resumes[0]) + 1:] if "event" not in r]
    one_rank = train(_cfg(tmp_path / "one", *common))["losses"]  # 1 rank x 2 accumulation
    assert after == pytest.approx(one_rank[2:], rel=1e-5), (after, one_rank)


def test_restart_resumes_only_checkpoints_of_the_same_launch(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 4, {"step": 4, "launch_id": "job-a"})
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert restart_checkpoint(tmp_path) is None  # first attempt: the config decides
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restart_checkpoint(tmp_path).name == "checkpoint_00000004.pt"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # someone else's run directory
    assert restart_checkpoint(tmp_path) is None
    assert restart_checkpoint(tmp_path / "empty") is None


# --- guards -------------------------------------------------------------------------------------

def test_nonfinite_update_is_skipped_and_nothing_applied(tmp_path):
    common = ["train.max_steps=6"]
    out = train(_cfg(tmp_path / "nan", *common, "train.debug_nan_steps=[3]", "train.stop_at=3"))
    train(_cfg(tmp_path / "clean", *common, "train.stop_at=2"))
    skipped = load_checkpoint(tmp_path / "nan/checkpoint_00000003.pt")
    clean = load_checkpoint(tmp_path / "clean/checkpoint_00000002.pt")
    for key in ("model", "teacher", "optimizer"):
        _assert_same_state(skipped[key], clean[key], key)
    assert skipped["scheduler"]["last_epoch"] == 3  # the step counts: data and schedules move on
    events = _events(tmp_path / "nan", "nonfinite")
    assert [(e["step"], e["skipped_steps"]) for e in events] == [(3, 1)], events
    assert _step_rows(tmp_path / "nan")[-1]["skipped_steps"] == 1
    assert out["losses"][2] != out["losses"][2]  # the skipped step's loss is logged as NaN


def test_nonfinite_updates_in_a_row_stop_after_max_bad_steps(tmp_path):
    with pytest.raises(TrainingError, match=r"3 updates in a row \(steps 2-4; limit "
                                            r"train.max_bad_steps=3") as e:
        train(_cfg(tmp_path, "train.max_steps=8", "train.debug_nan_steps=[2,3,4,5]",
                   "train.max_bad_steps=3", "train.checkpoint_every=1"))
    assert isinstance(e.value, D2VError)  # the CLI prints it as one line and exits 2
    assert [r["step"] for r in _events(tmp_path, "nonfinite")] == [2, 3, 4]
    assert _events(tmp_path, "stopped")[0]["reason"] == "nonfinite"
    # checkpoints of skipped steps hold the weights of step 1: nothing was applied since
    kept = [load_checkpoint(p)["model"] for _, p in list_checkpoints(tmp_path)]
    assert len(kept) == 2
    _assert_same_state(kept[0], kept[1], "model")


def test_forced_collapse_stops_with_a_message_naming_the_values(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "d2v_engine.cli.train", "configs/tiny_text.yaml", f"run.dir={tmp_path}",
         *FAST, "train.max_steps=5", "objective.min_target_var=100", "objective.min_pred_var=0",
         "objective.collapse_check_after=1"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: representation collapse at step 3: target_var "), last
    assert "< objective.min_target_var 100" in last and "Traceback" not in r.stderr
    rows = _step_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3]
    stopped, = _events(tmp_path, "stopped")
    assert stopped["reason"] == "collapse" and stopped["target_var"] == rows[-1]["target_var"]
    assert f"{rows[-1]['target_var']:.4g}" in last


# --- checkpoints: retention, failed saves -------------------------------------------------------

def test_retention_keeps_the_last_n_and_every_mth_and_clears_stale_temps(tmp_path):
    (tmp_path / ".checkpoint_00000003.pt.tmp-99999").write_bytes(b"left by a killed writer")
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2, keep_every=4)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("checkpoint_")) == []


def _failing_save(monkeypatch, fail_calls):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) in fail_calls:
            f.write(b"\x80 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_failed_periodic_save_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path,
                                                                                 monkeypatch):
    calls = _failing_save(monkeypatch, fail_calls={2})
    out = train(_cfg(tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    assert out["step"] == 6 and calls == [2, 4, 6]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 6]
    failed, = _events(tmp_path, "save_failed")
    assert failed["step"] == 4 and "No space left on device" in failed["error"]
    assert failed["newest"] == "checkpoint_00000002.pt"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert load_checkpoint(tmp_path / "checkpoint_00000002.pt")["step"] == 2


@pytest.mark.parametrize("overrides, fail_calls, kept, match", [
    (["train.max_steps=4", "train.checkpoint_every=2"], {2}, 2, "final / preemption checkpoint"),
    (["train.max_steps=6", "train.checkpoint_every=1", "train.max_failed_saves=2"], {2, 3}, 1,
     "2 failed saves in a row"),
])
def test_failed_save_that_must_succeed_stops_and_keeps_the_previous(tmp_path, monkeypatch,
                                                                    overrides, fail_calls, kept,
                                                                    match):
    _failing_save(monkeypatch, fail_calls)
    with pytest.raises(CheckpointError, match=match):
        train(_cfg(tmp_path, *overrides))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [kept]
    assert load_checkpoint(list_checkpoints(tmp_path)[0][1])["step"] == kept
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --- the run directory --------------------------------------------------------------------------

def test_run_directory_holds_config_command_env_report_metrics_and_dashboards(tmp_path, capfd,
                                                                             monkeypatch):
    has_tb = importlib.util.find_spec("tensorboard") is not None
    has_wandb = importlib.util.find_spec("wandb") is not None
    monkeypatch.setenv("WANDB_MODE", "disabled")  # never reach a server from a test
    train(_cfg(tmp_path, "train.max_steps=3", "run.tensorboard=true", "run.wandb=true"))
    err = capfd.readouterr().err
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "command.txt").is_file()
    env = json.loads((tmp_path / "env.json").read_text())
    for key in ("torch", "triton", "dali", "cuda", "gpu", "device"):
        assert key in env, key
    dispatch = env["dispatch"]
    assert dispatch["teacher_targets"] == dispatch["masking"] == "torch reference", dispatch
    assert "AdamW (foreach)" in dispatch["optimizer"] and "DataLoader" in dispatch["loader"]
    assert [r["step"] for r in _step_rows(tmp_path)] == [1, 2, 3]
    if has_tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        losses = [e.value for e in acc.Scalars("train/loss")]
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
        assert losses == pytest.approx([r["loss"] for r in _step_rows(tmp_path)], rel=1e-6)
        for tag in ("lr", "ema_decay", "target_var", "pred_var", "samples_per_s", "grad_norm"):
            assert f"train/{tag}" in acc.Tags()["scalars"], tag
    else:
        assert not (tmp_path / "tensorboard").exists() and "tensorboard not installed" in err
    if not has_wandb:
        assert "wandb is not installed" in err


def test_tensorboard_that_imports_but_is_broken_warns_and_logging_goes_on(tmp_path, capfd,
                                                                          monkeypatch):
    import importlib.machinery
    import types

    from d2v_engine.run.metrics import MetricsLog

    # A tensorboard that imports (version and all) but whose parts are missing, as when one of
    # its dependencies is absent: torch.utils.tensorboard fails while importing its writer.
    broken = types.ModuleType("tensorboard")
    broken.__version__ = "2.21.0"
    broken.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    for name in [n for n in sys.modules if n == "tensorboard" or n.startswith(
            ("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", broken)
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 2.5})
    log.close()
    err = capfd.readouterr().err
    assert "tensorboard installed but unusable" in err and "metrics.jsonl only" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert _rows(tmp_path) == [{"step": 1, "loss": 2.5}]


def test_steps_without_any_readable_sample_skip_the_update_and_stop_after_the_limit(tmp_path):
    from d2v_engine.run.guards import UpdateGuard
    from d2v_engine.run.metrics import MetricsLog
    cfg = load_config(ROOT / "configs/tiny_image.yaml",
                      [f"run.dir={tmp_path}", "train.max_bad_steps=3"])
    log = MetricsLog(tmp_path)
    guard = UpdateGuard(cfg, log)
    assert guard.update_ok(1, 0.0, 0.0, masked=0.0) is False  # nothing read: no update
    assert guard.update_ok(2, 1.5, 2.0, masked=40.0) is True  # data again: the streak ends
    assert guard.update_ok(3, 0.0, 0.0, masked=0.0) is False
    assert guard.update_ok(4, 0.0, 0.0, masked=0.0) is False
    with pytest.raises(TrainingError, match="unreadable file"):
        guard.update_ok(5, 0.0, 0.0, masked=0.0)
    log.close()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "no_data"] == [1, 3, 4, 5]
    assert rows[-1] == {"event": "stopped", "step": 5, "reason": "no_data"}
    assert guard.empty_steps == 4 and guard.skipped_steps == 0
