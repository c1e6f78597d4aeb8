"""Two gloo ranks under torchrun: the run checkpoints, follows the 1-rank x 2-accumulation trajectory
on every modality, and each rank sets its threads and CPU affinity."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v_engine.config import load_config
from d2v_engine.runtime.cpu_setup import rank_cpus
from d2v_engine.errors import ConfigError
from d2v_engine.runtime.topology import read_topology
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _torchrun(port, run_dir, config, *overrides, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [*TORCHRUN, "--master_port", str(port), "-m", "d2v_engine.cli.train", config,
           f"run.dir={run_dir}", "train.progress=false", "train.log_every=1", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _share_of_cpus():
    """(usable CPUs, rank 0's CPUs of 2 CPU ranks): half the whole cores of this machine."""
    usable = sorted(os.sched_getaffinity(0))
    return usable, rank_cpus(usable, 0, 2, read_topology()).cpus


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

    usable, mine = _share_of_cpus()
    for rank in (0, 1):
        found = re.search(rf"rank {rank} \(local {rank}/2\): (\d+) intra-op thread\(s\) from "
                          rf"share of the cores of \d+ usable CPUs, pinned to CPUs", two.stderr)
        assert found and int(found.group(1)) == len(mine), two.stderr
    cpu = plan_two["cpu"]
    assert cpu["threads"] == len(mine) and cpu["pinned"] and cpu["cpus"] == mine, (cpu, mine)


def test_a_users_omp_num_threads_is_kept_and_ranks_still_pinned(tmp_path):
    r = _torchrun(29536, tmp_path, "configs/tiny_image.yaml", "train.dry_run=true",
                  env={"OMP_NUM_THREADS": "3"})
    usable, mine = _share_of_cpus()
    cpu = json.loads((tmp_path / "plan.json").read_text())["cpu"]
    assert cpu["threads_from"] == "OMP_NUM_THREADS (user)" and cpu["pinned"]
    assert cpu["cpus"] == mine, (cpu["cpus"], mine)
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


# --- process group set-up ----------------------------------------------------------------------

WAIT_SCRIPT = '''
import sys, time
import torch, torch.distributed as dist
from d2v_engine.runtime.distributed import init_distributed
info = init_distributed("cpu", float(sys.argv[1]))
if info.rank == 1:
    time.sleep(float(sys.argv[2]))
start = time.perf_counter()
try:
    dist.all_reduce(torch.ones(1))
    outcome = "done"
except Exception as e:
    outcome = f"failed ({type(e).__name__})"
print(f"rank {info.rank}: all_reduce {outcome} after {time.perf_counter() - start:.1f} s",
      flush=True)
'''


def _rank0_wait(tmp_path, timeout_s, sleep_s, port):
    """(outcome, seconds) of rank 0's all-reduce while rank 1 sleeps `sleep_s` first."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*TORCHRUN, "--master_port", str(port), str(script), str(timeout_s),
                        str(sleep_s)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    found = re.search(r"rank 0: all_reduce (done|failed \(\w+\)) after ([\d.]+) s", r.stdout)
    assert found, r.stdout + r.stderr[-2000:]
    return found.group(1), float(found.group(2))


def test_the_collective_timeout_reaches_the_gloo_group(tmp_path):
    """Two gloo ranks, rank 1 late to the all-reduce: with a 3 s timeout rank 0 fails after ~3 s
    (torch's gloo default would wait 30 min); with 60 s it waits for rank 1 and succeeds."""
    outcome, waited = _rank0_wait(tmp_path, 3, 20, 29543)
    print(f"\ntimeout 3 s, rank 1 20 s late: rank 0 {outcome} after {waited} s")
    assert outcome.startswith("failed") and 2.5 <= waited < 15, (outcome, waited)
    outcome, waited = _rank0_wait(tmp_path, 60, 3, 29544)
    print(f"timeout 60 s, rank 1 3 s late: rank 0 {outcome} after {waited} s")
    assert outcome == "done" and waited >= 2.0, (outcome, waited)


class _Joined(Exception):
    pass


def _record_init(monkeypatch, env: dict) -> dict:
    """init_process_group's keyword arguments, for a rank with `env` (RANK, WORLD_SIZE, ...)."""
    from d2v_engine.runtime import distributed
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise _Joined
    monkeypatch.setattr(distributed.dist, "init_process_group", init)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    for key in ("TORCHELASTIC_RESTART_COUNT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return seen


def test_init_process_group_gets_the_timeout_and_on_cuda_the_device(monkeypatch):
    import datetime

    from d2v_engine.runtime.distributed import init_distributed
    seen = _record_init(monkeypatch, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    with pytest.raises(_Joined):
        init_distributed("cpu", 42)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=42)}, seen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    seen.clear()
    with pytest.raises(_Joined):
        init_distributed("auto", 90)
    assert seen == {"backend": "nccl", "timeout": datetime.timedelta(seconds=90),
                    "device_id": torch.device("cuda", 1)}, seen


def test_the_trainer_passes_train_collective_timeout_s(monkeypatch, tmp_path):
    from d2v_engine.run import trainer
    seen = []

    def init(device, timeout):
        seen.append((device, timeout))
        raise _Joined
    monkeypatch.setattr(trainer, "init_distributed", init)
    cfg = load_config(ROOT / "configs/tiny_image.yaml", [f"run.dir={tmp_path}",
                                                          "train.collective_timeout_s=42"])
    with pytest.raises(_Joined):
        train(cfg)
    assert seen == [("auto", 42.0)], seen
    assert load_config(None, []).train.collective_timeout_s == 300.0
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        load_config(None, ["train.collective_timeout_s=0"])


def test_more_local_ranks_than_visible_gpus_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    """torchrun --nproc_per_node 4 where CUDA_VISIBLE_DEVICES leaves 2 GPUs: exit 2 at start,
    one line naming both counts, instead of two ranks sharing a GPU until NCCL fails."""
    from d2v_engine.cli import train as entry
    _record_init(monkeypatch, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3",
                               "LOCAL_WORLD_SIZE": "4", "CUDA_VISIBLE_DEVICES": "2,3"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code = entry.main([str(ROOT / "configs/tiny_image.yaml"), f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0] == ("error: 4 ranks on this node (LOCAL_WORLD_SIZE) but 2 CUDA device(s) "
                      "visible (CUDA_VISIBLE_DEVICES=2,3): start at most 2 (torchrun "
                      "--nproc_per_node, GPUS=), or set train.device=cpu"), err
