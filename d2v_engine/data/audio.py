"""Raw-waveform dataset from a fairseq manifest (CPU, no audio library needed).

Manifest (`<name>.tsv`): the first line is the root folder of the audio files (absolute, or relative
to the manifest's own folder); every other line is `relative/path.wav<TAB>num_samples`. An optional
`<name>.label` beside it holds one integer label per manifest entry, in the same order.

Semantics follow fairseq's RawAudioDataset: entries shorter than data.min_sample_size are dropped
using the manifest sizes; each waveform is normalized over the whole utterance (layer norm without
affine) before it is cropped to data.max_sample_size; batches are cropped to a shortest clip
(below), or zero-padded to their longest with a padding mask when data.pad_audio. A file at another
sample rate is resampled when data.resample, else a bad file; several channels are always a bad
file.

Crop groups. fairseq crops each GPU's batch to its shortest clip (and gives its rows one masked
count, require_same_masks), so its crops depend on how the global batch is cut. Here the global
batch is cut into fixed groups of data.crop_group consecutive positions (the paper's per-GPU
batch; 0: the whole global batch), and every clip of a group is cropped to the group's shortest:
the clip lengths come from the file headers (crop_length), each clip's offset from its own
generator (seed, step, position). A sample's crop therefore depends on the seed, the step, its
position and its group's lengths, never on the world size, the micro-batch or the accumulation;
the trainer gives a group's rows one masked count the same way (d2v_engine.objective.data2vec). A micro-batch
holds whole groups' parts only: train.micro_batch must divide data.crop_group (d2v_engine.planning.plan).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2v_engine.config import DataConfig
from d2v_engine.data.common import bad_file, check_file, read_labels, with_labels
from d2v_engine.errors import DataError

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def _wav_chunks(data: bytes, total: int) -> tuple[bytes, int, int]:
    """(fmt chunk, data offset, data size) of a RIFF/WAVE file whose first len(data) of `total`
    bytes are `data`; ValueError if damaged or truncated. The walk stops at the data chunk when
    the rest of the file is not in `data` (the header alone was read)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    fmt, payload, pos = None, None, 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        end = pos + 8 + size
        if end > total or (end > len(data) and chunk != b"data"):
            raise ValueError(f"'{chunk.decode('latin-1')}' chunk truncated")
        if chunk == b"fmt ":
            fmt = data[pos + 8:end]
        elif chunk == b"data":
            payload = (pos + 8, size)
            if end > len(data):
                break
        pos = end + (size & 1)  # chunks are word-aligned
    if fmt is None or len(fmt) < 16 or payload is None:
        raise ValueError("missing fmt or data chunk")
    return fmt, *payload


class NonFiniteAudio(ValueError):
    """Float samples that are NaN / Inf, or so large that the per-utterance normalization's
    float32 statistics overflow: the waveform would turn every target it touches into NaN."""


# Float WAVs hold samples near [-1, 1]; past this the sum of squares of a long utterance no longer
# fits float32 (1e6^2 x 1e8 samples ~ 1e20, well inside 3e38), so normalization stays finite.
MAX_ABS_SAMPLE = 1e6


def check_finite(samples: np.ndarray) -> None:
    """NonFiniteAudio unless every sample is finite and within +-MAX_ABS_SAMPLE."""
    if samples.size and not (np.isfinite(samples).all() and np.abs(samples).max() <= MAX_ABS_SAMPLE):
        raise NonFiniteAudio(f"non-finite samples (NaN / Inf, or beyond +-{MAX_ABS_SAMPLE:g}: "
                             "normalization would overflow)")


