"""Loader benchmark: DALI vs the torch DataLoader fallback, same samples, same worker count.

    python -m benchmarks.bench_loader [--tiny] [--workers N] [--json PATH]

Generates, in a temp folder, ImageNet-sized JPEGs (500 x 375, q90, smooth noise so they compress
like photos) and 10-15 s 16 kHz mono WAVs, then times whole passes of each loader at the base
configs' shapes: images RandomResizedCrop to 224 + flip + normalize, audio normalized and cropped
to 250k samples (15.6 s) batched by cropping to the shortest. Reports images/s and audio seconds/s
(seconds of decoded audio, before cropping). DALI decodes on the GPU (mixed) where there is one,
else on the CPU with N threads; the torch loader uses N workers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from d2v_engine.config import DataConfig
from d2v_engine.data import build_dataset
from d2v_engine.data.dali_common import dali_available
from d2v_engine.data.loader import BatchPlan, global_batch_indices
from d2v_engine.data.select import build_loader


@dataclass
class Row:
    modality: str
    loader: str
    device: str
    workers: int
    batch: int
    samples: int
    seconds: float
    per_s: float  # images/s or audio seconds/s
    unit: str


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # smooth after upscaling
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def make_audio(folder: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    lines = ["wav"]
    for i in range(count):
        n = int(rng.uniform(10.0, 15.0) * 16000)
        t = np.arange(n) / 16000
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(n)
        with wave.open(str(folder / "wav" / f"{i:05d}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
        lines.append(f"{i:05d}.wav\t{n}")
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder / "train.tsv"


def time_loader(kind: str, modality: str, cfg: DataConfig, batch: int, steps: int,
                device: torch.device) -> tuple[float, int, float]:
    """(seconds, samples, audio seconds) of `steps` batches after one warm-up batch."""
    ds = build_dataset(cfg, modality)
    plan = BatchPlan.make(batch, batch, 1)
    loader = build_loader(ds, cfg, modality, plan, 0, 0, 0, steps + 1, device=device, kind=kind)
    it = iter(loader)
    next(it)
    start, samples, audio = time.perf_counter(), 0, 0.0
    for b in it:
        samples += len(b["position"])
        if modality == "audio":
            # one rank, one micro-batch: the global batch is this batch (bad files: none here)
            indices = global_batch_indices(len(ds), batch, 0, b["step"])
            audio += float(ds.sizes[indices].sum()) / 16000
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del it, loader
    gc.collect()
    return seconds, samples, audio


def cases(tiny: bool = False) -> list:
    """run_all's interface: one BenchCase per modality, DALI against the torch DataLoader, same
    workers (DALI rows only where DALI is installed)."""
    from benchmarks import common

    def run(emit, modality):
        rows = main((["--tiny"] if tiny else []) + ["--modalities", modality])
        for dali in (r for r in rows if r.loader == "dali"):
            peer = next(r for r in rows if r.loader == "torch")
            shape = (f"{dali.modality} batch {dali.batch}, {dali.workers} workers, DALI on "
                     f"{dali.device}")
            emit(common.record("loader", shape, dali.per_s, "torch DataLoader", peer.per_s,
                               dali.unit))

    return [common.BenchCase(f"loader/{m}", lambda emit, m=m: run(emit, m), ("torch DataLoader",),
                             60.0) for m in ("image", "audio")]


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="few files (checks the plumbing)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--modalities", default="image,audio")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Several epochs of a few hundred files: whole seconds per loader, so the ratio is stable.
    n_img, img_batch, img_steps, n_wav, wav_batch, wav_steps = (
        (16, 8, 1, 4, 2, 1) if args.tiny else (512, 64, 24, 48, 8, 240))
    # torch first: its forked workers must not inherit a live DALI pipeline.
    kinds = ["torch", "dali"] if dali_available() else ["torch"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2v-bench-loader-") as tmp:
        tmp = Path(tmp)
        for modality in args.modalities.split(","):
            if modality == "image":
                cfg = DataConfig(path=str(make_images(tmp / "img", n_img)), img_size=224,
                                 num_workers=args.workers)
                batch = img_batch
            else:
                cfg = DataConfig(path=str(make_audio(tmp / "aud", n_wav)), max_sample_size=250000,
                                 num_workers=args.workers)
                batch = wav_batch
            todo = wav_steps if modality == "audio" else img_steps
            for kind in kinds:
                secs, samples, audio = time_loader(kind, modality, cfg, batch, todo, device)
                where = device.type if kind == "dali" else "cpu"
                rate, unit = (samples / secs, "images/s") if modality == "image" else (
                    audio / secs, "audio s/s")
                rows.append(Row(modality, kind, where, args.workers, batch, samples,
                                round(secs, 3), round(rate, 1), unit))
                print(f"{modality:6s} {kind:6s} on {where:4s} {args.workers} workers, batch "
                      f"{batch}: {rate:9.1f} {unit} ({samples} samples in {secs:.2f} s)",
                      flush=True)
    if args.json:
        info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "command": "python -m benchmarks.bench_loader " + " ".join(argv or []),
                "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
