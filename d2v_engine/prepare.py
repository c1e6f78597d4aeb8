"""Check a raw data folder once, offline, and write what the loaders read plus a report.

    d2v-prepare audio SRC_DIR OUT_DIR [--valid-percent P] [--sample-rate 16000]
                                 [--resample] [--min-seconds S] [--max-seconds S] [--workers N]
    d2v-prepare image SRC_DIR OUT_DIR [--valid-percent P] [--workers N]
    d2v-prepare text SRC OUT_DIR [--docs file|paragraphs|lines] [--valid-percent P]
                                [--vocab-size 8192 | --tokenizer tokenizer.json] [--min-tokens N]
                                [--errors strict|replace] [--no-dedup] [--workers N]

Every file is decoded once, in a pool over the machine's cores, with the same decoder the
loader uses, so a file that passes here loads in training. What each writes in OUT_DIR:

audio  train.tsv / valid.tsv, fairseq manifests: the root line (SRC_DIR, absolute), then
       `relative_path<TAB>num_samples`. With --resample, other rates and several channels are
       resampled (band-limited, FFT) / averaged to mono and written as 16-bit WAV under
       OUT_DIR/resampled/ (never over the source); their manifest paths are relative to the root
       too (they start with ../ when OUT_DIR is outside SRC_DIR). data.path=OUT_DIR.
image  train.tsv (/ valid.tsv): the root line, then `relative_path[<TAB>label]`; class
       sub-folders (sorted by name) become labels 0..n-1, their names in classes.txt.
       data.path=OUT_DIR/train.tsv.
text   the token folder of d2v_engine/data/text.py: meta.json, tokenizer.json, train.bin / .idx
       (valid.bin / .idx); documents rejected by reason (d2v_engine/prepare_text.py). data.path=OUT_DIR.
report.json  {"accepted", "rejected": {reason: count}, "rejected_files": [{"path", "reason"}]
       (first 100; text adds the byte "offset"), "total_seconds" (audio) | "total_tokens"
       (text), "lengths": {"min", "p50", "p95", "max"}} with lengths in seconds (audio),
       short-side pixels (image), tokens per document, </s> included (text).

--valid-percent is a fraction, as in fairseq's wav2vec_manifest (0.01 = 1 %); the held-out files
are a seeded draw (--seed), so the split is reproducible. Exit 0 when anything was accepted;
exit 2, with the counts by reason and no manifest, when nothing was. Every error is one line
naming the file or option and the reason, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import stat
import sys
import time
import wave
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from d2v_engine.errors import DataError, debug, error_line

AUDIO_EXTENSIONS = (".wav", ".flac")
MAX_LISTED = 100

# Rejection reasons (report.json keys).
EMPTY_FILE = "empty_file"  # zero bytes
NOT_AUDIO = "not_audio"  # no WAV / FLAC signature
NOT_IMAGE = "not_image"  # no image format recognised
TRUNCATED = "truncated"  # the file ends before its declared content
CORRUPT = "corrupt"  # recognised format, but decoding failed
UNSUPPORTED = "unsupported_encoding"  # a well-formed file the installed decoders cannot read
NO_SAMPLES = "no_samples"  # decodes to zero audio frames
SAMPLE_RATE = "wrong_sample_rate"  # without --resample
CHANNELS = "not_mono"  # without --resample
TOO_SHORT = "too_short"  # below --min-seconds
TOO_LONG = "too_long"  # above --max-seconds
NON_FINITE = "non_finite"  # float samples NaN / Inf, or too large to normalize
NOT_REGULAR = "not_regular_file"  # a FIFO, a device, a socket
TOO_LARGE_FILE = "too_large"  # over --max-file-bytes
UNSAFE_NAME = "unsafe_name"  # a TAB or a line break in the path: a .tsv row cannot hold it


# ----------------------------------------------------------------------------------------------
# shared: scanning, progress, the pool, the report


def find_files(src: Path, extensions: tuple[str, ...], follow_symlinks: bool = True,
               skipped: list[str] | None = None) -> list[str]:
    """Paths relative to src of every file with one of `extensions`, recursively, sorted.

    No folder is read twice: a symlinked folder is followed only when it leads outside src to a
    folder not read yet (a link back into src is a loop or a second name for a folder already
    listed); follow_symlinks=False follows none and leaves symlinked files out too. The folders
    left out are appended to `skipped` (relative paths)."""
    src = Path(src)
    inside = os.path.realpath(src)
    seen: set[tuple[int, int]] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=follow_symlinks):
        info = os.stat(dirpath)
        seen.add((info.st_dev, info.st_ino))
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            if os.path.islink(full) and not _follow(full, inside, seen, follow_symlinks):
                if skipped is not None:
                    skipped.append(os.path.relpath(full, src))
                continue
            keep.append(d)
        dirnames[:] = keep
        rel_dir = os.path.relpath(dirpath, src)
        for name in sorted(filenames):
            if not name.lower().endswith(extensions) or name.startswith("."):
                continue
            if not follow_symlinks and os.path.islink(os.path.join(dirpath, name)):
                continue
            found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    return found


def _follow(link: str, inside: str, seen: set, follow_symlinks: bool) -> bool:
    if not follow_symlinks:
        return False
    target = os.path.realpath(link)
    try:
        info = os.stat(target)
    except OSError:  # a dangling link
        return False
    if target == inside or target.startswith(inside + os.sep) or \
            (info.st_dev, info.st_ino) in seen:
        return False
    seen.add((info.st_dev, info.st_ino))
    return True


def scan_sources(src: Path, extensions: tuple[str, ...], args) -> tuple[list[str], list[tuple]]:
    """(files to check, [(path, unsafe_name)]) under src, saying which symlinked folders it did
    not follow; names a .tsv manifest cannot hold (a TAB or a line break) are rejected here."""
    skipped: list[str] = []
    files = find_files(src, extensions, not args.no_follow_symlinks, skipped)
    if skipped:
        print(f"d2v-engine prepare: read no folder twice: did not follow {len(skipped)} symlinked "
              f"folder(s) ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}): "
              + ("--no-follow-symlinks" if args.no_follow_symlinks else
                 "they lead back into the source or to a folder already read"), file=sys.stderr)
    unsafe = [(f, UNSAFE_NAME) for f in files if any(c in f for c in "\t\n\r")]
    return [f for f in files if not any(c in f for c in "\t\n\r")], unsafe


def regular_file_reason(path: Path, max_bytes: int) -> str | None:
    """NOT_REGULAR / TOO_LARGE / EMPTY_FILE for a file prepare must not read, else None."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        return NOT_REGULAR
    if info.st_size > max_bytes:
        return TOO_LARGE_FILE
    return EMPTY_FILE if info.st_size == 0 else None