def check_finite_wav(path: Path | str) -> None:
    """check_finite of a float WAV's samples, read through a memory map (PCM and FLAC hold
    integers, always finite: nothing is read for them)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
        total = os.fstat(f.fileno()).st_size
    if head[:4] != b"RIFF":
        return
    code, _, _, bits, offset, size = _wav_header(head, total)
    if code == _FLOAT and size >= bits // 8:
        dtype = "<f4" if bits == 32 else "<f8"
        count = min(size, total - offset) // (bits // 8)
        if count > 0:
            check_finite(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)))


class UnsupportedEncoding(ValueError):
    """A well-formed WAV or FLAC file that the built-in decoder cannot read and the optional
    soundfile package, which can, is not installed."""


SOUNDFILE_FIX = "pip install soundfile, or pip install -e '.[audio]'"


def _wav_header(data: bytes, total: int | None = None) -> tuple[int, int, int, int, int, int]:
    """(format code, channels, rate, bits, data offset, data size) of a RIFF/WAVE file (its first
    bytes `data` of `total`, or all of it), any encoding; ValueError if damaged."""
    fmt, offset, size = _wav_chunks(data, len(data) if total is None else total)
    code = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if code == _EXTENSIBLE and len(fmt) >= 26:
        code = int.from_bytes(fmt[24:26], "little")  # first bytes of the sub-format GUID
    if channels < 1:
        raise ValueError("no channels")
    if bits < 8 or bits % 8:
        raise ValueError(f"{bits} bits per sample")
    return code, channels, rate, bits, offset, size


def _wav_format(data: bytes, total: int | None = None) -> tuple[int, int, int, int, int, int]:
    """_wav_header, and UnsupportedEncoding unless 16-bit PCM or 32-bit float (what read_wav
    decodes without a dependency)."""
    code, channels, rate, bits, offset, size = _wav_header(data, total)
    if (code, bits) not in ((_PCM, 16), (_FLOAT, 32)):
        raise UnsupportedEncoding(f"unsupported encoding (format {code}, {bits} bits); "
                                  "use 16-bit PCM or 32-bit float")
    return code, channels, rate, bits, offset, size


def _flac_info(data: bytes, total: int | None = None) -> tuple[int, int, int]:
    """(rate, channels, frames) from a FLAC file's STREAMINFO block (in its first bytes `data` of
    `total`); ValueError if damaged."""
    if len(data) < 42 or data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        raise ValueError("not a FLAC file (no fLaC marker and STREAMINFO block)")
    bits = int.from_bytes(data[18:26], "big")  # rate 20 | channels-1 3 | bps-1 5 | frames 36
    rate, channels, frames = bits >> 44, ((bits >> 41) & 7) + 1, bits & ((1 << 36) - 1)
    if rate == 0 or frames == 0:
        raise ValueError("FLAC STREAMINFO has no sample rate or no total sample count")
    if (len(data) if total is None else total) <= 42:
        raise ValueError("FLAC file has no audio frames")
    return rate, channels, frames


def audio_info(data: bytes, total: int | None = None) -> tuple[int, int, int]:
    """(sample rate, channels, frames) of a WAV or FLAC file from its header alone (no decoding):
    `data` is the whole file, or its first bytes when `total` gives the file size; ValueError for
    anything else, a truncated WAV or an empty file."""
    if total == 0 or not data:
        raise ValueError("empty file")
    if data[:4] == b"fLaC":
        return _flac_info(data, total)
    code, channels, rate, bits, _, size = _wav_header(data, total)
    return rate, channels, size // (bits // 8) // channels


_HEAD_BYTES = 1 << 16  # WAV fmt/data chunk headers and FLAC's STREAMINFO sit well inside this


def audio_file_info(path: Path | str) -> tuple[int, int, int]:
    """audio_info of a file from its first bytes and its size, without reading the samples."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        return audio_info(f.read(_HEAD_BYTES), total)


