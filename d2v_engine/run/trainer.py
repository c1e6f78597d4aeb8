"""The training loop, top to bottom: build the run, then for each step the micro-batches (forward,
backward), one all-reduce, the update decision, the EMA, the log row, the checkpoint.

Loss normalization follows the reference's sample-size convention: each micro-batch backpropagates
its loss summed over masked positions, and once the whole global batch is done the gradients are
scaled by world_size / (masked positions in the global batch), undoing DDP's averaging. So
1 rank x 2 micro-batches and 2 ranks x 1 follow the same trajectory.

Operating for days: SIGTERM / SIGUSR1 checkpoint and exit 0, launcher restarts resume
(d2v_engine.run.preemption); non-finite updates are skipped, collapse and failed saves stop the
run (d2v_engine.run.guards). Starting in a run directory: d2v_engine.run.start.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from d2v_engine.checkpoint import rng_state, set_rng_state
from d2v_engine.config import Config, to_dict
from d2v_engine.data.select import build_loader, choose_loader, describe_loader
from d2v_engine.handoff.init_from import init_encoder
from d2v_engine.models import build_model
from d2v_engine.objective import build_objective
from d2v_engine.objective.ema import EMATeacher, ema_decay_at, teacher_shared_prefixes
from d2v_engine.objective.optim import build_optimizer, describe_optimizer
from d2v_engine.objective.schedule import lr_factor, scaled_lr
from d2v_engine.objective.step import StepOutput, channel_std
from d2v_engine.planning.buckets import buckets_for, describe_buckets
from d2v_engine.planning.flops import device_peak
from d2v_engine.planning.plan import RunPlan, describe_plan, make_plan, write_plan
from d2v_engine.run.guards import CheckpointSaver, UpdateGuard, inject_nan
from d2v_engine.run.mask_ahead import Feed, host_to_device
from d2v_engine.run.metrics import MetricsLog, Progress, throughput, warn_data_wait
from d2v_engine.run.preemption import (
    StopSignals, injected_kill_step, kill_self, launch_id, restart_count,
)
from d2v_engine.run.run_lock import RunDirLock
from d2v_engine.run.start import (
    load_resume_state, prepare_run_dir, remove_failed_start, share_attention_picks_of_ranks,
    wandb_settings, write_run_info,
)
from d2v_engine.runtime.backends import env_report, preload_attention_picks
from d2v_engine.runtime.compile import FirstStepTimer, compile_student_teacher
from d2v_engine.runtime.cpu_setup import dali_cpus, describe as describe_cpu
from d2v_engine.runtime.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, init_distributed,
)
from d2v_engine.runtime.parallel import (
    forget_unused_blocks, full_tensor, gather_states, load_states, no_sync,
    shard_student_and_teacher, wrap_ddp,
)
from d2v_engine.runtime.precision import autocast
from d2v_engine.seeding import STREAM_DROPOUT, mix_seed


@dataclass
class Tally:
    """What the loop carries from step to step."""

    # Skipped files, each counted once over all ranks and the whole run (resumes included): a
    # rank's newly seen paths ride the step's all-reduce as a count, and only a step with any
    # gathers them, so every rank keeps the same set. Every rank prints its own to stderr.
    bad_seen: set
    first_bad: list
    last_log_step: int
    last_log_time: float = field(default_factory=time.time)
    flops_since_log: float = 0.0  # all ranks, from each micro-batch's shape
    tokens_since_log: float = 0.0
    cycle_start: float = field(default_factory=time.perf_counter)
    last_wait_warning: float = -1e9
    losses: list = field(default_factory=list)


@dataclass
class Run:
    """Everything the steps use, built once by _build_run."""

    cfg: Config
    dist: DistInfo
    signals: StopSignals
    run_plan: RunPlan
    model: torch.nn.Module
    teacher: EMATeacher
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    log: MetricsLog
    guard: UpdateGuard
    saver: CheckpointSaver
    start_step: int
    stop: int
    tally: Tally
    ddp: torch.nn.Module = None
    feed: Feed = None
    params: list = None
    progress: Progress = None
    first_step: FirstStepTimer = None
    peak_tflops: float | None = None
    kill_step: int | None = None
    cuda_graphs: bool = False  # train.compile_mode=reduce-overhead on CUDA


@dataclass
class Local:
    """This rank's micro-batches of one step, summed on the device (no host read yet)."""

    loss_sum: torch.Tensor
    masked: torch.Tensor
    new_bad: list
    flops: float
    tokens: int
    out: StepOutput  # the last micro-batch's, for the logged variances


