"""d2v_engine.run.mask_ahead: masks drawn a micro-batch ahead (a side CUDA stream on a GPU, in order on the
CPU) are bit for bit the masks the step draws itself, and training follows the same trajectory.

On the CPU the prefetch path runs the same calls with a no-op stream context; the stream and event
ordering (and the absence of host synchronization) is checked where CUDA exists.
"""
from pathlib import Path

import pytest
import torch

from d2v_engine.config import load_config
from d2v_engine.objective import build_objective
from d2v_engine.run.mask_ahead import Feed
from d2v_engine.models import build_model
from d2v_engine.seeding import STREAM_MASK, sample_seeds
from d2v_engine.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["image", "audio", "text", "image_v2", "audio_v2", "text_v2"]
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3}


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    # Masks are integer hashes: the reference and the kernels agree bit for bit (test_masking);
    # the interpreted kernels would cost seconds per micro-batch here.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def config(name, *overrides):
    return load_config(ROOT / f"configs/tiny_{name}.yaml", ["train.progress=false", *overrides])


def objective(cfg):
    torch.manual_seed(0)
    special = {**SPECIAL, "mask": cfg.model.vocab_size - 1} if cfg.modality == "text" else None
    return build_objective(cfg, build_model(cfg.model, cfg.modality), special)


