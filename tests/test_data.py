"""Datasets: embedded data counts, shapes/dtypes/ranges, seeded determinism, and every bad input."""
from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v_engine.config import DataConfig
from d2v_engine.data import BadSample, build_dataset
from d2v_engine.data.audio import read_wav
from d2v_engine.data.images import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box
from d2v_engine.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
DIGITS = DATA / "images" / "digits"
PHOTOS = DATA / "images" / "photos"
AUDIO = DATA / "audio"
TEXT = DATA / "text"


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def rng(seed=0) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_wav(path: Path, samples: np.ndarray, rate=16000, channels=1, as_float=False) -> Path:
    """RIFF/WAVE writer for planted test files: 16-bit PCM via `wave`, 32-bit float by hand."""
    if not as_float:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
        return path
    payload = samples.astype("<f4").tobytes()
    fmt = (np.array([3, channels], "<u2").tobytes() + np.array([rate, rate * 4 * channels], "<u4")
           .tobytes() + np.array([4 * channels, 32], "<u2").tobytes())
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt
    body += b"data" + len(payload).to_bytes(4, "little") + payload
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    return path


def one_line(err: pytest.ExceptionInfo, *names) -> str:
    msg = str(err.value)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    for name in names:
        assert str(name) in msg, f"{name} not named in: {msg}"
    return msg


# ---------------------------------------------------------------- embedded data


def test_embedded_data_fits_the_size_budget():
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
             for p in DATA.iterdir()}
    total = sum(sizes.values())
    assert total < 20e6, f"embedded data {total / 1e6:.1f} MB >= 20 MB: {sizes}"
    assert sizes["images"] < 3.5e6, f"images {sizes['images'] / 1e6:.2f} MB"
    assert sizes["audio"] < 9e6, f"audio {sizes['audio'] / 1e6:.2f} MB"


def test_embedded_digits_are_1797_labelled_images_in_10_classes():
    ds = build_dataset(cfg(DIGITS, img_size=32), "image")
    counts = np.bincount(ds.labels, minlength=10)
    assert len(ds) == 1797 and ds.num_labels == 10, (len(ds), ds.num_labels)
    assert ds.classes == [str(d) for d in range(10)], ds.classes
    assert counts.min() >= 170, f"class counts {counts.tolist()}"


def test_embedded_photos_are_an_unlabelled_flat_folder():
    ds = build_dataset(cfg(PHOTOS, img_size=64), "image")
    assert len(ds) >= 15 and ds.num_labels == 0, (len(ds), ds.num_labels)
    assert "label" not in ds.load(0, rng())
    with Image.open(ds.files[0]) as img:
        assert 128 <= min(img.size) <= 160, img.size


def test_embedded_audio_manifests_parse_with_matching_labels():
    train = build_dataset(cfg(AUDIO), "audio", "train")
    valid = build_dataset(cfg(AUDIO / "valid.tsv"), "audio")
    assert (len(train), len(valid)) == (360, 40), (len(train), len(valid))
    assert train.root == AUDIO / "wav", train.root
    assert train.num_labels == valid.num_labels == 10
    assert sorted(set(valid.labels)) == list(range(10)), sorted(set(valid.labels))
    assert train.sizes.min() >= 4000, f"shortest utterance {train.sizes.min()} samples"
    wav, rate, channels = read_wav(train.root / train.files[0])
    assert (rate, channels, wav.shape[0]) == (16000, 1, train.sizes[0]), (rate, channels, wav.shape)


def test_embedded_text_meta_matches_token_files():
    meta = json.loads((TEXT / "meta.json").read_text())
    assert (meta["bos"], meta["pad"], meta["eos"], meta["unk"]) == (0, 1, 2, 3), meta
    assert meta["mask"] == meta["vocab_size"] - 1 == 4095, meta
    for split in ("train", "valid", "probe"):
        ds = build_dataset(cfg(TEXT), "text", split)
        assert len(ds.tokens) == meta["num_tokens"][split], (split, len(ds.tokens))
        assert int(ds.tokens.max()) < meta["vocab_size"], (split, int(ds.tokens.max()))
    valid_share = meta["num_tokens"]["valid"] / meta["num_tokens"]["train"]
    assert 0.03 < valid_share < 0.08, f"valid is {valid_share:.3f} of train"