@dataclass
class Totals:
    """The step over all ranks, read to the host once."""

    loss: float
    masked: float
    stop_votes: float
    wait: float
    bad: float
    flops: float
    tokens: float
    grad_norm: float


def train(cfg: Config) -> dict:
    """Runs (or resumes) pretraining; returns {'step': last completed step, 'losses': [...]}.

    While it runs, SIGTERM / SIGUSR1 stop it cleanly after the current step
    (d2v_engine.run.preemption).
    """
    fresh = not cfg.run_dir.exists()
    lock = RunDirLock(cfg.run_dir)  # rank 0 takes it in _train (d2v_engine.run.run_lock)
    try:
        with StopSignals() as signals, contextlib.ExitStack() as cleanup:
            return _train(cfg, signals, cleanup, lock)
    except BaseException:
        if fresh and lock.held:
            remove_failed_start(cfg.run_dir)
        raise
    finally:
        lock.release()


def _train(cfg: Config, signals: StopSignals, cleanup: contextlib.ExitStack,
           lock: RunDirLock) -> dict:
    dist = _start_processes(cfg, lock)
    run_plan = make_plan(cfg, dist)  # ConfigError on world size, batch arithmetic, empty data
    if dist.is_main:
        print(describe_plan(run_plan.info), file=sys.stdout if cfg.train.dry_run else sys.stderr,
              flush=True)
    if cfg.train.dry_run:
        return _dry_run(cfg, dist, run_plan)
    resume_from = prepare_run_dir(cfg, dist)
    state = None
    if resume_from is not None:
        state = load_resume_state(cfg, resume_from)
        preload_attention_picks(cfg.run_dir)  # the attention backends picked before the restart
    if dist.world_size > 1:  # the first collective: every rank arrives with its picks made
        share_attention_picks_of_ranks(cfg, dist)
    run = _build_run(cfg, dist, run_plan, signals, cleanup, state, resume_from)

    run.model.train()
    preempted = False
    for step in range(run.start_step, run.stop):
        if step == run.kill_step:
            kill_self()
        local = _forward_backward(run, step)  # every micro-batch of this rank
        totals = _reduce_and_clip(run, local)  # one all-reduce; the step's one host read
        lr, decay = _update(run, step, totals)  # skip or apply: optimizer, schedule, EMA
        done = step + 1
        if done % cfg.train.log_every == 0 or done == run.stop:
            _log_row(run, done, totals, local, lr, decay)
        preempted = totals.stop_votes > 0
        if done == run.stop or preempted or (cfg.train.checkpoint_every
                                             and done % cfg.train.checkpoint_every == 0):
            _save(run, done, must_succeed=done == run.stop or preempted)
        if preempted:
            run.stop = done
            break
    return _finish(run, preempted)


def _start_processes(cfg: Config, lock: RunDirLock) -> DistInfo:
    """The process group (torchrun aware), the run directory's lock on rank 0, the CPU line."""
    dist = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    if dist.is_main:  # before anything reads or writes the run directory
        lock.acquire()
    if dist.cpu:
        # One write per line: print() writes the text and the newline separately, and the ranks'
        # lines would interleave.
        sys.stderr.write(f"d2v-engine: {describe_cpu(dist.cpu, dist.rank)}\n")
        sys.stderr.flush()
    return dist


def _dry_run(cfg: Config, dist: DistInfo, run_plan: RunPlan) -> dict:
    if dist.is_main:
        path = write_plan(cfg.run_dir, run_plan.info)
        print(f"d2v-engine: dry run (train.dry_run=true): nothing was trained; the plan is in "
              f"{path}", file=sys.stderr, flush=True)
    return {"step": 0, "losses": [], "run_dir": str(cfg.run_dir), "plan": run_plan.info,
            "pid": os.getpid()}


def _build_models(cfg: Config, dist: DistInfo, run_plan: RunPlan, peak_lr: float):
    """(objective with its student, EMA teacher, optimizer, lr schedule, length buckets) on the
    device, sharded (FSDP) and compiled as the config says."""
    torch.manual_seed(cfg.seed)
    encoder = build_model(cfg.model, cfg.modality)
    if cfg.model.init_from:  # student and teacher (its copy) start from these weights
        init_encoder(encoder, cfg.model.init_from, cfg.modality)
        if dist.is_main:
            print(f"d2v-engine: student and teacher encoders start from {cfg.model.init_from} "
                  f"(model.init_from); the head is fresh, the run starts at step 0",
                  file=sys.stderr)
    special_ids = getattr(run_plan.dataset, "special_ids", None)
    model = build_objective(cfg, encoder, special_ids).to(dist.device)
    teacher = EMATeacher(encoder, teacher_shared_prefixes(encoder, cfg.objective.ema_scope))
    shard_student_and_teacher(model, teacher, cfg, dist)  # train.distributed=fsdp only
    buckets = buckets_for(cfg) if cfg.train.compile else []
    if cfg.train.compile:
        compile_student_teacher(model.encoder, teacher.model, cfg.train, max(1, len(buckets)))
    optimizer = build_optimizer(model, cfg.optim, peak_lr, dist.device)  # apex / fused / foreach
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.optim, s, cfg.train.max_steps))
    return model, teacher, optimizer, scheduler, buckets


