"""The plan's peak memory per rank (d2v_engine.planning.memory), train.micro_batch=auto, the budget."""
import json
from pathlib import Path

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from d2v_engine.config import load_config
from d2v_engine.objective import build_objective
from d2v_engine.objective.ema import EMATeacher
from d2v_engine.errors import ConfigError
from d2v_engine.planning.memory import GB, MemoryModel, PeakTracker, candidates
from d2v_engine.models import build_model
from d2v_engine.objective.optim import build_optimizer
from d2v_engine.seeding import STREAM_MASK, sample_seeds
from d2v_engine.planning.shadow import forward, make_batch
from d2v_engine.run.trainer import train
from d2v_kernels import ops

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # masks and targets on the reference path: fast


def _dry(name, run_dir, *overrides):
    cfg = load_config(ROOT / f"configs/{name}.yaml",
                      [f"run.dir={run_dir}", "train.progress=false", "train.dry_run=true",
                       *overrides])
    return train(cfg)["plan"]


def test_candidates_are_multiples_of_8_or_below_8_dividing_the_share():
    assert candidates(2048) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert candidates(96) == [1, 2, 3, 4, 6, 8, 16, 24, 32, 48, 96]
    assert candidates(6) == [1, 2, 3, 6]
    assert candidates(2048, group=16) == [1, 2, 4, 8, 16]  # audio crop groups of 16 clips
    assert candidates(96, group=48) == [1, 2, 3, 4, 6, 8, 16, 24, 48]


def test_auto_keeps_a_micro_batch_inside_one_audio_crop_group(tmp_path):
    # Every micro-batch fits this budget, so without the crop groups auto would take all 16.
    plan = _dry("tiny_audio", tmp_path, "data.crop_group=4", "train.micro_batch=auto",
                "train.device_memory_gb=1000")
    assert (plan["micro_batch"], plan["accumulation"], plan["crop_group"]) == (4, 4, 4)
    assert "chose 4 of [1, 2, 4]" in plan["memory"]["auto"]
    assert "divide data.crop_group's 4" in plan["memory"]["auto"]


def test_peak_tracker_agrees_with_torch_mem_tracker():
    """Our tracker and torch's MemTracker on the same fake step: the same peak above the state
    that existed before (exact bytes, no rounding on either side)."""
    cfg = load_config(ROOT / "configs/tiny_image.yaml")
    mm = MemoryModel.build(cfg, "cpu", 1)
    sh = mm.shadow
    params = [p for p in sh.model.parameters() if p.requires_grad]

    batch = make_batch(sh, 8)  # real masks: made outside the fake mode

    def step():
        loss, out = forward(sh, batch)
        loss.backward()
        del loss, out
        mm.optimizer.step()
        sh.model.zero_grad(set_to_none=True)

    existing = (list(sh.model.parameters()) + list(sh.model.buffers())
                + list(sh.teacher.parameters()) + list(sh.teacher.buffers())
                + [t for st in mm.optimizer.state.values() for t in st.values()])
    with sh.mode():
        ours = PeakTracker(params, existing, block=1)
        with ours:
            step()
        # MemTracker hooks every parameter of the modules it sees, frozen ones too (it cannot
        # hook those): the teacher runs under no_grad, so marking it trainable changes nothing.
        sh.teacher.requires_grad_(True)
        theirs = MemTracker()
        theirs.track_external(sh.model, sh.teacher, mm.optimizer)
        before = sum(v["Total"] for v in theirs.get_tracker_snapshot().values())
        with theirs:
            step()
        peak = sum(v["Total"] for v in theirs.get_tracker_snapshot("peak").values())
        sh.teacher.requires_grad_(False)
    assert ours.peak == pytest.approx(peak - before, rel=0.01), (ours.peak, peak - before)