def make_batch(cfg, b, first_position, seed):
    """A host micro-batch as the loaders give it: padded audio / text rows of varied length."""
    g = torch.Generator().manual_seed(seed)
    position = torch.arange(first_position, first_position + b)
    if cfg.modality == "image":
        side = cfg.data.img_size
        return {"source": torch.randn(b, 3, side, side, generator=g), "padding_mask": None,
                "position": position, "bad_files": []}
    if cfg.modality == "audio":
        length = 4000
        lengths = torch.randint(length // 2, length + 1, (b,), generator=g)
        lengths[0] = length
        pad = torch.arange(length)[None, :] >= lengths[:, None]
        wave = torch.randn(b, length, generator=g).masked_fill(pad, 0.0)
        return {"source": wave, "padding_mask": pad, "position": position, "bad_files": []}
    t = cfg.data.max_tokens
    ids = torch.randint(4, cfg.model.vocab_size - 1, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    ids[:, 0] = SPECIAL["bos"]
    ids = torch.where(torch.arange(t)[None, :] == lengths[:, None] - 1, SPECIAL["eos"], ids)
    ids = torch.where(torch.arange(t)[None, :] >= lengths[:, None], SPECIAL["pad"], ids)
    return {"source": ids, "padding_mask": ids.eq(SPECIAL["pad"]), "position": position,
            "bad_files": []}


def assert_same_masks(got: dict, want: dict, what: str):
    # Drawn ahead, data2vec 2.0's masks also carry the host's copy of their shared count.
    assert got.keys() - {"masked_count"} == want.keys(), (what, got.keys(), want.keys())
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (
            f"{what}: '{key}' differs in {(got[key] != want[key]).sum().item()} places")
    if "row_counts" in want:
        lo, hi = want["row_counts"].tolist()
        assert got["masked_count"] == lo == hi == int(want["mask"].sum(1)[0]), what


@pytest.mark.parametrize("name", CONFIGS)
def test_masks_drawn_ahead_equal_the_masks_the_step_draws(name):
    cfg = config(name)
    model = objective(cfg)
    batches = [make_batch(cfg, 4, 4 * i, seed=i) for i in range(4)]  # 2 steps x 2 micro-batches
    feed = Feed(iter([dict(b) for b in batches]), model, cfg, torch.device("cpu"), 2, 5, 7)
    for i, batch in enumerate(batches):
        mb = feed.take()
        assert (mb.step, mb.micro, mb.weight) == (5 + i // 2, i % 2, 1.0)
        feed.prefetch()  # the next micro-batch's masks come before this one is "used"
        torch.manual_seed(123 + i)  # the step's own RNG use in between changes nothing
        seeds = sample_seeds(cfg.seed, mb.step, batch["position"], STREAM_MASK)
        in_step = model.draw_masks({k: v for k, v in batch.items() if k != "bad_files"}, seeds)
        assert_same_masks(mb.masks, in_step, f"{name} micro-batch {i}")
        assert torch.equal(mb.seeds, seeds)


@pytest.mark.parametrize("name", ["image", "image_v2", "text"])
def test_a_sample_mask_depends_only_on_seed_step_and_position(name):
    # Row b of a batch and the same sample alone in a batch of one (its global position kept):
    # the same mask (the audio rule require_same_masks ties a batch's rows, by design).
    cfg = config(name)
    model = objective(cfg)
    batch = make_batch(cfg, 4, 100, seed=7)
    del batch["bad_files"]
    seeds = sample_seeds(cfg.seed, 9, batch["position"], STREAM_MASK)
    whole = model.draw_masks(batch, seeds)
    rows = whole["mask"].shape[0] // 4  # data2vec 2.0: clone_batch rows per sample
    for b in range(4):
        alone = {k: None if v is None else v[b:b + 1] for k, v in batch.items()}
        one = model.draw_masks(alone, sample_seeds(cfg.seed, 9, alone["position"], STREAM_MASK))
        for key in whole.keys() - {"row_counts"}:  # the range is the batch's, not a row's
            assert torch.equal(one[key], whole[key][b * rows:(b + 1) * rows]), (name, key, b)


@pytest.mark.parametrize("name", ["image", "audio", "text"])
def test_token_layout_is_what_embed_gives(name):
    cfg = config(name)
    encoder = build_model(cfg.model, cfg.modality)
    batch = make_batch(cfg, 3, 0, seed=3)
    tokens, pad = encoder.token_layout(batch["source"], batch["padding_mask"])
    with torch.no_grad():
        x, x_pad = encoder.embed(batch["source"], batch["padding_mask"])
    assert tokens == x.shape[1], (tokens, tuple(x.shape))
    assert (pad is None and x_pad is None) or torch.equal(pad, x_pad)
    if name == "text":  # no padding mask given: embed and token_layout take source == pad
        tokens, pad = encoder.token_layout(batch["source"], None)
        assert torch.equal(pad, encoder.embed(batch["source"], None)[1])


def test_feed_reads_nothing_past_the_last_step_and_stands_in_for_bad_micro_batches():
    cfg = config("image")
    model = objective(cfg)
    good = [make_batch(cfg, 2, 2 * i, seed=i) for i in range(3)]
    bad = {"bad_files": ["a.jpg", "b.jpg"]}
    pulled = []

    def loader():
        for batch in [good[0], bad, good[1], good[2], good[0]]:
            pulled.append(batch)
            yield dict(batch)

    feed = Feed(loader(), model, cfg, torch.device("cpu"), 2, 0, 2)
    got = []
    for _ in range(4):
        got.append(feed.take())
        feed.prefetch()
    assert len(pulled) == 4, "the feed read past step 2's micro-batches"
    assert [(m.step, m.micro) for m in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert got[1].weight == 0.0 and got[1].bad_files == ["a.jpg", "b.jpg"]
    assert torch.equal(got[1].batch["source"], good[0]["source"]), "the stand-in is the last good"
    assert [m.weight for m in got] == [1.0, 0.0, 1.0, 1.0]
    assert feed.data_wait >= 0.0


@pytest.mark.parametrize("name", ["image", "audio", "text_v2"])
def test_training_with_masks_ahead_follows_the_in_step_trajectory(name, tmp_path):
    common = ["train.max_steps=3", "train.checkpoint_every=0", "train.global_batch=8",
              "train.micro_batch=4", "train.log_every=1"]
    ahead = train(config(name, f"run.dir={tmp_path / 'ahead'}", *common))["losses"]
    in_step = train(config(name, f"run.dir={tmp_path / 'step'}", *common,
                           "train.mask_ahead=false"))["losses"]
    assert len(ahead) == 3 and ahead == in_step, f"ahead {ahead} vs in the step {in_step}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["image", "audio", "text_v2"])
def test_side_stream_masks_equal_in_step_masks_without_host_sync(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # the compiled kernels on the side stream
    cfg = config(name)
    model = objective(cfg).cuda()
    device = torch.device("cuda")
    batches = [make_batch(cfg, 8, 8 * i, seed=i) for i in range(3)]
    for batch in batches:
        for key in ("source", "padding_mask"):
            if batch[key] is not None:
                batch[key] = batch[key].pin_memory()
    feed = Feed(iter([dict(b) for b in batches]), model, cfg, device, 1, 0, 3)
    assert feed.stream is not None
    feed.prefetch()  # first use: kernel compilation and table uploads may synchronize
    torch.cuda.synchronize()
    got = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in batches:
            mb = feed.take()
            feed.prefetch()
            got.append(mb)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for mb, batch in zip(got, batches):
        on_device = {k: v if v is None or not torch.is_tensor(v) else v.cuda()
                     for k, v in batch.items() if k != "bad_files"}
        seeds = sample_seeds(cfg.seed, mb.step, batch["position"], STREAM_MASK).cuda()
        assert_same_masks(mb.masks, model.draw_masks(on_device, seeds), f"{name} step {mb.step}")
