"""Unlucky and malicious users: a run directory belongs to one run, resume refuses a changed
recipe, bad samples are named, every user error is one line, signal bursts exit 0, export never
clobbers. Tiny configs on the CPU; each case is what failed before."""
import errno
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from d2v_engine.checkpoint import list_checkpoints
from d2v_engine.config import load_config
from d2v_engine.errors import ConfigError
from d2v_engine.planning.plan import checkpoints_kept
from d2v_engine.cli.train import main as train_main
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
FAST = ["train.progress=false", "train.log_every=1", "train.global_batch=4",
        "train.checkpoint_every=0", "run.tensorboard=false"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _cfg(run_dir, *overrides, config="configs/tiny_text.yaml"):
    return load_config(ROOT / config, [f"run.dir={run_dir}", *FAST, *overrides])


def _env():
    return {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "d2v_engine.cli.train", *args], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _assert_one_line_error(done, *named):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = _error_lines(done.stderr)
    assert len(errors) == 1, done.stderr[-3000:]
    for word in named:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def _metrics_rows(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


# --- 1. resume checks the recipe --------------------------------------------------------------

def test_resume_with_a_changed_seed_is_refused_naming_both_values(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "train.max_steps=6", "train.stop_at=2", "seed=1"))
    code = train_main(["configs/tiny_text.yaml", f"run.dir={run}", *FAST, "train.max_steps=6",
                       "train.resume=true", "seed=3"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = _error_lines(err)
    assert "seed: 1 in the checkpoint, 3 now" in line, line
    assert "train.resume_overrides=[seed]" in line, line
    assert [s for s, _ in list_checkpoints(run)] == [2], "a refused resume trained"
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1  # untouched

    # Named on purpose: accepted, said, and the earlier config kept beside the new one.
    out = train(_cfg(run, "train.max_steps=6", "train.resume=true", "seed=3",
                     "train.resume_overrides=[seed]"))
    assert out["step"] == 6
    err = capsys.readouterr().err
    assert "resumed with seed 1 -> 3" in err, err
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 3
    assert yaml.safe_load((run / "config.yaml.prev1").read_text())["seed"] == 1


def test_always_free_keys_change_on_resume_without_naming_them(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "train.max_steps=4", "train.stop_at=2"))
    out = train(_cfg(run, "train.max_steps=5", "train.resume=true", "train.log_every=2"))
    assert out["step"] == 5
    assert "train.max_steps 4 -> 5" in capsys.readouterr().err


def test_an_unknown_resume_override_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.resume_overrides"):
        _cfg(tmp_path, "train.resume_overrides=[optim.lrr]")


# --- 2. one writer per run directory ----------------------------------------------------------

def test_a_second_writer_is_refused_and_a_killed_holder_leaves_nothing_to_clean(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "d2v_engine.cli.train", "configs/tiny_text.yaml", f"run.dir={run}",
         *FAST, "train.max_steps=100000"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not _metrics_rows(run) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-3000:]
        rows_before = len(_metrics_rows(run))
        second = _cli("configs/tiny_text.yaml", f"run.dir={run}", *FAST, "train.max_steps=3")
        line = _assert_one_line_error(second, f"in use by pid {first.pid} on ", str(run))
        assert "choose another run.dir" in line
        assert first.poll() is None, "the second start disturbed the first"
        assert len(_metrics_rows(run)) >= rows_before, "the second start touched metrics.jsonl"
        assert not list(run.glob("metrics.jsonl.prev*"))
    finally:
        first.kill()  # SIGKILL: no clean-up runs
        first.wait()
    resumed = _cli("configs/tiny_text.yaml", f"run.dir={run}", *FAST, "train.max_steps=2")
    # The kernel dropped the dead holder's lock: the next start gets the directory (and, as it
    # holds no checkpoint yet, starts it afresh).
    assert resumed.returncode == 0, resumed.stderr[-3000:]


# --- 3. data ----------------------------------------------------------------------------------

def _prepare(*args):
    return subprocess.run([sys.executable, "-m", "d2v_engine.cli.prepare", *map(str, args),
                           "--quiet", "--workers", "1"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


def test_prepare_follows_no_folder_twice_through_a_symlink_loop(tmp_path):
    src = tmp_path / "images"
    for label in ("a", "b"):
        (src / label).mkdir(parents=True)
        for i, jpg in enumerate(sorted((ROOT / f"data/images/digits/{i}").glob("*.jpg"))[0]
                                for i in range(3)):
            (src / label / f"{i}.jpg").write_bytes(jpg.read_bytes())
    (src / "a" / "loop").symlink_to(src)  # back to the top: listed 41 times before
    (src / "b" / "again").symlink_to(src / "a")
    done = _prepare("image", src, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["accepted"] == 6 and report["classes"] == 2, report
    assert "did not follow 2 symlinked folder(s)" in done.stderr, done.stderr
    rows = (tmp_path / "out/train.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[1] for r in rows) == ["0"] * 3 + ["1"] * 3


def _float_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)


def test_non_finite_audio_is_rejected_by_prepare_and_a_bad_file_to_both_loaders(tmp_path):
    src = tmp_path / "wav"
    src.mkdir()
    wave_ = np.sin(np.linspace(0, 200, 16000)).astype(np.float32) * 0.3
    _float_wav(src / "good.wav", wave_)
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf), ("huge.wav", 1e30)):
        bad = wave_.copy()
        bad[8000] = value
        _float_wav(src / name, bad)
    done = _prepare("audio", src, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["accepted"] == 1 and report["rejected"] == {"non_finite": 3}, report
    assert {f["path"] for f in report["rejected_files"]} == {"nan.wav", "inf.wav", "huge.wav"}

    from d2v_engine.data.audio import AudioManifestDataset
    from d2v_engine.data.common import BadSample

    manifest = tmp_path / "all.tsv"
    manifest.write_text("\n".join([str(src)] + [f"{n}\t16000" for n in
                                                ("good.wav", "nan.wav", "inf.wav", "huge.wav")]))
    cfg = _cfg(tmp_path / "r", f"data.path={manifest}", "data.on_bad_file=skip",
               config="configs/tiny_audio.yaml").data
    dataset = AudioManifestDataset(cfg, manifest)
    dataset.read(src / "good.wav")
    for name in ("nan.wav", "inf.wav", "huge.wav"):
        with pytest.raises(BadSample, match="non-finite"):
            dataset.read(src / name)
    pytest.importorskip("nvidia.dali")
    from d2v_engine.data.audio import check_finite_wav

    check_finite_wav(src / "good.wav")  # what the DALI loader checks before DALI decodes
    with pytest.raises(ValueError, match="non-finite"):
        check_finite_wav(src / "nan.wav")


def test_a_gz_bomb_is_rejected_in_bounded_memory(tmp_path):
    src = tmp_path / "text"
    src.mkdir()
    (src / "good.txt").write_text("A short document about speech and vision.\n" * 20)
    member = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    with open(src / "bomb.txt.gz", "wb") as f:  # 512 gzip members: 33 MB expanding to 32 GiB
        for _ in range(512):
            f.write(member)
    start = time.time()
    cmd = [sys.executable, "-m", "d2v_engine.cli.prepare", "text", str(src), str(tmp_path / "out"),
           "--quiet", "--workers", "1", "--vocab-size", "300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    peak_gb = usage.ru_maxrss * 1024 / 1e9
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["rejected"] == {"too_large": 1}, report
    assert report["rejected_files"][0]["path"] == "bomb.txt.gz"
    assert peak_gb < 1.5 and time.time() - start < 120, (peak_gb, time.time() - start)


def test_a_long_line_over_the_limit_is_rejected_and_the_rest_of_the_file_kept(tmp_path):
    from d2v_engine.prepare.text import read_source

    path = tmp_path / "lines.txt"
    path.write_bytes(b"first line\n" + b"x" * 5000 + b"\nlast line\n")
    items = read_source((str(path), "lines", "strict", 1000))
    assert [i[0] for i in items] == ["doc", "bad", "doc"], items
    assert items[1][1:] == (11, "too_large") and items[2][2] == "last line"


def test_devices_fifos_and_huge_files_are_bad_files_never_read(tmp_path):
    from d2v_engine.data.common import check_file

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(ValueError, match="not a regular file"):
        check_file(fifo, 1 << 30)
    with pytest.raises(ValueError, match="not a regular file"):
        check_file("/dev/zero", 1 << 30)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 2048)
    with pytest.raises(ValueError, match="over data.max_file_bytes=1024"):
        check_file(big, 1024)

    # A manifest row naming /dev/zero: skipped and counted by the torch loader.
    images = tmp_path / "flat"
    images.mkdir()
    for i, jpg in enumerate(sorted((ROOT / "data/images/digits/3").glob("*.jpg"))[:8]):
        (images / f"{i}.jpg").write_bytes(jpg.read_bytes())
    manifest = tmp_path / "train.tsv"
    manifest.write_text("\n".join([str(images)] + [f"{i}.jpg" for i in range(8)]
                                  + ["/dev/zero", str(fifo)]) + "\n")
    out = train(_cfg(tmp_path / "run", f"data.path={manifest}", "data.on_bad_file=skip",
                     "train.max_steps=3", "data.loader=torch", "train.global_batch=10",
                     config="configs/tiny_image.yaml"))
    assert out["step"] == 3
    rows = [r for r in _metrics_rows(tmp_path / "run") if "loss" in r]
    assert rows[-1]["bad_files"] == 2, rows[-1]

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "ok.jpg").write_bytes((images / "0.jpg").read_bytes())
    os.mkfifo(src / "a" / "pipe.jpg")
    (src / "a" / "tab\tname.jpg").write_bytes((images / "1.jpg").read_bytes())
    done = _prepare("image", src, tmp_path / "prepared")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "prepared/report.json").read_text())
    assert report["rejected"] == {"not_regular_file": 1, "unsafe_name": 1}, report


# --- 4. one line for every user error ---------------------------------------------------------

def _hf_export(tmp_path) -> Path:
    from d2v_engine.handoff.export import export

    run = tmp_path / "src_run"
    train(_cfg(run, "train.max_steps=1", config="configs/tiny_image.yaml"))
    return export(run, tmp_path / "hf")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("stopped") / "run"
    done = _cli("configs/tiny_image.yaml", f"run.dir={run}", *FAST, "train.max_steps=4",
                "train.stop_at=1")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.mark.parametrize("overrides,named", [
    (["optim.lr=-1"], ["optim.lr", "-1"]),
    (["data.num_workers=-3"], ["data.num_workers", "-3"]),
    (["seed=99999999999999999999"], ["'seed'", "99999999999999999999"]),
    (["train.max_steps=100000000000000000000"], ["train.max_steps"]),
])
def test_bad_values_are_one_line_naming_the_key(overrides, named, tmp_path):
    _assert_one_line_error(_cli("configs/tiny_image.yaml", f"run.dir={tmp_path / 'r'}", *FAST,
                                *overrides), *named)


def test_resume_with_another_model_size_is_one_line(stopped_run):
    _assert_one_line_error(_cli("configs/tiny_image.yaml", f"run.dir={stopped_run}", *FAST,
                                "train.max_steps=4", "train.resume=true", "model.depth=3"),
                           "model.depth: 4 in the checkpoint, 3 now")


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# r\xe9sum\xe9\nmodality: image\n".encode("latin-1"))
    _assert_one_line_error(_cli(str(bad)), str(bad), "not UTF-8")


def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _assert_one_line_error(_cli("configs/tiny_image.yaml", f"run.dir={blocker / 'run'}", *FAST,
                                "train.max_steps=1"), str(blocker))
    if os.geteuid() == 0:
        return  # root writes into read-only folders; the case above is the one root meets
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _assert_one_line_error(_cli("configs/tiny_image.yaml", f"run.dir={locked / 'run'}", *FAST,
                                "train.max_steps=1"), str(locked))


@pytest.mark.parametrize("damage", ["truncated safetensors", "malformed index",
                                    "index naming a path outside"])
def test_a_damaged_init_from_directory_is_one_line(damage, tmp_path):
    hf = _hf_export(tmp_path)
    weights = hf / "model.safetensors"
    if damage == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:1000])
        named = [str(weights)]
    else:
        weights.unlink()
        index = hf / "model.safetensors.index.json"
        index.write_text("{not json" if damage == "malformed index" else
                         json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
        named = [str(index)]
    _assert_one_line_error(_cli("configs/tiny_image.yaml", f"run.dir={tmp_path / 'r'}", *FAST,
                                "train.max_steps=1", f"model.init_from={hf}"), *named)


def test_d2v_debug_shows_the_traceback(tmp_path):
    done = _cli("configs/tiny_image.yaml", f"run.dir={tmp_path / 'r'}", "optim.lr=-1",
                env={**_env(), "D2V_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "optim.lr" in done.stderr


def test_the_plans_checkpoint_count_is_arithmetic_for_any_run_length():
    def listed(max_steps, every, keep_last, keep_every):
        steps = list(range(every, max_steps, every)) if every > 0 else []
        steps.append(max_steps)
        return sum(1 for i, s in enumerate(steps)
                   if i >= len(steps) - keep_last or (keep_every and s % keep_every == 0))

    for case in [(m, e, k, ke) for m in range(1, 40) for e in range(0, 9) for k in (1, 2, 3)
                 for ke in range(0, 7)]:
        assert checkpoints_kept(*case) == listed(*case), case
    assert checkpoints_kept(10**18, 1000, 2, 10**6) == 2 + (10**18 // 1000 - 2) // 1000


# --- 5. signals -------------------------------------------------------------------------------

def test_a_sigterm_burst_checkpoints_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "d2v_engine.cli.train", "configs/tiny_text.yaml", f"run.dir={run}",
         *FAST, "train.max_steps=100000"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(_metrics_rows(run)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(40):  # a scheduler's burst, then an impatient user, over about 2 s
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGTERM if _ % 3 else signal.SIGUSR1)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, (proc.returncode, err[-3000:])
    (step, _), = list_checkpoints(run)
    assert [e["step"] for e in _metrics_rows(run) if e.get("event") == "preempted"] == [step]


# --- 6. export never clobbers -----------------------------------------------------------------

def test_export_into_a_non_empty_folder_is_refused_then_replaces_only_its_own_files(tmp_path):
    from d2v_engine.cli.export import main as export_main

    run = tmp_path / "run"
    train(_cfg(run, "train.max_steps=1", config="configs/tiny_image.yaml"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "keep.txt").write_text("mine too")
    done = subprocess.run([sys.executable, "-m", "d2v_engine.cli.export", str(run), str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    line = _assert_one_line_error(done, str(out), "README.md", "--overwrite")
    assert "keep.txt" not in line.split("would replace")[1], line
    assert (out / "README.md").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) \
        == ["README.md", "keep.txt"], "a refused export wrote into the folder"
    assert export_main([str(run), str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text() != "my notes" and (out / "config.json").is_file()
    assert (out / "keep.txt").read_text() == "mine too"
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]


# --- 7. the unclear ones ----------------------------------------------------------------------

def test_a_damaged_newest_checkpoint_names_the_older_one_and_resume_from_uses_it(tmp_path,
                                                                                 capsys):
    run = tmp_path / "run"
    train(_cfg(run, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=3",
               "train.stop_at=6"))
    newest = run / "checkpoint_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:4000])
    code = train_main(["configs/tiny_text.yaml", f"run.dir={run}", *FAST, "train.max_steps=8",
                       "train.checkpoint_every=2", "train.keep_last=3", "train.resume=true"])
    (line,) = _error_lines(capsys.readouterr().err)
    older = run / "checkpoint_00000004.pt"
    assert code == 2 and "checkpoint_00000006.pt" in line, line
    assert f"train.resume_from={older}" in line, line
    out = train(_cfg(run, "train.max_steps=8", "train.checkpoint_every=2", "train.keep_last=3",
                     f"train.resume_from={older}"))
    assert out["step"] == 8 and [r["step"] for r in _metrics_rows(run)
                                 if r.get("event") == "resume"] == [4]


def test_a_full_disk_says_no_space_left(tmp_path, monkeypatch, capsys):
    import shutil

    real_save, real_usage = torch.save, shutil.disk_usage

    def full_disk_save(obj, f, *args, **kwargs):
        if obj.get("step") == 2:  # torch's writer: no errno, just "file write failed"
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=1 << 20))
    out = train(_cfg(tmp_path, "train.max_steps=4", "train.checkpoint_every=2"))
    assert out["step"] == 4
    failed = [r for r in _metrics_rows(tmp_path) if r.get("event") == "save_failed"]
    assert len(failed) == 1 and "no space left on device" in failed[0]["error"], failed
    assert "no space left on device" in capsys.readouterr().err
    from d2v_engine.errors import error_line

    line = error_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.pt")))
    assert line.startswith(f"{tmp_path / 'x.pt'}: No space left on device (free some"), line


def test_a_prepare_worker_killed_from_outside_is_an_error_not_a_hang(tmp_path):
    from d2v_engine.errors import DataError
    from d2v_engine.prepare.common import check_all

    with pytest.raises(DataError, match="a worker process died"):
        check_all(_die_on_three, list(range(8)), 2, "checking", progress=False)


def _die_on_three(job):
    if job == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return job
