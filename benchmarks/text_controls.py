"""Why tiny text does not beat its random init: controls on the tiny text runs.

    python -m benchmarks.text_controls [--configs tiny_text,tiny_text_v2] [--budget-scale 1]
                                       [--mlm-steps 800,3000] [--seed 1] [--out benchmarks/results]

benchmarks.quality finds text's document probe (which stdlib package wrote a docstring) no
better after pretraining than at random init. This separates "data2vec does not learn here" from
"nothing learnable at this size shows in that probe":
1. each config's data2vec run (benchmarks.quality's run, budget and probes);
2. the probe of every layer's mean-pooled output (embeddings, each block, the final output), at
   the checkpoint and at random init: does any layer carry what the last one lost?
3. the masked-token probe (v1 only: v2's student never sees a <mask>): the student's final state
   at <mask> positions, on the probe docstrings with MASKED_SHARE of their TOP_TOKENS most
   frequent (train split) tokens masked, classifies which of those tokens was there; the share
   of the majority token is the floor;
4. the position share of the EMA teacher's targets on the valid split: the fraction of their
   variance that the mean target of each position explains (1: the targets say only where a
   token is, a collapse onto position that target_var, a variance over positions, does not see);
5. the control: a plain masked-LM with the same encoder, data, batch, masks (draw_masks of the
   config), optimizer and lr schedule (d2v_engine.objective.optim, d2v_engine.objective.schedule), cross entropy over the
   vocabulary instead of teacher targets, probed at the same quarters. If it does not beat
   random init either, the probe cannot tell learning at this size, whatever the objective.
Writes <out>/<date>-cpu-quality-text-controls.json. Every run is on one thread.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, commit
from benchmarks.quality import POINTS, budget_steps, config_run, cross_val_accuracy

TOP_TOKENS = 32  # masked-token probe classes: the most frequent non-special train tokens
MASKED_SHARE = 0.15
POSITION_SAMPLES = 256  # valid-split blocks the position share is measured on


def position_share(targets: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """N x T x C targets (keep: N x T bool, True = a real token) -> the fraction of their total
    variance explained by the per-position mean: sum over positions and channels of
    count_t * (mean_t - mean)^2 over the sum of (x - mean)^2."""
    x = targets.double()
    keep = torch.ones(x.shape[:2], dtype=torch.bool) if keep is None else keep
    w = keep.double()[..., None]
    count = w.sum(0)  # T x 1
    mean = (x * w).sum((0, 1)) / w.sum()
    pos_mean = (x * w).sum(0) / count.clamp(min=1)
    total = (((x - mean) ** 2) * w).sum()
    between = (count * (pos_mean - mean) ** 2).sum()
    return float(between / total)


def _pool(h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    keep = (~pad).float()[..., None]
    return (h.float() * keep).sum(1) / keep.sum(1).clamp(min=1.0)


@torch.no_grad()
def layer_probes(wrapper, items, labels, num_classes) -> dict:
    """Probe accuracy of the mean-pooled embeddings, every block's output and the final output."""
    from d2v_engine.handoff.probe import _pad_batch

    enc = wrapper.encoder
    pooled = None
    for start in range(0, len(items), 64):
        source, pad = _pad_batch([ds.load(i, None)["source"] for ds, i in items[start:start + 64]],
                                 wrapper.cfg.model.pad_id)
        x, x_pad = enc.embed(source, pad)
        out = enc.encode(x, x_pad, return_layers=True)
        rows = [_pool(x, x_pad)] + [_pool(b, x_pad) for b in out.block_results] + [
            _pool(out.x, x_pad)]
        pooled = [[r] for r in rows] if pooled is None else [p + [r] for p, r in zip(pooled, rows)]
    names = ["embeddings"] + [f"block_{i}" for i in range(len(pooled) - 2)] + ["final"]
    return {n: cross_val_accuracy(torch.cat(p), labels, num_classes) for n, p in zip(names, pooled)}


def top_tokens(data_path: Path, meta: dict, n: int = TOP_TOKENS) -> torch.Tensor:
    from d2v_engine.data.text import read_token_stream

    tokens = np.asarray(read_token_stream(data_path, "train", meta.get("dtype", "uint16"))[0])
    counts = np.bincount(tokens, minlength=meta["vocab_size"])
    for key in ("bos", "pad", "eos", "unk", "mask"):
        counts[meta[key]] = 0
    return torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:n]))


