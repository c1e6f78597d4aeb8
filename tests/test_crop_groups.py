"""Audio crops and masks do not depend on how the global batch is split (d2v_engine.data.audio's crop
groups): 1 rank x micro 16, 1 rank x micro 8 x accumulation 2 and 2 ranks x micro 8 read the same
clips, crop them alike, mask them alike and follow the same losses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v_engine.config import DataConfig, MaskingConfig, load_config
from d2v_engine.data import build_dataset
from d2v_engine.data.dali_common import dali_available
from d2v_engine.data.loader import BatchPlan
from d2v_engine.data.select import build_loader
from d2v_engine.objective.step import group_mask_count
from d2v_engine.errors import ConfigError
from d2v_engine.seeding import STREAM_MASK, sample_seeds
from d2v_engine.run.trainer import train
from d2v_kernels.masking import span_mask

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "data/audio/train.tsv"
SPLITS = [(1, 16), (1, 8), (2, 8), (4, 2)]  # (ranks, micro-batch) of a global batch of 16
LOADERS = ["torch"] + (["dali"] if dali_available() else [])


def _rows_by_position(kind, ranks, micro, group, steps=2, seed=5):
    """{(step, position): cropped clip} over every rank's micro-batches of a global batch of 16."""
    cfg = DataConfig(path=str(AUDIO), max_sample_size=16000, min_sample_size=4000,
                     crop_group=group)
    ds = build_dataset(cfg, "audio")
    rows, lengths = {}, {}
    for rank in range(ranks):
        plan = BatchPlan.make(16, micro, ranks)
        for batch in build_loader(ds, cfg, "audio", plan, rank, seed, 0, steps, kind=kind):
            for pos, row in zip(batch["position"].tolist(), batch["source"]):
                rows[(batch["step"], pos)] = row
                lengths.setdefault((batch["step"], pos // (group or 16)), set()).add(row.numel())
    return rows, lengths


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("group", [0, 8])
def test_every_split_of_the_global_batch_crops_each_clip_alike(kind, group):
    ref, ref_lengths = _rows_by_position(kind, 1, group or 16, group)
    assert len(ref) == 32 and all(len(v) == 1 for v in ref_lengths.values()), \
        "one crop length per group"
    if group:  # two groups of one step: cropped to their own shortest clips
        assert len({next(iter(v)) for (step, _), v in ref_lengths.items() if step == 0}) == 2
    for ranks, micro in SPLITS:
        if group and group % micro or micro == (group or 16):
            continue
        rows, _ = _rows_by_position(kind, ranks, micro, group)
        assert rows.keys() == ref.keys()
        for key, row in rows.items():
            assert torch.equal(row, ref[key]), f"{ranks} ranks x micro {micro}: clip {key} differs"


@pytest.mark.skipif(not dali_available(), reason="needs nvidia.dali")
def test_dali_and_torch_loaders_crop_a_split_batch_alike():
    dali, _ = _rows_by_position("dali", 2, 8, 16)
    plain, _ = _rows_by_position("torch", 2, 8, 16)
    assert dali.keys() == plain.keys()
    assert max((dali[k] - plain[k]).abs().max().item() for k in dali) < 1e-4


def test_rows_of_a_split_group_keep_the_groups_masked_count():
    m = MaskingConfig(mask_prob=0.65, mask_length=5, min_masks=1, require_same_masks=True)
    seeds = sample_seeds(3, 7, list(range(16)), STREAM_MASK)
    frames = torch.full((16,), 49, dtype=torch.long)
    whole = span_mask(frames, 49, m.mask_prob, m.mask_length, m.min_masks, seed=seeds,
                      require_same_masks=True)
    assert len(set(whole.sum(1).tolist())) == 1
    same = group_mask_count(seeds, 49, m)
    for half in (slice(0, 8), slice(8, 16)):
        part = span_mask(frames[half], 49, m.mask_prob, m.mask_length, m.min_masks,
                         seed=seeds[half], require_same_masks=True, same_count=same)
        assert torch.equal(part, whole[half]), "a micro-batch's masks differ from its group's"


def test_a_micro_batch_straddling_two_crop_groups_is_a_config_error(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_audio.yaml",
                      [f"run.dir={tmp_path}", "data.crop_group=8", "train.micro_batch=16",
                       "train.dry_run=true", "train.progress=false"])
    with pytest.raises(ConfigError, match=r"data.crop_group.*train.micro_batch=16 must divide 8"):
        train(cfg)
    cfg = load_config(ROOT / "configs/tiny_audio.yaml",
                      [f"run.dir={tmp_path}", "data.crop_group=6", "train.dry_run=true"])
    with pytest.raises(ConfigError, match=r"data.crop_group': 6 does not divide "
                                          r"train.global_batch=16"):
        train(cfg)


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_one_rank_micro_16_micro_8_x_2_and_two_ranks_x_8_follow_the_same_losses(tmp_path,
                                                                                 monkeypatch):
    # model.dropout=0.0: no random source left in the model; the crops stay random (augment).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    common = ["train.max_steps=3", "model.dropout=0.0", "train.progress=false",
              "train.log_every=1", "run.tensorboard=false", "train.checkpoint_every=0"]
    config = ROOT / "configs/tiny_audio.yaml"
    one = train(load_config(config, [f"run.dir={tmp_path / 'a'}", "train.micro_batch=16",
                                     *common]))["losses"]
    accum = train(load_config(config, [f"run.dir={tmp_path / 'b'}", "train.micro_batch=8",
                                       *common]))["losses"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29551", "-m", "d2v_engine.cli.train", str(config),
                        f"run.dir={tmp_path / 'c'}", "train.micro_batch=8", *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = _losses(tmp_path / "c")
    plans = [json.loads((tmp_path / d / "plan.json").read_text()) for d in "abc"]
    assert [(p["world_size"], p["accumulation"], p["micro_batch"]) for p in plans] == \
        [(1, 1, 16), (1, 2, 8), (2, 1, 8)]
    print(f"\n1 x 16: {one}\n1 x 8 x 2: {accum}\n2 x 8: {two}")
    assert len(one) == len(accum) == len(two) == 3
    for a, b, c in zip(one, accum, two):
        assert b == pytest.approx(a, rel=1e-5) and c == pytest.approx(a, rel=1e-5), \
            f"1 x 16 {one} / 1 x 8 x 2 {accum} / 2 x 8 {two}"
