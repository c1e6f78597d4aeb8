"""data2vec 2.0 mode: visible-only student, conv decoder, clone masks, v2 masking, end to end."""
import json
import math
from pathlib import Path

import pytest
import torch

from d2v_engine.config import load_config
from d2v_engine.objective import Data2Vec, build_objective
from d2v_engine.objective.data2vec_v2 import Data2VecV2
from d2v_engine.objective.ema import EMATeacher
from d2v_engine.errors import ConfigError
from d2v_engine.models import build_model
from d2v_engine.models.decoder import ConvDecoder
from d2v_engine.models.visible import encode_visible, gather_tokens, keep_indices, scatter_tokens
from d2v_engine.run.trainer import train
from d2v_kernels.masking import block_mask, clone_seeds, random_mask
from d2v_kernels.targets import teacher_targets

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ["image", "audio", "text"]
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # As tests/test_train.py: the interpreter costs seconds per step; kernels have their own tests.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny shapes: a second intra-op thread buys nothing and costs a lot on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(modality, *overrides):
    return load_config(ROOT / f"configs/tiny_{modality}_v2.yaml", list(overrides))


def _batch(modality, cfg, batch=3, pad=True):
    g = torch.Generator().manual_seed(7)
    if modality == "image":
        s = cfg.model.img_size
        return {"source": torch.randn(batch, 3, s, s, generator=g), "padding_mask": None}
    if modality == "audio":
        source = torch.randn(batch, 3000, generator=g)
        padding = torch.zeros(batch, 3000, dtype=torch.bool)
        if pad:
            padding[0, 2200:] = True
            source[0, 2200:] = 0
        return {"source": source, "padding_mask": padding if pad else None}
    source = torch.randint(5, cfg.model.vocab_size, (batch, 40), generator=g)
    source[:, 0], source[:, -1] = SPECIAL["bos"], SPECIAL["eos"]
    if pad:
        source[1, 30:] = SPECIAL["pad"]
        source[1, 29] = SPECIAL["eos"]
    return {"source": source, "padding_mask": source.eq(SPECIAL["pad"])}


def _model(modality, *overrides):
    cfg = _cfg(modality, *overrides)
    torch.manual_seed(0)
    encoder = build_model(cfg.model, modality)
    return cfg, Data2VecV2(cfg, encoder, SPECIAL if modality == "text" else None)


# --------------------------------------------------------------------------------------------
# The gather/scatter check: visible-only == full length with masked tokens out of attention


@pytest.mark.parametrize("modality,overrides", [
    ("image", ["model.rel_pos_bias=false"]),
    ("image", ["model.rel_pos_bias=true"]),
    ("audio", []),
    ("text", []),
])
def test_visible_only_student_equals_full_sequence_without_masked_keys(modality, overrides):
    cfg, model = _model(modality, *overrides, "model.layerdrop=0.0")
    model.eval()  # dropout off
    enc = model.encoder
    if getattr(enc, "rel_pos_bias", None) is not None:  # it starts at zero: make it matter
        torch.nn.init.normal_(enc.rel_pos_bias.table)
    batch = _batch(modality, cfg)
    seeds = torch.tensor([11, 12, 13], dtype=torch.int64)
    with torch.no_grad():
        x, pad = enc.embed(batch["source"], batch["padding_mask"])
        x = x.repeat_interleave(2, 0)
        pad = None if pad is None else pad.repeat_interleave(2, 0)
        mask = model.make_masks(clone_seeds(seeds, 2), pad, x.shape[1])
        keep = keep_indices(mask)
        fast = encode_visible(enc, x, pad, mask, keep, return_layers=True)
        full = encode_visible(enc, x, pad, mask, None, return_layers=True)
    e = enc.num_extra_tokens
    assert fast.x.shape == (x.shape[0], e + keep.shape[1], x.shape[2])
    assert keep.shape[1] < x.shape[1]
    want = gather_tokens(full.x[:, e:], keep)
    torch.testing.assert_close(fast.x[:, e:], want, rtol=1e-5, atol=1e-5)
    if e:
        torch.testing.assert_close(fast.x[:, :e], full.x[:, :e], rtol=1e-5, atol=1e-5)
    for got, ref in zip(fast.block_results, full.block_results):
        torch.testing.assert_close(got[:, e:], gather_tokens(ref[:, e:], keep), rtol=1e-5, atol=1e-5)
    if pad is not None:
        assert torch.equal(fast.padding_mask, gather_tokens(pad, keep))


