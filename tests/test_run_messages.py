"""What a run says and counts: dry runs, stop_at, finished runs, guard stops, bad-file counts,
failed starts, command.txt, the start lines (precision, init_from, buckets), optional loggers
that break, and the help of the command-line tools."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from d2v_engine.planning.buckets import buckets_for, describe_buckets
from d2v_engine.checkpoint import list_checkpoints, save_checkpoint
from d2v_engine.config import load_config
from d2v_engine.errors import ConfigError, TrainingError
from d2v_engine.run.metrics import MetricsLog
from d2v_engine.planning.plan import checkpoints_kept
from d2v_engine.cli.train import main
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
FAST = ["train.progress=false", "train.log_every=1", "run.tensorboard=false",
        "model.depth=1", "objective.top_k=1", "train.global_batch=2"]  # tiny_text, one block


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels have their own tests


def _text(run_dir, *overrides):
    return ["configs/tiny_text.yaml", f"run.dir={run_dir}", *FAST, *overrides]


def _rows(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_dry_run_says_that_nothing_was_trained(tmp_path, capsys):
    assert main(_text(tmp_path, "train.dry_run=true")) == 0
    err = capsys.readouterr().err
    assert "dry run (train.dry_run=true): nothing was trained" in err, err
    assert str(tmp_path / "plan.json") in err and not (tmp_path / "metrics.jsonl").exists()


def test_stop_at_resume_and_a_finished_run_say_what_they_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["d2v_engine.cli.train", "first"])
    assert main(_text(tmp_path, "train.max_steps=3", "train.stop_at=2")) == 0
    assert "stopped at step 2 (train.stop_at)" in capsys.readouterr().err
    assert _rows(tmp_path)[-1] == {"event": "stopped", "step": 2, "reason": "stop_at"}
    monkeypatch.setattr(sys, "argv", ["d2v_engine.cli.train", "second"])
    assert main(_text(tmp_path, "train.max_steps=3", "train.resume=true")) == 0
    monkeypatch.setattr(sys, "argv", ["d2v_engine.cli.train", "third"])
    assert main(_text(tmp_path, "train.max_steps=3", "train.resume=true")) == 0
    err = capsys.readouterr().err
    assert "the run is finished (step 3 of train.max_steps=3): nothing to train" in err, err
    commands = (tmp_path / "command.txt").read_text().splitlines()
    assert [c.split()[-1] for c in commands] == ["first", "second", "third"], \
        "command.txt keeps the original command and each resume's"


def test_the_start_lines_name_the_precision_and_the_initial_weights(tmp_path, capsys):
    assert main(_text(tmp_path / "a", "train.max_steps=1")) == 0
    assert "fp32 (train.precision=auto)" in capsys.readouterr().err
    assert main(_text(tmp_path / "b", "train.max_steps=1", f"model.init_from={tmp_path / 'a'}")) == 0
    err = capsys.readouterr().err
    assert f"encoders start from {tmp_path / 'a'} (model.init_from)" in err, err


def test_fewer_length_buckets_than_asked_are_explained():
    cfg = load_config(ROOT / "configs/tiny_text.yaml", ["train.compile=true"])
    text = describe_buckets(cfg, buckets_for(cfg))
    assert text.startswith("7 length buckets 16..64") and \
        "train.length_buckets=16 geometric sizes rounded down to multiples of 8" in text, text


def test_a_nonfinite_stop_before_any_checkpoint_says_to_start_again(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_text.yaml",
                      [f"run.dir={tmp_path}", *FAST, "train.max_steps=5",
                       "train.debug_nan_steps=[1, 2]", "train.max_bad_steps=2"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError) as err:
            train(cfg)
    assert "no checkpoint was written yet" in str(err.value) and " none" not in str(err.value)
    leaked = [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert not leaked, "a skipped first update leaks torch's scheduler-order warning"


def _image_folder(tmp_path, good, bad):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for src in sorted((ROOT / "data/images/digits/3").glob("*.jpg"))[:good]:
        (folder / src.name).write_bytes(src.read_bytes())
    for i in range(bad):
        (folder / f"zz_corrupt{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg after all")
    return tmp_path / "images"


def _image(run_dir, data, *overrides):
    return load_config(ROOT / "configs/tiny_image.yaml",
                       [f"run.dir={run_dir}", f"data.path={data}", "data.on_bad_file=skip",
                        "train.global_batch=2", "train.checkpoint_every=0", "model.depth=1",
                        "objective.top_k=1", *FAST[:3], *overrides])


def test_a_bad_file_counts_once_across_epochs_and_a_resume(tmp_path):
    data = _image_folder(tmp_path, good=3, bad=1)  # 2 steps per epoch: the file is read 5 times
    train(_image(tmp_path / "run", data, "train.max_steps=10", "train.stop_at=5"))
    train(_image(tmp_path / "run", data, "train.max_steps=10", "train.resume=true"))
    last = [r for r in _rows(tmp_path / "run") if "loss" in r][-1]
    assert last["step"] == 10 and last["bad_files"] == 1, last
    assert [Path(p).name for p in last["bad_files_first"]] == ["zz_corrupt0.jpg"]


def test_a_no_data_stop_names_the_bad_files(tmp_path):
    data = _image_folder(tmp_path, good=0, bad=4)
    with pytest.raises(TrainingError) as err:
        train(_image(tmp_path / "run", data, "train.max_steps=5", "train.max_bad_steps=2"))
    assert "first bad files: " in str(err.value) and "zz_corrupt" in str(err.value), err.value
    rows = [r for r in _rows(tmp_path / "run") if r.get("event") in ("no_data", "stopped")]
    assert rows and all(r["bad_files_first"] for r in rows), rows


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    assert main(_text(tmp_path / "new", "model.vocab_size=100")) == 2
    assert "model.vocab_size" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_broken_tensorboard_install_is_reported_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                      capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorboard" else real(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # imports, then fails
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    err = capsys.readouterr().err
    assert "tensorboard installed but unusable (ModuleNotFoundError" in err, err
    assert _rows(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_post_ln_image_with_layer_scale_is_a_config_error():
    """Post-LN image blocks are data2vec 2.0's (legitimate); layer scale exists only in BEiT's
    pre-LN blocks, so the v1 tiny config flipped to post-LN names the key to change."""
    from d2v_engine.models import build_model

    cfg = load_config(ROOT / "configs/tiny_image.yaml", ["model.layer_norm_first=false"])
    with pytest.raises(ConfigError, match=r"model.layer_scale_init.*post-LN image blocks"):
        build_model(cfg.model, "image")
    cfg = load_config(ROOT / "configs/tiny_image.yaml",
                      ["model.layer_norm_first=false", "model.layer_scale_init=0"])
    assert not build_model(cfg.model, "image").pre_ln  # drop path stays: AltBlock has it


@pytest.mark.parametrize("steps,every,last,keep_every", [(10, 1, 2, 4), (20, 5, 2, 5),
                                                         (7, 2, 3, 0), (9, 0, 2, 3)])
def test_the_plans_kept_count_is_what_retention_keeps(tmp_path, steps, every, last, keep_every):
    written = list(range(every, steps, every)) if every else []
    for step in written + [steps]:
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=last, keep_every=keep_every)
    assert checkpoints_kept(steps, every, last, keep_every) == len(list_checkpoints(tmp_path))


@pytest.mark.parametrize("module", ["d2v_engine.cli.export", "benchmarks.bench_masking"])
def test_help_explains_and_exits_0(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stdout.splitlines()) > 3, r.stdout