@torch.no_grad()
def masked_token_probe(wrapper, items, classes: torch.Tensor, mask_id: int, seed: int = 0) -> dict:
    """Which of `classes` stood at a <mask>, from the final state there (5-fold probe)."""
    from d2v_engine.handoff.probe import _pad_batch

    enc, g = wrapper.encoder, torch.Generator().manual_seed(seed)
    feats, ids = [], []
    for start in range(0, len(items), 64):
        source, pad = _pad_batch([ds.load(i, None)["source"] for ds, i in items[start:start + 64]],
                                 wrapper.cfg.model.pad_id)
        mask = torch.isin(source, classes) & ~pad & (torch.rand(source.shape, generator=g)
                                                      < MASKED_SHARE)
        x, x_pad = enc.embed(source.masked_fill(mask, mask_id), pad)
        feats.append(enc.encode(x, x_pad).x[mask])
        ids.append(source[mask])
    labels = torch.searchsorted(classes, torch.cat(ids))
    return {"accuracy": cross_val_accuracy(torch.cat(feats), labels, len(classes)),
            "majority": torch.bincount(labels).max().item() / len(labels),
            "positions": len(labels)}


def teacher_of(wrapper, random_init: bool):
    """The run's EMA teacher: the checkpoint's "teacher" weights in the student's architecture; at
    random init the initial weights (where the teacher starts)."""
    from d2v_engine.checkpoint import load_checkpoint

    if random_init:
        return wrapper.encoder
    teacher = copy.deepcopy(wrapper.encoder)
    teacher.load_state_dict(load_checkpoint(wrapper.checkpoint_path)["teacher"])
    return teacher.eval()


@torch.no_grad()
def target_position_share(teacher, cfg, data_path: Path) -> float:
    """position_share of the targets `teacher` gives under the config's objective, on the valid
    split (full blocks only, so every position has as many targets)."""
    from d2v_engine.data import build_dataset
    from d2v_kernels.targets import teacher_targets_reference

    enc = teacher
    o = cfg.objective
    ds = build_dataset(dataclasses.replace(cfg.data, path=str(data_path)), "text", "valid")
    rng = np.random.default_rng(0)
    blocks = [s for s in (ds.load(i, rng)["source"] for i in range(len(ds)))
              if s.shape[0] == cfg.data.max_tokens][:POSITION_SAMPLES]
    source = torch.stack(blocks)
    x, x_pad = enc.embed(source)
    out = enc.encode(x, x_pad, return_layers=True)
    per_block = out.layer_results if o.layer_output == "ffn" else out.block_results
    targets = teacher_targets_reference(per_block[-o.top_k:], x_pad, o.layer_norm, o.final_norm)
    return position_share(targets)


