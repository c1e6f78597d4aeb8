import os
import pathlib
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v_engine.checkpoint import (
    FORMAT, FORMAT_KEY, latest_checkpoint, list_checkpoints, load_checkpoint, rng_state,
    save_checkpoint, set_rng_state,
)
from d2v_engine.errors import CheckpointError


def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_half_written_file_is_never_picked_up(tmp_path):
    save_checkpoint(tmp_path, 5, {"step": 5})
    (tmp_path / ".checkpoint_00000009.pt.tmp-123").write_bytes(b"\x80partial")
    assert latest_checkpoint(tmp_path).name == "checkpoint_00000005.pt"


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, {"step": 2, "x": Unpicklable()})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000001.pt"]


def test_corrupt_checkpoint_is_a_named_error(tmp_path):
    p = tmp_path / "checkpoint_00000001.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint_00000001.pt"):
        load_checkpoint(p)


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# --- weights-only loading: nothing in a checkpoint file runs ------------------------------------

ROOT = Path(__file__).resolve().parent.parent


class _Touch:
    """Unpickling this runs a command that creates `marker`: what a crafted checkpoint does."""

    def __init__(self, marker, how):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "Path.touch":
            return pathlib.Path.touch, (pathlib.Path(self.marker),)
        return os.system, (f"touch {self.marker}",)


def _crafted(path, marker, how="os.system"):
    """A file that looks like ours (marker key, model, config) but whose pickle runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({FORMAT_KEY: FORMAT, "step": 1, "model": {"encoder.w": torch.zeros(2)},
                "config": {"modality": "image"}, "rng": _Touch(marker, how)}, path,
               pickle_protocol=4 if how == "protocol 4" else 2)
    return path


def test_checkpoint_state_loads_weights_only_and_restores_every_rng_exactly(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    path = save_checkpoint(tmp_path, 1, {"step": 1, "rng": rng_state()})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)
    want = (random.random(), np.random.randn(), np.random.randint(1 << 30), torch.rand(3))
    set_rng_state(state["rng"])
    got = (random.random(), np.random.randn(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3]), (got, want)


def test_truncated_foreign_and_unsafe_files_each_get_their_own_one_line_message(tmp_path):
    good = save_checkpoint(tmp_path / "run", 1, {"step": 1, "w": torch.randn(64, 64)})
    cases = {
        "truncated": (tmp_path / "cut.pt", good.read_bytes()[: good.stat().st_size // 2]),
        "empty": (tmp_path / "empty.pt", b""),
        "not torch": (tmp_path / "text.pt", b"not a checkpoint at all"),
    }
    for path, data in cases.values():
        path.write_bytes(data)
    torch.save({"encoder.w": torch.zeros(2)}, tmp_path / "state_dict.pt")  # a foreign pickle
    marker = tmp_path / "pwned"
    _crafted(tmp_path / "evil.pt", marker)
    expect = {
        "cut.pt": "is truncated: its zip archive ends early",
        "empty.pt": "is truncated: the file is empty",
        "text.pt": "is not a d2v-engine checkpoint: not the zip archive torch.save writes",
        "state_dict.pt": "is not a d2v-engine checkpoint: a dict with keys ['encoder.w'] without",
        "evil.pt": "refused checkpoint",
    }
    for name, message in expect.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        text = str(e.value)
        assert message in text and str(tmp_path / name) in text and "\n" not in text, text
    with pytest.raises(CheckpointError, match=r"needs posix\.system.*could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["os.system", "Path.touch", "protocol 4"])
def test_crafted_checkpoint_is_refused_before_it_runs_by_load_and_restart(how, tmp_path,
                                                                         monkeypatch):
    from d2v_engine.run.preemption import restart_checkpoint

    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path / "run" / "checkpoint_00000001.pt", marker, how)
    with pytest.raises(CheckpointError, match="refused checkpoint"):
        load_checkpoint(evil)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(CheckpointError, match="refused checkpoint"):
        restart_checkpoint(tmp_path / "run")
    assert not marker.exists()


def _module(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("entry", ["export", "probe", "init_from", "resume"])
def test_crafted_checkpoint_is_refused_by_every_reader_and_never_runs(entry, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    evil = _crafted(run / "checkpoint_00000001.pt", marker)
    args = {
        "export": ["d2v_engine.cli.export", str(evil), str(tmp_path / "hf")],
        "probe": ["d2v_engine.cli.probe", str(evil)],
        "init_from": ["d2v_engine.cli.train", "configs/tiny_image.yaml", f"run.dir={tmp_path / 'new'}",
                      f"model.init_from={evil}", "train.max_steps=1", "train.progress=false"],
        "resume": ["d2v_engine.cli.train", "configs/tiny_image.yaml", f"run.dir={run}",
                   "train.resume=true", "train.max_steps=2", "train.progress=false"],
    }[entry]
    r = _module(*args)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "refused checkpoint" in errors[0] and str(evil) in errors[0], errors[0]
    assert "posix.system" in errors[0], errors[0]
    assert not marker.exists(), f"{entry} ran the checkpoint's code"
    assert not (tmp_path / "hf").exists()


def _as_written_before(path, out):
    """The checkpoint at `path` as the engine wrote it before weights-only loading: NumPy's RNG
    state as get_state()'s tuple (a uint32 array), no format marker."""
    state = load_checkpoint(path)
    n = state["rng"]["numpy"]
    state["rng"]["numpy"] = (n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"])
    del state[FORMAT_KEY]
    torch.save(state, out)
    return out


def test_old_checkpoint_is_refused_then_upgraded_and_resumes_exactly(tmp_path, monkeypatch):
    from d2v_engine.cli.checkpoint import upgrade
    from d2v_engine.config import load_config
    from d2v_engine.run.trainer import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def cfg(run_dir, *overrides):
        return load_config(ROOT / "configs/tiny_text.yaml",  # the fastest tiny config
                           [f"run.dir={run_dir}", "train.progress=false", "train.log_every=1",
                            "train.max_steps=4", "train.checkpoint_every=0",
                            "train.global_batch=4", *overrides])

    full = train(cfg(tmp_path / "full"))["losses"]
    train(cfg(tmp_path / "cut", "train.stop_at=2"))
    new = tmp_path / "cut" / "checkpoint_00000002.pt"
    old = _as_written_before(new, tmp_path / "old.pt")
    new.unlink()
    with pytest.raises(CheckpointError, match=r"numpy.*d2v-checkpoint upgrade"):
        load_checkpoint(old)
    assert upgrade(old, new) == new
    assert torch.serialization.get_unsafe_globals_in_checkpoint(new) == []
    resumed = train(cfg(tmp_path / "cut", "train.resume=true"))["losses"]
    assert resumed == full[2:], (resumed, full)
    with pytest.raises(CheckpointError, match="already exists"):
        upgrade(old, new)


def test_upgrade_refuses_a_file_that_needs_more_than_numpy_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path / "evil.pt", marker)
    r = _module("d2v_engine.cli.checkpoint", "upgrade", str(evil), str(tmp_path / "new.pt"))
    assert r.returncode == 2 and "posix.system" in r.stderr and "not converted" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "new.pt").exists()


