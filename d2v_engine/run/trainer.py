"""The training loop, top to bottom: data, masks, teacher targets, student loss, update, EMA, logs,
checkpoints.

Loss normalization follows the reference's sample-size convention: each micro-batch backpropagates
its loss summed over masked positions, and once the whole global batch is done the gradients are
scaled by world_size / (masked positions in the global batch), undoing DDP's averaging. So
1 rank x 2 micro-batches and 2 ranks x 1 follow the same trajectory.

Operating for days: SIGTERM / SIGUSR1 checkpoint and exit 0, launcher restarts resume
(d2v_engine.run.preemption); non-finite updates are skipped, collapse and failed saves stop the run
(d2v_engine.run.guards).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from d2v_engine.runtime.backends import (
    describe, env_report, preload_attention_picks, share_attention_picks,
)
from d2v_engine.runtime.cpu_setup import dali_cpus, describe as describe_cpu
from d2v_engine.planning.buckets import buckets_for, describe_buckets
from d2v_engine.runtime.compile import FirstStepTimer, compile_student_teacher
from d2v_engine.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, newest_loadable, rng_state,
    set_rng_state,
)
from d2v_engine.config import Config, dump_yaml, to_dict
from d2v_engine.data.loader import BatchPlan
from d2v_engine.data.select import build_loader, choose_loader, describe_loader
from d2v_engine.objective import build_objective
from d2v_engine.objective.step import channel_std
from d2v_engine.runtime.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, broadcast_object, init_distributed,
)
from d2v_engine.objective.ema import EMATeacher, ema_decay_at, teacher_shared_prefixes
from d2v_engine.errors import CheckpointError, ConfigError
from d2v_engine.planning.flops import device_peak
from d2v_engine.run.guards import CheckpointSaver, UpdateGuard, inject_nan
from d2v_engine.handoff.init_from import init_encoder
from d2v_engine.run.mask_ahead import Feed, host_to_device
from d2v_engine.run.metrics import MetricsLog, Progress, throughput, warn_data_wait
from d2v_engine.models import build_model
from d2v_engine.planning.plan import describe_plan, make_plan, write_plan
from d2v_engine.run.resume_check import check_resume, describe_changes
from d2v_engine.run.run_lock import LOCK_NAME, RunDirLock
from d2v_engine.run.preemption import (
    StopSignals, injected_kill_step, kill_self, launch_id, restart_checkpoint, restart_count,
)
from d2v_engine.objective.optim import build_optimizer, describe_optimizer
from d2v_engine.runtime.parallel import (
    forget_unused_blocks, full_tensor, gather_states, load_states, no_sync,
    shard_student_and_teacher, wrap_ddp,
)
from d2v_engine.objective.schedule import lr_factor, scaled_lr
from d2v_engine.seeding import STREAM_DROPOUT, mix_seed


def _use_bf16(device: torch.device, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _autocast(device: torch.device, precision: str):
    if not _use_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _precision(device: torch.device, precision: str) -> str:
    """The precision in use, in words, with the train.precision that chose it."""
    used = "bf16 autocast" if _use_bf16(device, precision) else "fp32"
    return f"{used} (train.precision={precision})"


def _optimizer(model: torch.nn.Module, cfg: Config, lr: float, device: torch.device):
    return build_optimizer(model, cfg.optim, lr, device)  # apex / fused / foreach: d2v_engine.objective.optim


def _prepare_run_dir(cfg: Config, dist: DistInfo) -> Path | None:
    """Checks resume/fresh against what run_dir holds; returns the checkpoint to resume from."""
    run_dir = cfg.run_dir
    restarted = None if cfg.train.resume else restart_checkpoint(run_dir)
    if restarted is not None:
        return restarted
    if cfg.train.resume_from:
        ckpt = Path(cfg.train.resume_from)
        if not ckpt.is_file():
            raise CheckpointError(f"train.resume_from={ckpt}: no such checkpoint file")
        return ckpt
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


def _write_run_info(cfg: Config, run_dir: Path, dist: DistInfo, plan: BatchPlan, lr: float,
                    loader: str, optimizer: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, dump_yaml(cfg))
    # One line per start in this directory: the original command first, then each resume's.
    with open(run_dir / "command.txt", "a") as f:
        f.write(" ".join([sys.executable, "-m", "d2v_engine.cli.train"] + sys.argv[1:]) + "\n")
    print(f"d2v-engine: {describe(dist.device, loader, cfg, optimizer)}", file=sys.stderr)
    print(f"d2v-engine: {cfg.modality} run '{cfg.run.name}' in {run_dir}: world {dist.world_size} "
          f"on {dist.device.type}, global batch {plan.global_batch} = {plan.world_size} ranks x "
          f"{plan.accumulation} accumulation x {plan.micro_batch} micro-batch, peak lr {lr:.3g}, "
          f"{_precision(dist.device, cfg.train.precision)}", file=sys.stderr, flush=True)


def _write_config(run_dir: Path, text: str) -> None:
    """config.yaml is this start's resolved config; one that differs from an earlier start's is
    never replaced silently: the earlier one is kept as config.yaml.prev<N>."""
    path = run_dir / "config.yaml"
    if path.is_file() and path.read_text() != text:
        n = 1
        while (run_dir / f"config.yaml.prev{n}").exists():
            n += 1
        path.rename(run_dir / f"config.yaml.prev{n}")
        print(f"d2v-engine: the config differs from the previous start's, kept as "
              f"config.yaml.prev{n}", file=sys.stderr)
    path.write_text(text)


def _load_resume_state(cfg: Config, checkpoint: Path) -> dict:
    """The checkpoint to resume from, loaded and checked against this start's recipe."""
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as e:
        older = newest_loadable(checkpoint.parent, before=checkpoint)
        if older is None or cfg.train.resume_from:
            raise
        raise CheckpointError(f"{e}; the newest checkpoint that loads is {older.name}: resume "
                              f"from it with train.resume_from={older}") from None
    if isinstance(state.get("config"), dict):
        changes = check_resume(cfg, state["config"], checkpoint)
        line = describe_changes(changes)
        if line and int(os.environ.get("RANK", "0")) == 0:
            print(f"d2v-engine: {line}", file=sys.stderr)
    return state


