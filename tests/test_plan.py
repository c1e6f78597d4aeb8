"""The run plan (train.dry_run): its numbers, its errors, the CPU share arithmetic, and what
model.dropout=0.0 switches off."""
import json
from pathlib import Path

import pytest
import torch

from d2v_engine.config import load_config
from d2v_engine.runtime.cpu_setup import omp_threads_from_user, rank_cpus
from d2v_engine.runtime.topology import Topology, parse_cpulist
from d2v_engine.errors import ConfigError
from d2v_engine.run.metrics import warn_data_wait
from d2v_engine.models import build_model
from d2v_engine.planning.plan import checkpoint_count
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter costs seconds a step


def _dry(modality, run_dir, *overrides):
    cfg = load_config(ROOT / f"configs/tiny_{modality}.yaml",
                      [f"run.dir={run_dir}", "train.progress=false", "train.dry_run=true",
                       *overrides])
    return train(cfg)


def test_dry_run_prints_and_writes_the_plan_without_training(tmp_path, capsys):
    out = _dry("audio", tmp_path, "train.global_batch=32", "train.micro_batch=8",
               "data.min_sample_size=8000", "optim.lr_reference_batch=16",
               "optim.lr_scaling=sqrt", "train.max_steps=100", "train.checkpoint_every=30")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert out["step"] == 0 and out["plan"] == plan
    assert (plan["world_size"], plan["ranks_per_node"], plan["nodes"]) == (1, 1, 1)
    assert (plan["global_batch"], plan["micro_batch"], plan["accumulation"]) == (32, 8, 4)
    assert plan["lr"] == pytest.approx(1e-3 * 2 ** 0.5)
    # Embedded audio: 360 train utterances; the ones below 8000 samples are filtered out.
    tsv = (ROOT / "data/audio/train.tsv").read_text().splitlines()[1:]
    sizes = [int(line.split("\t")[1]) for line in tsv]
    kept = [n for n in sizes if n >= 8000]
    assert plan["data"]["samples"] == len(kept) and plan["data"]["dropped_by_size"] == 360 - len(kept)
    assert plan["data"]["seconds"] == pytest.approx(sum(kept) / 16000)
    assert plan["steps_per_epoch"] == len(kept) // 32
    assert plan["checkpoints"] == 4 and plan["checkpoints_kept"] == 2  # 30, 60, 90, 100
    printed = capsys.readouterr().out
    assert "global batch 32 = 1 rank(s) x 4 accumulation step(s) x 8 micro-batch" in printed
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not list(tmp_path.glob("checkpoint_*"))


def test_dry_run_of_text_counts_tokens(tmp_path):
    plan = _dry("text", tmp_path)["plan"]
    tokens = (ROOT / "data/text/train.bin").stat().st_size // 2
    assert plan["data"]["tokens"] == tokens
    assert plan["data"]["samples"] == -(-tokens // 63)  # blocks of max_tokens - 1, then <s>
    assert plan["data"]["sample_break_mode"] == "none"


def test_real_runs_store_the_plan_too(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_image.yaml",
                      [f"run.dir={tmp_path}", "train.progress=false", "train.max_steps=1",
                       "train.global_batch=4"])
    train(cfg)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["global_batch"] == 4 and plan["data"]["samples"] == 1797


def test_filters_that_leave_nothing_name_the_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"data.min_sample_size.*100000.*0 of the 360.*longest"):
        _dry("audio", tmp_path, "data.min_sample_size=100000")


def test_global_batch_larger_than_the_filtered_data(tmp_path):
    with pytest.raises(ConfigError, match=r"train.global_batch.*400 .*360 samples"):
        _dry("audio", tmp_path, "train.global_batch=400")


def test_indivisible_global_batch_names_the_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"16 is not divisible by train.micro_batch \(5\) x "
                                          r"world size \(1\)"):
        _dry("audio", tmp_path, "train.micro_batch=5")


def test_configured_world_size_must_match_torchrun(tmp_path):
    with pytest.raises(ConfigError, match=r"train.world_size.*16.*1 rank"):
        _dry("image", tmp_path, "train.world_size=16")
    assert _dry("image", tmp_path, "train.world_size=1")["plan"]["world_size"] == 1


def test_checkpoint_count():
    assert checkpoint_count(100, 0) == 1
    assert checkpoint_count(100, 25) == 4
    assert checkpoint_count(100, 30) == 4
    assert checkpoint_count(10, 100) == 1


def test_model_dropout_zero_override_turns_off_every_random_source():
    cfg = load_config(ROOT / "configs/image_base.yaml")
    assert cfg.model.drop_path == 0.25 and cfg.model.attention_dropout == 0.05  # recipe kept
    cfg = load_config(ROOT / "configs/audio_base.yaml", ["model.dropout=0.0"])
    m = cfg.model
    assert (m.dropout, m.attention_dropout, m.activation_dropout, m.encoder_dropout_input,
            m.layerdrop, m.drop_path) == (0.0,) * 6
    tiny = load_config(ROOT / "configs/tiny_image.yaml", ["model.dropout=0.0"])
    encoder = build_model(tiny.model, "image").train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = encoder(x).x
    torch.manual_seed(2)
    assert torch.equal(a, encoder(x).x)


def test_cpu_share_arithmetic():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    cpus = list(range(8))
    assert [rank_cpus(cpus, r, 2).cpus for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [rank_cpus(cpus, r, 3).cpus for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [rank_cpus([0, 1], r, 4).cpus for r in range(4)] == [[0], [1], [0], [1]]
    topo = Topology(nodes={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]})
    assert [(p.cpus, p.node) for p in (rank_cpus(cpus, r, 4, topo) for r in range(4))] == [
        ([0, 1], 0), ([2, 3], 0), ([4, 5], 1), ([6, 7], 1)]
    one = rank_cpus(cpus, 0, 1, topo)
    assert (one.cpus, one.node) == (cpus, None)  # one rank spans the nodes
    flat = rank_cpus([4, 5, 6], 0, 2, topo)
    assert (flat.cpus, flat.node) == ([4], None)  # one usable node: a flat split


def test_who_set_omp_num_threads():
    assert not omp_threads_from_user(None, 8, {})
    assert omp_threads_from_user("4", 8, {})
    assert not omp_threads_from_user("1", 8, {"PATH": "/bin"})  # torchrun's default
    assert omp_threads_from_user("1", 8, {"OMP_NUM_THREADS": "1"})  # exported before torchrun
    assert not omp_threads_from_user("1", 8, None)
    assert omp_threads_from_user("1", 1, None)  # torchrun leaves a single process alone


def test_data_wait_warning(capsys):
    t = warn_data_wait({"step": 3, "data_wait_frac": 0.5}, -1e9)
    assert "50% of the step waits for the data loader" in capsys.readouterr().err
    assert warn_data_wait({"step": 4, "data_wait_frac": 0.6}, t) == t  # rate-limited
    assert warn_data_wait({"step": 5, "data_wait_frac": 0.1}, -1e9) == -1e9
    assert capsys.readouterr().err == ""
