"""DALI audio loader: the manifest's WAV and FLAC files read and decoded by DALI.

Same files, labels and random draws as audio.AudioManifestDataset + its collate: the per-utterance
crop offset (data.max_sample_size) and the crop to the crop group's shortest clip come from the
same per-sample numpy generators and the same header lengths (after resampling: ceil(frames x
sample_rate / rate), what DALI produces; AudioManifestDataset.crop_length). DALI reads each file on
its threads (fn.io.file.read: Python never copies the samples) and decodes it (fn.decoders.audio,
resampling to data.sample_rate only when data.resample). Then each utterance is normalized over its
whole length (layer norm, no affine), its window is kept, and the batch is zero-padded to the
longest (data.pad_audio) with the padding mask built from the known lengths: "source" B x L float32
on the loader's device, "padding_mask" B x L bool (True = pad) or None.

Where that arithmetic runs: on the GPU, in the DALI graph (fn.normalize, fn.slice, fn.pad). On the
CPU, in torch on the decoded utterances (F.layer_norm, as the torch loader, so the two agree
exactly): DALI's CPU normalize and slice measured 0.3 and 0.2 ms per 12 s utterance here and made
DALI the bottleneck.

Checked from the file's first 64 KiB and its size before DALI sees it (bad files per
data.on_bad_file): missing, empty, not WAV/FLAC, truncated WAV, no samples, several channels, a
rate other than data.sample_rate without data.resample. A file only the decoder rejects (a
damaged FLAC) is found by dali_common's recovery.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from d2v_engine.data.audio import (
    AudioManifestDataset, audio_file_info, check_finite_wav, check_format, crop_start,
)
from d2v_engine.data.common import bad_file, check_file
from d2v_engine.data.dali_common import DaliLoader, one_torch_thread
from d2v_engine.data.loader import check_crop_group, global_batch_indices, group_positions
from d2v_engine.errors import DataError

_LAYER_NORM_EPS = 1e-5  # torch.nn.functional.layer_norm's default, as the torch path


class DaliAudioLoader(DaliLoader):
    """Micro-batches {"source": B x L, "padding_mask": B x L bool or None, "label"?, ...}."""

    num_inputs = 3  # file path (utf-8 bytes), start and length of the window kept

    def __init__(self, dataset: AudioManifestDataset, *args, crop_group: int = 0, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        from nvidia.dali import types

        self.input_dtypes = (types.UINT8, types.INT64, types.INT64)
        self.cfg = dataset.cfg
        check_crop_group(crop_group, self.plan)
        self.crop_group = crop_group  # positions per crop group; 0: crop to the micro-batch

    def path_of(self, index: int) -> str:
        return str(self.dataset.root / self.dataset.files[index])

    def prepare_sample(self, index: int, rng: np.random.Generator):
        path = self.path_of(index)
        try:
            check_file(path, self.cfg.max_file_bytes)
            rate, channels, frames = audio_file_info(path)
            check_finite_wav(path)  # DALI's decoder would pass NaN / Inf samples on
        except FileNotFoundError:
            raise bad_file(self.cfg.on_bad_file, path, "file not found") from None
        except (OSError, ValueError) as e:
            raise bad_file(self.cfg.on_bad_file, path, str(e) or "empty file") from None
        check_format(self.cfg, path, rate, channels, frames)
        length = -(-frames * self.cfg.sample_rate // rate)
        start, excess = 0, length - self.cfg.max_sample_size
        if excess > 0:  # the same draw as AudioManifestDataset.load
            start = int(rng.integers(0, excess + 1)) if self.cfg.augment else 0
            length = self.cfg.max_sample_size
        # The path, not the bytes: DALI's threads read the file (fn.io.file.read).
        arrays = [np.frombuffer(path.encode(), dtype=np.uint8), np.array([start], dtype=np.int64),
                  np.array([length], dtype=np.int64)]
        label = self.dataset.labels[index] if self.dataset.labels is not None else None
        # The draw AudioManifestDataset.load makes next: where the clip's crop sits in its group's.
        return arrays, {"label": label, "length": length, "crop_u": float(rng.random())}

    def plan_batch(self, prepared, facts) -> None:
        """The crop of AudioManifestDataset.collate to the crop group's length, folded into each
        sample's window."""
        sizes = [f["length"] for f in facts]
        if self.cfg.pad_audio:
            prepared.extra["lengths"] = sizes
        else:
            shortest = min(sizes)
            if self.crop_group:
                indices = global_batch_indices(len(self.dataset), self.plan.global_batch,
                                               self.seed, prepared.step)
                members = group_positions(prepared.first_position, self.crop_group)
                shortest = self.dataset.crop_length(indices[list(members)])
            for start, length, n, fact in zip(prepared.inputs[1], prepared.inputs[2], sizes,
                                              facts):
                start += crop_start(fact["crop_u"], n, shortest) if self.cfg.augment else 0
                length[0] = shortest
        if self.dataset.labels is not None:
            prepared.extra["label"] = [f["label"] for f in facts]

    def graph(self, inputs, gpu: bool):
        from nvidia.dali import fn, types

        path, start, length = inputs
        rate = {"sample_rate": float(self.cfg.sample_rate)} if self.cfg.resample else {}
        encoded = fn.io.file.read(path)
        # Mono was checked from the header, so down-mixing changes nothing but the layout (L,).
        wav, _ = fn.decoders.audio(encoded, dtype=types.FLOAT, downmix=True, **rate)
        if not gpu:  # decode only; finish() normalizes, crops and pads (module docstring)
            return wav
        wav = wav.gpu()
        if self.cfg.normalize:
            wav = fn.normalize(wav, axes=[0], epsilon=_LAYER_NORM_EPS)
        wav = fn.slice(wav, start, length, axes=[0], out_of_bounds_policy="error")
        if self.cfg.pad_audio:
            wav = fn.pad(wav, axes=[0], fill_value=0.0)
        return wav

    def finish(self, prepared, outputs) -> dict:
        if self.gpu:
            source = self.to_torch(outputs[0], torch.float32)
        else:
            with one_torch_thread():
                source = self.window_on_cpu(outputs[0], prepared)
        mask = None
        if self.cfg.pad_audio:
            lengths = torch.tensor(prepared.extra["lengths"])
            mask = torch.arange(source.shape[1])[None, :] >= lengths[:, None]
            mask = mask.to(source.device)
        batch = {"source": source, "padding_mask": mask}
        if "label" in prepared.extra:
            batch["label"] = torch.tensor(prepared.extra["label"], dtype=torch.int64)
        return batch

    def window_on_cpu(self, decoded, prepared) -> torch.Tensor:
        """B x L float32 from DALI's decoded utterances: each normalized over the whole utterance
        (F.layer_norm, as AudioManifestDataset.load), its window written into the batch,
        zero-padded to the longest when data.pad_audio. New torch memory: no DALI buffer
        outlives the batch."""
        windows = [(int(start[0]), int(length[0]))
                   for start, length in zip(prepared.inputs[1], prepared.inputs[2])]
        longest = max(length for _, length in windows)
        make = torch.zeros if self.cfg.pad_audio else torch.empty
        source = make(len(windows), longest, dtype=torch.float32)
        for i, ((index, _, _), (start, length)) in enumerate(zip(prepared.keys, windows)):
            wav = torch.from_numpy(np.asarray(decoded[i]))
            if start + length > wav.numel():
                raise DataError(f"{self.path_of(index)}: decoded {wav.numel()} samples, fewer "
                                f"than its header announced ({start + length} needed)")
            if self.cfg.normalize:  # torch.var_mean measured 6x slower than layer_norm here
                wav = F.layer_norm(wav, wav.shape, eps=_LAYER_NORM_EPS)
            source[i, :length] = wav[start:start + length]
        return source
