"""The fast path: custom ops under torch.compile, compiled == eager step, optimizer choice,
activation checkpointing, length buckets, FSDP2 on two gloo ranks, and the step benchmark."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v_engine.objective import optim
from d2v_engine.planning import buckets
from d2v_engine.config import load_config
from d2v_engine.errors import ConfigError
from d2v_engine.models import build_model
from d2v_kernels import attention as attn
from d2v_kernels import masking, ops, targets


@pytest.fixture(autouse=True)
def _sdpa_attention(monkeypatch):
    # The models here run under SDPA: the interpreted Triton attention has its own tests, and
    # would make each compiled or checkpointed model step here take minutes.
    monkeypatch.setenv("D2V_ATTENTION", "sdpa")

ROOT = Path(__file__).resolve().parent.parent


def _ops_inputs():
    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, 9, 16, generator=g) * (i + 1) + i for i in range(3)]
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    seeds = torch.randint(0, 2**62, (2,), generator=g)
    tokens = torch.randint(4, 50, (2, 12), generator=g)
    tokens[:, 0] = 0
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, 9, 9, generator=g)
    return layers, pad, seeds, tokens, (q, k, v, bias)


def _all_ops(layers, pad, seeds, tokens, q, k, v, bias):
    tgt = ops.teacher_targets(layers, pad, "instance", "layer")
    span = ops.span_mask((~pad).sum(1), 9, 0.5, 2, 1, seeds, True)
    block = ops.block_mask(2, (4, 4), 0.5, seeds, min_block=2)
    new, selected = ops.token_mask(tokens, 0.3, tokens == 0, 60, 64, seeds, span=2,
                                   random_exclude=(0, 1, 2, 3, 60))
    out = ops.attention(q, k, v, pad, bias, use_custom_op=True)
    return tgt, span, block, new, selected, out


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_custom_ops_compile_fullgraph_and_match_eager(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)  # "1": the Triton kernels inside the ops
    layers, pad, seeds, tokens, (q, k, v, bias) = _ops_inputs()
    torch._dynamo.reset()
    explain = torch._dynamo.explain(_all_ops)(layers, pad, seeds, tokens, q, k, v, bias)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(_all_ops, backend="aot_eager", fullgraph=True)
    got = compiled(layers, pad, seeds, tokens, q, k, v, bias)
    want = (targets.teacher_targets_reference(layers, pad, "instance", "layer"),
            masking.span_mask_reference((~pad).sum(1), 9, 0.5, 2, 1, seeds, True),
            masking.block_mask_reference(2, (4, 4), 0.5, seeds, min_block=2),
            *masking.token_mask_reference(tokens, 0.3, tokens == 0, 60, 64, seeds, span=2,
                                          random_exclude=(0, 1, 2, 3, 60)),
            attn.attention_reference(q, k, v, pad, bias))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(g, w)


def test_attention_custom_op_gradients_match_reference_with_empty_rows():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(2, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2] = True  # a fully padded sample: output and gradients 0, never NaN
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: ops.attention(q, k, v, pad[:2], b, use_custom_op=True),
        (q[:2].detach().requires_grad_(), k[:2].detach().requires_grad_(),
         v[:2].detach().requires_grad_(), bias))
    grad_out = torch.randn(3, 2, 7, 4, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: ops.attention(*a, use_custom_op=True), attn.attention_reference):
        out = fn(q, k, v, pad, bias)
        grads = torch.autograd.grad(out, (q, k, v, bias), grad_out)
        results.append((out, *grads))
    for a, b in zip(*results):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert results[0][0][2].abs().max() == 0


def test_registered_attention_kernel_is_called_through_the_custom_op():
    calls = []

    def forward(*args):
        calls.append("fwd")
        return ops.attention_forward_math(*args)

    def backward(*args):
        calls.append("bwd")
        return ops.attention_backward_math(*args)

    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    ops.register_attention_kernel(forward, backward)
    try:
        ops.attention(q, k, v).sum().backward()
    finally:
        ops.reset_attention_kernel()
    assert calls == ["fwd", "bwd"]
    calls.clear()
    ops.attention(q, k, v)  # default again: the traced SDPA path
    assert calls == []


def test_compiled_training_matches_eager_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from d2v_engine.run.trainer import train
    common = ["train.progress=false", "train.log_every=1", "train.max_steps=2",
              "train.checkpoint_every=0", "train.global_batch=4", "train.precision=fp32",
              "model.depth=2", "objective.top_k=2"]
    eager = train(load_config(ROOT / "configs/tiny_image.yaml",
                              [f"run.dir={tmp_path / 'eager'}", *common]))["losses"]
    torch._dynamo.reset()
    compiled = train(load_config(ROOT / "configs/tiny_image.yaml",
                                 [f"run.dir={tmp_path / 'compiled'}", *common, "train.compile=true",
                                  "train.compile_backend=aot_eager"]))["losses"]
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert a == pytest.approx(b, rel=1e-5), (eager, compiled)


def test_optimizer_selection(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = load_config(None, [])
    cpu = torch.device("cpu")
    assert optim.choose_impl("auto", cpu) == "foreach"
    assert optim.choose_impl("auto", torch.device("cuda")) in ("apex", "fused")
    for impl in ("foreach", "fused"):
        cfg.optim.impl = impl
        opt = optim.build_optimizer(model, cfg.optim, 1e-3, cpu)
        assert opt.impl == impl and isinstance(opt, torch.optim.AdamW)
        assert opt.defaults[impl] is True
        assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
        assert len(opt.param_groups[0]["params"]) == 1 and len(opt.param_groups[1]["params"]) == 3
    monkeypatch.setattr(optim, "detect", lambda: {"apex": None})
    with pytest.raises(ConfigError, match="optim.impl"):
        optim.choose_impl("apex", cpu)
    monkeypatch.setattr(optim, "detect", lambda: {"apex": "0.1"})
    assert optim.choose_impl("auto", torch.device("cuda")) == "apex"
    assert optim.choose_impl("auto", cpu) == "foreach"
    with pytest.raises(ConfigError, match="CUDA"):
        optim.choose_impl("apex", cpu)
    with pytest.raises(ConfigError, match="optim.impl"):
        load_config(None, ["optim.impl=adam8bit"])


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_activation_checkpointing_gives_equal_gradients(modality):
    overrides = ["model.dropout=0.1", "model.attention_dropout=0.1"]
    if modality == "image":
        overrides.append("model.drop_path=0.2")
    cfg = load_config(ROOT / f"configs/tiny_{modality}.yaml", overrides)
    g = torch.Generator().manual_seed(0)
    source = (torch.randn(3, 3, 32, 32, generator=g) if modality == "image"
              else torch.randn(3, 4000, generator=g))
    grads = []
    for checkpointing in (False, True):
        cfg.model.activation_checkpointing = checkpointing
        torch.manual_seed(0)
        model = build_model(cfg.model, modality).train()
        torch.manual_seed(1)
        out = model(source).x
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_bucket_sizes_floor_ceil_and_batch():
    sizes = buckets.bucket_sizes(320000, 16, 32000, 320)
    assert sizes == sorted(set(sizes)) and len(sizes) <= 16 and sizes[-1] == 320000
    assert sizes[0] >= 32000 - 320 and all(s % 320 == 0 for s in sizes)
    ratio = max(b / a for a, b in zip(sizes, sizes[1:]))
    assert ratio < 1.2
    for length in range(sizes[0], 320001, 997):
        lo, hi = buckets.bucket_floor(length, sizes), buckets.bucket_ceil(length, sizes)
        assert lo <= length <= hi and lo in sizes and hi in sizes
        assert length / lo <= ratio + 1e-9
    assert buckets.bucket_floor(10, sizes) == 10 and buckets.bucket_ceil(10**6, sizes) == 10**6
    assert len({buckets.bucket_floor(n, sizes) for n in range(32000, 320001, 7)}) <= 16
    with pytest.raises(ValueError):
        buckets.bucket_sizes(0)

    wave = torch.randn(2, 1000)
    cropped = buckets.bucket_batch({"source": wave, "padding_mask": None, "position": 7}, [600, 900])
    assert torch.equal(cropped["source"], wave[:, :900]) and cropped["position"] == 7
    ids = torch.randint(4, 9, (2, 21))
    pad = torch.zeros(2, 21, dtype=torch.bool)
    padded = buckets.bucket_batch({"source": ids, "padding_mask": pad}, [16, 24, 32], pad_value=1)
    assert padded["source"].shape == (2, 24) and torch.equal(padded["source"][:, :21], ids)
    assert (padded["source"][:, 21:] == 1).all() and padded["padding_mask"][:, 21:].all()
    assert not padded["padding_mask"][:, :21].any()

    cfg = load_config(ROOT / "configs/tiny_text.yaml", [])
    assert buckets.buckets_for(cfg)[-1] == cfg.data.max_tokens
    assert buckets.buckets_for(load_config(ROOT / "configs/tiny_image.yaml", [])) == []


def test_text_padding_to_a_bucket_keeps_the_loss(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from d2v_engine.objective.data2vec import Data2Vec
    from d2v_engine.objective.ema import EMATeacher
    cfg = load_config(ROOT / "configs/tiny_text.yaml", [])
    torch.manual_seed(0)
    encoder = build_model(cfg.model, "text")
    ids = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": cfg.model.vocab_size - 1}
    model = Data2Vec(cfg, encoder, ids).eval()
    teacher = EMATeacher(encoder)
    source = torch.randint(4, 100, (3, 21))
    source[:, 0], source[:, -1] = 0, 2
    batch = {"source": source, "padding_mask": torch.zeros(3, 21, dtype=torch.bool)}
    seeds = torch.tensor([11, 12, 13])
    a = model(batch, teacher.model, seeds)
    b = model(buckets.bucket_batch(batch, [16, 24, 32], pad_value=1), teacher.model, seeds)
    assert a.masked == b.masked and a.masked > 0
    assert a.loss_sum.item() == pytest.approx(b.loss_sum.item(), rel=1e-5)


def _metrics(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fsdp_two_gloo_ranks_follow_the_one_rank_trajectory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
           "PYTHONPATH": str(ROOT)}
    common = ["-m", "d2v_engine.cli.train", "configs/tiny_image.yaml", "train.progress=false",
              "train.log_every=1", "train.max_steps=3", "train.global_batch=8",
              "train.micro_batch=4", "model.drop_path=0.0", "data.augment=false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29547"]
    r = subprocess.run([*torchrun, *common, f"run.dir={tmp_path / 'fsdp'}",
                        "train.distributed=fsdp", "train.checkpoint_every=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, *common, f"run.dir={tmp_path / 'one'}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    fsdp, one = _metrics(tmp_path / "fsdp"), _metrics(tmp_path / "one")
    assert len(fsdp) == len(one) == 3
    for a, b in zip(fsdp, one):
        assert a == pytest.approx(b, rel=1e-5), (fsdp, one)
    # The checkpoint holds full (unsharded) tensors: loadable without FSDP.
    state = torch.load(tmp_path / "fsdp" / "checkpoint_00000002.pt", weights_only=True)
    one_state = torch.load(tmp_path / "one" / "checkpoint_00000003.pt", weights_only=True)
    assert state["model"].keys() == one_state["model"].keys()
    for name, value in state["model"].items():
        assert type(value) is torch.Tensor and value.shape == one_state["model"][name].shape


def test_bench_step_tiny_writes_valid_records(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from benchmarks import bench_step, common
    path = tmp_path / "step.json"
    bench_step.main(["--tiny", "--modalities", "text", "--steps", "1",
                     "--compile-backend", "eager", "--json", str(path)])
    data = json.loads(path.read_text())
    for key in ("device", "torch", "copy_gbps", "matmul_tflops", "commit", "records"):
        assert key in data
    assert data["copy_gbps"] > 0 and data["matmul_tflops"] > 0
    records = data["records"]
    units = {(r["bench"], r["peer"], r["unit"]) for r in records}
    assert ("step/text", "plain", "samples/s") in units
    assert ("step/text", None, "samples/s") in units, "ours' row of its own (emitted first)"
    assert ("step/text", "sdpa_compile", "tokens/s") in units
    assert {r["bench"] for r in records} >= {f"step_phase/text/{p}" for p in bench_step.PHASES}
    for r in records:
        assert tuple(r) == common.RECORD_KEYS
        assert r["device"] == "cpu" and r["ours"] > 0 and math.isfinite(r["ours"])
        if r["unit"] == "samples/s":
            assert 0 < r["fraction_of_peak"] < 1
            if r["peer"] is not None:
                assert r["ratio"] == pytest.approx(r["ours"] / r["peer_value"])
    cfg = bench_step.load_case(bench_step.TINY["text"])
    c, f, t, b = cfg.model.embed_dim, cfg.model.ffn_dim, 64, 8
    blocks = b * cfg.model.depth * (2 * t * (4 * c * c + 2 * c * f) + 4 * t * t * c)
    head = 2 * b * t * cfg.masking.mask_prob * (c * 2 * c + 2 * c * c)
    assert bench_step.step_flops(cfg, bench_step.TINY["text"]) == pytest.approx(4 * blocks + 3 * head)