class ProgressBar:
    """A one-line stderr bar (on a terminal), else a line every 10 %; at most ~5 redraws/s."""

    def __init__(self, total: int, what: str, enabled: bool = True, unit: str = "files"):
        self.total, self.what, self.enabled = total, what, enabled and total > 0
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.time()
        self.next_tenth = 1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.time()
        rate = done / max(now - self.start, 1e-9)
        if self.tty:
            if now - self.last < 0.2 and done < self.total:
                return
            self.last = now
            filled = int(30 * done / self.total)
            sys.stderr.write(f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{done}/{self.total} {self.unit}, {rate:.0f}/s")
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif done * 10 >= self.next_tenth * self.total:
            while done * 10 >= self.next_tenth * self.total:
                self.next_tenth += 1
            print(f"{self.what}: {done}/{self.total} {self.unit}, {rate:.0f}/s",
                  file=sys.stderr, flush=True)


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def check_all(worker, jobs: list, workers: int, what: str, progress: bool = True) -> list:
    """worker(job) for every job, in order, over a process pool (in-process for one worker)."""
    bar = ProgressBar(len(jobs), what, progress)
    results = []
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            results.append(worker(job))
            bar.update(len(results))
        return results
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    # An executor, not multiprocessing.Pool: a worker killed from outside (the OOM killer, a
    # SIGKILL) breaks the executor with an error, where Pool.imap would wait for it forever.
    try:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            for result in pool.map(worker, jobs, chunksize=chunk):
                results.append(result)
                bar.update(len(results))
    except BrokenProcessPool:
        raise DataError(f"{what}: a worker process died (killed from outside, e.g. out of "
                        f"memory) after {len(results)} of {len(jobs)} files; run again, with "
                        "fewer --workers if memory is short") from None
    return results


def length_stats(values) -> dict:
    """{"min", "p50", "p95", "max"} of the accepted samples' lengths (None when there are none)."""
    if len(values) == 0:
        return {"min": None, "p50": None, "p95": None, "max": None}
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def _fixes() -> dict:
    """What accepts the files rejected for a reason that is not the file's fault."""
    from d2v_engine.data.audio import SOUNDFILE_FIX

    return {UNSUPPORTED: SOUNDFILE_FIX, SAMPLE_RATE: "--resample converts them",
            CHANNELS: "--resample converts them"}


def build_report(accepted: int, rejected: list[tuple], lengths, **totals) -> dict:
    """The report.json object; `rejected` is [(path, reason)] or [(path, reason, byte offset)]
    in scan order."""
    counts = dict(sorted(Counter(r[1] for r in rejected).items()))
    report = {"accepted": accepted,
              "rejected": counts,
              "rejected_files": [{"path": r[0], "reason": r[1],
                                  **({"offset": int(r[2])} if len(r) > 2 else {})}
                                 for r in rejected[:MAX_LISTED]]}
    fixes = {reason: fix for reason, fix in _fixes().items() if reason in counts}
    if fixes:
        report["fixes"] = fixes
    report.update(totals)
    report["lengths"] = length_stats(lengths)
    return report


def write_report(out_dir: Path, report: dict, what: str = "file") -> int:
    """Writes OUT_DIR/report.json, prints a summary; the exit code (0 accepted, 2 none)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    fixes = report.get("fixes", {})
    counts = ", ".join(f"{k} {v}" + (f" ({fixes[k]})" if k in fixes else "")
                       for k, v in report["rejected"].items()) or "none"
    if report["accepted"] == 0:
        print(f"error: no {what} accepted; rejected by reason: {counts} (details in "
              f"{out_dir / 'report.json'})", file=sys.stderr)
        return 2
    print(f"d2v-engine prepare: accepted {report['accepted']} {what}s, rejected: {counts}; "
          f"report {out_dir / 'report.json'}", file=sys.stderr)
    return 0


def split_valid(count: int, valid_percent: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out entries: round(count * valid_percent) of them, seeded; at
    least one when valid_percent > 0 and there are two entries or more (valid.tsv was asked for)."""
    is_valid = np.zeros(count, dtype=bool)
    n_valid = int(round(count * valid_percent))
    if valid_percent > 0 and count >= 2:
        n_valid = max(1, n_valid)
    if n_valid:
        is_valid[np.random.default_rng(seed).permutation(count)[:n_valid]] = True
    return is_valid


def _warn_no_valid(valid_percent: float, is_valid: np.ndarray) -> None:
    if valid_percent > 0 and not is_valid.any():
        print(f"d2v-engine prepare: warning: --valid-percent {valid_percent} but only "
              f"{len(is_valid)} file accepted: it stays in train.tsv, no valid.tsv written",
              file=sys.stderr)


def _remove_stale(out_dir: Path, names: tuple[str, ...]) -> None:
    # A manifest from an earlier prepare of the same OUT_DIR must not outlive a failed one.
    for name in names:
        (out_dir / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1] (0.01 = 1 %)")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    from d2v_engine.prepare_text import add_arguments as text_arguments

    parser = argparse.ArgumentParser(
        prog="d2v-prepare",
        description="Check a raw data folder and write the manifests the loaders read, plus "
                    "OUT_DIR/report.json. Exit 0 when anything was accepted, 2 when nothing was.")
    sub = parser.add_subparsers(dest="modality", required=True)

    def common(p):
        p.add_argument("src", metavar="SRC_DIR", help="folder scanned recursively")
        p.add_argument("out", metavar="OUT_DIR", help="where manifests and report.json go")
        p.add_argument("--valid-percent", type=_fraction, default=0.0,
                       help="fraction of accepted files held out in valid.tsv (0.01 = 1 %%)")
        p.add_argument("--seed", type=int, default=42, help="seed of the valid draw")
        p.add_argument("--workers", type=_positive_int, default=default_workers(),
                       help="decoding processes (default: the usable cores)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--no-follow-symlinks", action="store_true",
                       help="follow no symlinked folder or file (default: those leading outside "
                            "SRC_DIR, each folder read once)")
        p.add_argument("--max-file-bytes", type=_positive_int, default=1 << 30,
                       help="files over this many bytes are rejected as too_large (default "
                            "1 GiB, the loaders' data.max_file_bytes)")

    audio = sub.add_parser("audio", help="wav/flac folder -> train.tsv / valid.tsv")
    common(audio)
    audio.add_argument("--sample-rate", type=_positive_int, default=16000)
    audio.add_argument("--resample", action="store_true",
                       help="resample other rates and downmix several channels into "
                            "OUT_DIR/resampled/ instead of rejecting them")
    audio.add_argument("--min-seconds", type=_seconds, default=None)
    audio.add_argument("--max-seconds", type=_seconds, default=None)
    image = sub.add_parser("image", help="image folder (class sub-folders = labels) -> train.tsv")
    common(image)
    text = sub.add_parser(
        "text", help="text folder or file -> token folder (train.bin / .idx, meta.json)",
        prog=prog, usage=f"{prog or parser.prog + ' text'} SRC OUT_DIR [options]\n       "
                         f"{prog or parser.prog + ' text'} OUT_DIR SPLIT=PATH [SPLIT=PATH ...] "
                         "[options]")
    text_arguments(text)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The whole command; the exit code (`prog` names d2v_engine.data.tokenize in text usage lines)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser(prog).parse_args(argv)
    except SystemExit as e:  # argparse's usage error (exit 2) or --help (exit 0)
        return 2 if isinstance(e.code, str) else int(e.code or 0)
    try:
        if args.modality == "text":
            from d2v_engine.prepare_text import prepare_text
            return prepare_text(args)
        return prepare_audio(args) if args.modality == "audio" else prepare_image(args)
    except Exception as e:  # an output folder that cannot be written, a file gone while reading
        line = error_line(e)
        if line is None or debug():
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