# ---------------------------------------------------------------- images


def test_image_eval_is_deterministic_normalized_float32():
    ds = build_dataset(cfg(PHOTOS, img_size=48, augment=False), "image")
    a, b = ds.load(3, rng(0))["source"], ds.load(3, rng(99))["source"]
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32, (a.shape, a.dtype)
    assert torch.equal(a, b), "augment=false must not depend on the rng"
    assert lo - 1e-5 <= a.min() and a.max() <= hi + 1e-5, (a.min().item(), a.max().item(), lo, hi)


def test_image_augment_same_seed_same_tensor_other_seed_other_crop():
    ds = build_dataset(cfg(PHOTOS, img_size=32), "image")
    a, b, c = (ds.load(0, rng(s))["source"] for s in (7, 7, 8))
    assert torch.equal(a, b), "same seed gave different crops"
    diff = (a - c).abs().max().item()
    assert diff > 0.1, f"different seeds gave the same crop (max diff {diff})"


def test_image_eval_center_crop_of_a_square_keeps_the_whole_image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x = build_dataset(cfg(tmp_path, img_size=16, augment=False), "image").load(0, rng())["source"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6), (x - expected).abs().max()


def test_random_resized_crop_box_stays_inside_with_scale_and_ratio():
    g = rng(1)
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(200, 120, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 120, (left, top, w, h)
        assert 0.07 * 200 * 120 <= w * h <= 200 * 120, (w, h)


def test_random_resized_crop_box_falls_back_to_center_crop():
    # An area above the image can never fit: after 10 draws torchvision takes the central crop,
    # clamped to the ratio range (wide image -> full height, width = height * 4/3).
    box = random_resized_crop_box(300, 100, (2.0, 3.0), (3 / 4, 4 / 3), rng(0))
    assert box == (83, 0, 133, 100), box


def test_image_flip_only_when_hflip():
    ds = build_dataset(cfg(PHOTOS, img_size=32, crop_scale=[1.0, 1.0], hflip=False), "image")
    outs = {tuple(ds.load(1, rng(s))["source"][0, 0, :4].tolist()) for s in range(6)}
    assert len(outs) == 1, f"hflip=false and full-area crops still varied: {len(outs)} variants"
    ds.cfg.hflip = True
    outs = {tuple(ds.load(1, rng(s))["source"][0, 0, :4].tolist()) for s in range(12)}
    assert len(outs) == 2, f"hflip=true should give the image and its mirror, got {len(outs)}"


def test_image_collate_stacks_sources_and_labels():
    ds = build_dataset(cfg(DIGITS, img_size=32), "image")
    idx = [0, 500, 1000, 1796]
    batch = ds.collate([ds.load(i, rng(i)) for i in idx], rng())
    assert batch["source"].shape == (4, 3, 32, 32) and batch["padding_mask"] is None
    assert batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [ds.labels[i] for i in idx], batch["label"]


# ---------------------------------------------------------------- audio


def test_audio_load_range_and_normalization():
    raw = build_dataset(cfg(AUDIO, normalize=False), "audio").load(5, rng())["source"]
    normed = build_dataset(cfg(AUDIO, normalize=True), "audio").load(5, rng())["source"]
    assert raw.dtype == normed.dtype == torch.float32 and raw.dim() == 1
    assert raw.abs().max() <= 1.0 and raw.abs().max() > 0.05, raw.abs().max()
    assert abs(normed.mean()) < 1e-4 and abs(normed.std(unbiased=False) - 1) < 1e-3, (
        normed.mean().item(), normed.std().item())


def test_audio_crop_to_max_size_is_seeded_and_zero_offset_without_augment():
    full = build_dataset(cfg(AUDIO, augment=False), "audio").load(0, rng())["source"]
    plain = build_dataset(cfg(AUDIO, augment=False, max_sample_size=3000), "audio")
    aug = build_dataset(cfg(AUDIO, augment=True, max_sample_size=3000), "audio")
    assert torch.equal(plain.load(0, rng(1))["source"], full[:3000]), "augment=false must crop at 0"
    a, b, c = (aug.load(0, rng(s))["source"] for s in (3, 3, 4))
    assert a.shape == (3000,) and torch.equal(a, b), "same seed gave different crops"
    assert not torch.equal(a, c), "different seeds gave the same crop"


def test_audio_collate_crops_to_shortest_or_pads_with_mask():
    ds = build_dataset(cfg(AUDIO, augment=False), "audio")
    samples = [ds.load(i, rng()) for i in (0, 1, 2)]
    sizes = [s["source"].numel() for s in samples]
    crop = ds.collate(samples, rng())
    assert crop["source"].shape == (3, min(sizes)) and crop["padding_mask"] is None
    assert torch.equal(crop["source"][1], samples[1]["source"][:min(sizes)])
    ds.cfg.pad_audio = True
    pad = ds.collate(samples, rng())
    mask = pad["padding_mask"]
    assert pad["source"].shape == mask.shape == (3, max(sizes)) and mask.dtype == torch.bool
    assert (~mask).sum(1).tolist() == sizes, ((~mask).sum(1), sizes)
    assert (pad["source"][mask] == 0).all() and pad["label"].tolist() == ds.labels[:3]


def test_audio_collate_random_crop_is_each_samples_own_draw():
    ds = build_dataset(cfg(AUDIO, augment=True), "audio")
    a, b, c = (ds.collate([ds.load(i, rng(s + i)) for i in (0, 1, 2, 3)])["source"]
               for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A sample's crop does not depend on its batch-mates: the same sample in another batch, at
    # the same length, sits at the same offset.
    samples = [ds.load(i, rng(5 + i)) for i in (0, 1, 2, 3)]
    length = min(s["source"].numel() for s in samples)
    alone = ds.collate(samples[2:3], length=length)["source"][0]
    assert torch.equal(alone, ds.collate(samples)["source"][2])


def test_audio_min_sample_size_skips_and_reports():
    ds = build_dataset(cfg(AUDIO, min_sample_size=8000), "audio")
    sizes = np.array([int(line.split("\t")[1]) for line in
                      (AUDIO / "train.tsv").read_text().splitlines()[1:]])
    assert len(ds) == int((sizes >= 8000).sum()) and ds.skipped == int((sizes < 8000).sum())
    assert f"{ds.skipped} shorter than 8000 skipped" in ds.describe(), ds.describe()
    assert (ds.sizes >= 8000).all()


def test_audio_reads_float32_wav_like_pcm16(tmp_path):
    x = np.sin(np.linspace(0, 60, 5000)).astype(np.float32) * 0.5
    write_wav(tmp_path / "a.wav", x)
    write_wav(tmp_path / "b.wav", x, as_float=True)
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t5000\nb.wav\t5000\n")
    ds = build_dataset(cfg(tmp_path / "m.tsv", normalize=False, augment=False), "audio")
    a, b = ds.load(0, rng())["source"], ds.load(1, rng())["source"]
    assert a.shape == b.shape == (5000,) and (a - b).abs().max() < 1e-4, (a - b).abs().max()
    assert ds.num_labels == 0 and "label" not in ds.load(0, rng())


def test_audio_reads_flac_and_24_bit_wav_through_soundfile_like_pcm16(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    x = np.sin(np.linspace(0, 60, 5000)).astype(np.float32) * 0.5
    write_wav(tmp_path / "a.wav", x)
    soundfile.write(tmp_path / "b.flac", x, 16000, subtype="PCM_16")
    soundfile.write(tmp_path / "c.wav", x, 16000, subtype="PCM_24")
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t5000\nb.flac\t5000\nc.wav\t5000\n")
    ds = build_dataset(cfg(tmp_path / "m.tsv", normalize=False, augment=False), "audio")
    a = ds.load(0, rng())["source"]
    for i in (1, 2):
        b = ds.load(i, rng())["source"]
        assert b.shape == a.shape == (5000,) and (a - b).abs().max() < 1e-4, (i, (a - b).abs().max())


# ---------------------------------------------------------------- text


def test_text_samples_are_bos_then_stream_blocks_as_fairseq_none():
    # fairseq masked_lm: TokenBlockDataset(tokens_per_sample - 1, "none"), then <s> prepended.
    ds = build_dataset(cfg(TEXT, max_tokens=64), "text")
    ids = ds.special_ids
    samples = [ds.load(i, rng())["source"] for i in range(len(ds))]
    assert ds.vocab_size == 4096 and ids == dict(bos=0, pad=1, eos=2, unk=3, mask=4095), ids
    assert all(s.dtype == torch.int64 for s in samples)
    assert all(s[0] == ids["bos"] for s in samples)
    assert all(len(s) == 64 for s in samples[:-1]) and 2 <= len(samples[-1]) <= 64, len(samples[-1])
    stream = torch.cat([s[1:] for s in samples])
    assert torch.equal(stream, torch.from_numpy(np.asarray(ds.tokens, dtype=np.int64)))


def _token_folder(path: Path, doc_lengths, eos=2, vocab=100, seed=0) -> np.ndarray:
    """A text folder whose documents have these lengths (each ending with </s>); the offsets."""
    path.mkdir(parents=True, exist_ok=True)
    meta = dict(vocab_size=vocab, bos=0, pad=1, eos=eos, unk=3, mask=vocab - 1)
    (path / "meta.json").write_text(json.dumps(meta))
    gen = np.random.default_rng(seed)
    docs = [np.append(gen.integers(4, vocab - 1, n - 1), eos) for n in doc_lengths]
    np.concatenate(docs).astype("<u2").tofile(path / "train.bin")
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype("<i8")
    offsets.tofile(path / "train.idx")
    return offsets


@pytest.mark.parametrize("max_tokens", [4, 9, 16])
def test_complete_doc_blocks_never_cross_a_document_boundary_and_cover_every_token_once(
        tmp_path, max_tokens):
    lengths = [1, 3, 8, 9, 17, 2, 40, 8, 1, 5]  # around and across the block size
    offsets = _token_folder(tmp_path, lengths)
    ds = build_dataset(cfg(tmp_path, max_tokens=max_tokens, sample_break_mode="complete_doc"),
                       "text")
    block = max_tokens - 1
    doc_of = np.searchsorted(offsets, ds.spans[:, 0], side="right") - 1
    for (start, end), doc in zip(ds.spans, doc_of):
        assert offsets[doc] <= start < end <= offsets[doc + 1], (start, end, offsets[doc:doc + 2])
    # a document gets ceil(length / block) blocks: full ones, then its remainder
    assert np.bincount(doc_of, minlength=len(lengths)).tolist() == [-(-n // block)
                                                                      for n in lengths]
    samples = [ds.load(i, rng())["source"] for i in range(len(ds))]
    assert all(s[0] == 0 and 2 <= len(s) <= max_tokens for s in samples)
    stream = torch.cat([s[1:] for s in samples])
    assert torch.equal(stream, torch.from_numpy(np.asarray(ds.tokens, dtype=np.int64))), \
        "every token must be in exactly one block, in stream order"
    ends_doc = [end == offsets[doc + 1] for (_, end), doc in zip(ds.spans, doc_of)]
    assert all((s[-1] == 2) == e for s, e in zip(samples, ends_doc)), \
        "a block ends with </s> exactly when it ends its document (no </s> is added)"


def test_complete_doc_pads_short_blocks_and_the_padding_is_masked(tmp_path):
    _token_folder(tmp_path, [3, 10, 5])
    ds = build_dataset(cfg(tmp_path, max_tokens=8, sample_break_mode="complete_doc"), "text")
    batch = ds.collate([ds.load(i, rng()) for i in range(len(ds))], rng())
    lengths = (~batch["padding_mask"]).sum(1).tolist()
    assert lengths == [4, 8, 4, 6], lengths  # <s> + 3 | <s> + 7 | <s> + 3 | <s> + 5
    assert (batch["source"][batch["padding_mask"]] == ds.special_ids["pad"]).all()


def test_embedded_text_folder_loads_in_both_break_modes():
    # data/text predates sample_break_mode: its .idx offsets are the document boundaries.
    none = build_dataset(cfg(TEXT, max_tokens=64), "text")
    doc = build_dataset(cfg(TEXT, max_tokens=64, sample_break_mode="complete_doc"), "text")
    assert len(none) == -(-len(none.tokens) // 63)
    assert len(doc) >= len(none.offsets) - 1 > len(none), (len(doc), len(none))
    assert int((doc.sizes - 1).sum()) == int((none.sizes - 1).sum()) == len(doc.tokens)


def test_unknown_sample_break_mode_is_a_config_error(tmp_path):
    from d2v_engine.config import load_config

    with pytest.raises(ConfigError, match="data.sample_break_mode"):
        load_config(REPO / "configs/tiny_text.yaml", ["data.sample_break_mode=eos"])


def test_text_collate_pads_with_pad_id_and_masks_padding():
    ds = build_dataset(cfg(TEXT, max_tokens=32), "text", "valid")
    samples = [ds.load(0, rng()), ds.load(len(ds) - 1, rng())]
    batch = ds.collate(samples, rng())
    src, mask = batch["source"], batch["padding_mask"]
    n = len(samples[1]["source"])
    assert src.shape == mask.shape == (2, 32) and mask.dtype == torch.bool
    assert not mask[0].any() and mask[1].sum() == 32 - n, mask.sum(1)
    assert (src[1, n:] == ds.special_ids["pad"]).all() and "label" not in batch


def test_text_probe_documents_have_labels_and_fit_max_tokens():
    ds = build_dataset(cfg(TEXT, max_tokens=48), "text", "probe")
    meta = json.loads((TEXT / "meta.json").read_text())
    counts = np.bincount(ds.labels)
    assert len(ds) == 640, len(ds)
    assert ds.num_labels == len(meta["probe_labels"]) == 8, ds.num_labels
    assert counts.tolist() == [80] * 8, counts
    batch = ds.collate([ds.load(i, rng()) for i in range(6)], rng())
    assert batch["source"].shape[1] <= 48 and batch["label"].tolist() == ds.labels[:6]
    assert (batch["source"][:, 0] == 0).all()


def test_text_is_independent_of_rng_and_augment():
    a = build_dataset(cfg(TEXT, max_tokens=16, augment=True), "text").load(3, rng(1))["source"]
    b = build_dataset(cfg(TEXT, max_tokens=16, augment=False), "text").load(3, rng(2))["source"]
    assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input


def test_missing_path_and_empty_path_errors(tmp_path):
    for modality in ("image", "audio", "text"):
        with pytest.raises(DataError) as err:
            build_dataset(cfg(tmp_path / "nope"), modality)
        one_line(err, tmp_path / "nope")
    with pytest.raises(ConfigError, match="data.path"):
        build_dataset(DataConfig(), "image")


def test_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path), "image")
    one_line(err, tmp_path)


def test_corrupt_image_fails_or_is_a_skippable_bad_sample(tmp_path):
    shutil.copy(PHOTOS / "coffee.jpg", tmp_path / "good.jpg")
    data = (PHOTOS / "coffee.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 3])
    (tmp_path / "zz_garbage.png").write_bytes(b"not a png at all")
    ds = build_dataset(cfg(tmp_path, img_size=16), "image")
    assert ds.load(0, rng())["source"].shape == (3, 16, 16)
    for index, name in ((1, "truncated.jpg"), (2, "zz_garbage.png")):
        with pytest.raises(DataError) as err:
            ds.load(index, rng())
        assert not isinstance(err.value, BadSample), "on_bad_file=fail must not be skippable"
        one_line(err, tmp_path / name)
    ds.cfg.on_bad_file = "skip"
    with pytest.raises(BadSample) as err:
        ds.load(2, rng())
    assert err.value.path == tmp_path / "zz_garbage.png", err.value.path


def test_manifest_with_only_the_root_line_is_an_error(tmp_path):
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n")
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path), "audio")
    one_line(err, tmp_path / "train.tsv")


def test_manifest_malformed_line_and_wrong_root_are_errors(tmp_path):
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav 100\n")
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path / "m.tsv"), "audio")
    one_line(err, tmp_path / "m.tsv", "line 2")
    (tmp_path / "m.tsv").write_text("no_such_root\na.wav\t100\n")
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path / "m.tsv"), "audio")
    one_line(err, tmp_path / "no_such_root")