def _share_attention_picks(cfg: Config, dist: DistInfo) -> None:
    """Every rank times the config's attention shapes at once, then takes rank 0's picks
    (d2v_engine.runtime.backends.share_attention_picks); rank 0 says so, a rank that keeps its own too."""
    shared = share_attention_picks(cfg, dist.device, dist.rank, broadcast_object)
    if shared["error"]:
        sys.stderr.write(f"d2v-engine: rank {dist.rank}: timing attention failed "
                         f"({shared['error']})\n")
    if not shared["same_gpu"]:
        sys.stderr.write(f"d2v-engine: rank {dist.rank}: its GPU is not rank 0's model: it keeps "
                         f"its own attention picks\n")
    if dist.is_main and shared["shapes"]:
        print(f"d2v-engine: attention backends of {shared['shapes']} shape(s) picked on every rank "
              f"in {shared['seconds']:.1f} s; all {dist.world_size} ranks run rank 0's",
              file=sys.stderr, flush=True)


def _wandb(cfg: Config) -> dict | None:
    if not cfg.run.wandb:
        return None
    run_id = hashlib.sha1(str(cfg.run_dir.resolve()).encode()).hexdigest()[:16]  # resumes append
    return {"project": cfg.run.wandb_project, "name": cfg.run.name, "config": to_dict(cfg),
            "id": run_id}


def train(cfg: Config) -> dict:
    """Runs (or resumes) pretraining; returns {'step': last completed step, 'losses': [...]}.

    While it runs, SIGTERM / SIGUSR1 stop it cleanly after the current step (d2v_engine.run.preemption).
    """
    fresh = not cfg.run_dir.exists()
    lock = RunDirLock(cfg.run_dir)  # rank 0 takes it in _train (d2v_engine.run.run_lock)
    try:
        with StopSignals() as signals, contextlib.ExitStack() as cleanup:
            return _train(cfg, signals, cleanup, lock)
    except BaseException:
        if fresh and lock.held:
            _remove_failed_start(cfg.run_dir)
        raise
    finally:
        lock.release()


def _remove_failed_start(run_dir: Path) -> None:
    """A start that failed before its first logged row leaves no directory behind (only what it
    created itself is there: the start's info files, an empty metrics.jsonl, event files)."""
    metrics = run_dir / "metrics.jsonl"
    if list_checkpoints(run_dir) or (metrics.exists() and metrics.stat().st_size):
        return
    for name in ("config.yaml", "command.txt", "plan.json", "env.json", "metrics.jsonl",
                 LOCK_NAME):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only when nothing else is in it


