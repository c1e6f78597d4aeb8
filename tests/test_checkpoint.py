import random

import numpy as np
import pytest
import torch

from engine.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from engine.errors import CheckpointError


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