def test_manifest_entry_whose_file_is_missing(tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(100))
    (tmp_path / "m.tsv").write_text(".\na.wav\t100\ngone.wav\t100\n")
    ds = build_dataset(cfg(tmp_path / "m.tsv"), "audio")
    assert ds.root == tmp_path / ".", ds.root
    assert ds.load(0, rng())["source"].shape == (100,)
    with pytest.raises(DataError) as err:
        ds.load(1, rng())
    one_line(err, "gone.wav")
    ds.cfg.on_bad_file = "skip"
    with pytest.raises(BadSample) as err:
        ds.load(1, rng())
    assert err.value.path.name == "gone.wav"


def test_corrupt_wav_fails_or_is_a_skippable_bad_sample(tmp_path):
    write_wav(tmp_path / "ok.wav", np.zeros(400))
    (tmp_path / "garbage.wav").write_bytes(b"RIFX\x00\x00junk")
    full = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(full[:200])
    (tmp_path / "m.tsv").write_text(".\ngarbage.wav\t400\ncut.wav\t400\n")
    ds = build_dataset(cfg(tmp_path / "m.tsv"), "audio")
    for index, name in ((0, "garbage.wav"), (1, "cut.wav")):
        with pytest.raises(DataError) as err:
            ds.load(index, rng())
        assert not isinstance(err.value, BadSample)
        one_line(err, tmp_path / name)
    ds.cfg.on_bad_file = "skip"
    for index in (0, 1):
        with pytest.raises(BadSample):
            ds.load(index, rng())