def _train(cfg: Config, signals: StopSignals, cleanup: contextlib.ExitStack,
           lock: RunDirLock) -> dict:
    dist = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    device, run_dir = dist.device, cfg.run_dir
    if dist.is_main:  # before anything reads or writes the run directory
        lock.acquire()
    if dist.cpu:
        # One write per line: print() writes the text and the newline separately, and the ranks'
        # lines would interleave.
        sys.stderr.write(f"d2v-engine: {describe_cpu(dist.cpu, dist.rank)}\n")
        sys.stderr.flush()
    run_plan = make_plan(cfg, dist)  # ConfigError on world size, batch arithmetic, empty data
    if dist.is_main:
        print(describe_plan(run_plan.info), file=sys.stdout if cfg.train.dry_run else sys.stderr,
              flush=True)
    if cfg.train.dry_run:
        if dist.is_main:
            path = write_plan(run_dir, run_plan.info)
            print(f"d2v-engine: dry run (train.dry_run=true): nothing was trained; the plan is in "
                  f"{path}", file=sys.stderr, flush=True)
        return {"step": 0, "losses": [], "run_dir": str(run_dir), "plan": run_plan.info,
                "pid": os.getpid()}
    resume_from = _prepare_run_dir(cfg, dist)
    state = None
    if resume_from is not None:
        state = _load_resume_state(cfg, resume_from)
        preload_attention_picks(cfg.run_dir)  # the attention backends picked before the restart
    if dist.world_size > 1:  # the first collective: every rank arrives with its picks made
        _share_attention_picks(cfg, dist)

    dataset, plan = run_plan.dataset, run_plan.batch
    loader_kind = choose_loader(cfg.data, cfg.modality)
    peak_lr = scaled_lr(cfg.optim, plan.global_batch)

    torch.manual_seed(cfg.seed)
    encoder = build_model(cfg.model, cfg.modality)
    if cfg.model.init_from:  # student and teacher (its copy) start from these weights
        init_encoder(encoder, cfg.model.init_from, cfg.modality)
        if dist.is_main:
            print(f"d2v-engine: student and teacher encoders start from {cfg.model.init_from} "
                  f"(model.init_from); the head is fresh, the run starts at step 0",
                  file=sys.stderr)
    model = build_objective(cfg, encoder, getattr(dataset, "special_ids", None)).to(device)
    teacher = EMATeacher(encoder, teacher_shared_prefixes(encoder, cfg.objective.ema_scope))
    shard_student_and_teacher(model, teacher, cfg, dist)  # train.distributed=fsdp only
    buckets = buckets_for(cfg) if cfg.train.compile else []
    if cfg.train.compile:
        compile_student_teacher(model.encoder, teacher.model, cfg.train, max(1, len(buckets)))
    optimizer = _optimizer(model, cfg, peak_lr, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.optim, s, cfg.train.max_steps))

    log = cleanup.enter_context(contextlib.closing(MetricsLog(
        run_dir, enabled=dist.is_main, tensorboard=cfg.run.tensorboard, wandb=_wandb(cfg))))
    guard = UpdateGuard(cfg, log)
    saver = CheckpointSaver(cfg, dist.is_main, device, log)
    start_step, bad_state = 0, {}
    if state is not None:
        load_states(model, teacher, optimizer, state)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device)
        guard.load_state_dict(state.get("guard", {}))
        bad_state = state.get("bad_files", {})
        start_step = state["step"]

    if dist.is_main:
        _write_run_info(cfg, run_dir, dist, plan, peak_lr,
                        describe_loader(loader_kind, cfg.data, device, dali_cpus(dist.cpu)),
                        describe_optimizer(optimizer))
        write_plan(run_dir, run_plan.info)
        if resume_from is not None:
            log.write({"event": "resume", "step": start_step, "checkpoint": resume_from.name,
                       "restart": restart_count()})
            print(f"d2v-engine: resumed from {resume_from} at step {start_step}", file=sys.stderr)
            if start_step >= cfg.train.max_steps:
                print(f"d2v-engine: the run is finished (step {start_step} of train.max_steps="
                      f"{cfg.train.max_steps}): nothing to train; raise train.max_steps to go on",
                      file=sys.stderr)
        print(f"d2v-engine: optimizer {describe_optimizer(optimizer)}; "
              + (f"compiled ({cfg.train.compile_mode}, {describe_buckets(cfg, buckets)})"
                 if cfg.train.compile else "eager"), file=sys.stderr)
    peak_name, peak_tflops = device_peak(cfg, device)  # MFU's denominator (d2v_engine.planning.flops)
    if dist.is_main:
        print(f"d2v-engine: MFU against {peak_name}"
              + (f" {peak_tflops:.0f} TFLOP/s" if peak_tflops else ": mfu is null"),
              file=sys.stderr)

    ddp = wrap_ddp(model, cfg, dist, plan.accumulation)  # DDP on several ranks (ddp mode)
    pad_value = getattr(dataset, "special_ids", {}).get("pad", 0)
    crop_group = run_plan.info.get("crop_group", 0)
    first_step = FirstStepTimer(cfg.train.compile and dist.is_main, device)
    stop = cfg.train.stop_at if 0 < cfg.train.stop_at < cfg.train.max_steps else cfg.train.max_steps
    loader = build_loader(dataset, cfg.data, cfg.modality, plan, dist.rank, cfg.seed, start_step,
                          stop, device=device, kind=loader_kind, cpus=dali_cpus(dist.cpu))
    # Micro-batches on the device, the next one's copies and masks on a side stream (mask_ahead).
    feed = Feed(iter(loader), model, cfg, device, plan.accumulation, start_step, stop, buckets,
                pad_value, crop_group)
    if dist.is_main:
        (run_dir / "env.json").write_text(
            json.dumps(env_report(device, optimizer, loader), indent=1) + "\n")
    kill_step = injected_kill_step(dist.rank)
    progress = Progress(cfg.train.max_steps, enabled=dist.is_main and cfg.train.progress)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, preempted = [], False
    # Skipped files, each counted once over all ranks and the whole run (resumes included): a
    # rank's newly seen paths ride the step's all-reduce as a count, and only a step with any
    # gathers them, so every rank keeps the same set. Every rank prints its own to stderr.
    bad_seen = set(bad_state.get("paths", bad_state.get("first", [])))
    first_bad = list(bad_state.get("first", []))
    last_log_time, last_log_step = time.time(), start_step
    flops_since_log = tokens_since_log = 0.0  # all ranks, from each micro-batch's shape
    cycle_start, last_wait_warning = time.perf_counter(), -1e9

    model.train()
    for step in range(start_step, stop):
        if step == kill_step:
            kill_self()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        masked = torch.zeros((), device=device)
        new_bad, step_flops, step_tokens = [], 0.0, 0
        for micro in range(plan.accumulation):
            # A stand-in (weight 0) replaces a micro-batch whose every file was bad (mask_ahead).
            mb = feed.take()
            if mb.bad_files:
                new_bad += [p for p in mb.bad_files if p not in bad_seen and p not in new_bad]
                print(f"d2v-engine: rank {dist.rank} skipped bad files: {mb.bad_files}",
                      file=sys.stderr)
            micro_flops, micro_tokens = run_plan.flops.batch_flops(mb.batch["source"].shape)
            step_flops, step_tokens = step_flops + micro_flops, step_tokens + micro_tokens
            # Seeded by the micro-batch's place in the global batch, not by (rank, micro), so
            # dropout does not depend on the world size either.
            torch.manual_seed(mix_seed(cfg.seed, step, micro * dist.world_size + dist.rank,
                                       STREAM_DROPOUT))
            last = micro == plan.accumulation - 1
            sync = no_sync(ddp, model, last)
            with sync:
                with _autocast(device, cfg.train.precision):
                    out = ddp(mb.batch, teacher.model, mb.seeds, mb.masks)
                micro_loss = inject_nan(out.loss_sum, step + 1, cfg.train.debug_nan_steps)
                if not mb.weight:
                    micro_loss = micro_loss * 0.0
                micro_loss.backward()
            feed.prefetch()  # the next micro-batch's copies and masks run beside this backward
            loss_sum += micro_loss.detach().float()
            masked += out.masked * mb.weight

        # Fraction of this step's cycle (since the last one) spent waiting for the loader, the
        # files skipped, the FLOPs and tokens: summed over ranks in the same all-reduce as the
        # loss (one small pinned copy to the device, no extra synchronization).
        now = time.perf_counter()
        host_values = host_to_device(
            torch.tensor([feed.data_wait / max(now - cycle_start, 1e-9), float(len(new_bad)),
                          step_flops, float(step_tokens)]), device)
        cycle_start, feed.data_wait = now, 0.0
        totals = all_reduce_sum(torch.cat([torch.stack([loss_sum, masked, signals.vote(device)]),
                                           host_values]))
        forget_unused_blocks(model)  # FSDP with layerdrop: no gradient where no rank ran a block
        grad_scale = dist.world_size / totals[1].clamp(min=1.0)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], grad_scale)
        max_norm = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # The step's one host read (d2v_engine.run.guards): skip decision, stop votes, logged numbers.
        loss_total, masked_total, stop_votes, wait_total, bad_total, flops_total, tokens_total, \
            grad_norm = torch.cat([totals, full_tensor(grad_norm).float().reshape(1)]).tolist()
        flops_since_log, tokens_since_log = flops_since_log + flops_total, \
            tokens_since_log + tokens_total
        if bad_total:
            for paths in all_gather_objects(new_bad):
                first_bad += [p for p in paths if p not in bad_seen][:max(0, 10 - len(first_bad))]
                bad_seen.update(paths)
        lr = optimizer.param_groups[0]["lr"]
        done = step + 1
        apply = guard.update_ok(done, loss_total, grad_norm, masked_total, first_bad)
        if apply:
            optimizer.step()
        with warnings.catch_warnings():
            # A skipped update still moves the schedule on (d2v_engine.run.guards); torch warns when the
            # optimizer has not stepped yet, which is the point of the skip.
            warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before")
            scheduler.step()
        decay = ema_decay_at(step, cfg.objective.ema_decay, cfg.objective.ema_end_decay,
                             run_plan.info["schedule"]["ema_anneal_end_step"])
        if apply:
            teacher.update(model.encoder, decay)
        compile_s = first_step.stop()
        if compile_s is not None:
            print(f"d2v-engine: first step (compilation included) took {compile_s:.1f} s",
                  file=sys.stderr, flush=True)

        if done % cfg.train.log_every == 0 or done == stop:
            loss = loss_total / max(masked_total, 1.0)
            target_var, pred_var = (all_reduce_sum(torch.stack(
                [channel_std(out.target), channel_std(out.pred)])) / dist.world_size).tolist()
            now = time.time()
            elapsed = max(now - last_log_time, 1e-9)
            row = {
                "step": done, "loss": loss, "lr": lr, "ema_decay": decay,
                "samples_per_s": plan.global_batch * (done - last_log_step) / elapsed,
                **throughput(flops_since_log, tokens_since_log, elapsed, dist.world_size,
                             peak_tflops),
                "grad_norm": grad_norm,
                "target_var": target_var,
                "pred_var": pred_var,
                "masked_per_step": masked_total,
                "bad_files": len(bad_seen),
                "bad_files_first": first_bad,
                "skipped_steps": guard.skipped_steps,
                "empty_steps": guard.empty_steps,
                "data_wait_frac": wait_total / dist.world_size,
            }
            last_wait_warning = warn_data_wait(row, last_wait_warning, dist.is_main)
            last_log_time, last_log_step = now, done
            flops_since_log = tokens_since_log = 0.0
            losses.append(loss)
            log.write(row)
            progress.update(done, row)
            guard.check_collapse(step, target_var, pred_var)

        preempted = stop_votes > 0
        if done == stop or preempted or (cfg.train.checkpoint_every
                                         and done % cfg.train.checkpoint_every == 0):
            states = gather_states(model, teacher, optimizer, cfg)  # collective under FSDP
            saver.save(done, lambda: {
                "step": done, **states, "scheduler": scheduler.state_dict(),
                "rng": rng_state(device), "config": to_dict(cfg), "world_size": dist.world_size,
                "guard": guard.state_dict(), "launch_id": launch_id(),
                "bad_files": {"count": len(bad_seen), "first": first_bad,
                              "paths": sorted(bad_seen)},
            }, must_succeed=done == stop or preempted)
        if preempted:
            stop = done
            break

    progress.close()
    if dist.is_main and preempted:
        log.write({"event": "preempted", "step": stop, "signal": signals.received})
        print(f"d2v-engine: stop requested ({signals.received or 'signal on another rank'}): "
              f"checkpoint at step {stop} written; resume with train.resume=true", file=sys.stderr)
    elif dist.is_main and start_step < stop < cfg.train.max_steps:
        log.write({"event": "stopped", "step": stop, "reason": "stop_at"})
        print(f"d2v-engine: stopped at step {stop} (train.stop_at); resume with train.resume=true",
              file=sys.stderr)
    log.close()
    return {"step": stop, "losses": losses, "run_dir": str(run_dir), "pid": os.getpid(),
            "preempted": preempted}
