"""data2vec 2.0 vs 1.0 training throughput per modality: one full step (teacher + student forward,
backward, AdamW, EMA update) on synthetic inputs of each base config's shapes.

    python -m benchmarks.bench_v2 [--tiny] [--json PATH] [--modalities image,audio,text]

Rows: samples/s (input samples: images, crops, sequences), views/s (samples x clone_batch: the
masked views the student learns from; equal to samples for v1) and the step's milliseconds; the
v2 rows add the speed-up over v1 in samples/s. Each mode runs at its own config's micro-batch
(v1 image 128 images; v2 image 16 images x 16 clones). On CUDA in bf16 autocast; --tiny uses the
tiny configs on CPU and checks the plumbing only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v_engine.config import load_config
from d2v_engine.objective import build_objective
from d2v_engine.objective.ema import EMATeacher, teacher_shared_prefixes
from d2v_engine.models import build_model
from d2v_engine.seeding import STREAM_MASK, sample_seeds

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}


@dataclass(frozen=True)
class Case:
    modality: str
    mode: str
    config: str
    length: int  # audio samples per crop / text tokens per sequence (images: the config's size)


CASES = [
    Case("image", "v1", "configs/image_base.yaml", 0),
    Case("image", "v2", "configs/image_v2.yaml", 0),
    Case("audio", "v1", "configs/audio_base.yaml", 250_000),
    Case("audio", "v2", "configs/audio_v2.yaml", 250_000),
    Case("text", "v1", "configs/text_base.yaml", 512),
    Case("text", "v2", "configs/text_v2.yaml", 512),
]
TINY = [
    Case("image", "v1", "configs/tiny_image.yaml", 0),
    Case("image", "v2", "configs/tiny_image_v2.yaml", 0),
    Case("audio", "v1", "configs/tiny_audio.yaml", 16_000),
    Case("audio", "v2", "configs/tiny_audio_v2.yaml", 16_000),
    Case("text", "v1", "configs/tiny_text.yaml", 64),
    Case("text", "v2", "configs/tiny_text_v2.yaml", 64),
]


def make_batch(case: Case, cfg, batch: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    if case.modality == "image":
        s = cfg.model.img_size
        source, pad = torch.randn(batch, 3, s, s, generator=g), None
    elif case.modality == "audio":
        source, pad = torch.randn(batch, case.length, generator=g), None
    else:
        source = torch.randint(5, cfg.model.vocab_size, (batch, case.length), generator=g)
        source[:, 0], source[:, -1] = SPECIAL["bos"], SPECIAL["eos"]
        pad = torch.zeros(batch, case.length, dtype=torch.bool)
    return {"source": source.to(device), "padding_mask": None if pad is None else pad.to(device)}


def run_case(case: Case, device, steps: int, warmup: int, batch: int | None) -> dict:
    cfg = load_config(ROOT / case.config)
    b = batch or cfg.train.micro_batch or cfg.train.global_batch
    torch.manual_seed(0)
    encoder = build_model(cfg.model, case.modality)
    model = build_objective(cfg, encoder, SPECIAL if case.modality == "text" else None).to(device)
    teacher = EMATeacher(encoder, teacher_shared_prefixes(encoder, cfg.objective.ema_scope))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    data = make_batch(case, cfg, b, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    model.train()

    def step(i):
        opt.zero_grad(set_to_none=True)
        seeds = sample_seeds(cfg.seed, i, range(b), STREAM_MASK).to(device)
        with autocast:
            out = model(data, teacher.model, seeds)
        (out.loss_sum / out.masked).backward()
        opt.step()
        teacher.update(model.encoder, 0.999)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync()
    ms = (time.perf_counter() - start) / steps * 1e3
    clones = cfg.objective.clone_batch if cfg.objective.mode == "v2" else 1
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {"modality": case.modality, "mode": case.mode, "config": case.config, "batch": b,
            "clone_batch": clones, "length": case.length, "ms": ms,
            "samples_per_s": b / ms * 1e3, "views_per_s": b * clones / ms * 1e3,
            "peak_gib": peak}


def environment(device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.bench_v2"]
                            + sys.argv[1:]),
    }


def print_table(env: dict, rows) -> None:
    print(f"device {env['device']}  torch {env['torch']}  {env['precision']}")
    print(f"{'modality':<9}{'mode':<5}{'batch':>6}{'M':>4}{'ms/step':>10}{'samples/s':>11}"
          f"{'views/s':>10}{'vs v1':>7}{'GiB':>7}")
    for r in rows:
        speed = f"{r['speedup_vs_v1']:.2f}x" if "speedup_vs_v1" in r else ""
        print(f"{r['modality']:<9}{r['mode']:<5}{r['batch']:>6}{r['clone_batch']:>4}"
              f"{r['ms']:>10.1f}{r['samples_per_s']:>11.1f}{r['views_per_s']:>10.1f}"
              f"{speed:>7}{r['peak_gib']:>7.1f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU check)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--modalities", default="image,audio,text")
    parser.add_argument("--batch", type=int, default=None, help="override every micro-batch")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = [c for c in (TINY if args.tiny else CASES)
             if c.modality in args.modalities.split(",")]
    cuda = device.type == "cuda"
    steps = args.steps or (10 if cuda else 2)
    rows = []
    for case in cases:
        rows.append(run_case(case, device, steps, warmup=3 if cuda else 1, batch=args.batch))
        if case.mode == "v2":
            v1 = [r for r in rows if r["modality"] == case.modality and r["mode"] == "v1"]
            if v1:
                rows[-1]["speedup_vs_v1"] = rows[-1]["samples_per_s"] / v1[0]["samples_per_s"]
    env = environment(device)
    print_table(env, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


def cases(tiny: bool = False) -> list:
    """run_all's interface: one BenchCase per modality, v2 samples/s against v1 samples/s."""
    from benchmarks import common
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    all_cases = TINY if tiny else CASES

    def run(emit, modality):
        rows = [run_case(case, device, 10 if cuda else 2, warmup=3 if cuda else 1, batch=None)
                for case in all_cases if case.modality == modality]
        for v2 in (r for r in rows if r["mode"] == "v2"):
            v1 = next((r for r in rows if r["mode"] == "v1"), None)
            if v1 is not None:
                shape = f"{v2['modality']} batch {v2['batch']} M={v2['clone_batch']}"
                emit(common.record("v2_vs_v1", shape, v2["samples_per_s"], "v1",
                                   v1["samples_per_s"], "samples/s", None, device))

    modalities = list(dict.fromkeys(case.modality for case in all_cases))
    return [common.BenchCase(f"v2_vs_v1/{m}", lambda emit, m=m: run(emit, m), ("v1",), 90.0)
            for m in modalities]


if __name__ == "__main__":
    main()