def test_keep_indices_and_scatter_invert_each_other():
    mask = torch.tensor([[True, False, True, False, False], [False, False, True, True, False]])
    keep = keep_indices(mask)
    assert keep.tolist() == [[1, 3, 4], [0, 1, 4]]
    x = torch.randn(2, 5, 3)
    fill = torch.full((2, 5, 3), float("nan"))
    back = scatter_tokens(gather_tokens(x, keep), keep, fill)
    assert torch.equal(back[~mask], x[~mask]) and back[mask].isnan().all()
    with pytest.raises(ValueError, match="same masked count"):
        keep_indices(torch.tensor([[True, False], [False, False]]))


# --------------------------------------------------------------------------------------------
# The objective


@pytest.mark.parametrize("modality", MODALITIES)
def test_gradients_reach_decoder_and_encoder(modality):
    cfg, model = _model(modality)
    teacher = EMATeacher(model.encoder).model
    out = model(_batch(modality, cfg), teacher, torch.tensor([5, 6, 7], dtype=torch.int64))
    assert torch.isfinite(out.loss_sum) and out.masked > 0
    assert out.pred.shape == out.target.shape == (int(out.masked), cfg.model.embed_dim)
    out.loss_sum.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in ("decoder.blocks.0.", "decoder.proj", "encoder.blocks.blocks.0.",
                   f"encoder.blocks.blocks.{cfg.model.depth - 1}."):
        hit = [g for n, g in grads.items() if n.startswith(prefix)]
        assert hit and all(g is not None and g.abs().sum() > 0 for g in hit), prefix
    if modality == "image":  # the CLS loss trains the CLS token
        assert grads["encoder.cls_token"].abs().sum() > 0
    if hasattr(model.encoder, "mask_emb"):  # unused in v2: frozen, out of the optimizer
        assert not model.encoder.mask_emb.requires_grad


def test_loss_is_the_reference_l2_over_masked_positions_of_all_clones():
    cfg, model = _model("text", "objective.decoder_input_dropout=0.0")
    model.eval()
    teacher = EMATeacher(model.encoder).model
    batch, seeds = _batch("text", cfg, pad=False), torch.tensor([1, 2, 3], dtype=torch.int64)
    out = model(batch, teacher, seeds)
    # loss_scale 1 in the text config; L2 summed over channels and masked positions.
    assert torch.allclose(out.loss_sum, ((out.pred - out.target) ** 2).sum(), rtol=1e-5)
    # the targets: one teacher pass per sample, shared by its clones, at each clone's masked steps
    o, m = cfg.objective, cfg.objective.clone_batch
    with torch.no_grad():
        t_out = teacher(batch["source"], batch["padding_mask"], return_layers=True)
        want = teacher_targets(t_out.layer_results[-o.top_k:], batch["padding_mask"],
                               layer_norm="instance", final_norm="none")
    mask = model.make_masks(clone_seeds(seeds, m), None, 40)
    torch.testing.assert_close(out.target, want.repeat_interleave(m, 0)[mask])
    t = 40
    per_row = t - int(t * (1 - cfg.masking.mask_prob))
    assert int(out.masked) == 3 * cfg.objective.clone_batch * per_row


def test_clone_masks_are_distinct_and_have_equal_counts():
    cfg, model = _model("image")
    seeds = clone_seeds(torch.tensor([3, 4], dtype=torch.int64), 4)
    assert seeds.shape == (8,) and len(set(seeds.tolist())) == 8
    assert torch.equal(seeds, clone_seeds(torch.tensor([3, 4], dtype=torch.int64), 4))
    assert torch.equal(seeds[4:], clone_seeds(torch.tensor([4], dtype=torch.int64), 4))
    mask = model.make_masks(seeds, None, 64)
    assert len({tuple(r.tolist()) for r in mask}) == 8
    assert mask.sum(1).tolist() == [round(0.8 * 64)] * 8


def test_audio_clone_masks_same_count_with_padding():
    cfg, model = _model("audio")
    pad = torch.zeros(8, 50, dtype=torch.bool)
    pad[:4, 40:] = True
    mask = model.make_masks(clone_seeds(torch.tensor([1, 2], dtype=torch.int64), 4), pad, 50)
    assert len(set(mask.sum(1).tolist())) == 1 and not (mask & pad).any()
    assert len({tuple(r.tolist()) for r in mask}) == 8


def test_random_mask_exact_counts_only_eligible():
    eligible = torch.ones(4, 30, dtype=torch.bool)
    eligible[1, 20:] = False
    seed = torch.tensor([9, 8, 7, 6], dtype=torch.int64)
    free = random_mask(eligible, 0.48, seed=seed, same_count=False)
    want = [30 - int(30 * 0.52), 20 - int(20 * 0.52), 30 - int(30 * 0.52), 30 - int(30 * 0.52)]
    assert free.sum(1).tolist() == want and not (free & ~eligible).any()
    same = random_mask(eligible, 0.48, seed=seed)
    assert same.sum(1).tolist() == [min(want)] * 4 and not (same & ~eligible).any()
    # a row's mask depends only on its own seed (without the same-count rule)
    alone = random_mask(eligible[2:3], 0.48, seed=seed[2:3], same_count=False)
    assert torch.equal(alone[0], free[2])
    assert not torch.equal(free[0], free[2])
    with pytest.raises(ValueError, match="mask_prob"):
        random_mask(eligible, 1.5)