def mlm_control(config: str, steps: int, seed: int, items, labels, num_classes,
                loss_every: int | None = None) -> dict:
    """The config's encoder trained as a plain masked LM (same data, batch, masks, lr schedule);
    the document probe at random init and at each of POINTS; every loss_every-th loss."""
    from d2v_engine.config import load_config
    from d2v_engine.data import build_dataset
    from d2v_engine.data.text import read_meta
    from d2v_engine.objective.data2vec import Data2Vec
    from d2v_engine.handoff.export import EncoderForExport
    from d2v_engine.models.encoders import build_model
    from d2v_engine.objective.optim import build_optimizer
    from d2v_engine.handoff.probe import embed_all
    from d2v_engine.objective.schedule import lr_factor

    cfg = load_config(ROOT / f"configs/{config}.yaml", [f"seed={seed}"])
    cfg.data.path = str(ROOT / cfg.data.path)
    meta = read_meta(Path(cfg.data.path))
    torch.manual_seed(seed)
    encoder = build_model(cfg.model, "text")
    lm_head = torch.nn.Linear(cfg.model.embed_dim, cfg.model.vocab_size)
    masker = Data2Vec(cfg, encoder, {k: meta[k] for k in ("bos", "pad", "eos", "unk", "mask")})
    wrapper = EncoderForExport(encoder, cfg)
    lm = torch.nn.ModuleDict({"encoder": encoder, "lm_head": lm_head})
    opt = build_optimizer(lm, cfg.optim, cfg.optim.lr, torch.device("cpu"))  # as d2v_engine.cli.train
    data = build_dataset(cfg.data, "text", "train")
    rng = np.random.default_rng(seed)
    checkpoints = {max(1, round(steps * p)) for p in POINTS}
    points = [{"step": 0, "probe": cross_val_accuracy(embed_all(wrapper, items), labels,
                                                      num_classes)}]
    losses = []
    for step in range(1, steps + 1):  # update `step` runs at lr_factor(step - 1), as the trainer
        encoder.train()
        picks = rng.integers(0, len(data), cfg.train.global_batch)
        batch = data.collate([data.load(int(i), rng) for i in picks], rng)
        seeds = torch.from_numpy(rng.integers(0, 2**31 - 1, len(picks)))
        masks = masker.draw_masks(batch, seeds)
        x, x_pad = encoder.embed(masks["source"], batch.get("padding_mask"))
        hidden = encoder.encode(x, x_pad).x
        loss = F.cross_entropy(lm_head(hidden[masks["mask"]]), batch["source"][masks["mask"]])
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(cfg.optim, step - 1, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.optim.clip_norm)
        opt.step()
        losses.append(loss.item())
        if step in checkpoints:
            points.append({"step": step, "probe": cross_val_accuracy(
                embed_all(wrapper, items), labels, num_classes),
                "loss": float(np.mean(losses[-max(1, steps // 20):]))})
    unigram = np.bincount(np.asarray(data.tokens), minlength=cfg.model.vocab_size)
    p = unigram[unigram > 0] / unigram.sum()
    loss_every = loss_every or max(1, steps // 100)
    return {"steps": steps, "points": points, "random_init": points[0]["probe"],
            "losses": losses[::loss_every], "loss_every": loss_every,
            "gain": points[-1]["probe"] - points[0]["probe"],
            "unigram_entropy": float(-(p * np.log(p)).sum())}


def controls(config: str, steps: int, seed: int, work: Path) -> dict:
    """Items 1-4 of the module docstring for one config."""
    from d2v_engine.data.text import read_meta
    from d2v_engine.handoff.export import load_encoder
    from d2v_engine.handoff.probe import labelled_split

    record = {"run": config_run(config, work / config, steps, seed, [])}
    last = max((work / config).glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for name, random_init in (("random_init", True), ("checkpoint", False)):
        wrapper = load_encoder(last, random_init=random_init)
        cfg = wrapper.cfg
        data_path = ROOT / cfg.data.path
        items, labels, _, num_classes = labelled_split(cfg, max_samples=0)
        entry = {"layers": layer_probes(wrapper, items, labels, num_classes),
                 "target_position_share": target_position_share(
                     teacher_of(wrapper, random_init), cfg, data_path)}
        if cfg.objective.mode == "v1":
            meta = read_meta(data_path)
            entry["masked_token"] = masked_token_probe(
                wrapper, items, top_tokens(data_path, meta), meta["mask"])
        record[name] = entry
        print(f"{config} {name}: {json.dumps(entry)}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text_controls",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny_text,tiny_text_v2")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="of benchmarks.quality's BUDGET, for the data2vec runs")
    parser.add_argument("--mlm-config", default="tiny_text")
    parser.add_argument("--mlm-steps", default="800,3000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--work", default=None)
    args = parser.parse_args(argv)
    from d2v_engine.config import load_config
    from d2v_engine.handoff.probe import labelled_split

    torch.set_num_threads(1)
    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="d2v-text-controls-"))
    configs = [c for c in args.configs.split(",") if c]
    steps = {c: budget_steps(c, args.budget_scale) for c in configs}
    record = {"bench": "quality-text-controls", "date": datetime.date.today().isoformat(),
              "commit": commit(), "torch": torch.__version__, "seed": args.seed,
              "steps": steps, "threads": 1, "load_before": os.getloadavg(), "configs": {}}
    for config in configs:
        record["configs"][config] = controls(config, steps[config], args.seed, work)
    cfg = load_config(ROOT / f"configs/{args.mlm_config}.yaml")
    items, labels, _, num_classes = labelled_split(cfg, max_samples=0)
    record["mlm_control"] = {"config": args.mlm_config, "runs": []}
    for n in (int(s) for s in args.mlm_steps.split(",") if s):
        result = mlm_control(args.mlm_config, n, args.seed, items, labels, num_classes)
        record["mlm_control"]["runs"].append(result)
        print(f"mlm control {n}: probe {result['points'][-1]['probe']:.3f} vs random init "
              f"{result['random_init']:.3f}, loss {result['points'][-1]['loss']:.2f} (unigram "
              f"entropy {result['unigram_entropy']:.2f})", flush=True)
    record["total_s"] = time.perf_counter() - start
    record["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['date']}-cpu-quality-text-controls.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path} ({record['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