def _build_run(cfg: Config, dist: DistInfo, run_plan: RunPlan, signals: StopSignals,
               cleanup: contextlib.ExitStack, state: dict | None, resume_from) -> Run:
    """The models, logs and guards, the state of a resume restored, the start lines, the feed."""
    plan, device = run_plan.batch, dist.device
    loader_kind = choose_loader(cfg.data, cfg.modality)
    peak_lr = scaled_lr(cfg.optim, plan.global_batch)
    model, teacher, optimizer, scheduler, buckets = _build_models(cfg, dist, run_plan, peak_lr)
    log = cleanup.enter_context(contextlib.closing(MetricsLog(
        cfg.run_dir, enabled=dist.is_main, tensorboard=cfg.run.tensorboard,
        wandb=wandb_settings(cfg))))
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
    stop = cfg.train.stop_at if 0 < cfg.train.stop_at < cfg.train.max_steps else cfg.train.max_steps
    tally = Tally(bad_seen=set(bad_state.get("paths", bad_state.get("first", []))),
                  first_bad=list(bad_state.get("first", [])), last_log_step=start_step)
    run = Run(cfg, dist, signals, run_plan, model, teacher, optimizer, scheduler, log, guard,
              saver, start_step, stop, tally)
    if dist.is_main:
        write_run_info(cfg, cfg.run_dir, dist, plan, peak_lr,
                       describe_loader(loader_kind, cfg.data, device, dali_cpus(dist.cpu)),
                       describe_optimizer(optimizer))
        write_plan(cfg.run_dir, run_plan.info)
        if resume_from is not None:
            _say_resumed(run, resume_from)
    _start_feed(run, loader_kind, buckets)
    return run


def _start_feed(run: Run, loader_kind: str, buckets: list) -> None:
    """The optimizer / compile / MFU lines, DDP, the loader and the mask-ahead feed, env.json."""
    cfg, dist, device, plan = run.cfg, run.dist, run.dist.device, run.run_plan.batch
    if dist.is_main:
        print(f"d2v-engine: optimizer {describe_optimizer(run.optimizer)}; "
              + (f"compiled ({cfg.train.compile_mode}, {describe_buckets(cfg, buckets)})"
                 if cfg.train.compile else "eager"), file=sys.stderr)
    peak_name, run.peak_tflops = device_peak(cfg, device)  # MFU's denominator (planning.flops)
    if dist.is_main:
        print(f"d2v-engine: MFU against {peak_name}"
              + (f" {run.peak_tflops:.0f} TFLOP/s" if run.peak_tflops else ": mfu is null"),
              file=sys.stderr)
    run.ddp = wrap_ddp(run.model, cfg, dist, plan.accumulation)  # DDP on several ranks
    dataset = run.run_plan.dataset
    pad_value = getattr(dataset, "special_ids", {}).get("pad", 0)
    crop_group = run.run_plan.info.get("crop_group", 0)
    run.first_step = FirstStepTimer(cfg.train.compile and dist.is_main, device)
    loader = build_loader(dataset, cfg.data, cfg.modality, plan, dist.rank, cfg.seed,
                          run.start_step, run.stop, device=device, kind=loader_kind,
                          cpus=dali_cpus(dist.cpu))
    # Micro-batches on the device, the next one's copies and masks on a side stream (mask_ahead).
    run.feed = Feed(iter(loader), run.model, cfg, device, plan.accumulation, run.start_step,
                    run.stop, buckets, pad_value, crop_group)
    if dist.is_main:
        (cfg.run_dir / "env.json").write_text(
            json.dumps(env_report(device, run.optimizer, loader), indent=1) + "\n")
    run.kill_step = injected_kill_step(dist.rank)
    run.progress = Progress(cfg.train.max_steps, enabled=dist.is_main and cfg.train.progress)
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    run.cuda_graphs = (cfg.train.compile and cfg.train.compile_mode == "reduce-overhead"
                       and device.type == "cuda")
    run.tally.last_log_time, run.tally.cycle_start = time.time(), time.perf_counter()


