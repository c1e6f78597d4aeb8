"""Does pretraining learn? Each tiny config pretrained on the embedded data, probed along the way.

    python -m benchmarks.quality [--configs tiny_image,tiny_audio,...] [--budget-scale 1.0]
                                 [--jobs 2] [--seed 1] [--out benchmarks/results] [--work DIR]
    python -m benchmarks.quality --short    # tests/test_quality.py's margins over 5 seeds

Per config: one run of BUDGET[config] updates (the schedules span it; train.max_steps overridden),
a checkpoint at each of POINTS. At every checkpoint: the linear probe of the student's frozen,
mean-pooled features (d2v_engine.handoff.probe: logistic regression, here 5-fold cross-validated over all the
labelled data), and target_var / pred_var (mean of the logged rows since the previous point).
Once per config: the probe of the same architecture at its random init (the run's own initial
weights: step 0 of the curve), and once per modality a probe on the raw input: image pixels,
audio log-mel frames (mean and std over time), text bag of tokens. Each training run is a
subprocess on one thread (OMP_NUM_THREADS=1: its CPU time, wall time and peak RSS are its own);
--jobs configs run side by side (2: one per core), each probed by its worker on one thread.

Text does not beat its random init at these budgets; benchmarks.text_controls measures why.
Writes <out>/<date>-cpu-quality.json and <out>/<date>-cpu-quality.png (probe accuracy against
steps per modality, v1 and v2, with the random-init and raw-input levels; drawn with PIL).
BUDGET is sized for at most about 30 minutes on 2 CPU cores (--jobs 2) of a shared machine: it
took 17.6 min at load averages 2.4-4.4 (benchmarks/results/2026-11-27-cpu-quality.json). The JSON
records the budget, the machine's load averages before, after each run and after, and the wall
and CPU times.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ROOT, commit

# Updates per tiny config (with the probes: 17.6 min on 2 shared cores, --jobs 2).
BUDGET = {"tiny_image": 600, "tiny_image_v2": 400, "tiny_audio": 400, "tiny_audio_v2": 300,
          "tiny_text": 800, "tiny_text_v2": 600}
POINTS = (0.25, 0.5, 0.75, 1.0)  # fractions of the budget where the student is probed
FOLDS = 5
# tests/test_quality.py's short run; `--short` measures its margins over SHORT_SEEDS.
SHORT_CONFIG, SHORT_STEPS, SHORT_SEEDS = "tiny_image_v2", 60, (1, 2, 3, 4, 5)


def budget_steps(config: str, scale: float = 1.0) -> int:
    """BUDGET[config] times scale, in a multiple of 4: the POINTS checkpoints fall on whole steps."""
    return 4 * max(1, round(BUDGET[config] * scale / 4))


# ---------------------------------------------------------------------------------- features


def log_mel(wave: torch.Tensor, rate: int = 16000, n_fft: int = 400, hop: int = 160,
            mels: int = 40) -> torch.Tensor:
    """L samples -> frames x mels log mel energies (25 ms Hann windows, 10 ms hop, HTK mel)."""
    spec = torch.stft(wave.float(), n_fft, hop, window=torch.hann_window(n_fft),
                      return_complex=True).abs().pow(2)  # (n_fft/2+1) x frames
    hz = torch.linspace(0, rate / 2, n_fft // 2 + 1)

    def to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    edges = torch.linspace(0.0, float(to_mel(torch.tensor(rate / 2.0))), mels + 2)
    edges = 700.0 * (10 ** (edges / 2595.0) - 1.0)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = torch.clamp(torch.minimum((hz - lo) / (mid - lo), (hi - hz) / (hi - mid)), min=0)
    return torch.log(bank @ spec + 1e-6).T


def raw_features(modality: str, items: list, vocab_size: int) -> torch.Tensor:
    """N x D features of the raw input: pixels, pooled log-mel, bag of tokens."""
    rng = np.random.default_rng(0)  # unused: the probe datasets do not augment
    rows = []
    for ds, i in items:
        source = ds.load(i, rng)["source"]
        if modality == "image":
            rows.append(source.flatten().float())
        elif modality == "audio":
            frames = log_mel(source)
            rows.append(torch.cat([frames.mean(0), frames.std(0)]))
        else:
            rows.append(torch.log1p(torch.bincount(source, minlength=vocab_size).float()))
    return torch.stack(rows)


def cross_val_accuracy(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       folds: int = FOLDS) -> float:
    """Mean test accuracy of d2v_engine.handoff.probe's logistic regression over `folds` contiguous folds of
    the (already seeded-shuffled) samples."""
    from d2v_engine.handoff.probe import logistic_regression_accuracy

    n, accs = len(labels), []
    bounds = np.linspace(0, n, folds + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        train = torch.ones(n, dtype=torch.bool)
        train[lo:hi] = False
        accs.append(logistic_regression_accuracy(feats[train], labels[train], feats[~train],
                                                 labels[~train], num_classes))
    return float(np.mean(accs))


# ---------------------------------------------------------------------------------- runs


def train_run(config: str, run_dir: Path, steps: int, seed: int, extra: list[str]) -> dict:
    """Trains `config` for `steps` updates in a subprocess; its wall and CPU seconds, peak RSS."""
    every = max(1, round(steps * POINTS[0]))
    args = [sys.executable, "-m", "d2v_engine.cli.train", str(ROOT / f"configs/{config}.yaml"),
            f"run.dir={run_dir}", f"train.max_steps={steps}", f"seed={seed}",
            f"train.checkpoint_every={every}", f"train.keep_every={every}",
            f"train.log_every={min(5, every)}",  # rows in every window, however short the run
            "train.progress=false", "run.tensorboard=false", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{config} failed (exit {proc.returncode}):\n{err.read()[-2000:]}")
    # CPU seconds hardly depend on what else the machine runs; wall seconds do.
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_mb": usage.ru_maxrss / 1024}


def read_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def raw_input_probe(config: str) -> dict:
    """Cross-validated probe on `config`'s labelled data as raw input (no encoder)."""
    from d2v_engine.config import load_config
    from d2v_engine.handoff.probe import labelled_split

    cfg = load_config(ROOT / f"configs/{config}.yaml")
    t0 = time.perf_counter()
    items, labels, _, num_classes = labelled_split(cfg, max_samples=0)
    feats = raw_features(cfg.modality, items, cfg.model.vocab_size)
    return {"accuracy": cross_val_accuracy(feats, labels, num_classes), "dim": feats.shape[1],
            "samples": len(items), "seconds": time.perf_counter() - t0}


