import numpy as np
import pytest

from d2v_engine.data.loader import BatchPlan, GlobalBatchSampler, global_batch_indices
from d2v_engine.errors import ConfigError, DataError


def _step_contents(num, gb, world, micro, seed, steps):
    plan = BatchPlan.make(gb, micro, world)
    per_step = {}
    for rank in range(world):
        for mb in GlobalBatchSampler(num, plan, rank, seed, 0, steps):
            for idx, step, pos in mb:
                per_step.setdefault(step, set()).add((idx, pos))
    return per_step


def test_global_batches_do_not_depend_on_world_size_or_micro_batch():
    a = _step_contents(50, 8, 1, 4, seed=3, steps=12)  # 1 rank x 2 accumulation
    b = _step_contents(50, 8, 2, 4, seed=3, steps=12)  # 2 ranks x 1
    c = _step_contents(50, 8, 4, 1, seed=3, steps=12)  # 4 ranks x 2
    assert a == b == c
    assert all(len(v) == 8 for v in a.values())


def test_each_epoch_is_a_permutation_without_repeats():
    seen = np.concatenate([global_batch_indices(40, 8, 1, s) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    nxt = np.concatenate([global_batch_indices(40, 8, 1, s) for s in range(5, 10)])
    assert sorted(nxt.tolist()) == list(range(40))
    assert not np.array_equal(seen, nxt), "a new epoch must reshuffle"


def test_resumed_sampler_continues_the_same_stream():
    plan = BatchPlan.make(8, 4, 1)
    full = list(GlobalBatchSampler(30, plan, 0, 5, 0, 10))
    tail = list(GlobalBatchSampler(30, plan, 0, 5, 4, 10))
    assert full[4 * plan.accumulation:] == tail


def test_different_seeds_give_different_orders():
    assert not np.array_equal(global_batch_indices(100, 10, 1, 0), global_batch_indices(100, 10, 2, 0))


def test_batch_arithmetic_errors_name_the_numbers():
    with pytest.raises(ConfigError, match="10 is not divisible by train.micro_batch \\(4\\) x world size \\(1\\)"):
        BatchPlan.make(10, 4, 1)
    assert BatchPlan.make(32, 0, 2) == BatchPlan(32, 16, 2, 1)
    assert BatchPlan.make(32, 4, 2).accumulation == 4
    with pytest.raises(DataError, match="3 samples"):
        GlobalBatchSampler(3, BatchPlan.make(8, 8, 1), 0, 1, 0, 1)
