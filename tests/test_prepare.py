"""d2v-prepare on folders with planted bad files: report counts, exact manifest lines, exit codes,
and the loaders read what it writes."""
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2v_engine.config import DataConfig
from d2v_engine.data import build_dataset
from d2v_engine.cli.prepare import main
from d2v_engine.prepare.media import resample

ROOT = Path(__file__).resolve().parent.parent


def _wav(path, samples, rate=16000, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


@pytest.fixture
def audio_src(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    noise = lambda n: rng.standard_normal(n) * 0.1  # noqa: E731
    _wav(src / "spk1" / "a.wav", noise(16000))
    _wav(src / "spk1" / "b.wav", noise(8000))
    _wav(src / "spk2" / "deep" / "c.wav", noise(12000))
    _wav(src / "bad" / "rate8k.wav", noise(8000), rate=8000)
    _wav(src / "bad" / "stereo.wav", noise(2 * 16000), channels=2)
    _wav(src / "bad" / "short.wav", noise(800))
    _wav(src / "bad" / "long.wav", noise(16000 * 3))
    _wav(src / "bad" / "header_only.wav", noise(0))
    (src / "bad" / "zero.wav").write_bytes(b"")
    (src / "bad" / "text.wav").write_text("this is not audio at all")
    good = (src / "spk1" / "a.wav").read_bytes()
    (src / "bad" / "cut.wav").write_bytes(good[:len(good) // 2])
    (src / "bad" / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(200)))
    (src / "notes.txt").write_text("ignored: not .wav/.flac")
    return src


try:
    import soundfile  # noqa: F401
    HAVE_SOUNDFILE = True
except ImportError:
    HAVE_SOUNDFILE = False
# A FLAC needs soundfile to decode: without it, a damaged one with a sound header cannot be told
# from a good one, and is an encoding this installation does not read.
FLAC_REASON = "corrupt" if HAVE_SOUNDFILE else "unsupported_encoding"
AUDIO_REJECTED = dict(sorted({
    FLAC_REASON: 1, "empty_file": 1, "no_samples": 1, "not_audio": 1, "not_mono": 1,
    "too_long": 1, "too_short": 1, "truncated": 1, "wrong_sample_rate": 1}.items()))


def test_audio_report_counts_and_exact_manifest_lines(audio_src, tmp_path):
    out = tmp_path / "out"
    code = main(["audio", str(audio_src), str(out), "--min-seconds", "0.1", "--max-seconds", "2",
                 "--workers", "2", "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 3
    assert report["rejected"] == AUDIO_REJECTED
    assert {(r["path"], r["reason"]) for r in report["rejected_files"]} == {
        ("bad/corrupt.flac", FLAC_REASON), ("bad/zero.wav", "empty_file"),
        ("bad/header_only.wav", "no_samples"), ("bad/text.wav", "not_audio"),
        ("bad/stereo.wav", "not_mono"), ("bad/long.wav", "too_long"),
        ("bad/short.wav", "too_short"), ("bad/cut.wav", "truncated"),
        ("bad/rate8k.wav", "wrong_sample_rate")}
    assert report["total_seconds"] == pytest.approx(36000 / 16000)
    assert report["lengths"] == {"min": 0.5, "p50": 0.75, "p95": pytest.approx(0.975), "max": 1.0}
    assert (out / "train.tsv").read_text().splitlines() == [
        str(audio_src.resolve()), "spk1/a.wav\t16000", "spk1/b.wav\t8000",
        "spk2/deep/c.wav\t12000"]
    assert not (out / "valid.tsv").exists()
    data = build_dataset(DataConfig(path=str(out), min_sample_size=0), "audio")
    rng = np.random.default_rng(0)
    assert [data.load(i, rng)["source"].numel() for i in range(len(data))] == [16000, 8000, 12000]


def test_audio_resample_writes_beside_out_never_over_the_source(audio_src, tmp_path):
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in audio_src.rglob("*") if p.is_file()}
    assert main(["audio", str(audio_src), str(out), "--resample", "--min-seconds", "0.1",
                 "--max-seconds", "2", "--workers", "1", "--quiet"]) == 0
    assert {p: p.read_bytes() for p in audio_src.rglob("*") if p.is_file()} == before
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 5
    assert "wrong_sample_rate" not in report["rejected"] and "not_mono" not in report["rejected"]
    lines = (out / "train.tsv").read_text().splitlines()
    assert lines[1:3] == ["../out/resampled/bad/rate8k.wav\t16000",
                          "../out/resampled/bad/stereo.wav\t16000"]
    assert (out / "resampled" / "bad" / "rate8k.wav").is_file()
    data = build_dataset(DataConfig(path=str(out), min_sample_size=0), "audio")
    assert data.load(0, np.random.default_rng(0))["source"].numel() == 16000


def test_valid_split_is_a_seeded_fraction(audio_src, tmp_path):
    args = ["--valid-percent", "0.34", "--workers", "1", "--quiet", "--min-seconds", "0.1"]
    assert main(["audio", str(audio_src), str(tmp_path / "a"), *args]) == 0
    assert main(["audio", str(audio_src), str(tmp_path / "b"), *args]) == 0
    train = (tmp_path / "a" / "train.tsv").read_text().splitlines()
    valid = (tmp_path / "a" / "valid.tsv").read_text().splitlines()
    assert len(train) - 1 == 3 and len(valid) - 1 == 1  # round(4 accepted x 0.34) held out
    assert valid == (tmp_path / "b" / "valid.tsv").read_text().splitlines()


def test_a_tiny_valid_percent_still_holds_out_one_file(audio_src, tmp_path):
    out = tmp_path / "out"
    assert main(["audio", str(audio_src), str(out), "--valid-percent", "0.01", "--workers", "1",
                 "--quiet", "--min-seconds", "0.1"]) == 0  # 0.01 x 4 files rounds to 0
    assert len((out / "valid.tsv").read_text().splitlines()) - 1 == 1
    assert len((out / "train.tsv").read_text().splitlines()) - 1 == 3


def _wav24(path, samples, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = b"".join(int(v * 8388607).to_bytes(3, "little", signed=True) for v in samples)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(3)
        w.setframerate(rate)
        w.writeframes(pcm)


def test_a_24_bit_wav_needs_soundfile_not_a_corrupt_verdict(tmp_path, monkeypatch, capsys):
    x = np.sin(np.arange(8000) * 0.01) * 0.5
    _wav24(tmp_path / "src" / "a24.wav", x)
    _wav(tmp_path / "src" / "b16.wav", x)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # as on an install without the extra
    assert main(["audio", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1",
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rejected_files"] == [{"path": "a24.wav", "reason": "unsupported_encoding"}]
    assert "pip install soundfile" in report["fixes"]["unsupported_encoding"]
    assert "unsupported_encoding 1 (pip install soundfile" in capsys.readouterr().err
    # Its header is sound: the DALI loader (libsndfile) and crop groups read its length.
    from d2v_engine.data.audio import audio_file_info
    assert audio_file_info(tmp_path / "src" / "a24.wav") == (16000, 1, 8000)


def test_nothing_accepted_exits_2_with_counts_and_no_manifest(audio_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.tsv").write_text("stale\n")
    r = subprocess.run([sys.executable, "-m", "d2v_engine.cli.prepare", "audio", str(audio_src / "bad"),
                        str(out), "--quiet", "--min-seconds", "0.1", "--max-seconds", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no file accepted" in r.stderr and "wrong_sample_rate 1" in r.stderr
    assert "Traceback" not in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 0 and report["rejected"] == AUDIO_REJECTED
    assert report["lengths"] == {"min": None, "p50": None, "p95": None, "max": None}
    assert not (out / "train.tsv").exists()


def test_resample_keeps_a_tone_and_the_length():
    rate_in, rate_out = 8000, 16000
    t = np.arange(rate_in) / rate_in
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    up = resample(tone, rate_in, rate_out)
    assert up.shape == (rate_out,)
    want = np.sin(2 * np.pi * 440 * np.arange(rate_out) / rate_out)
    assert np.abs(up - want)[100:-100].max() < 1e-3


@pytest.fixture
def image_src(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "img"

    def save(path, size, fmt):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, fmt)

    save(src / "cat" / "a.jpg", (40, 30), "JPEG")
    save(src / "cat" / "b.png", (50, 60), "PNG")
    save(src / "dog" / "c.jpg", (64, 64), "JPEG")
    good = (src / "cat" / "a.jpg").read_bytes()
    (src / "dog" / "cut.jpg").write_bytes(good[:len(good) // 2])
    (src / "dog" / "zero.jpg").write_bytes(b"")
    (src / "dog" / "text.png").write_text("not an image at all")
    png = bytearray((src / "cat" / "b.png").read_bytes())
    png[60:120] = bytes(60)
    (src / "dog" / "corrupt.png").write_bytes(bytes(png))
    return src


def test_image_report_counts_list_and_loader(image_src, tmp_path):
    out = tmp_path / "out"
    assert main(["image", str(image_src), str(out), "--workers", "2", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accepted"] == 3 and report["classes"] == 2
    assert report["rejected"] == {"corrupt": 1, "empty_file": 1, "not_image": 1, "truncated": 1}
    assert {(r["path"], r["reason"]) for r in report["rejected_files"]} == {
        ("dog/corrupt.png", "corrupt"), ("dog/zero.jpg", "empty_file"),
        ("dog/text.png", "not_image"), ("dog/cut.jpg", "truncated")}
    assert report["lengths"]["min"] == 30 and report["lengths"]["max"] == 64
    assert (out / "train.tsv").read_text().splitlines() == [
        str(image_src.resolve()), "cat/a.jpg\t0", "cat/b.png\t0", "dog/c.jpg\t1"]
    assert (out / "classes.txt").read_text().split() == ["cat", "dog"]
    for path in (out, out / "train.tsv"):  # the folder or the list itself as data.path
        data = build_dataset(DataConfig(path=str(path), img_size=16), "image")
        assert len(data) == 3 and data.labels == [0, 0, 1] and data.classes == ["cat", "dog"]
        assert data.load(2, np.random.default_rng(0))["source"].shape == (3, 16, 16)


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["audio", str(tmp_path), str(tmp_path / "o"), "--valid-percent", "5"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main(["image", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