def test_estimate_matches_the_same_step_on_real_tensors(monkeypatch):
    """The fake step's peak equals the real objective's step on real CPU tensors (fp32), tracked
    the same way: the shadow creates the tensors the real step does."""
    cfg = load_config(ROOT / "configs/tiny_audio.yaml", ["model.dropout=0.0"])
    monkeypatch.setattr("d2v_engine.models.transformer.attention",
                        lambda q, k, v, key_padding_mask=None, attn_bias=None, dropout_p=0.0,
                        skip_padded_queries=False:
                        ops.attention(q, k, v, key_padding_mask, attn_bias, impl="math",
                                      skip_padded_queries=skip_padded_queries))
    micro = 8
    estimate = MemoryModel.build(cfg, "cpu", 1).measure(micro, 1)

    torch.manual_seed(0)
    encoder = build_model(cfg.model, "audio")
    model = build_objective(cfg, encoder).train()
    teacher = EMATeacher(encoder, encoder.feature_encoder_prefixes())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim, 1e-3, torch.device("cpu"))
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    existing = (list(model.parameters()) + list(model.buffers())
                + list(teacher.model.parameters()) + list(teacher.model.buffers())
                + [t for s in optimizer.state.values() for t in s.values()])
    static = sum(t.untyped_storage().nbytes() for t in existing)
    tracker = PeakTracker(params, existing)
    with tracker:
        source = torch.randn(micro, cfg.data.max_sample_size)
        seeds = sample_seeds(cfg.seed, 0, range(micro), STREAM_MASK)
        out = model({"source": source, "padding_mask": None}, teacher.model, seeds)
        out.loss_sum.backward()
        del out
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        optimizer.step()
    real = static + tracker.peak
    assert estimate["peak"] == pytest.approx(real, rel=0.05), (estimate, real)


def test_dry_run_prints_and_writes_flops_and_memory(tmp_path, capsys):
    plan = _dry("tiny_image_v2", tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    flops, memory = plan["flops"], plan["memory"]
    assert set(flops["per_sample"]) == {"teacher", "student", "head", "decoder", "total"}
    assert flops["per_sample"]["decoder"] > 0 and flops["per_sample"]["head"] == 0
    assert flops["per_step"]["total"] == flops["per_sample"]["total"] * plan["global_batch"]
    assert flops["tokens_per_sample"]["student"] == 4 * (flops["tokens_per_sample"]["student"] // 4)
    parts = ("params", "grads", "optimizer", "teacher", "activations", "loader")
    assert memory["peak"] == sum(memory[k] for k in parts) and memory["activations"] > 0
    assert memory["micro_batch"] == plan["micro_batch"] == 16
    printed = capsys.readouterr().out
    assert "FLOPs per image" in printed and "decoder fwd+bwd" in printed
    assert "memory per rank at micro-batch 16" in printed


def test_auto_picks_the_largest_fitting_micro_batch(tmp_path, capsys):
    # The torch loader: no DALI memory (test_dali_memory_is_planned_and_auto_leaves_room_for_it).
    cfg = load_config(ROOT / "configs/tiny_image.yaml", ["train.global_batch=64",
                                                          "data.loader=torch"])
    mm = MemoryModel.build(cfg, "cuda", 1)
    p8, p16 = mm.measure(8, 8)["peak"], mm.measure(16, 4)["peak"]
    budget_gb = (p8 + p16) / 2 / GB / 0.9  # 8 fits, 16 does not
    plan = _dry("tiny_image", tmp_path, "train.global_batch=64", "train.micro_batch=auto",
                f"train.device_memory_gb={budget_gb}", "data.loader=torch")
    assert (plan["micro_batch"], plan["accumulation"]) == (8, 8)
    assert plan["memory"]["peak"] == pytest.approx(p8)
    assert "chose 8 of [1, 2, 4, 8, 16, 32, 64]" in plan["memory"]["auto"]
    assert "16 needs" in plan["memory"]["auto"]
    assert "train.micro_batch=auto: chose 8" in capsys.readouterr().out


def test_a_micro_batch_over_budget_is_refused_naming_one_that_fits(tmp_path):
    with pytest.raises(ConfigError, match=r"train.micro_batch': 32 needs an estimated .* per rank "
                                          r"\(params .*activations .*\), more than "
                                          r"train.memory_fraction 0.9 x .* micro-batch \d+ fits"):
        _dry("tiny_image", tmp_path, "train.device_memory_gb=0.02")


def test_an_impossible_budget_is_refused_with_the_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"even micro-batch 1 needs an estimated [\d.]+ MB per "
                                          r"rank .* more than train.memory_fraction 0.9 x "
                                          r"0.1 MB = 0.1 MB"):
        _dry("tiny_image", tmp_path, "train.device_memory_gb=0.0001", "train.micro_batch=auto")


def test_auto_without_a_budget_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="auto needs a memory budget.*train.device_memory_gb"):
        _dry("tiny_image", tmp_path, "train.micro_batch=auto", "train.device=cpu")