def _say_resumed(run: Run, resume_from) -> None:
    cfg = run.cfg
    run.log.write({"event": "resume", "step": run.start_step, "checkpoint": resume_from.name,
                   "restart": restart_count()})
    print(f"d2v-engine: resumed from {resume_from} at step {run.start_step}", file=sys.stderr)
    if run.start_step >= cfg.train.max_steps:
        print(f"d2v-engine: the run is finished (step {run.start_step} of train.max_steps="
              f"{cfg.train.max_steps}): nothing to train; raise train.max_steps to go on",
              file=sys.stderr)


def _forward_backward(run: Run, step: int) -> Local:
    """Each micro-batch of this rank: forward (bf16 autocast on CUDA), backward, gradients kept
    local (no_sync) until the last."""
    cfg, dist, device, feed = run.cfg, run.dist, run.dist.device, run.feed
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    masked = torch.zeros((), device=device)
    new_bad, step_flops, step_tokens = [], 0.0, 0
    accumulation = run.run_plan.batch.accumulation
    for micro in range(accumulation):
        # A stand-in (weight 0) replaces a micro-batch whose every file was bad (mask_ahead).
        mb = feed.take()
        if mb.bad_files:
            new_bad += [p for p in mb.bad_files if p not in run.tally.bad_seen and p not in new_bad]
            print(f"d2v-engine: rank {dist.rank} skipped bad files: {mb.bad_files}",
                  file=sys.stderr)
        micro_flops, micro_tokens = run.run_plan.flops.batch_flops(mb.batch["source"].shape)
        step_flops, step_tokens = step_flops + micro_flops, step_tokens + micro_tokens
        # Seeded by the micro-batch's place in the global batch, not by (rank, micro), so
        # dropout does not depend on the world size either.
        torch.manual_seed(mix_seed(cfg.seed, step, micro * dist.world_size + dist.rank,
                                   STREAM_DROPOUT))
        if run.cuda_graphs:
            # A new step for torch's CUDA-graph trees: the previous micro-batch's graph outputs
            # are consumed (its loss went backward; the logged targets and predictions are eager
            # tensors), so the next replay may reuse their memory.
            torch.compiler.cudagraph_mark_step_begin()
        with no_sync(run.ddp, run.model, micro == accumulation - 1):
            with autocast(device, cfg.train.precision):
                out = run.ddp(mb.batch, run.teacher.model, mb.seeds, mb.masks)
            micro_loss = inject_nan(out.loss_sum, step + 1, cfg.train.debug_nan_steps)
            if not mb.weight:
                micro_loss = micro_loss * 0.0
            micro_loss.backward()
        feed.prefetch()  # the next micro-batch's copies and masks run beside this backward
        loss_sum += micro_loss.detach().float()
        masked += out.masked * mb.weight
    return Local(loss_sum, masked, new_bad, step_flops, step_tokens, out)


def _reduce_and_clip(run: Run, local: Local) -> Totals:
    """One all-reduce of the step's sums and stop votes; the gradients scaled to the global
    batch's masked count and clipped; then the step's one host read (the skip decision, the stop
    votes, the logged numbers) and the new bad files gathered when any rank has some."""
    dist, device, feed, tally = run.dist, run.dist.device, run.feed, run.tally
    # Fraction of this step's cycle (since the last one) spent waiting for the loader, the files
    # skipped, the FLOPs and tokens: summed over ranks in the same all-reduce as the loss (one
    # small pinned copy to the device, no extra synchronization).
    now = time.perf_counter()
    host_values = host_to_device(
        torch.tensor([feed.data_wait / max(now - tally.cycle_start, 1e-9),
                      float(len(local.new_bad)), local.flops, float(local.tokens)]), device)
    tally.cycle_start, feed.data_wait = now, 0.0
    sums = all_reduce_sum(torch.cat([torch.stack([local.loss_sum, local.masked,
                                                  run.signals.vote(device)]), host_values]))
    forget_unused_blocks(run.model)  # FSDP with layerdrop: no gradient where no rank ran a block
    grad_scale = dist.world_size / sums[1].clamp(min=1.0)
    torch._foreach_mul_([p.grad for p in run.params if p.grad is not None], grad_scale)
    max_norm = run.cfg.optim.clip_norm if run.cfg.optim.clip_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    totals = Totals(*torch.cat([sums, full_tensor(grad_norm).float().reshape(1)]).tolist())
    tally.flops_since_log += totals.flops
    tally.tokens_since_log += totals.tokens
    if totals.bad:
        for paths in all_gather_objects(local.new_bad):
            tally.first_bad += [p for p in paths
                                if p not in tally.bad_seen][:max(0, 10 - len(tally.first_bad))]
            tally.bad_seen.update(paths)
    return totals