def probe_run(run_dir: Path) -> dict:
    """Probe accuracies along the run and at random init; variances and loss per point."""
    from d2v_engine.handoff.export import load_encoder
    from d2v_engine.handoff.probe import embed_all, labelled_split

    torch.set_grad_enabled(False)
    checkpoints = sorted(run_dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    cfg = load_encoder(checkpoints[0]).cfg
    items, labels, _, num_classes = labelled_split(cfg, max_samples=0)
    random_init = cross_val_accuracy(embed_all(load_encoder(checkpoints[0], random_init=True),
                                               items), labels, num_classes)
    rows = read_rows(run_dir)
    points, prev = [{"step": 0, "probe": random_init}], 0
    for ckpt in checkpoints:
        step = int(ckpt.stem.split("_")[1])
        window = [r for r in rows if prev < r["step"] <= step]
        points.append({
            "step": step,
            "probe": cross_val_accuracy(embed_all(load_encoder(ckpt), items), labels,
                                        num_classes),
            "target_var": float(np.mean([r["target_var"] for r in window])),
            "pred_var": float(np.mean([r["pred_var"] for r in window])),
            "loss": float(np.mean([r["loss"] for r in window])),
        })
        prev = step
    torch.set_grad_enabled(True)
    return {"modality": cfg.modality, "mode": cfg.objective.mode, "samples": len(items),
            "classes": num_classes, "random_init": random_init, "points": points,
            "min_target_var": min(r["target_var"] for r in rows),
            "collapse_threshold": cfg.objective.min_target_var,
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def config_run(config: str, run_dir: Path, steps: int, seed: int, extra: list[str]) -> dict:
    """One config's training run and its probes (a --jobs worker, on one thread)."""
    torch.set_num_threads(1)
    timing = train_run(config, run_dir, steps, seed, extra)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = probe_run(run_dir)
    result.update(timing, steps=steps, cpu_s_per_update=timing["cpu_s"] / steps,
                  probe_s=time.perf_counter() - t0, probe_cpu_s=time.process_time() - cpu0,
                  load_after=os.getloadavg())
    return result


def short_run(run_dir: Path, seed: int) -> dict:
    """tests/test_quality.py's run, in this process: SHORT_STEPS updates of SHORT_CONFIG, then the
    cross-validated probe of its last checkpoint and of its random init on all the digits."""
    from d2v_engine.config import load_config
    from d2v_engine.run.trainer import train

    cfg = load_config(ROOT / f"configs/{SHORT_CONFIG}.yaml",
                      [f"run.dir={run_dir}", f"train.max_steps={SHORT_STEPS}", f"seed={seed}",
                       "train.progress=false", "run.tensorboard=false", "train.log_every=2"])
    train(cfg)
    result = probe_run(Path(run_dir))
    probe = result["points"][-1]["probe"]
    return {"seed": seed, "probe": probe, "random_init": result["random_init"],
            "gain": probe - result["random_init"], "min_target_var": result["min_target_var"],
            "collapse_threshold": result["collapse_threshold"]}


def short_margins(out: Path, work: Path) -> Path:
    """short_run over SHORT_SEEDS -> <out>/<date>-cpu-quality-short.json."""
    start = time.perf_counter()
    rows = []
    for seed in SHORT_SEEDS:
        rows.append(short_run(work / f"short_{seed}", seed))
        print(f"seed {seed}: gain {rows[-1]['gain']:.3f}, min target_var "
              f"{rows[-1]['min_target_var']:.3f}", flush=True)
    record = {"bench": "quality-short", "date": datetime.date.today().isoformat(),
              "commit": commit(), "config": SHORT_CONFIG, "steps": SHORT_STEPS, "folds": FOLDS,
              "runs": rows,
              "gain": [min(r["gain"] for r in rows), max(r["gain"] for r in rows)],
              "min_target_var": [min(r["min_target_var"] for r in rows),
                                 max(r["min_target_var"] for r in rows)],
              "seconds_per_seed": (time.perf_counter() - start) / len(rows),
              "load_after": os.getloadavg()}
    path = out / f"{record['date']}-cpu-quality-short.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------- figure


def plot(results: dict, path: Path) -> None:
    """Probe accuracy against steps, one panel per modality (v1 and v2), drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    panel_w, panel_h, pad = 420, 330, 60
    modalities = [m for m in ("image", "audio", "text")
                  if any(r["modality"] == m for r in results.values())]
    img = Image.new("RGB", (panel_w * len(modalities) + 20, panel_h + 100), "white")
    draw = ImageDraw.Draw(img)
    colors = {"v1": (31, 119, 180), "v2": (214, 39, 40)}
    for k, modality in enumerate(modalities):
        runs = {r["mode"]: r for r in results.values() if r["modality"] == modality}
        x0, y0 = 20 + k * panel_w + pad, 40
        w, h = panel_w - pad - 20, panel_h - 50
        max_step = max(p["step"] for r in runs.values() for p in r["points"])
        levels = [p["probe"] for r in runs.values() for p in r["points"]]
        levels += [r["raw_input"] for r in runs.values()]
        lo = max(0.0, np.floor(min(levels) * 10) / 10 - 0.05)
        hi = min(1.0, np.ceil(max(levels) * 10) / 10 + 0.02)

        def xy(step, acc):
            return x0 + w * step / max_step, y0 + h - h * (acc - lo) / (hi - lo)

        draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        for t in np.arange(np.ceil(lo * 10) / 10, hi + 1e-9, 0.1):
            _, y = xy(0, t)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((x0 - 36, y - 7), f"{t:.1f}", fill="black", font=small)
        for s in np.linspace(0, max_step, 5):
            x, _ = xy(s, lo)
            draw.line([x, y0 + h, x, y0 + h + 4], fill="black")
            draw.text((x - 12, y0 + h + 6), f"{int(s)}", fill="black", font=small)
        draw.text((x0 + w / 2 - 60, 12), f"{modality}: probe accuracy", fill="black", font=font)
        draw.text((x0 + w / 2 - 25, y0 + h + 22), "updates", fill="black", font=small)
        raw = next(iter(runs.values()))["raw_input"]
        _, y = xy(0, raw)
        for xs in range(int(x0), int(x0 + w), 8):
            draw.line([xs, y, xs + 4, y], fill=(90, 90, 90))
        draw.text((x0 + 4, y + 3), f"raw input {raw:.2f}", fill=(90, 90, 90), font=small)
        legend_y = y0 + h + 40  # under the axis: clear of the curves and the level lines
        for mode, run in sorted(runs.items()):
            c = colors[mode]
            pts = [xy(p["step"], p["probe"]) for p in run["points"]]
            draw.line(pts, fill=c, width=3)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
            _, y = xy(0, run["random_init"])
            for xs in range(int(x0), int(x0 + w), 12):
                draw.line([xs, y, xs + 6, y], fill=c, width=1)
            label = (f"{mode}: {run['points'][-1]['probe']:.2f} "
                     f"(random init {run['random_init']:.2f})")
            draw.line([x0, legend_y + 7, x0 + 15, legend_y + 7], fill=c, width=3)
            draw.text((x0 + 20, legend_y), label, fill="black", font=small)
            legend_y += 16
    img.save(path)


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(BUDGET))
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every budget (a quicker look; the record keeps the factor)")
    parser.add_argument("--jobs", type=int, default=2, help="configs trained side by side")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--work", default=None, help="run directories here (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[],
                        help="extra key=value override for every run (repeatable)")
    parser.add_argument("--short", action="store_true",
                        help="only measure tests/test_quality.py's margins over its seeds")
    args = parser.parse_args(argv)
    if args.short:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        work = Path(args.work or tempfile.mkdtemp(prefix="d2v-quality-short-"))
        print(f"wrote {short_margins(out, work)}")
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in BUDGET]
    if unknown:
        print(f"error: unknown configs {unknown}; choices: {', '.join(BUDGET)}", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="d2v-quality-"))
    record = {"bench": "quality", "date": datetime.date.today().isoformat(), "commit": commit(),
              "torch": torch.__version__, "cpus": os.cpu_count(), "seed": args.seed,
              "budget": {c: budget_steps(c, args.budget_scale) for c in configs},
              "budget_scale": args.budget_scale, "points": POINTS, "folds": FOLDS,
              "jobs": args.jobs, "threads_per_run": 1,
              "overrides": args.set, "load_before": os.getloadavg(), "runs": {}}
    start = time.perf_counter()
    torch.set_num_threads(1)
    modalities = {}
    for config in configs:  # one raw-input probe per modality (v1 and v2 share the data)
        modalities.setdefault(config.split("_")[1], config)
    record["raw_input"] = {m: raw_input_probe(c) for m, c in modalities.items()}
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        futures = {c: pool.submit(config_run, c, work / c, record["budget"][c], args.seed,
                                  args.set) for c in configs}
        for config in configs:
            result = futures[config].result()
            result["raw_input"] = record["raw_input"][result["modality"]]["accuracy"]
            record["runs"][config] = result
            last = result["points"][-1]
            print(f"{config}: probe {last['probe']:.3f} vs random init "
                  f"{result['random_init']:.3f} (raw input {result['raw_input']:.3f}); "
                  f"target_var {last['target_var']:.3f}, pred_var {last['pred_var']:.3f}; "
                  f"{result['wall_s']:.0f} s train", flush=True)
    record["total_s"] = time.perf_counter() - start
    record["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{record['date']}-cpu-quality"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record["runs"], out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png ({record['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
