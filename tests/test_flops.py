"""The plan's FLOP count (d2v_engine.planning.flops, d2v_engine.planning.shadow) and the MFU fields of the logs."""
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from d2v_engine.config import load_config
from d2v_engine.objective import build_objective
from d2v_engine.objective.ema import EMATeacher
from d2v_engine.planning.flops import (
    COUNTER_FORMULAS, PHASES, count_at_depth, count_flops, count_sample, device_peak, peak_tflops,
)
from d2v_engine.run.metrics import _scalars
from d2v_engine.models import build_model
from d2v_engine.seeding import STREAM_MASK, sample_seeds
from d2v_engine.planning.shadow import build_shadow, random_text
from d2v_engine.run.trainer import train
from d2v_kernels import ops

ROOT = Path(__file__).resolve().parent.parent
TINY = ["image", "audio", "text", "image_v2", "audio_v2", "text_v2"]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # masks and targets on the reference path: fast


def _analytic_vit(depth, dim, tokens, patch_in, ffn_ratio=4):
    """FLOPs of one data2vec v1 image step by hand: 2 per multiply-add; attention 4 T^2 C
    forward, 2.5x backward; linear layers 2x forward in backward; patch conv weight grad only."""
    linear = 2 * tokens * (4 * dim * dim + 2 * ffn_ratio * dim * dim)  # q k v o, fc1 fc2
    attention = 4 * tokens * tokens * dim
    teacher = depth * (linear + attention)
    patches = tokens - 1
    patch_embed = 2 * patches * patch_in * dim
    student = depth * (3 * linear + 3.5 * attention) + 2 * patch_embed
    # The head runs on every patch (the loss zeroes the unmasked ones; no data-dependent gather).
    head = 3 * 2 * patches * dim * dim
    return teacher, student, head


def test_vit_b16_v1_flops_match_an_independent_count():
    cfg = load_config(ROOT / "configs/image_base.yaml")
    info, _ = count_flops(cfg)
    s = info["per_sample"]
    teacher, student, head = _analytic_vit(12, 768, 197, 3 * 16 * 16)
    assert s["teacher"] == pytest.approx(teacher, rel=0.01), s
    assert s["student"] == pytest.approx(student, rel=0.01), s
    assert s["head"] == pytest.approx(head, rel=0.1), s
    assert s["total"] == pytest.approx(teacher + student + head, rel=0.1)
    # the scale: ~35 GFLOP teacher forward + ~105 student forward and backward
    assert 33e9 < s["teacher"] < 37e9 and 100e9 < s["student"] < 110e9
    assert info["tokens_per_sample"] == {"teacher": 197, "student": 197}


def _real_flops(cfg, samples=1):
    """FLOPs of the real objective's forward + backward on real CPU tensors, attention through the
    d2v op pair (math) so that it is counted by the same formula."""
    torch.manual_seed(0)
    encoder = build_model(cfg.model, cfg.modality)
    ids = None
    if cfg.modality == "text":
        ids = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": cfg.model.vocab_size - 1}
    model = build_objective(cfg, encoder, ids).train()
    teacher = EMATeacher(encoder)
    seeds = sample_seeds(cfg.seed, 0, range(samples), STREAM_MASK)
    if cfg.modality == "image":
        source = torch.randn(samples, 3, cfg.model.img_size, cfg.model.img_size)
    elif cfg.modality == "audio":
        source = torch.randn(samples, cfg.data.max_sample_size)
    else:
        source = random_text(cfg, ids, samples, cfg.data.max_tokens)
    pad = torch.zeros_like(source, dtype=torch.bool) if cfg.modality == "text" else None
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FORMULAS) as counter:
        out = model({"source": source, "padding_mask": pad}, teacher.model, seeds)
        out.loss_sum.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", TINY)
def test_counted_flops_equal_the_real_objective_on_real_tensors(name, monkeypatch):
    cfg = load_config(ROOT / f"configs/tiny_{name}.yaml", ["model.dropout=0.0"])
    monkeypatch.setattr("d2v_engine.models.transformer.attention",
                        lambda q, k, v, key_padding_mask=None, attn_bias=None, dropout_p=0.0,
                        skip_padded_queries=False:
                        ops.attention(q, k, v, key_padding_mask, attn_bias, impl="math",
                                      skip_padded_queries=skip_padded_queries))
    real = _real_flops(cfg)
    counted = count_sample(build_shadow(cfg, fake=False))
    assert sum(counted[p] for p in PHASES) == real, (counted, real)