def test_fsdp_shards_the_states():
    cfg = load_config(ROOT / "configs/tiny_text.yaml", ["train.distributed=fsdp"])
    one = MemoryModel.build(cfg, "cuda", 1).measure(4, 2)  # accumulation: gradients held
    four = MemoryModel.build(cfg, "cuda", 4).measure(4, 2)
    for key in ("optimizer",):
        assert four[key] == one[key] // 4
    for key in ("params", "grads", "teacher"):
        assert one[key] // 4 < four[key] < one[key]
    assert four["activations"] == one["activations"]


def test_precision_and_checkpointing_change_the_estimate():
    cfg = load_config(ROOT / "configs/tiny_text.yaml")
    fp32 = MemoryModel.build(cfg, "cpu", 1).measure(8, 1)
    bf16 = MemoryModel.build(cfg, "cuda", 1).measure(8, 1)
    assert bf16["activations"] < fp32["activations"]
    cfg = load_config(ROOT / "configs/tiny_text.yaml", ["model.activation_checkpointing=true"])
    ckpt = MemoryModel.build(cfg, "cuda", 1).measure(8, 1)
    assert ckpt["activations"] < bf16["activations"]
    assert ckpt["params"] == bf16["params"]


def test_image_base_dry_run_plans_without_data_or_gpu(tmp_path):
    plan = _dry("image_base", tmp_path, "train.max_steps=10")
    assert plan["data"]["found"] is False and plan["device"] == "cpu"
    s = plan["flops"]["per_sample"]
    assert 135e9 < s["total"] < 147e9  # ~140 GFLOP per image
    m = plan["memory"]
    assert m["precision"] == "bf16" and m["micro_batch"] == 128
    # ViT-B: 86M parameters in fp32, Adam's two moments, an fp32 teacher
    assert 0.33 * GB < m["params"] < 0.36 * GB and 0.66 * GB < m["optimizer"] < 0.72 * GB
    assert m["peak"] > m["activations"] > 1 * GB


def test_dali_memory_is_planned_and_auto_leaves_room_for_it(tmp_path):
    """DALI decoding on the GPU: its estimate (the data's own image size, from the headers) is a
    part of the peak, scales with the micro-batch, and a budget that fits 16 without it fits
    only 8 with it."""
    pytest.importorskip("nvidia.dali")
    from d2v_engine.data import build_dataset
    from d2v_engine.planning.memory import DALI_IN_FLIGHT, dali_bytes_per_sample, source_extent

    cfg = load_config(ROOT / "configs/tiny_image.yaml", ["train.global_batch=64"])
    extent = source_extent(build_dataset(cfg.data, "image"))
    assert extent == 32 * 32, extent  # the embedded digits are 32 x 32 JPEGs
    per_sample = dali_bytes_per_sample(cfg, extent)
    assert per_sample == 3 * 1024 + (2 * 12 * 1024 if any(cfg.data.color_jitter) else 0) \
        + 2 * 12 * cfg.data.img_size ** 2
    torch_plan = _dry("tiny_image", tmp_path / "t", "data.loader=torch")["memory"]
    dali_plan = _dry("tiny_image", tmp_path / "d", "data.loader=dali")["memory"]
    assert torch_plan["loader"] == 0
    assert dali_plan["loader"] == per_sample * dali_plan["micro_batch"] * DALI_IN_FLIGHT
    assert dali_plan["peak"] == torch_plan["peak"] + dali_plan["loader"]

    mm = MemoryModel.build(cfg, "cuda", 1, extent=extent)
    plain = MemoryModel.build(load_config(ROOT / "configs/tiny_image.yaml",
                                          ["train.global_batch=64", "data.loader=torch"]),
                              "cuda", 1)
    without, with_dali = plain.measure(16, 4)["peak"], mm.measure(16, 4)["peak"]
    assert with_dali - without == per_sample * 16 * DALI_IN_FLIGHT
    budget_gb = (without + with_dali) / 2 / GB / 0.9  # 16 fits without DALI's share, not with
    plan = _dry("tiny_image", tmp_path / "a", "train.global_batch=64", "train.micro_batch=auto",
                f"train.device_memory_gb={budget_gb}", "data.loader=dali")
    assert plan["micro_batch"] == 8, plan["memory"]["auto"]
