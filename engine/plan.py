"""The run's plan, worked out before any GPU time is spent, and its checks.

make_plan(cfg, dist) returns what the run will do: the rank layout torchrun gave, the global batch
cut into ranks x accumulation x micro-batch (and the audio crop groups), the learning rate after
scaling, the data left after the size filters, steps per epoch, the checkpoints written and kept,
and the schedules in steps after scaling to train.max_steps (engine.schedule). It raises
ConfigError, naming the numbers, when a configured train.world_size disagrees with torchrun's, when
the global batch does not divide into micro-batches over the ranks (or a micro-batch would straddle
two audio crop groups), or when the size filters leave less than one global batch. The trainer
prints it, stores it as run.dir/plan.json, and stops there under train.dry_run=true.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config
from engine.data import build_dataset
from engine.data.audio import crop_group_size
from engine.data.loader import BatchPlan
from engine.distributed import DistInfo
from engine.errors import ConfigError
from engine.schedule import schedule_steps, scaled_lr


@dataclass
class RunPlan:
    batch: BatchPlan
    lr: float
    dataset: object
    info: dict  # what plan.json holds


def check_world_size(cfg: Config, dist: DistInfo) -> None:
    """ConfigError when train.world_size is set and torchrun started another number of ranks."""
    want = cfg.train.world_size
    if want and want != dist.world_size:
        env = os.environ.get("WORLD_SIZE")
        got = f"WORLD_SIZE={env}" if env is not None else "no WORLD_SIZE: not under torchrun"
        raise ConfigError(
            f"config key 'train.world_size': {want}, but this run has {dist.world_size} rank(s) "
            f"({got}); launch torchrun with --nnodes x --nproc_per_node = {want}, or set "
            f"train.world_size=0 to accept any")


def _check_audio_filters(cfg: Config) -> None:
    # The dataset itself refuses an all-filtered manifest; naming the numbers here first turns a
    # "dataset is empty" into the filter and the lengths it left out.
    from engine.data.audio import read_manifest

    path = Path(cfg.data.path).expanduser()
    manifest = path / "train.tsv" if path.is_dir() else path
    if not manifest.is_file():
        return  # build_dataset names the missing file
    _, entries = read_manifest(manifest)
    sizes = [n for _, n in entries]
    if not any(n >= cfg.data.min_sample_size for n in sizes):
        rate = cfg.data.sample_rate
        raise ConfigError(
            f"config key 'data.min_sample_size': {cfg.data.min_sample_size} samples "
            f"({cfg.data.min_sample_size / rate:.2f} s) leaves 0 of the {len(sizes)} entries of "
            f"{manifest} (longest {max(sizes)} samples = {max(sizes) / rate:.2f} s)")


def check_crop_group(cfg: Config, batch: BatchPlan) -> int:
    """Positions per audio crop group (engine.data.audio; 0: padded batches); ConfigError when
    the groups do not tile the global batch or a micro-batch would straddle two of them."""
    group = crop_group_size(cfg.data, batch.global_batch)
    if group and batch.global_batch % group:
        raise ConfigError(
            f"config key 'data.crop_group': {group} does not divide train.global_batch="
            f"{batch.global_batch} (the global batch is cut into crop groups)")
    if group and group % batch.micro_batch:
        raise ConfigError(
            f"config key 'data.crop_group': {group} clips share one crop length, so a "
            f"micro-batch must hold part of one group: train.micro_batch={batch.micro_batch} must "
            f"divide {group} (e.g. train.micro_batch={_largest_divisor(group, batch.micro_batch)}); "
            f"a larger data.crop_group changes the recipe")
    return group


def _largest_divisor(n: int, below: int) -> int:
    return max(d for d in range(1, min(n, below) + 1) if n % d == 0)


def data_summary(cfg: Config, dataset) -> dict:
    """Samples left after the size filters, with seconds (audio) or tokens (text)."""
    out = {"samples": len(dataset)}
    if cfg.modality == "audio":
        out["seconds"] = float(dataset.sizes.sum()) / cfg.data.sample_rate
        out["dropped_by_size"] = int(dataset.skipped)
        out["min_sample_size"] = cfg.data.min_sample_size
        out["max_sample_size"] = cfg.data.max_sample_size
    elif cfg.modality == "text":
        if getattr(dataset, "labels", None) is not None:
            out["tokens"] = int(sum(min(len(dataset.body(i)), dataset.block) + 2
                                    for i in range(len(dataset))))
        else:
            out["tokens"] = int(len(dataset.tokens))
        out["max_tokens"] = cfg.data.max_tokens
    return out


def checkpoint_count(max_steps: int, every: int) -> int:
    """Checkpoints a full run writes: every `every` steps and at the end."""
    if every <= 0:
        return 1
    return max_steps // every + (1 if max_steps % every else 0)


def checkpoints_kept(max_steps: int, every: int, keep_last: int, keep_every: int) -> int:
    """Checkpoints left at the end of a full run: the newest keep_last, and every one whose step
    is a multiple of keep_every (engine.checkpoint's retention)."""
    steps = list(range(every, max_steps, every)) if every > 0 else []
    steps.append(max_steps)
    return sum(1 for i, s in enumerate(steps)
               if i >= len(steps) - keep_last or (keep_every and s % keep_every == 0))


def make_plan(cfg: Config, dist: DistInfo) -> RunPlan:
    """Checks the run's arithmetic and data before training; builds the training dataset."""
    t = cfg.train
    check_world_size(cfg, dist)
    batch = BatchPlan.make(t.global_batch, t.micro_batch, dist.world_size)
    crop_group = 0
    if cfg.modality == "audio":
        crop_group = check_crop_group(cfg, batch)
        _check_audio_filters(cfg)
    dataset = build_dataset(cfg.data, cfg.modality, "train")
    data = data_summary(cfg, dataset)
    if data["samples"] < batch.global_batch:
        raise ConfigError(
            f"config key 'train.global_batch': {batch.global_batch} is more than the "
            f"{data['samples']} samples left after the size filters; lower it or add data")
    steps_per_epoch = data["samples"] // batch.global_batch
    lr = scaled_lr(cfg.optim, batch.global_batch)
    info = {
        "modality": cfg.modality,
        "world_size": dist.world_size,
        "ranks_per_node": dist.local_world_size,
        "nodes": max(1, dist.world_size // max(1, dist.local_world_size)),
        "device": dist.device.type,
        "global_batch": batch.global_batch,
        "micro_batch": batch.micro_batch,
        "accumulation": batch.accumulation,
        **({"crop_group": crop_group} if cfg.modality == "audio" else {}),
        "lr": lr,
        "lr_config": cfg.optim.lr,
        "lr_reference_batch": cfg.optim.lr_reference_batch,
        "lr_scaling": cfg.optim.lr_scaling,
        "data": data,
        "max_steps": t.max_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": t.max_steps / steps_per_epoch,
        "checkpoint_every": t.checkpoint_every,
        "checkpoints": checkpoint_count(t.max_steps, t.checkpoint_every),
        "checkpoints_kept": checkpoints_kept(t.max_steps, t.checkpoint_every, t.keep_last,
                                             t.keep_every),
        "schedule": schedule_steps(cfg),
        "cpu": dict(dist.cpu) if getattr(dist, "cpu", None) else {},
    }
    return RunPlan(batch, lr, dataset, info)


def describe_plan(info: dict) -> str:
    """The plan as a few human lines."""
    d = info["data"]
    amount = ""
    if "seconds" in d:
        amount = f" ({d['seconds'] / 3600:.2f} h; {d['dropped_by_size']} shorter than " \
                 f"data.min_sample_size={d['min_sample_size']} dropped)"
    elif "tokens" in d:
        amount = f" ({d['tokens']} tokens)"
    scaling = "" if info["lr_scaling"] == "none" or info["lr_reference_batch"] <= 0 else \
        f" = optim.lr {info['lr_config']:.3g} at batch {info['lr_reference_batch']}, " \
        f"{info['lr_scaling']} scaling"
    every = f"every {info['checkpoint_every']} steps and at the end" \
        if info["checkpoints"] > 1 else "at the end"
    return "\n".join([
        f"plan: world size {info['world_size']} = {info['nodes']} node(s) x "
        f"{info['ranks_per_node']} rank(s) per node ({info['device']})",
        f"  global batch {info['global_batch']} = {info['world_size']} rank(s) x "
        f"{info['accumulation']} accumulation step(s) x {info['micro_batch']} micro-batch",
        *([f"  audio crop groups of {info['crop_group']} clips: each cropped to its group's "
           f"shortest, one masked count per group (data.crop_group)"]
          if info.get("crop_group") else []),
        f"  learning rate {info['lr']:.4g}{scaling}",
        f"  data: {d['samples']} samples after the size filters{amount}",
        f"  {info['max_steps']} steps, {info['steps_per_epoch']} per epoch "
        f"({info['epochs']:.2f} epochs); {info['checkpoints']} checkpoint(s) {every}, "
        f"{info['checkpoints_kept']} kept",
        *_schedule_lines(info),
    ])


def _schedule_lines(info: dict) -> list[str]:
    """The schedules in steps after scaling to this run's length, and what they miss."""
    s, max_steps = info["schedule"], info["max_steps"]
    if s["reference_steps"] == max_steps:
        how = "as stated: optim.schedule_reference_steps = train.max_steps"
    elif s["scaling"] == "absolute":
        how = f"as stated at {s['reference_steps']} steps: optim.schedule_scaling=absolute"
    else:
        how = (f"stated at {s['reference_steps']} steps, x{max_steps / s['reference_steps']:.4g} "
               f"for this run: optim.schedule_scaling=proportional")
    phases = f"warmup {s['warmup_steps']}"
    if s["lr_schedule"] == "tri_stage":
        phases += f", hold {s['hold_steps']}"
    phases += f", decay {s['decay_steps']}" if s["lr_schedule"] != "constant" else ", then constant"
    lines = [
        f"  schedules ({how}):",
        f"    lr {s['lr_schedule']}: {phases} steps; EMA decay {s['ema_decay']:g} -> "
        f"{s['ema_end_decay']:g} by step {s['ema_anneal_end_step']}; collapse check after step "
        f"{s['collapse_check_after']}",
    ]
    if s["warmup_steps"] >= max_steps:
        lines.append(f"  warning: the lr warmup ({s['warmup_steps']} steps) does not end within "
                     f"the run's {max_steps} steps: the run never reaches its peak lr")
    if s["ema_anneal_end_step"] > max_steps and s["ema_decay"] != s["ema_end_decay"]:
        lines.append(f"  warning: the EMA anneal ends at step {s['ema_anneal_end_step']}, after "
                     f"the run's {max_steps} steps: the teacher never reaches its end decay")
    return lines


def write_plan(run_dir: Path, info: dict) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path
