"""DALI loaders on CPU (device_id=None): shapes, dtypes, ranges, agreement with the torch loader,
sharding across 2 ranks, seeded determinism, resume, every bad-data case; loader selection."""
from __future__ import annotations

import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from d2v_engine.config import DataConfig
from d2v_engine.data import build_dataset
from d2v_engine.data.audio import audio_info
from d2v_engine.data.dali_audio import DaliAudioLoader
from d2v_engine.data.dali_common import affinity_mask
from d2v_engine.data.dali_images import DaliImageLoader
from d2v_engine.data.images import IMAGENET_MEAN, IMAGENET_STD
from d2v_engine.data.loader import BatchPlan, make_loader
from d2v_engine.data.select import build_loader, choose_loader
from d2v_engine.errors import ConfigError, DataError
from d2v_engine.runtime.topology import parse_cpulist

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "images" / "digits"
PHOTOS = REPO / "data" / "images" / "photos"
AUDIO = REPO / "data" / "audio"


def write_wav(path: Path, samples: np.ndarray, rate=16000, channels=1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def write_flac(path: Path, samples: np.ndarray, rate=16000) -> Path:
    """Mono 16-bit FLAC with VERBATIM subframes (valid FLAC, no compression): enough for tests."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int64)
    info = (rate << 44) | (0 << 41) | (15 << 36) | len(pcm)  # 1 channel, 16 bits
    streaminfo = ((4096).to_bytes(2, "big") * 2 + b"\0" * 6 + info.to_bytes(8, "big") + b"\0" * 16)
    out = b"fLaC" + bytes([0x80]) + len(streaminfo).to_bytes(3, "big") + streaminfo
    for number, start in enumerate(range(0, len(pcm), 4096)):
        block = pcm[start:start + 4096]
        assert number < 128  # one-byte UTF-8 frame number
        header = bytes([0xFF, 0xF8, 0x70, 0x08, number]) + (len(block) - 1).to_bytes(2, "big")
        header += bytes([_crc8(header)])
        frame = header + b"\x02" + block.astype(">i2").tobytes()
        out += frame + _crc16(frame).to_bytes(2, "big")
    path.write_bytes(out)
    return path


def loader_kw(**kw):
    base = dict(rank=0, seed=3, start_step=0, max_steps=2)
    base.update(kw)
    return base


def run(cls, ds, gb=4, micro=4, world=1, **kw):
    plan = BatchPlan.make(gb, micro, world)
    args = loader_kw(**kw)
    return list(cls(ds, plan, args.pop("rank"), args.pop("seed"), args.pop("start_step"),
                    args.pop("max_steps"), **args))


def torch_run(ds, gb=4, micro=4, world=1, skip_bad=False, **kw):
    args = loader_kw(**kw)
    return list(make_loader(ds, BatchPlan.make(gb, micro, world), args["rank"], args["seed"],
                            args["start_step"], args["max_steps"], skip_bad=skip_bad))


# ---------------------------------------------------------------- images


@pytest.mark.latest
def test_dali_images_shape_dtype_range_labels_and_agree_with_pil():
    ds = build_dataset(DataConfig(path=str(DIGITS), img_size=32, crop_scale=[0.3, 1.0]), "image")
    dali, ref = run(DaliImageLoader, ds, 8, 4), torch_run(ds, 8, 4)
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert len(dali) == len(ref) == 4
    for a, b in zip(dali, ref):
        x = a["source"]
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32, (x.shape, x.dtype)
        assert lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4, (x.min(), x.max())
        assert torch.equal(a["position"], b["position"]) and torch.equal(a["label"], b["label"])
        # Same crop boxes and flips as PIL: only the resampling filters differ.
        diff = (x - b["source"]).abs().mean().item()
        assert diff < 0.02, f"DALI and PIL crops disagree: mean abs diff {diff}"
        assert a["padding_mask"] is None and a["bad_files"] == []


@pytest.mark.parametrize("augment,jitter", [(True, 0.0), (True, 0.4), (False, 0.0)])
def test_dali_cpu_images_are_the_pil_pixels(augment, jitter):
    """On the CPU, DALI decodes, torch's uint8 antialiased resize stands in for PIL's BICUBIC and
    d2v_engine.data.augment.jitter_uint8 for ImageEnhance: the same jitter, crop, flip and filter, so
    the same pixels up to one level of 255 (the two JPEG decoders round chroma differently) and
    mostly identical."""
    ds = build_dataset(DataConfig(path=str(PHOTOS), img_size=24, crop_scale=[0.2, 1.0],
                                  augment=augment, color_jitter=[jitter] * 3), "image")
    dali, ref = run(DaliImageLoader, ds, 4, 4, max_steps=3), torch_run(ds, 4, 4, max_steps=3)
    assert len(dali) == len(ref) == 3
    for a, b in zip(dali, ref):
        assert torch.equal(a["position"], b["position"])
        assert a["source"].abs().max() > 0.5  # real pixels, not a blank batch
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        levels = ((a["source"] - b["source"]) * std * 255).abs()
        assert levels.max() < 1.01, f"DALI CPU and PIL differ by {levels.max():.2f} levels"
        assert (levels < 0.01).float().mean() > 0.9, "DALI CPU and PIL differ at most pixels"


def test_dali_images_eval_flat_folder_and_dtype():
    ds = build_dataset(DataConfig(path=str(PHOTOS), img_size=24, augment=False), "image")
    out = run(DaliImageLoader, ds, 4, 4, max_steps=1, dtype=torch.bfloat16)
    assert out[0]["source"].shape == (4, 3, 24, 24) and out[0]["source"].dtype == torch.bfloat16
    assert "label" not in out[0]


def test_dali_images_seeded_and_resumable():
    ds = build_dataset(DataConfig(path=str(PHOTOS), img_size=16), "image")
    a = run(DaliImageLoader, ds, 4, 2, max_steps=3)
    b = run(DaliImageLoader, ds, 4, 2, max_steps=3)
    c = run(DaliImageLoader, ds, 4, 2, max_steps=3, seed=4)
    tail = run(DaliImageLoader, ds, 4, 2, max_steps=3, start_step=1)
    assert all(torch.equal(x["source"], y["source"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["source"], c[0]["source"]), "another seed gave the same batch"
    assert all(torch.equal(x["source"], y["source"]) for x, y in zip(a[2:], tail))


def test_dali_two_ranks_are_disjoint_and_make_the_one_rank_batch():
    ds = build_dataset(DataConfig(path=str(DIGITS), img_size=16), "image")
    one = run(DaliImageLoader, ds, 8, 8, 1, max_steps=2)
    ranks = [run(DaliImageLoader, ds, 8, 4, 2, rank=r, max_steps=2) for r in (0, 1)]
    for step in range(2):
        p0, p1 = ranks[0][step]["position"], ranks[1][step]["position"]
        assert not set(p0.tolist()) & set(p1.tolist()), (p0, p1)
        joined = torch.cat([ranks[0][step]["source"], ranks[1][step]["source"]])
        assert torch.equal(joined, one[step]["source"]), "2 ranks must split the 1-rank batch"


def _bad_image_folder(tmp_path: Path) -> Path:
    data = (PHOTOS / "coffee.jpg").read_bytes()
    shutil.copy(PHOTOS / "coffee.jpg", tmp_path / "a_good.jpg")
    shutil.copy(PHOTOS / "camera.jpg", tmp_path / "b_good.jpg")
    (tmp_path / "c_truncated.jpg").write_bytes(data[:len(data) // 3])
    (tmp_path / "d_empty.jpg").write_bytes(b"")
    (tmp_path / "e_garbage.jpg").write_bytes(b"not a jpeg at all")
    # Header and end marker intact, a Huffman table broken: only the decoder can tell.
    broken = bytearray(data)
    dht = broken.index(b"\xff\xc4")
    broken[dht + 5:dht + 21] = bytes([255] * 16)
    (tmp_path / "f_bad_huffman.jpg").write_bytes(bytes(broken))
    return tmp_path


@pytest.mark.parametrize("name", ["c_truncated.jpg", "d_empty.jpg", "e_garbage.jpg",
                                  "f_bad_huffman.jpg"])
def test_dali_bad_image_fails_naming_the_file(tmp_path, name):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _bad_image_folder(folder)
    for other in folder.iterdir():
        if other.name != name and "good" not in other.name:
            other.unlink()
    ds = build_dataset(DataConfig(path=str(folder), img_size=16), "image")
    with pytest.raises(DataError) as err:
        run(DaliImageLoader, ds, 3, 3, max_steps=2)
    assert name in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_dali_bad_images_skipped_counted_never_altered(tmp_path):
    ds = build_dataset(DataConfig(path=str(_bad_image_folder(tmp_path)), img_size=16,
                                  on_bad_file="skip"), "image")
    out = run(DaliImageLoader, ds, 6, 6, max_steps=2, skip_bad=True)
    ref = torch_run(ds, 6, 6, max_steps=2, skip_bad=True)
    for a, b in zip(out, ref):
        assert a["source"].shape == (2, 3, 16, 16), a["source"].shape
        assert sorted(Path(p).name for p in a["bad_files"]) == [
            "c_truncated.jpg", "d_empty.jpg", "e_garbage.jpg", "f_bad_huffman.jpg"], a["bad_files"]
        assert torch.equal(a["position"], b["position"])  # the good ones, in place
        assert (a["source"] - b["source"]).abs().mean() < 0.05


# ---------------------------------------------------------------- audio


@pytest.mark.latest
def test_dali_audio_matches_the_torch_loader_crop_and_pad():
    for pad in (False, True):
        cfg = DataConfig(path=str(AUDIO / "train.tsv"), pad_audio=pad, max_sample_size=6000)
        ds = build_dataset(cfg, "audio")
        for a, b in zip(run(DaliAudioLoader, ds, 4, 4), torch_run(ds, 4, 4)):
            assert a["source"].dtype == torch.float32 and a["source"].shape == b["source"].shape
            assert a["source"].shape[1] <= 6000
            assert (a["source"] - b["source"]).abs().max() < 1e-4
            assert torch.equal(a["label"], b["label"])
            if pad:
                assert a["padding_mask"].dtype == torch.bool
                assert torch.equal(a["padding_mask"], b["padding_mask"])
                assert (a["source"][a["padding_mask"]] == 0).all()
            else:
                assert a["padding_mask"] is None


def test_dali_audio_normalized_per_utterance_and_seeded():
    ds = build_dataset(DataConfig(path=str(AUDIO / "train.tsv"), max_sample_size=10 ** 6,
                                  pad_audio=True), "audio")
    out = run(DaliAudioLoader, ds, 4, 4, max_steps=1)[0]
    for row, mask in zip(out["source"], out["padding_mask"]):
        x = row[~mask]
        assert abs(x.mean()) < 1e-3 and abs(x.std(unbiased=False) - 1) < 5e-3  # eps=1e-5
    a, again = (run(DaliAudioLoader, ds, 4, 4, max_steps=2) for _ in range(2))
    b = run(DaliAudioLoader, ds, 4, 4, max_steps=2, seed=9)
    assert all(torch.equal(x["source"], y["source"]) for x, y in zip(a, again))
    assert not torch.equal(a[0]["label"], b[0]["label"]) or \
        a[0]["source"].shape != b[0]["source"].shape, "another seed gave the same batch"


def test_flac_and_wav_decode_alike_and_resample_when_allowed(tmp_path):
    x = (np.sin(np.arange(9000) * 0.03) * 0.5).astype(np.float32)
    write_wav(tmp_path / "a.wav", x)
    write_flac(tmp_path / "b.flac", x)
    write_wav(tmp_path / "c8k.wav", x[:4000], rate=8000)
    assert audio_info((tmp_path / "b.flac").read_bytes()) == (16000, 1, 9000)
    (tmp_path / "m.tsv").write_text(".\na.wav\t9000\nb.flac\t9000\nc8k.wav\t8000\n")
    cfg = DataConfig(path=str(tmp_path / "m.tsv"), normalize=False, augment=False,
                     pad_audio=True, resample=True)
    out = run(DaliAudioLoader, build_dataset(cfg, "audio"), 3, 3, max_steps=1)[0]
    src = out["source"][torch.argsort(out["position"])]
    order = sorted(range(3), key=lambda i: out["position"][i].item())
    del order
    lengths = (~out["padding_mask"]).sum(1).tolist()
    assert sorted(lengths) == [8000, 9000, 9000], lengths
    wav_rows = [r for r, n in zip(out["source"], lengths) if n == 9000]
    assert (wav_rows[0] - wav_rows[1]).abs().max() < 1e-6, "FLAC and WAV of one signal differ"
    assert src.abs().max() <= 1.0
    resampled = [r[:n] for r, n in zip(out["source"], lengths) if n == 8000][0]
    expected = np.sin(np.arange(8000) * 0.015) * 0.5
    assert np.abs(resampled.numpy() - expected)[200:-200].max() < 2e-3


def _bad_audio_manifest(tmp_path: Path) -> Path:
    x = (np.sin(np.arange(4000) * 0.05) * 0.3).astype(np.float32)
    write_wav(tmp_path / "a_good.wav", x)
    write_wav(tmp_path / "b_good.wav", x[::-1])
    (tmp_path / "c_garbage.wav").write_bytes(b"RIFX\x00\x00junk")
    (tmp_path / "d_empty.wav").write_bytes(b"")
    (tmp_path / "e_cut.wav").write_bytes((tmp_path / "a_good.wav").read_bytes()[:3000])
    write_wav(tmp_path / "f_8k.wav", x, rate=8000)
    flac = write_flac(tmp_path / "h.flac", x).read_bytes()
    (tmp_path / "h_bad.flac").write_bytes(flac[:60] + bytes(200) + flac[260:])
    (tmp_path / "h.flac").unlink()
    names = ["a_good.wav", "b_good.wav", "c_garbage.wav", "d_empty.wav", "e_cut.wav",
             "f_8k.wav", "g_missing.wav", "h_bad.flac"]
    (tmp_path / "m.tsv").write_text(".\n" + "".join(f"{n}\t4000\n" for n in names))
    return tmp_path / "m.tsv"


BAD_AUDIO = ["c_garbage.wav", "d_empty.wav", "e_cut.wav", "f_8k.wav", "g_missing.wav",
             "h_bad.flac"]


@pytest.mark.parametrize("name", BAD_AUDIO)
def test_dali_bad_audio_fails_naming_the_file(tmp_path, name):
    manifest = _bad_audio_manifest(tmp_path)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(ln for ln in lines if "good" in ln or ln.startswith(name)
                                  or ln == ".") + "\n")
    ds = build_dataset(DataConfig(path=str(manifest)), "audio")
    with pytest.raises(DataError) as err:
        run(DaliAudioLoader, ds, 3, 3, max_steps=2)
    assert name in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_dali_bad_audio_skipped_and_counted(tmp_path):
    ds = build_dataset(DataConfig(path=str(_bad_audio_manifest(tmp_path)), on_bad_file="skip",
                                  pad_audio=True), "audio")
    out = run(DaliAudioLoader, ds, 8, 8, max_steps=1, skip_bad=True)[0]
    assert out["source"].shape == (2, 4000), out["source"].shape
    assert sorted(Path(p).name for p in out["bad_files"]) == BAD_AUDIO, out["bad_files"]
    # The torch loader (which reads WAV only) skips the same WAV cases.
    manifest = tmp_path / "m.tsv"
    manifest.write_text(manifest.read_text().replace("h_bad.flac", "g_missing.wav"))
    ds = build_dataset(DataConfig(path=str(manifest), on_bad_file="skip", pad_audio=True), "audio")
    ref = torch_run(ds, 8, 8, max_steps=1, skip_bad=True)[0]
    assert sorted({Path(p).name for p in ref["bad_files"]}) == BAD_AUDIO[:-1], ref["bad_files"]
    assert ref["source"].shape == (2, 4000)


# ---------------------------------------------------------------- selection


def test_loader_selection_auto_dali_torch():
    img = DataConfig(path=str(DIGITS))
    assert choose_loader(img, "image") == "dali" and choose_loader(img, "audio") == "dali"
    assert choose_loader(img, "text") == "torch"
    img.loader = "torch"
    assert choose_loader(img, "image") == "torch"
    img.loader = "dali"
    with pytest.raises(ConfigError, match="data.loader"):
        choose_loader(img, "text")
    ds = build_dataset(DataConfig(path=str(DIGITS), img_size=16), "image")
    loader = build_loader(ds, img, "image", BatchPlan.make(4, 4, 1), 0, 0, 0, 1)
    assert isinstance(loader, DaliImageLoader) and len(loader) == 1


# ---------------------------------------------------------------- thread affinity


def _threads() -> dict:
    """{thread id: (name, CPUs it may run on)} of this process."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        allowed = next(l.split()[1] for l in status if l.startswith("Cpus_allowed_list"))
        out[task.name] = (name, allowed)
    return out


def _worker_cpus(cpus, monkeypatch) -> list:
    """CPUs of the DALI worker threads a loader given `cpus` starts, while it runs."""
    monkeypatch.delenv("DALI_AFFINITY_MASK", raising=False)
    ds = build_dataset(DataConfig(path=str(DIGITS), img_size=16), "image")
    before = set(_threads())
    batches = iter(DaliImageLoader(ds, BatchPlan.make(4, 4, 1), 0, 3, 0, 2, num_threads=2,
                                   cpus=cpus))
    next(batches)
    workers = [allowed for tid, (name, allowed) in _threads().items()
               if tid not in before and name.startswith("[DALI][TP")]
    batches.close()
    return workers


def test_dali_worker_threads_stay_on_the_ranks_cpus(monkeypatch):
    """Given this rank's CPUs (cpu_setup.dali_cpus), DALI's worker threads run on them, one CPU
    each from DALI_AFFINITY_MASK; given none, DALI leaves them on every CPU the process has."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 usable CPUs to tell pinned threads from unpinned ones")
    assert affinity_mask([3, 7], 3) == "3,7,3" and affinity_mask([3, 7, 9], 1) == "3,7,9"
    cpu = allowed[-1]
    pinned = _worker_cpus([cpu], monkeypatch)
    assert pinned == [str(cpu)] * 2, f"DALI workers on CPUs {pinned}, the rank's is {cpu}"
    assert os.environ["DALI_AFFINITY_MASK"] == f"{cpu},{cpu}"
    free = _worker_cpus(None, monkeypatch)
    assert len(free) == 2 and all(parse_cpulist(a) == allowed for a in free), \
        f"unpinned DALI workers on CPUs {free}, the process has {allowed}"
    assert sorted(os.sched_getaffinity(0)) == allowed, "the loader moved the training thread"