def read_wav(path: Path | str) -> tuple[np.ndarray, int, int]:
    """(samples as float32 in [-1, 1] of shape L x channels, sample rate, channels) of a RIFF/WAVE
    file holding 16-bit PCM or 32-bit float; ValueError for anything else or a damaged file."""
    data = Path(path).read_bytes()
    code, channels, rate, bits, offset, size = _wav_format(data)
    payload = memoryview(data)[offset:offset + size]
    if code == _PCM:
        samples = np.frombuffer(payload, dtype="<i2", count=len(payload) // 2)
        samples = samples.astype(np.float32) / 32768.0
    else:
        samples = np.frombuffer(payload, dtype="<f4", count=len(payload) // 4).astype(np.float32)
    frames = len(samples) // channels
    return samples[:frames * channels].reshape(frames, channels), rate, channels


def resample(wav: np.ndarray, rate: int, target: int, taps: int = 32) -> np.ndarray:
    """Band-limited resampling of a 1-D float32 signal (Hann-windowed sinc, `taps` zero crossings
    each side, cut-off at the lower Nyquist); ceil(len * target / rate) output samples, as DALI."""
    if rate == target:
        return wav
    out_len = -(-len(wav) * target // rate)
    cutoff = min(1.0, target / rate)  # fraction of the input Nyquist that survives
    half = int(np.ceil(taps / cutoff))
    t = np.arange(out_len, dtype=np.float64) * (rate / target)
    base = np.floor(t).astype(np.int64)
    k = base[:, None] + np.arange(-half + 1, half + 1)[None, :]
    dist = t[:, None] - k
    window = 0.5 + 0.5 * np.cos(np.pi * np.clip(dist / half, -1.0, 1.0))
    weights = cutoff * np.sinc(cutoff * dist) * window
    padded = np.concatenate([np.zeros(half, np.float32), wav, np.zeros(half + 1, np.float32)])
    out = np.empty(out_len, dtype=np.float32)
    for start in range(0, out_len, 8192):  # in chunks: the gather is out_len x 2*half
        rows = slice(start, start + 8192)
        out[rows] = (padded[k[rows] + half] * weights[rows]).sum(axis=1)
    return out
def read_audio(path: Path | str) -> tuple[np.ndarray, int, int]:
    """read_wav's result for any file the engine accepts: WAV (16-bit PCM or float32) without a
    dependency; other WAV encodings and FLAC through the optional `soundfile` package. The
    loader and `d2v-prepare` both decode with this, so whatever prepare accepts loads."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        try:
            samples, rate, channels = read_wav(path)
            check_finite(samples)
            return samples, rate, channels
        except UnsupportedEncoding:
            pass
    try:
        import soundfile
    except ImportError:
        with open(path, "rb") as f:  # a damaged header is damage, whatever decodes it
            audio_info(f.read(_HEAD_BYTES), os.fstat(f.fileno()).st_size)
        raise UnsupportedEncoding(
            f"decoding this {path.suffix or 'file'} needs the soundfile package ({SOUNDFILE_FIX})"
            " or the DALI loader (data.loader=dali)") from None
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    check_finite(samples)
    return samples, int(rate), samples.shape[1]


def read_manifest(manifest: Path) -> tuple[Path, list[tuple[str, int]]]:
    """(root folder, [(relative path, num_samples)]) of a fairseq .tsv manifest."""
    if not manifest.is_file():
        raise DataError(f"audio manifest not found: {manifest}")
    lines = manifest.read_text().splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{manifest}: first line must be the root folder of the audio files")
    root = Path(lines[0].strip())
    root = root if root.is_absolute() else manifest.parent / root
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip().isdigit():
            raise DataError(
                f"{manifest} line {number}: expected 'path<TAB>num_samples', got {line!r}")
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise DataError(f"{manifest} lists no audio files (only the root line)")
    if not root.is_dir():
        raise DataError(f"{manifest}: root folder {root} not found")
    return root, entries


def crop_start(u: float, size: int, length: int) -> int:
    """Offset of a `length` crop in a clip of `size` samples from the clip's uniform draw u."""
    return min(int(u * (size - length + 1)), size - length)


def crop_group_size(cfg: DataConfig, global_batch: int) -> int:
    """Positions per crop group (module docstring); 0 when batches are padded, not cropped."""
    return 0 if cfg.pad_audio else (cfg.crop_group or global_batch)


def check_format(cfg: DataConfig, path: Path, rate: int, channels: int, frames: int) -> None:
    """Raises bad_file for no samples, several channels, or a rate other than data.sample_rate
    unless data.resample: the sample is never altered silently (no down-mix)."""
    if frames == 0:
        raise bad_file(cfg.on_bad_file, path, "no audio samples")
    if channels != 1:
        raise bad_file(cfg.on_bad_file, path, f"{channels} channels; expected mono")
    if rate != cfg.sample_rate and not cfg.resample:
        raise bad_file(cfg.on_bad_file, path, f"{rate} Hz; expected data.sample_rate="
                       f"{cfg.sample_rate} Hz (data.resample=true resamples)")


class AudioManifestDataset:
    """Waveforms of a manifest; load() -> {"source": L float32 (+ "label" int)}."""

    def __init__(self, data_cfg: DataConfig, manifest: Path):
        self.cfg = data_cfg
        self.manifest = Path(manifest)
        self.root, entries = read_manifest(self.manifest)
        label_file = self.manifest.with_suffix(".label")
        labels = None
        if label_file.is_file():
            labels = read_labels(label_file, len(entries), self.manifest)
        keep = [i for i, (_, n) in enumerate(entries) if n >= data_cfg.min_sample_size]
        self.skipped = len(entries) - len(keep)
        if not keep:
            raise DataError(f"{self.manifest}: all {len(entries)} entries are shorter than "
                            f"data.min_sample_size={data_cfg.min_sample_size}")
        self.files = [entries[i][0] for i in keep]
        self.sizes = np.array([entries[i][1] for i in keep], dtype=np.int64)
        self.labels = [labels[i] for i in keep] if labels is not None else None
        self.num_labels = max(labels) + 1 if labels else 0

    def __len__(self) -> int:
        return len(self.files)

    def read(self, path: Path) -> np.ndarray:
        """Mono float32 waveform in [-1, 1] at data.sample_rate (resampled when data.resample);
        BadSample or DataError (data.on_bad_file) for a damaged file or a wrong rate/channels."""
        try:
            check_file(path, self.cfg.max_file_bytes)
            samples, rate, channels = read_audio(path)
        except FileNotFoundError:
            raise bad_file(self.cfg.on_bad_file, path, "file not found") from None
        except (OSError, ValueError) as e:
            raise bad_file(self.cfg.on_bad_file, path, str(e)) from None
        check_format(self.cfg, path, rate, channels, samples.shape[0])
        return resample(samples[:, 0], rate, self.cfg.sample_rate)

    def clip_length(self, index: int) -> int | None:
        """Samples that load(index) returns, from the file's header alone (resampled length,
        capped at data.max_sample_size); None for a file the loaders reject."""
        path = self.root / self.files[index]
        try:
            rate, channels, frames = audio_file_info(path)
            check_format(self.cfg, path, rate, channels, frames)
        except (OSError, ValueError, DataError):
            return None
        return min(-(-frames * self.cfg.sample_rate // rate), self.cfg.max_sample_size)

    def crop_length(self, indices) -> int:
        """A crop group's length: its shortest clip (header lengths; rejected files left out)."""
        lengths = [n for n in map(self.clip_length, indices) if n is not None]
        return min(lengths) if lengths else 0

    def load(self, index: int, rng: np.random.Generator) -> dict:
        """Sample `index`: "source" L float32 with L <= data.max_sample_size (+ "label" int), and
        "crop_u", the uniform draw that places its crop in a shorter batch (collate)."""
        wav = torch.from_numpy(np.ascontiguousarray(self.read(self.root / self.files[index])))
        if self.cfg.normalize:
            wav = F.layer_norm(wav, wav.shape)
        excess = wav.numel() - self.cfg.max_sample_size
        if excess > 0:
            start = int(rng.integers(0, excess + 1)) if self.cfg.augment else 0
            wav = wav[start:start + self.cfg.max_sample_size]
        sample = {"source": wav.contiguous(), "crop_u": float(rng.random())}
        if self.labels is not None:
            sample["label"] = self.labels[index]
        return sample

    def collate(self, samples: list[dict], rng: np.random.Generator | None = None, *,
                length: int | None = None) -> dict:
        """"source" B x L float32. data.pad_audio: L = longest, "padding_mask" B x L bool (True =
        pad); else L = `length` (the crop group's, crop_length) or the shortest sample, each
        longer one cropped at its own "crop_u" draw when data.augment, mask None. `rng` is not
        used: every draw is the sample's own, so a crop does not depend on its batch-mates."""
        assert samples, "collate needs at least one sample"
        sizes = [s["source"].numel() for s in samples]
        if self.cfg.pad_audio:
            length = max(sizes)
            source = torch.zeros(len(samples), length, dtype=torch.float32)
            padding_mask = torch.ones(len(samples), length, dtype=torch.bool)
            for i, (s, n) in enumerate(zip(samples, sizes)):
                source[i, :n] = s["source"]
                padding_mask[i, :n] = False
        else:
            length = min(sizes) if length is None else length
            rows = []
            for s, n in zip(samples, sizes):
                if n < length:
                    raise DataError(f"the audio clip at position {s.get('position')} of step "
                                    f"{s.get('step')} decoded to {n} samples, fewer than the "
                                    f"{length} its crop group's file headers announce")
                start = crop_start(s["crop_u"], n, length) if self.cfg.augment else 0
                rows.append(s["source"][start:start + length])
            source, padding_mask = torch.stack(rows), None
        batch = {"source": source, "padding_mask": padding_mask}
        return with_labels(batch, samples)

    def describe(self) -> str:
        """One line: manifest, counts, hours, crop/normalize settings."""
        hours = self.sizes.sum() / self.cfg.sample_rate / 3600
        labels = f", {self.num_labels} labels" if self.labels is not None else ""
        return (f"audio {self.manifest}: {len(self)} files ({hours:.2f} h){labels}, "
                f"{self.skipped} shorter than {self.cfg.min_sample_size} skipped, "
                f"crop {self.cfg.max_sample_size}, normalize={self.cfg.normalize}, "
                f"{'pad' if self.cfg.pad_audio else 'crop'} batches")