# --- CUDA generator states on any number of visible GPUs ---------------------------------------


class _VisibleGPUs:
    """torch.cuda's generator calls as on a machine with `count` visible devices, each with its
    own state (device i: 16 bytes of value i); setting a device that is not there fails as CUDA
    does."""

    def __init__(self, monkeypatch, count: int):
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]
        self.set: list[tuple[int, int]] = []  # (device, first byte of the state it was given)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: self._get(device))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)

    def _index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        if index >= len(self.states):
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def _get(self, device):
        return self.states[self._index(device)].clone()

    def _set(self, state, device=0):
        self.set.append((self._index(device), int(state[0])))


def test_a_checkpoint_written_with_8_visible_gpus_resumes_with_1(tmp_path, monkeypatch):
    """Rank 3 of an 8-GPU run saves its own device's state only; a debug resume with
    CUDA_VISIBLE_DEVICES=0 restores it into device 0 (set_rng_state_all over the 8 saved states
    failed here with an IndexError / invalid device ordinal)."""
    _VisibleGPUs(monkeypatch, 8)
    path = save_checkpoint(tmp_path, 1, {"step": 1, "rng": rng_state(torch.device("cuda", 3))})
    saved = load_checkpoint(path)["rng"]
    assert "cuda" not in saved and int(saved["cuda_device"][0]) == 3, sorted(saved)
    one = _VisibleGPUs(monkeypatch, 1)
    set_rng_state(saved, torch.device("cuda", 0))
    assert one.set == [(0, 3)], f"restored (device, state) pairs {one.set}, want [(0, 3)]"


@pytest.mark.parametrize("visible,device,want", [(1, 0, (0, 0)), (2, 1, (1, 1)), (8, 5, (5, 5))])
def test_old_checkpoints_with_every_devices_state_resume_on_fewer_gpus(tmp_path, monkeypatch,
                                                                       visible, device, want):
    """Checkpoints before "cuda_device" hold the list of all 8 states rank 0 saw: each rank
    takes its own device's entry (what set_rng_state_all gave it), on any visible count."""
    writer = _VisibleGPUs(monkeypatch, 8)
    old = {**rng_state(torch.device("cpu")), "cuda": list(writer.states)}
    state = load_checkpoint(save_checkpoint(tmp_path, 1, {"step": 1, "rng": old}))["rng"]
    now = _VisibleGPUs(monkeypatch, visible)
    set_rng_state(state, torch.device("cuda", device))
    assert now.set == [want], f"{visible} visible, rank on cuda:{device}: restored {now.set}"


def test_an_old_checkpoint_from_fewer_gpus_gives_extra_devices_rank_0s_state(monkeypatch):
    gpus = _VisibleGPUs(monkeypatch, 8)
    old = {**rng_state(torch.device("cpu")),
           "cuda": [torch.full((16,), v, dtype=torch.uint8) for v in (9, 10)]}
    set_rng_state(old, torch.device("cuda", 6))
    assert gpus.set == [(6, 9)], f"cuda:6 of a 2-GPU checkpoint restored {gpus.set}"