def _update(run: Run, step: int, totals: Totals) -> tuple[float, float]:
    """The update decision (d2v_engine.run.guards), the optimizer step, the schedule, the EMA;
    (the lr and the EMA decay this step used)."""
    cfg = run.cfg
    lr = run.optimizer.param_groups[0]["lr"]
    apply = run.guard.update_ok(step + 1, totals.loss, totals.grad_norm, totals.masked,
                                run.tally.first_bad)
    if apply:
        run.optimizer.step()
    with warnings.catch_warnings():
        # A skipped update still moves the schedule on (d2v_engine.run.guards); torch warns when
        # the optimizer has not stepped yet, which is the point of the skip.
        warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before")
        run.scheduler.step()
    decay = ema_decay_at(step, cfg.objective.ema_decay, cfg.objective.ema_end_decay,
                         run.run_plan.info["schedule"]["ema_anneal_end_step"])
    if apply:
        run.teacher.update(run.model.encoder, decay)
    compile_s = run.first_step.stop()
    if compile_s is not None:
        print(f"d2v-engine: first step (compilation included) took {compile_s:.1f} s",
              file=sys.stderr, flush=True)
    return lr, decay


def _log_row(run: Run, done: int, totals: Totals, local: Local, lr: float, decay: float) -> None:
    """The metrics row of step `done` (all ranks join the variances' all-reduce); then the
    collapse check on what it logged."""
    dist, tally, guard = run.dist, run.tally, run.guard
    loss = totals.loss / max(totals.masked, 1.0)
    target_var, pred_var = (all_reduce_sum(torch.stack(
        [channel_std(local.out.target), channel_std(local.out.pred)])) / dist.world_size).tolist()
    now = time.time()
    elapsed = max(now - tally.last_log_time, 1e-9)
    row = {
        "step": done, "loss": loss, "lr": lr, "ema_decay": decay,
        "samples_per_s": run.run_plan.batch.global_batch * (done - tally.last_log_step) / elapsed,
        **throughput(tally.flops_since_log, tally.tokens_since_log, elapsed, dist.world_size,
                     run.peak_tflops),
        "grad_norm": totals.grad_norm,
        "target_var": target_var,
        "pred_var": pred_var,
        "masked_per_step": totals.masked,
        "bad_files": len(tally.bad_seen),
        "bad_files_first": tally.first_bad,
        "skipped_steps": guard.skipped_steps,
        "empty_steps": guard.empty_steps,
        "data_wait_frac": totals.wait / dist.world_size,
    }
    tally.last_wait_warning = warn_data_wait(row, tally.last_wait_warning, dist.is_main)
    tally.last_log_time, tally.last_log_step = now, done
    tally.flops_since_log = tally.tokens_since_log = 0.0
    tally.losses.append(loss)
    run.log.write(row)
    run.progress.update(done, row)
    guard.check_collapse(done - 1, target_var, pred_var)


def _save(run: Run, done: int, must_succeed: bool) -> None:
    """Checkpoint at step `done`: every state gathered (a collective under FSDP), rank 0 writes."""
    cfg, tally = run.cfg, run.tally
    states = gather_states(run.model, run.teacher, run.optimizer, cfg)
    run.saver.save(done, lambda: {
        "step": done, **states, "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(run.dist.device), "config": to_dict(cfg),
        "world_size": run.dist.world_size, "guard": run.guard.state_dict(),
        "launch_id": launch_id(),
        "bad_files": {"count": len(tally.bad_seen), "first": tally.first_bad,
                      "paths": sorted(tally.bad_seen)},
    }, must_succeed=must_succeed)


def _finish(run: Run, preempted: bool) -> dict:
    """The end lines and event rows; train()'s result."""
    cfg, dist, stop = run.cfg, run.dist, run.stop
    run.progress.close()
    if dist.is_main and preempted:
        run.log.write({"event": "preempted", "step": stop, "signal": run.signals.received})
        print(f"d2v-engine: stop requested ({run.signals.received or 'signal on another rank'}): "
              f"checkpoint at step {stop} written; resume with train.resume=true", file=sys.stderr)
    elif dist.is_main and run.start_step < stop < cfg.train.max_steps:
        run.log.write({"event": "stopped", "step": stop, "reason": "stop_at"})
        print(f"d2v-engine: stopped at step {stop} (train.stop_at); resume with train.resume=true",
              file=sys.stderr)
    run.log.close()
    return {"step": stop, "losses": run.tally.losses, "run_dir": str(cfg.run_dir),
            "pid": os.getpid(), "preempted": preempted}