def test_wrong_sample_rate_or_channels_fail_or_skip_or_resample(tmp_path):
    write_wav(tmp_path / "a.wav", np.sin(np.arange(800) * 0.1) * 0.5, rate=8000)
    write_wav(tmp_path / "st.wav", np.zeros(800), channels=2)
    (tmp_path / "m.tsv").write_text(".\na.wav\t800\nst.wav\t400\n")
    ds = build_dataset(cfg(tmp_path / "m.tsv"), "audio")
    for index, name, what in ((0, "a.wav", "8000"), (1, "st.wav", "2 channels")):
        with pytest.raises(DataError) as err:
            ds.load(index, rng())
        assert not isinstance(err.value, BadSample)
        one_line(err, tmp_path / name, what)
    ds.cfg.on_bad_file = "skip"
    for index in (0, 1):
        with pytest.raises(BadSample):
            ds.load(index, rng())
    ds.cfg.resample = True  # a rate is converted when allowed; channels never are
    wav = ds.load(0, rng())["source"]
    assert wav.shape == (1600,), wav.shape
    with pytest.raises(BadSample):
        ds.load(1, rng())


def test_label_file_with_wrong_count_is_an_error(tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(100))
    (tmp_path / "train.tsv").write_text(".\na.wav\t100\n")
    (tmp_path / "train.label").write_text("1\n2\n")
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path), "audio")
    one_line(err, tmp_path / "train.label")


def test_text_folder_without_meta_or_split_is_an_error(tmp_path):
    for name in ("train.bin", "train.idx"):
        shutil.copy(TEXT / name, tmp_path / name)
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path), "text")
    one_line(err, tmp_path, "meta.json")
    shutil.copy(TEXT / "meta.json", tmp_path / "meta.json")
    assert len(build_dataset(cfg(tmp_path), "text")) > 0
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path), "text", "valid")
    one_line(err, tmp_path / "valid.bin")


def test_text_offsets_that_do_not_match_the_stream_are_an_error(tmp_path):
    shutil.copy(TEXT / "meta.json", tmp_path / "meta.json")
    np.arange(10, dtype="<u2").tofile(tmp_path / "train.bin")
    np.array([0, 4, 9], dtype="<i8").tofile(tmp_path / "train.idx")
    with pytest.raises(DataError) as err:
        build_dataset(cfg(tmp_path), "text")
    one_line(err, tmp_path / "train.idx")


def test_text_max_tokens_below_three_is_a_config_error():
    with pytest.raises(ConfigError, match="data.max_tokens"):
        build_dataset(cfg(TEXT, max_tokens=2), "text")
