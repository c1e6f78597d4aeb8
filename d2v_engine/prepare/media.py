"""Audio and image sources checked for d2v-prepare: every file decoded once with the loader's own
decoder (so a file that passes here loads in training), the manifests the loaders read written.
The command and what it writes: d2v_engine/cli/prepare.py."""
from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

from d2v_engine.errors import DataError
from d2v_engine.prepare.common import (
    CHANNELS, CORRUPT, NON_FINITE, NOT_AUDIO, NOT_IMAGE, NO_SAMPLES, SAMPLE_RATE, TOO_LONG, TOO_SHORT, TRUNCATED, UNSUPPORTED, _remove_stale, _warn_no_valid, build_report, check_all, regular_file_reason, scan_sources, split_valid, write_report,
)

AUDIO_EXTENSIONS = (".wav", ".flac")


# audio

def _audio_signature_ok(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return (head[:4] == b"RIFF" and head[8:12] == b"WAVE") or head[:4] == b"fLaC"


def resample(wave_: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by zero-padding / truncating its spectrum."""
    n = wave_.shape[0]
    n_out = int(round(n * dst_rate / src_rate))
    if n_out == n or n == 0:
        return wave_.astype(np.float32)
    spectrum = np.fft.rfft(wave_.astype(np.float64))
    bins = n_out // 2 + 1
    out = np.zeros(bins, dtype=np.complex128)
    keep = min(bins, spectrum.shape[0])
    out[:keep] = spectrum[:keep]
    if n_out < n and n_out % 2 == 0:
        out[-1] = out[-1].real  # the new Nyquist bin of a real signal is real
    return (np.fft.irfft(out, n_out) * (n_out / n)).astype(np.float32)


def write_wav16(path: Path, samples: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV (what the loader reads without any dependency)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def check_audio(job: tuple) -> tuple:
    """(relative path, manifest path or None, num_samples at the target rate, reason or None)."""
    from d2v_engine.data.audio import NonFiniteAudio, UnsupportedEncoding, read_audio

    rel, src, out_dir, rate, do_resample, min_s, max_s, max_bytes = job
    path = Path(src) / rel
    try:
        reason = regular_file_reason(path, max_bytes)
        if reason is not None:
            return rel, None, 0, reason
        if not _audio_signature_ok(path):
            return rel, None, 0, NOT_AUDIO
        samples, file_rate, channels = read_audio(path)
    except OSError:
        return rel, None, 0, CORRUPT
    except UnsupportedEncoding:
        return rel, None, 0, UNSUPPORTED
    except NonFiniteAudio:
        return rel, None, 0, NON_FINITE
    except ValueError as e:
        return rel, None, 0, TRUNCATED if "truncated" in str(e).lower() else CORRUPT
    if samples.shape[0] == 0:
        return rel, None, 0, NO_SAMPLES
    converted = file_rate != rate or channels != 1
    if converted and not do_resample:
        return rel, None, 0, SAMPLE_RATE if file_rate != rate else CHANNELS
    mono = samples.mean(axis=1) if channels > 1 else samples[:, 0]
    num = int(round(mono.shape[0] * rate / file_rate)) if file_rate != rate else mono.shape[0]
    seconds = num / rate
    if min_s is not None and seconds < min_s:
        return rel, None, num, TOO_SHORT
    if max_s is not None and seconds > max_s:
        return rel, None, num, TOO_LONG
    if not converted:
        return rel, rel, num, None
    mono = resample(mono, file_rate, rate) if file_rate != rate else mono
    target = Path(out_dir) / "resampled" / Path(rel).with_suffix(".wav")
    write_wav16(target, mono, rate)
    return rel, os.path.relpath(target, src), mono.shape[0], None


def prepare_audio(args) -> int:
    import d2v_engine.data.audio  # noqa: F401  (imported once here, inherited by the forked workers)

    src, out = Path(args.src).resolve(), Path(args.out).resolve()
    if not src.is_dir():
        raise DataError(f"audio source folder not found: {src}")
    files, unsafe = scan_sources(src, AUDIO_EXTENSIONS, args)
    jobs = [(rel, str(src), str(out), args.sample_rate, args.resample, args.min_seconds,
             args.max_seconds, args.max_file_bytes) for rel in files]
    results = check_all(check_audio, jobs, args.workers, "checking audio", not args.quiet)
    good = [(entry, num) for _, entry, num, reason in results if reason is None]
    rejected = unsafe + [(rel, reason) for rel, _, _, reason in results if reason is not None]
    report = build_report(len(good), rejected, [n / args.sample_rate for _, n in good],
                          total_seconds=sum(n for _, n in good) / args.sample_rate)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, ("train.tsv", "valid.tsv"))
    if good:
        is_valid = split_valid(len(good), args.valid_percent, args.seed)
        _warn_no_valid(args.valid_percent, is_valid)
        for name, want in (("train.tsv", False), ("valid.tsv", True)):
            rows = [f"{entry}\t{num}" for (entry, num), v in zip(good, is_valid) if v == want]
            if rows or name == "train.tsv":
                (out / name).write_text("\n".join([str(src)] + rows) + "\n")
    return write_report(out, report)


# image

def check_image(job: tuple) -> tuple:
    """(relative path, short side in pixels, reason or None): full decode, as the loader does."""
    from PIL import Image, UnidentifiedImageError

    rel, src, max_bytes = job
    path = Path(src) / rel
    try:
        reason = regular_file_reason(path, max_bytes)
        if reason is not None:
            return rel, 0, reason
        with Image.open(path) as img:
            img.load()
            img.convert("RGB")
            return rel, min(img.size), None
    except UnidentifiedImageError:
        return rel, 0, NOT_IMAGE
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return rel, 0, TRUNCATED if "truncat" in str(e).lower() else CORRUPT


def prepare_image(args) -> int:
    from PIL import Image  # noqa: F401  (imported once here, inherited by the forked workers)

    from d2v_engine.data.images import IMAGE_EXTENSIONS

    src, out = Path(args.src).resolve(), Path(args.out).resolve()
    if not src.is_dir():
        raise DataError(f"image source folder not found: {src}")
    files, unsafe = scan_sources(src, IMAGE_EXTENSIONS, args)
    top = sorted({f.split(os.sep, 1)[0] for f in files if os.sep in f})
    loose = [f for f in files if os.sep not in f]
    if top and loose:
        raise DataError(f"{src} mixes images ({loose[0]}, ...) and class folders ({top[0]}, ...); "
                        "use one or the other")
    results = check_all(check_image, [(rel, str(src), args.max_file_bytes) for rel in files],
                        args.workers, "checking images", not args.quiet)
    good = [(rel, side) for rel, side, reason in results if reason is None]
    rejected = unsafe + [(rel, reason) for rel, _, reason in results if reason is not None]
    classes = sorted({rel.split(os.sep, 1)[0] for rel, _ in good}) if top else []
    report = build_report(len(good), rejected, [side for _, side in good])
    report["classes"] = len(classes)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, ("train.tsv", "valid.tsv", "classes.txt"))
    if good:
        label_of = {name: i for i, name in enumerate(classes)}
        is_valid = split_valid(len(good), args.valid_percent, args.seed)
        _warn_no_valid(args.valid_percent, is_valid)
        for name, want in (("train.tsv", False), ("valid.tsv", True)):
            rows = [rel + (f"\t{label_of[rel.split(os.sep, 1)[0]]}" if classes else "")
                    for (rel, _), v in zip(good, is_valid) if v == want]
            if rows or name == "train.tsv":
                (out / name).write_text("\n".join([str(src)] + rows) + "\n")
        if classes:
            (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return write_report(out, report)
