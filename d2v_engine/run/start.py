"""Starting a run in its directory: fresh, resumed or restarted; the checkpoint to continue from,
checked against this start's recipe; what the directory records of each start; and the clean-up
of a start that failed before it trained."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
from pathlib import Path

from d2v_engine.checkpoint import (
    latest_checkpoint, list_checkpoints, load_checkpoint, newest_loadable,
)
from d2v_engine.config import Config, dump_yaml, to_dict
from d2v_engine.data.loader import BatchPlan
from d2v_engine.errors import CheckpointError, ConfigError
from d2v_engine.run.preemption import restart_checkpoint
from d2v_engine.run.resume_check import check_resume, describe_changes
from d2v_engine.run.run_lock import LOCK_NAME
from d2v_engine.runtime.backends import describe, share_attention_picks
from d2v_engine.runtime.distributed import DistInfo, broadcast_object
from d2v_engine.runtime.precision import describe_precision


def prepare_run_dir(cfg: Config, dist: DistInfo) -> Path | None:
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
            f"run directory {run_dir} already holds checkpoints: pass train.resume=true to "
            f"continue it, or choose another run.dir"
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


def load_resume_state(cfg: Config, checkpoint: Path) -> dict:
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


def share_attention_picks_of_ranks(cfg: Config, dist: DistInfo) -> None:
    """Every rank times the config's attention shapes at once, then takes rank 0's picks
    (d2v_engine.runtime.backends.share_attention_picks); rank 0 says so, a rank that keeps its
    own too."""
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


def write_run_info(cfg: Config, run_dir: Path, dist: DistInfo, plan: BatchPlan, lr: float,
                   loader: str, optimizer: str) -> None:
    """config.yaml and command.txt of this start, and its two start lines."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, dump_yaml(cfg))
    # One line per start in this directory: the original command first, then each resume's.
    with open(run_dir / "command.txt", "a") as f:
        f.write(" ".join([sys.executable, "-m", "d2v_engine.cli.train"] + sys.argv[1:]) + "\n")
    print(f"d2v-engine: {describe(dist.device, loader, cfg, optimizer)}", file=sys.stderr)
    print(f"d2v-engine: {cfg.modality} run '{cfg.run.name}' in {run_dir}: world {dist.world_size} "
          f"on {dist.device.type}, global batch {plan.global_batch} = {plan.world_size} ranks x "
          f"{plan.accumulation} accumulation x {plan.micro_batch} micro-batch, peak lr {lr:.3g}, "
          f"{describe_precision(dist.device, cfg.train.precision)}", file=sys.stderr, flush=True)


def write_config(run_dir: Path, text: str) -> None:
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


def wandb_settings(cfg: Config) -> dict | None:
    """What MetricsLog hands to wandb.init, or None (run.wandb off); resumes append to one run."""
    if not cfg.run.wandb:
        return None
    run_id = hashlib.sha1(str(cfg.run_dir.resolve()).encode()).hexdigest()[:16]
    return {"project": cfg.run.wandb_project, "name": cfg.run.name, "config": to_dict(cfg),
            "id": run_id}


def remove_failed_start(run_dir: Path) -> None:
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
