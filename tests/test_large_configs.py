"""The large recipes: each dry-runs with its real shapes (the plan holds FLOPs and memory) and
trains 2 steps shrunk to CPU size."""
import json
from pathlib import Path

import pytest

from d2v_engine.config import load_config
from d2v_engine.planning.memory import GB
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
LARGE = ["image_large", "image_large_v2", "audio_large", "audio_large_v2", "text_large_v2"]

# The same recipe at CPU size: 4 blocks of width 64 on the embedded data.
SHRINK = ["model.embed_dim=64", "model.depth=4", "model.num_heads=4", "model.ffn_dim=128",
          "objective.top_k=3", "train.global_batch=4", "train.micro_batch=2",
          "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=0",
          "train.progress=false", "optim.warmup_steps=1", "data.num_workers=0"]
SHRINK_MODALITY = {
    "image": ["model.img_size=32", "model.patch_size=4", "data.img_size=32",
              "data.path=data/images/digits", "masking.min_block=4"],
    "audio": ["model.conv_layers=[[64,10,5],[64,3,2],[64,3,2],[64,2,2]]", "model.conv_pos=16",
              "model.conv_pos_groups=4", "model.conv_pos_depth=2", "data.path=data/audio/train.tsv",
              "data.max_sample_size=16000", "data.min_sample_size=4000", "masking.mask_length=5"],
    "text": ["data.path=data/text", "data.max_tokens=64", "model.vocab_size=4096",
             "model.max_positions=128"],
}
SHRINK_V2 = ["objective.decoder_dim=32", "objective.clone_batch=2"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # masks and targets on the reference path: fast


@pytest.mark.parametrize("name", LARGE)
def test_large_config_dry_runs_with_real_shapes(name, tmp_path):
    cfg = load_config(ROOT / f"configs/{name}.yaml",
                      [f"run.dir={tmp_path}", "train.progress=false", "train.dry_run=true"])
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads) == (24, 1024, 16)
    plan = train(cfg)["plan"]
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    flops, memory = plan["flops"], plan["memory"]
    tokens = flops["tokens_per_sample"]["teacher"]
    # The teacher's forward at least does the 24 blocks' matmuls: 24 * 24 * T * C^2.
    assert flops["per_sample"]["teacher"] > 24 * 24 * tokens * 1024 ** 2
    assert flops["per_sample"]["student"] > 2 * flops["per_sample"]["teacher"] * (
        flops["tokens_per_sample"]["student"] / tokens) * 0.9
    # ~300M parameters: fp32 weights 1.2 GB, Adam's moments twice that
    assert 1.1 * GB < memory["params"] < 1.7 * GB
    assert memory["optimizer"] == pytest.approx(2 * memory["params"], rel=0.05)
    assert memory["activations"] > 0 and memory["micro_batch"] == cfg.train.micro_batch


@pytest.mark.parametrize("name", LARGE)
def test_large_config_trains_two_steps_shrunk(name, tmp_path):
    cfg = load_config(ROOT / f"configs/{name}.yaml")
    overrides = [f"run.dir={tmp_path}", *SHRINK, *SHRINK_MODALITY[cfg.modality]]
    if cfg.objective.mode == "v2":
        overrides += SHRINK_V2
    if cfg.objective.mode == "v2" and cfg.modality == "text":
        overrides.append("objective.decoder_groups=1")
    elif cfg.objective.mode == "v2":
        overrides.append("objective.decoder_groups=4")
    cfg = load_config(ROOT / f"configs/{name}.yaml", overrides)
    out = train(cfg)
    assert out["step"] == 2 and len(out["losses"]) == 2
    assert all(loss == loss and loss < float("inf") for loss in out["losses"])
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tflops_per_gpu"] > 0 for r in rows if "event" not in r)
