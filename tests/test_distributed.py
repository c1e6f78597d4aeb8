"""Two gloo ranks under torchrun: the run checkpoints, follows the 1-rank x 2-accumulation trajectory
on every modality, and each rank sets its threads and CPU affinity."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from d2v_engine.config import load_config
from d2v_engine.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _torchrun(port, run_dir, config, *overrides, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [*TORCHRUN, "--master_port", str(port), "-m", "d2v_engine.train", config,
           f"run.dir={run_dir}", "train.progress=false", "train.log_every=1", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _share_of_cpus():
    usable = sorted(os.sched_getaffinity(0))
    return usable, max(1, len(usable) // 2)


@pytest.mark.parametrize("modality,port", [pytest.param("image", 29533, marks=pytest.mark.latest),
                                           ("audio", 29534), ("text", 29535)])
def test_two_gloo_ranks_follow_one_rank_with_accumulation_two(modality, port, tmp_path,
                                                              monkeypatch):
    # model.dropout=0.0 turns off every random source in the model (drop path of tiny_image
    # included) and data.augment=false the loader's crops: what is left is summation order.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = f"configs/tiny_{modality}.yaml"
    common = ["train.max_steps=5", "train.global_batch=8", "train.micro_batch=4",
              "model.dropout=0.0", "data.augment=false"]
    extra = ["train.checkpoint_every=2"] if modality == "image" else []
    # OMP_NUM_THREADS unset: the 1 torchrun puts in the ranks' environment is its default, not
    # the user's choice, so each rank takes usable CPUs // 2 threads and those CPUs.
    two = _torchrun(port, tmp_path / "two", config, *common, *extra,
                    env={"OMP_NUM_THREADS": None})
    one = train(load_config(ROOT / config, [f"run.dir={tmp_path / 'one'}", "train.progress=false",
                                            "train.log_every=1", *common]))
    plan_two = json.loads((tmp_path / "two" / "plan.json").read_text())
    plan_one = json.loads((tmp_path / "one" / "plan.json").read_text())
    assert (plan_two["world_size"], plan_two["accumulation"], plan_two["micro_batch"]) == (2, 1, 4)
    assert (plan_one["world_size"], plan_one["accumulation"], plan_one["micro_batch"]) == (1, 2, 4)
    if modality == "image":
        assert (tmp_path / "two" / "checkpoint_00000004.pt").is_file()
        assert (tmp_path / "two" / "checkpoint_00000005.pt").is_file()
    l2, l1 = _losses(tmp_path / "two"), one["losses"]
    print(f"\n{modality} 1 rank x 2 accumulation: {l1}\n{modality} 2 ranks x 1: {l2}")
    assert len(l2) == len(l1) == 5
    for a, b in zip(l2, l1):
        assert a == pytest.approx(b, rel=1e-5), f"2 ranks {l2} vs 1 rank x 2 accumulation {l1}"
    rows = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 for r in rows if "loss" in r)

    usable, share = _share_of_cpus()
    for rank in (0, 1):
        found = re.search(rf"rank {rank} \(local {rank}/2\): (\d+) intra-op thread\(s\) from "
                          rf"share of the cores of \d+ usable CPUs, pinned to CPUs", two.stderr)
        assert found and int(found.group(1)) == share, two.stderr
    cpu = plan_two["cpu"]
    assert cpu["threads"] == share and cpu["pinned"] and cpu["cpus"] == usable[:share]


def test_a_users_omp_num_threads_is_kept_and_ranks_still_pinned(tmp_path):
    r = _torchrun(29536, tmp_path, "configs/tiny_image.yaml", "train.dry_run=true",
                  env={"OMP_NUM_THREADS": "3"})
    usable, share = _share_of_cpus()
    cpu = json.loads((tmp_path / "plan.json").read_text())["cpu"]
    assert cpu["threads_from"] == "OMP_NUM_THREADS (user)" and cpu["pinned"]
    assert cpu["cpus"] == usable[:share]
    assert not (tmp_path / "metrics.jsonl").exists()  # a dry run does not train
    assert sum("OMP_NUM_THREADS (user)" in l for l in r.stderr.splitlines()) == 2


def test_a_rank_whose_micro_batch_is_all_bad_files_keeps_step_with_the_other(tmp_path):
    """Two gloo ranks, one sample each per step, one corrupt file in the epoch: the rank that
    draws it runs a zero-weighted stand-in so DDP's all-reduce still sees both ranks; the run
    finishes, counts the file (on rank 0's log, whichever rank read it), and no step is empty (the other rank's sample is learned)."""
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for src in sorted((ROOT / "data/images/digits/3").glob("*.jpg"))[:7]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg after all")
    _torchrun(29541, tmp_path / "run", "configs/tiny_image.yaml", f"data.path={tmp_path / 'images'}",
              "data.on_bad_file=skip", "train.global_batch=2", "train.max_steps=4",
              "train.checkpoint_every=0")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert not [r for r in rows if r.get("event") == "no_data"]
    assert all(r["loss"] > 0 for r in losses)
    assert losses[-1]["bad_files"] == 1, "the count is over both ranks, whichever drew the file"
