"""The run's plan, worked out before any GPU time is spent, and its checks.

make_plan(cfg, dist) returns what the run will do: the rank layout torchrun gave, the global batch
cut into ranks x accumulation x micro-batch (and the audio crop groups), the learning rate after
scaling, the data left after the size filters, steps per epoch, the checkpoints written and kept,
the schedules in steps after scaling to train.max_steps (d2v_engine.objective.schedule); the FLOPs of a step
(d2v_engine.planning.flops) and, for a dry run or when there is a memory budget, the peak memory per rank
(d2v_engine.planning.memory), which also picks train.micro_batch=auto. It raises ConfigError, naming the
numbers, when a configured train.world_size disagrees with torchrun's, when the global batch does
not divide into micro-batches over the ranks (or a micro-batch would straddle two audio crop
groups), when the size filters leave less than one global batch, or when the estimated peak
exceeds train.memory_fraction of the budget. The trainer prints it, stores it as
run.dir/plan.json, and stops there under train.dry_run=true. A dry run whose data.path does not
exist (planning on another machine than the data's) plans everything but the data.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from d2v_engine.config import Config
from d2v_engine.data import build_dataset
from d2v_engine.data.audio import crop_group_size
from d2v_engine.data.loader import BatchPlan
from d2v_engine.runtime.distributed import DistInfo
from d2v_engine.errors import ConfigError
from d2v_engine.planning.flops import FlopModel, count_flops, describe_flops, step_info
from d2v_engine.planning.memory import GB, describe_memory, plan_memory, source_extent
from d2v_engine.objective.schedule import schedule_steps, scaled_lr


@dataclass
class RunPlan:
    batch: BatchPlan
    lr: float
    dataset: object
    info: dict  # what plan.json holds
    flops: FlopModel  # a micro-batch's FLOPs from its shape (the trainer's MFU)


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
    from d2v_engine.data.audio import read_manifest

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
    """Positions per audio crop group (d2v_engine.data.audio; 0: padded batches); ConfigError when
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
            out["tokens"] = int(dataset.sizes.sum())
        else:
            out["tokens"] = int(len(dataset.tokens))
            out["sample_break_mode"] = cfg.data.sample_break_mode
        out["max_tokens"] = cfg.data.max_tokens
    return out


def checkpoint_count(max_steps: int, every: int) -> int:
    """Checkpoints a full run writes: every `every` steps and at the end."""
    if every <= 0:
        return 1
    return max_steps // every + (1 if max_steps % every else 0)


def memory_budget(cfg: Config, device: torch.device) -> Optional[dict]:
    """The memory a rank may use: train.device_memory_gb, else the visible GPU's; None on CPU."""
    t = cfg.train
    if t.device_memory_gb is not None:
        device_gb, source = t.device_memory_gb, "train.device_memory_gb"
    elif device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_gb, source = props.total_memory / GB, props.name
    else:
        return None
    return {"device_gb": device_gb, "fraction": t.memory_fraction,
            "limit_gb": t.memory_fraction * device_gb, "source": source}


def planned_device(cfg: Config, dist: DistInfo) -> str:
    """The device type the compute is planned for: the run's; a dry run of a run that may use a
    GPU (train.device auto or cuda) plans for the GPU even from a machine without one."""
    if cfg.train.dry_run and cfg.train.device != "cpu":
        return "cuda"
    return dist.device.type


def _share(cfg: Config, dist: DistInfo) -> int:
    """Samples per rank and step: the global batch over the ranks."""
    t = cfg.train
    if t.global_batch % dist.world_size:
        raise ConfigError(f"config key 'train.global_batch': {t.global_batch} is not divisible "
                          f"by the world size ({dist.world_size})")
    return t.global_batch // dist.world_size