def test_depth_extrapolation_is_exact():
    cfg = load_config(ROOT / "configs/tiny_image.yaml", ["model.depth=5"])
    direct = count_sample(build_shadow(cfg, fake=False))
    extrapolated = count_at_depth(cfg)
    assert {p: extrapolated[p] for p in PHASES} == {p: direct[p] for p in PHASES}


def test_length_model_passes_through_the_counts_and_interpolates():
    cfg = load_config(ROOT / "configs/tiny_audio.yaml")
    info, model = count_flops(cfg)
    assert sum(model.sample_flops().values()) == pytest.approx(info["per_sample"]["total"])
    length = 12000  # between the fitted 8000 and 16000
    direct = count_sample(build_shadow(cfg, fake=False), length)
    frames = model.batch_tokens((1, length))[1]
    assert sum(model.sample_flops(frames).values()) == pytest.approx(
        sum(direct[p] for p in PHASES), rel=0.01)
    flops, tokens = model.batch_flops((3, length))
    assert tokens == 3 * frames
    assert flops == pytest.approx(3 * sum(model.sample_flops(frames).values()))


def test_attention_op_pair_counts_flash_attention_convention():
    b, h, tq, tk, d = 2, 3, 5, 7, 8
    q = torch.randn(b, h, tq, d, requires_grad=True)
    k, v = torch.randn(b, h, tk, d), torch.randn(b, h, tk, d)
    with FlopCounterMode(display=False) as fwd:
        out = ops.attention(q, k, v, impl="math")
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    assert fwd.get_total_flops() == 4 * b * h * tq * tk * d
    assert bwd.get_total_flops() == 10 * b * h * tq * tk * d  # 2.5x


def test_grouped_conv_backward_counts_one_forward_per_gradient():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=8)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FORMULAS) as fwd:
        y = conv(x)
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FORMULAS) as bwd:
        y.sum().backward()
    assert fwd.get_total_flops() == 2 * 2 * 36 * 32 * (32 // 8) * 9
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.1
    assert peak_tflops("Some Future GPU") is None
    cfg = load_config(ROOT / "configs/tiny_image.yaml")
    assert device_peak(cfg, torch.device("cpu"))[1] is None
    cfg = load_config(ROOT / "configs/tiny_image.yaml", ["train.peak_tflops=100"])
    name, tflops = device_peak(cfg, torch.device("cpu"))
    assert tflops == 100.0 and "train.peak_tflops" in name


def test_metrics_rows_hold_tflops_mfu_and_tokens(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_image.yaml",
                      [f"run.dir={tmp_path}", "train.progress=false", "train.max_steps=2",
                       "train.log_every=1", "train.global_batch=4", "train.peak_tflops=0.5"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]
    plan = json.loads((tmp_path / "plan.json").read_text())
    per_sample = plan["flops"]["per_sample"]["total"]
    assert len(rows) == 2
    for r in rows:
        assert r["tflops_per_gpu"] > 0 and r["tokens_per_s"] > 0
        # one sample's FLOPs and tokens at the logged sample rate
        assert r["tflops_per_gpu"] == pytest.approx(per_sample * r["samples_per_s"] / 1e12,
                                                    rel=1e-3)
        assert r["tokens_per_s"] == pytest.approx(65 * r["samples_per_s"], rel=1e-3)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 0.5)
        assert {"tflops_per_gpu", "mfu", "tokens_per_s"} <= set(_scalars(r))  # TensorBoard


def test_mfu_is_null_without_a_known_peak(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_image.yaml",
                      [f"run.dir={tmp_path}", "train.progress=false", "train.max_steps=1",
                       "train.global_batch=4"])
    train(cfg)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["mfu"] is None and row["tflops_per_gpu"] > 0
    assert "mfu" not in _scalars(row)
