"""The training loop, top to bottom: data, masks, teacher targets, student loss, update, EMA, logs,
checkpoints.

Loss normalization follows the reference's sample-size convention: each micro-batch backpropagates
its loss summed over masked positions, and once the whole global batch is done the gradients are
scaled by world_size / (masked positions in the global batch), undoing DDP's averaging. So
1 rank x 2 micro-batches and 2 ranks x 1 follow the same trajectory.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.backends import describe, detect
from engine.cpu_setup import describe as describe_cpu
from engine.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from engine.config import Config, dump_yaml, to_dict
from engine.data import build_dataset
from engine.data.loader import BatchPlan, make_loader
from engine.data2vec import Data2Vec, channel_std
from engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from engine.ema import EMATeacher, ema_decay_at
from engine.errors import CheckpointError, ConfigError, DataError
from engine.init_from import init_encoder
from engine.metrics import MetricsLog, Progress, warn_data_wait
from engine.models import build_model
from engine.plan import describe_plan, make_plan, write_plan
from engine.schedule import lr_factor, scaled_lr
from engine.seeding import STREAM_DROPOUT, STREAM_MASK, mix_seed, sample_seeds


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _optimizer(model: torch.nn.Module, cfg: Config, lr: float, device: torch.device):
    # No weight decay on biases, norms and learned tokens (1-D or scalar-like parameters).
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             **kwargs)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _prepare_run_dir(cfg: Config, dist: DistInfo) -> Path | None:
    """Checks resume/fresh against what run_dir holds; returns the checkpoint to resume from."""
    run_dir = cfg.run_dir
    if cfg.train.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"train.resume=true but {run_dir} holds no complete checkpoint")
        return ckpt
    if list_checkpoints(run_dir):
        raise ConfigError(
            f"run directory {run_dir} already holds checkpoints: pass train.resume=true to continue "
            f"it, or choose another run.dir"
        )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = run_dir / "metrics.jsonl"
        if old.exists():
            n = 1
            while (run_dir / f"metrics.jsonl.prev{n}").exists():
                n += 1
            old.rename(run_dir / f"metrics.jsonl.prev{n}")
    return None


def _write_run_info(cfg: Config, run_dir: Path, dist: DistInfo, plan: BatchPlan, lr: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "command.txt").write_text(" ".join([sys.executable, "-m", "engine.train"]
                                                  + sys.argv[1:]) + "\n")
    (run_dir / "env.json").write_text(json.dumps(detect(), indent=1) + "\n")
    print(f"d2v-engine: {describe(dist.device)}", file=sys.stderr)
    print(f"d2v-engine: {cfg.modality} run '{cfg.run.name}' in {run_dir}: world {dist.world_size} "
          f"on {dist.device.type}, global batch {plan.global_batch} = {plan.world_size} ranks x "
          f"{plan.accumulation} accumulation x {plan.micro_batch} micro-batch, peak lr {lr:.3g}",
          file=sys.stderr, flush=True)


def train(cfg: Config) -> dict:
    """Runs (or resumes) pretraining; returns {'step': last completed step, 'losses': [...]}."""
    dist = init_distributed(cfg.train.device)
    device, run_dir = dist.device, cfg.run_dir
    if dist.cpu:
        # One write per line: the ranks share the terminal.
        sys.stderr.write(f"d2v-engine: {describe_cpu(dist.cpu, dist.rank)}\n")
        sys.stderr.flush()
    run_plan = make_plan(cfg, dist)  # ConfigError on world size, batch arithmetic, empty data
    if dist.is_main:
        print(describe_plan(run_plan.info), file=sys.stdout if cfg.train.dry_run else sys.stderr,
              flush=True)
    if cfg.train.dry_run:
        if dist.is_main:
            write_plan(run_dir, run_plan.info)
        return {"step": 0, "losses": [], "run_dir": str(run_dir), "plan": run_plan.info,
                "pid": os.getpid()}
    resume_from = _prepare_run_dir(cfg, dist)

    dataset, plan = run_plan.dataset, run_plan.batch
    vocab = getattr(dataset, "vocab_size", 0)
    if cfg.modality == "text" and vocab > cfg.model.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than "
                          f"the data's vocabulary ({vocab})")
    peak_lr = scaled_lr(cfg.optim, plan.global_batch)

    torch.manual_seed(cfg.seed)
    encoder = build_model(cfg.model, cfg.modality)
    if cfg.model.init_from:  # student and teacher (its copy) start from these weights
        init_encoder(encoder, cfg.model.init_from, cfg.modality)
    model = Data2Vec(cfg, encoder, getattr(dataset, "special_ids", None)).to(device)
    shared = encoder.feature_encoder_prefixes() if cfg.objective.ema_scope == "transformer" else ()
    teacher = EMATeacher(encoder, shared_prefixes=shared)
    optimizer = _optimizer(model, cfg, peak_lr, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.optim, s, cfg.train.max_steps))

    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]

    log = MetricsLog(run_dir, enabled=dist.is_main)
    if dist.is_main:
        _write_run_info(cfg, run_dir, dist, plan, peak_lr)
        write_plan(run_dir, run_plan.info)
        if resume_from is not None:
            log.write({"event": "resume", "step": start_step, "checkpoint": resume_from.name})
            print(f"d2v-engine: resumed from {resume_from} at step {start_step}", file=sys.stderr)

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.world_size > 1 else model
    stop = cfg.train.stop_at if 0 < cfg.train.stop_at < cfg.train.max_steps else cfg.train.max_steps
    loader = make_loader(dataset, plan, dist.rank, cfg.seed, start_step, stop,
                         num_workers=cfg.data.num_workers, skip_bad=cfg.data.on_bad_file == "skip")
    batches = iter(loader)
    progress = Progress(cfg.train.max_steps, enabled=dist.is_main and cfg.train.progress)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, bad_files = [], 0
    last_log_time, last_log_step = time.time(), start_step
    cycle_start, data_wait, last_wait_warning = time.perf_counter(), 0.0, -1e9

    model.train()
    for step in range(start_step, stop):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        masked = torch.zeros((), device=device)
        for micro in range(plan.accumulation):
            wait_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - wait_start
            if batch["bad_files"]:
                bad_files += len(batch["bad_files"])
                if dist.is_main:
                    print(f"d2v-engine: skipped bad files: {batch['bad_files']}", file=sys.stderr)
            if "source" not in batch:
                raise DataError(f"every sample of a micro-batch at step {step} was unreadable")
            seeds = sample_seeds(cfg.seed, step, batch["position"], STREAM_MASK).to(device)
            batch = _to_device(batch, device)
            # Seeded by the micro-batch's place in the global batch, not by (rank, micro), so
            # dropout does not depend on the world size either.
            torch.manual_seed(mix_seed(cfg.seed, step, micro * dist.world_size + dist.rank,
                                       STREAM_DROPOUT))
            last = micro == plan.accumulation - 1
            sync = contextlib.nullcontext() if last or ddp is model else ddp.no_sync()
            with sync:
                with _autocast(device, cfg.train.precision):
                    out = ddp(batch, teacher.model, seeds)
                out.loss_sum.backward()
            loss_sum += out.loss_sum.detach().float()
            masked += out.masked

        # Fraction of this step's cycle (since the last one) spent waiting for the loader; summed
        # over ranks in the same all-reduce as the loss, so it costs no extra synchronization.
        now = time.perf_counter()
        wait_frac = torch.tensor(data_wait / max(now - cycle_start, 1e-9), device=device)
        cycle_start, data_wait = now, 0.0
        totals = all_reduce_sum(torch.stack([loss_sum, masked, wait_frac]))
        grad_scale = dist.world_size / totals[1].clamp(min=1.0)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], grad_scale)
        max_norm = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        decay = ema_decay_at(step, cfg.objective.ema_decay, cfg.objective.ema_end_decay,
                             cfg.objective.ema_anneal_end_step)
        teacher.update(model.encoder, decay)
        done = step + 1

        if done % cfg.train.log_every == 0 or done == stop:
            loss = (totals[0] / totals[1].clamp(min=1.0)).item()
            now = time.time()
            row = {
                "step": done, "loss": loss, "lr": lr, "ema_decay": decay,
                "samples_per_s": plan.global_batch * (done - last_log_step) / max(now - last_log_time, 1e-9),
                "grad_norm": grad_norm.item(),
                "target_var": channel_std(out.target).item(),
                "pred_var": channel_std(out.pred).item(),
                "masked_per_step": totals[1].item(),
                "bad_files": bad_files,
                "data_wait_frac": totals[2].item() / dist.world_size,
            }
            last_wait_warning = warn_data_wait(row, last_wait_warning, dist.is_main)
            last_log_time, last_log_step = now, done
            losses.append(loss)
            log.write(row)
            progress.update(done, row)

        if done == stop or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
            if dist.is_main:
                save_checkpoint(run_dir, done, {
                    "step": done, "model": model.state_dict(), "teacher": teacher.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "config": to_dict(cfg), "world_size": dist.world_size,
                }, keep_last=cfg.train.keep_last)
            barrier()

    progress.close()
    log.close()
    if dist.is_main and stop < cfg.train.max_steps:
        print(f"d2v-engine: stopped at step {stop} (train.stop_at); resume with train.resume=true",
              file=sys.stderr)
    return {"step": stop, "losses": losses, "run_dir": str(run_dir), "pid": os.getpid()}