def test_inverse_block_mask_is_blocky_with_the_exact_count():
    n, ratio = 14 * 14, 0.8
    mask = block_mask(64, (14, 14), ratio, seed=3, inverse=True, inverse_length=3,
                      inverse_adjust=0.07)
    assert mask.sum(1).tolist() == [round(ratio * n)] * 64  # fairseq: 196 - int(196 * 0.2) too
    kept = (~mask).view(64, 14, 14).float()
    # kept patches come in 3x3 squares: many kept 4-neighbours (a uniform random set of the same
    # size has 4 * 39/195, under one)
    near = torch.zeros_like(kept)
    near[:, 1:] += kept[:, :-1]
    near[:, :-1] += kept[:, 1:]
    near[:, :, 1:] += kept[:, :, :-1]
    near[:, :, :-1] += kept[:, :, 1:]
    assert (near * kept).sum() / kept.sum() > 2.0


# --------------------------------------------------------------------------------------------
# Decoder


def test_decoder_shapes_residual_and_receptive_field():
    dec = ConvDecoder(16, 8, 3, 4, layers=2, grid=(6, 6)).eval()
    x = torch.randn(2, 36, 16)
    y = dec(x)
    assert y.shape == (2, 36, 16)
    x2 = x.clone()
    x2[:, 35] += 1.0  # bottom-right patch: 2 layers of 3x3 reach 2 patches away
    y2 = dec(x2)
    assert torch.equal(y[:, 0], y2[:, 0]) and not torch.equal(y[:, 35], y2[:, 35])
    even = ConvDecoder(16, 16, 4, 1, layers=3)
    assert even(torch.randn(2, 9, 16)).shape == (2, 9, 16)
    text = ConvDecoder(16, 16, 9, 1, layers=2, residual=False, projection_layers=2)
    assert [m.out_features for m in text.proj if isinstance(m, torch.nn.Linear)] == [32, 16]


# --------------------------------------------------------------------------------------------
# Config and end to end


def test_v1_stays_the_default_and_v2_keys_are_checked():
    v1 = load_config(ROOT / "configs/tiny_image.yaml")
    assert v1.objective.mode == "v1"
    assert type(build_objective(v1, build_model(v1.model, "image"))) is Data2Vec
    with pytest.raises(ConfigError, match="objective.cls_loss"):
        _cfg("audio", "objective.cls_loss=0.1")
    with pytest.raises(ConfigError, match="objective.decoder_groups"):
        _cfg("image", "objective.decoder_groups=5")
    with pytest.raises(ConfigError, match="objective.mode"):
        _cfg("image", "objective.mode=v3")
    with pytest.raises(ConfigError, match="masking.require_same_masks"):
        _cfg("audio", "masking.require_same_masks=false")
    for name in ("image_v2", "audio_v2", "text_v2"):
        base = load_config(ROOT / f"configs/{name}.yaml")
        assert base.objective.mode == "v2" and base.objective.clone_batch in (8, 16)


def _train(modality, run_dir, *overrides):
    # Small batches and short crops keep the CPU runs to seconds.
    cfg = _cfg(modality, f"run.dir={run_dir}", "train.progress=false", "train.log_every=1",
               "train.checkpoint_every=0", "train.global_batch=4", "data.max_sample_size=6000",
               *overrides)
    return train(cfg)


@pytest.mark.parametrize("modality", MODALITIES)
def test_v2_resume_is_exact(modality, tmp_path):
    full = _train(modality, tmp_path / "full", "train.max_steps=3")["losses"]
    first = _train(modality, tmp_path / "cut", "train.max_steps=3", "train.stop_at=2")["losses"]
    assert first == full[:2]
    second = _train(modality, tmp_path / "cut", "train.max_steps=3", "train.resume=true")["losses"]
    assert second == full[2:], f"resumed {second} vs uninterrupted {full[2:]}"


@pytest.mark.latest
@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_v2_loss_falls(modality, tmp_path):
    losses = _train(modality, tmp_path, "train.max_steps=12", "optim.warmup_steps=3",
                    "optim.schedule_scaling=absolute")["losses"]  # 3 steps of these 12
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.95 * first, f"first3 {first:.4f} last3 {last:.4f} ({losses})"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["masked_per_step"] > 0 for r in rows if "loss" in r)