def checkpoints_kept(max_steps: int, every: int, keep_last: int, keep_every: int) -> int:
    """Checkpoints left at the end of a full run: the newest keep_last, and every one whose step
    is a multiple of keep_every (d2v_engine.checkpoint's retention)."""
    # Counted, not listed (a run of 1e12 steps is arithmetic, not a list): the checkpoints are
    # every, 2 * every, ... below max_steps, then max_steps, the newest keep_last of them kept.
    total = ((max_steps - 1) // every if every > 0 else 0) + 1
    older = max(0, total - keep_last)  # every * i for i = 1..older, all multiples of every
    kept_older = older // (keep_every // math.gcd(every, keep_every)) if keep_every else 0
    return min(keep_last, total) + kept_older


def make_plan(cfg: Config, dist: DistInfo) -> RunPlan:
    """Checks the run's arithmetic, data, compute and memory before training; builds the
    training dataset (None in a dry run without the data)."""
    t = cfg.train
    check_world_size(cfg, dist)
    if t.micro_batch != "auto":
        BatchPlan.make(t.global_batch, t.micro_batch, dist.world_size)  # the arithmetic first
    dataset, data = None, {"path": cfg.data.path, "found": False}
    no_data = t.dry_run and not (cfg.data.path and Path(cfg.data.path).expanduser().exists())
    if not no_data:
        if cfg.modality == "audio":
            _check_audio_filters(cfg)
        dataset = build_dataset(cfg.data, cfg.modality, "train")
        data = data_summary(cfg, dataset)
        if data["samples"] < t.global_batch:
            raise ConfigError(
                f"config key 'train.global_batch': {t.global_batch} is more than the "
                f"{data['samples']} samples left after the size filters; lower it or add data")
    vocab = getattr(dataset, "vocab_size", 0)
    if cfg.modality == "text" and vocab > cfg.model.vocab_size:  # before any model is built
        raise ConfigError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than "
                          f"the data's vocabulary ({vocab})")
    special_ids = getattr(dataset, "special_ids", None)
    flops, flop_model = count_flops(cfg, special_ids)
    budget = memory_budget(cfg, dist.device)
    memory = None
    if t.dry_run or budget is not None or t.micro_batch == "auto":
        memory = plan_memory(cfg, _share(cfg, dist), dist.world_size, planned_device(cfg, dist),
                             budget, special_ids, source_extent(dataset))
    micro = memory["micro_batch"] if t.micro_batch == "auto" else t.micro_batch
    batch = BatchPlan.make(t.global_batch, micro, dist.world_size)
    crop_group = check_crop_group(cfg, batch) if cfg.modality == "audio" else 0
    steps_per_epoch = data["samples"] // batch.global_batch if "samples" in data else None
    lr = scaled_lr(cfg.optim, batch.global_batch)
    info = {
        "modality": cfg.modality,
        "mode": cfg.objective.mode,
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
        "epochs": t.max_steps / steps_per_epoch if steps_per_epoch else None,
        "checkpoint_every": t.checkpoint_every,
        "checkpoints": checkpoint_count(t.max_steps, t.checkpoint_every),
        "checkpoints_kept": checkpoints_kept(t.max_steps, t.checkpoint_every, t.keep_last,
                                             t.keep_every),
        "schedule": schedule_steps(cfg),
        "cpu": dict(dist.cpu) if getattr(dist, "cpu", None) else {},
        "flops": step_info(flops, batch.global_batch, dist.world_size),
        "memory": memory,
        "memory_budget": budget,
    }
    return RunPlan(batch, lr, dataset, info, flop_model)


def describe_plan(info: dict) -> str:
    """The plan as a few human lines."""
    d = info["data"]
    if not d.get("found", True):
        data_line = f"  data: {d['path'] or '(data.path empty)'} not found: data not planned " \
                    f"(a dry run only; a real run stops here)"
        epochs = ""
    else:
        data_line, epochs = _data_lines(info)
    every = f"every {info['checkpoint_every']} steps and at the end" \
        if info["checkpoints"] > 1 else "at the end"
    scaling = "" if info["lr_scaling"] == "none" or info["lr_reference_batch"] <= 0 else \
        f" = optim.lr {info['lr_config']:.3g} at batch {info['lr_reference_batch']}, " \
        f"{info['lr_scaling']} scaling"
    lines = [
        f"plan: world size {info['world_size']} = {info['nodes']} node(s) x "
        f"{info['ranks_per_node']} rank(s) per node ({info['device']})",
        f"  global batch {info['global_batch']} = {info['world_size']} rank(s) x "
        f"{info['accumulation']} accumulation step(s) x {info['micro_batch']} micro-batch",
        *([f"  audio crop groups of {info['crop_group']} clips: each cropped to its group's "
           f"shortest, one masked count per group (data.crop_group)"]
          if info.get("crop_group") else []),
        f"  learning rate {info['lr']:.4g}{scaling}",
        data_line,
        f"  {info['max_steps']} steps{epochs}; {info['checkpoints']} checkpoint(s) {every}, "
        f"{info['checkpoints_kept']} kept",
        *_schedule_lines(info),
    ]
    lines += describe_flops(info["flops"], info["modality"], info.get("mode", "v1"))
    if info["memory"] is not None:
        lines += describe_memory(info["memory"], info["memory_budget"])
    else:
        lines.append("  memory: not estimated (no budget on this device; a dry run estimates it)")
    return "\n".join(lines)


def _data_lines(info: dict) -> tuple[str, str]:
    d = info["data"]
    amount = ""
    if "seconds" in d:
        amount = f" ({d['seconds'] / 3600:.2f} h; {d['dropped_by_size']} shorter than " \
                 f"data.min_sample_size={d['min_sample_size']} dropped)"
    elif "tokens" in d:
        amount = f" ({d['tokens']} tokens)"
    return (f"  data: {d['samples']} samples after the size filters{amount}",
            f", {info['steps_per_epoch']} per epoch ({info['epochs']:.2f} epochs)")


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
