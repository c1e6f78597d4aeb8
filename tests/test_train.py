"""End to end on CPU: the tiny configs train, resume exactly, and bad input is one clear line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from d2v_engine.checkpoint import load_checkpoint
from d2v_engine.config import load_config
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ["image", "audio", "text"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # The interpreter costs seconds per step; the kernels are checked against their references in
    # their own tests, and test_triton_path_trains_like_the_reference covers them in the loop.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _cfg(modality, run_dir, *overrides):
    return load_config(ROOT / f"configs/tiny_{modality}.yaml",
                       [f"run.dir={run_dir}", "train.progress=false", "train.log_every=1", *overrides])


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "d2v_engine.cli.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.latest
@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_config_trains_with_finite_falling_loss(modality, tmp_path):
    out = train(_cfg(modality, tmp_path, "train.max_steps=30", "train.checkpoint_every=0"))
    losses = out["losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"loss did not fall: first5 {first:.4f} last5 {last:.4f} ({losses})"
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "lr", "ema_decay", "samples_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert (tmp_path / "checkpoint_00000030.pt").is_file()
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize("modality", MODALITIES)
def test_resumed_run_logs_exactly_the_losses_of_an_uninterrupted_one(modality, tmp_path):
    common = ["train.max_steps=6", "train.checkpoint_every=0", "train.global_batch=8"]
    full = train(_cfg(modality, tmp_path / "full", *common))["losses"]
    first = train(_cfg(modality, tmp_path / "cut", *common, "train.stop_at=3"))["losses"]
    assert len(first) == 3 and first == full[:3]
    second = train(_cfg(modality, tmp_path / "cut", *common, "train.resume=true"))["losses"]
    assert second == full[3:], f"resumed {second} vs uninterrupted {full[3:]}"
    rows = _rows(tmp_path / "cut")
    assert {"event": "resume", "step": 3} in [{k: r[k] for k in ("event", "step")} for r in rows if "event" in r]
    assert [r["step"] for r in rows if "event" not in r] == [1, 2, 3, 4, 5, 6]


def test_resume_without_checkpoint_is_one_line_error(tmp_path):
    r = _cli("configs/tiny_image.yaml", f"run.dir={tmp_path}", "train.resume=true")
    assert r.returncode == 2
    assert "no complete checkpoint" in r.stderr and str(tmp_path) in r.stderr
    assert "Traceback" not in r.stderr


def test_fresh_run_refuses_to_overwrite_a_run_with_checkpoints(tmp_path):
    train(_cfg("image", tmp_path, "train.max_steps=1"))
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _cli("configs/tiny_image.yaml", f"run.dir={tmp_path}")
    assert r.returncode == 2 and "train.resume=true" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("args, expect", [
    (["configs/tiny_image.yaml", "model.dept=3"], "model.dept"),
    (["configs/tiny_image.yaml", "train.precision=fp8"], "train.precision"),
    (["configs/does_not_exist.yaml"], "does_not_exist.yaml"),
    (["configs/tiny_image.yaml", "data.path=/nonexistent/images"], "/nonexistent/images"),
    (["configs/tiny_audio.yaml", "data.path=/nonexistent/train.tsv"], "/nonexistent/train.tsv"),
    (["configs/tiny_text.yaml", "data.path=/nonexistent/text"], "/nonexistent/text"),
])
def test_bad_input_is_one_line_naming_the_culprit(args, expect, tmp_path):
    r = _cli(*args, f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and expect in lines[0] and lines[0].startswith("error:"), r.stderr


def test_bad_yaml_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modality: image\nmodel: [unclosed\n")
    r = _cli(str(bad), f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_triton_path_trains_like_the_reference(monkeypatch, tmp_path):
    common = ["train.max_steps=2", "train.global_batch=4", "train.checkpoint_every=0"]
    reference = train(_cfg("audio", tmp_path / "ref", *common))["losses"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Masking and targets take the interpreted Triton kernels; attention stays on SDPA because
    # interpreted it costs minutes per step here (tests/test_attention*.py check that kernel).
    monkeypatch.setenv("D2V_ATTENTION", "sdpa")
    interpreted = train(_cfg("audio", tmp_path / "triton", *common))["losses"]
    assert interpreted == pytest.approx(reference, rel=1e-4), (interpreted, reference)


def _folder_with_a_corrupt_image(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for src in sorted((ROOT / "data/images/digits/3").glob("*.jpg"))[:40]:
        (folder / src.name).write_bytes(src.read_bytes())
    bad = folder / "corrupt.jpg"
    bad.write_bytes(b"not a jpeg at all")
    return tmp_path / "images", bad


def test_corrupt_image_fails_with_its_path_even_from_loader_workers(tmp_path):
    data, bad = _folder_with_a_corrupt_image(tmp_path)
    r = _cli("configs/tiny_image.yaml", f"data.path={data}", f"run.dir={tmp_path / 'run'}",
             "train.max_steps=3", "train.global_batch=41", "data.num_workers=2", "train.progress=false")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(bad) in last and "Traceback" not in r.stderr, r.stderr


def test_corrupt_image_is_skipped_and_counted_when_skipping(tmp_path):
    data, bad = _folder_with_a_corrupt_image(tmp_path)
    out = train(_cfg("image", tmp_path / "run", f"data.path={data}", "data.on_bad_file=skip",
                     "train.max_steps=2", "train.global_batch=41"))
    rows = _rows(tmp_path / "run")
    # Read in both steps (one epoch each), counted once: bad_files counts files, not reads.
    assert out["step"] == 2 and rows[-1]["bad_files"] == 1, rows[-1]


def _small_folder_with_a_corrupt_image(tmp_path, good=7):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for src in sorted((ROOT / "data/images/digits/3").glob("*.jpg"))[:good]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg after all")
    return tmp_path / "images"


def _learned_state(path):
    """Student and teacher weights and the Adam moments of a checkpoint, as one flat dict."""
    import torch
    state = load_checkpoint(path)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"teacher.{k}": v for k, v in state["teacher"].items()
                 if torch.is_tensor(v)})
    for index, moments in state["optimizer"]["state"].items():
        flat.update({f"adam.{index}.{k}": v for k, v in moments.items() if k != "step"})
    return flat


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_micro_batch_of_only_bad_files_skips_the_update_and_the_run_goes_on(loader, tmp_path):
    """One sample per step (micro_batch 1, a common audio setting): the step whose only file is
    corrupt has nothing to learn from. The run neither dies nor updates on it: the weights and
    the teacher after that step equal those before it, and the next steps train on."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    data = _small_folder_with_a_corrupt_image(tmp_path)
    out = train(_cfg("image", tmp_path / "run", f"data.path={data}", "data.on_bad_file=skip",
                     f"data.loader={loader}", "train.global_batch=1", "train.max_steps=8",
                     "train.checkpoint_every=1", "train.keep_last=8"))
    rows = _rows(tmp_path / "run")
    empty = [r for r in rows if r.get("event") == "no_data"]
    assert out["step"] == 8 and len(empty) == 1, rows
    step = empty[0]["step"]
    last = [r for r in rows if "loss" in r][-1]
    assert last["bad_files"] == 1 and last["empty_steps"] == 1 and last["skipped_steps"] == 0
    before = tmp_path / "run" / f"checkpoint_{step - 1:08d}.pt"
    after = tmp_path / "run" / f"checkpoint_{step:08d}.pt"
    if step > 1:
        a, b = _learned_state(before), _learned_state(after)
        assert a.keys() == b.keys() and any(k.startswith("adam.") for k in a)
        changed = [k for k in a if not a[k].equal(b[k])]
        assert not changed, f"the empty step changed {changed[:5]}"
        # ...while an ordinary step does change them
        c = _learned_state(tmp_path / "run" / f"checkpoint_{step + 1:08d}.pt")
        assert any(not b[k].equal(c[k]) for k in b if k.startswith("model."))
    following = [r["loss"] for r in rows if "loss" in r and r["step"] > step]
    assert all(math.isfinite(x) and x > 0 for x in following)


def test_a_bad_micro_batch_among_good_ones_still_updates(tmp_path):
    """Accumulation 2 of one sample each: a micro-batch whose file is corrupt adds nothing (a
    stand-in runs with its loss times 0); the step updates from the other micro-batch."""
    data = _small_folder_with_a_corrupt_image(tmp_path)
    out = train(_cfg("image", tmp_path / "run", f"data.path={data}", "data.on_bad_file=skip",
                     "train.global_batch=2", "train.micro_batch=1", "train.max_steps=4",
                     "train.checkpoint_every=0"))
    rows = _rows(tmp_path / "run")
    assert out["step"] == 4 and not [r for r in rows if r.get("event") == "no_data"], rows
    last = [r for r in rows if "loss" in r][-1]
    assert last["bad_files"] == 1 and last["empty_steps"] == 0
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows if "loss" in r)
