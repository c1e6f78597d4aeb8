"""Data parallelism by config (train.distributed): DDP or FSDP2, and the state dicts they need.

DDP: gradients are bucketed (train.ddp_bucket_cap_mb) and all-reduced while backward still runs;
gradient_as_bucket_view=True lets the gradients live in the buckets (no copy);
find_unused_parameters=True only with layerdrop (which skips blocks at random). static_graph stays
off: with it, 2 gloo ranks drifted from 1 rank x 2 accumulation by ~3e-5 relative after one update
(tests/test_distributed.py), which breaks the world-size invariance the trainer promises.

FSDP2: `fully_shard` on every transformer block, then on the root module, for the student; each
parameter is sharded on its first dimension (no flattening, no dtype change: no mixed-precision
policy, so the bf16 autocast casts exactly as under DDP). Parameters outside the blocks (feature
encoder, embeddings, positional conv, CLS, relative bias, final norms, head / decoder) form the
root's group. The EMA teacher is sharded the same way (same blocks, same mesh), so each rank's
teacher shard lines up with its student shard and the EMA update is local: lerp (or copy, for the
parts ema_scope shares) of local shards, no collective. The teacher's only collectives are the
parameter all-gathers of its own forward (embed / encode are registered as FSDP forward methods),
in the same order on every rank; it has no gradients, so no reduce-scatter.

The teacher's root is sharded with reshard_after_forward=True. FSDP2 otherwise leaves a root
unsharded after its forward (the backward would gather it again at once) and reshards it only at
the end of the backward, which the teacher never runs: its root parameters stayed the tensors
gathered at the first step while the EMA wrote to the shards, so the teacher's embeddings /
feature encoder / positional conv / final norms never moved (ema_scope made no difference).
Resharding after each forward makes every embed / encode gather the current shards.

Layerdrop: ranks draw their own skips, but FSDP's all-gathers (and reduce-scatters) need every
rank to run every block. Under FSDP a dropped block runs at weight 0 (BlockStack.run_dropped), and
a block that no rank ran in the step loses its (zero) gradient before clipping and the update
(forget_unused_blocks), as under DDP and in one process, where it has none: so no weight decay and
no Adam-moment decay for it. A dropped block then costs its compute under FSDP.

Checkpoints hold full (unsharded) state dicts, gathered on every rank and written by rank 0, so a
checkpoint does not depend on the world size or on DDP vs FSDP. The optimizer's is torch's own
form without FSDP (parameters numbered in optimizer order) and keyed by parameter name with it
(torch.distributed.checkpoint's form); loading converts one to the other where needed.
"""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from d2v_engine.runtime.distributed import all_reduce_sum
from d2v_engine.errors import CheckpointError, ConfigError


def is_fsdp(cfg) -> bool:
    return getattr(cfg.train, "distributed", "ddp") == "fsdp"


def _check_fsdp(cfg, dist) -> None:
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        raise ConfigError("config key 'train.distributed': fsdp needs the process group (torchrun)")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def shard_student_and_teacher(model: torch.nn.Module, teacher, cfg, dist) -> None:
    """FSDP2 in place: per block, then root, for the student (Data2Vec) and the teacher encoder.
    Call before the optimizer is built (sharding replaces the parameters)."""
    if not is_fsdp(cfg) or dist.world_size <= 1:
        return
    _check_fsdp(cfg, dist)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import register_fsdp_forward_method
    fully_shard = _fully_shard()
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    for block in model.encoder.blocks.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.encoder.blocks.run_dropped = model.encoder.blocks.layerdrop > 0
    for block in teacher.model.blocks.blocks:
        fully_shard(block, mesh=mesh)
    # Explicit True: no backward reshards the teacher's root (module docstring).
    fully_shard(teacher.model, mesh=mesh, reshard_after_forward=True)
    # Data2Vec calls the teacher's embed / encode, not its forward: they unshard the root too.
    register_fsdp_forward_method(teacher.model, "embed")
    register_fsdp_forward_method(teacher.model, "encode")


def wrap_ddp(model: torch.nn.Module, cfg, dist, accumulation: int) -> torch.nn.Module:
    """The module the trainer calls: DDP on several ranks (ddp mode), else `model` itself."""
    if dist.world_size <= 1 or is_fsdp(cfg):
        return model
    layerdrop = cfg.model.layerdrop > 0
    return DDP(
        model,
        device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        bucket_cap_mb=getattr(cfg.train, "ddp_bucket_cap_mb", 25),
        gradient_as_bucket_view=True,
        find_unused_parameters=layerdrop,
        static_graph=False,
    )


def no_sync(wrapped: torch.nn.Module, model: torch.nn.Module, last_micro: bool):
    """Context for one micro-batch's backward: DDP's no_sync before the last micro-batch; FSDP2
    keeps unsharded-gradient accumulation local (set_requires_gradient_sync)."""
    import contextlib
    if wrapped is not model:
        return contextlib.nullcontext() if last_micro else wrapped.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2-sharded module
        model.set_requires_gradient_sync(last_micro)
    return contextlib.nullcontext()


def forget_unused_blocks(model: torch.nn.Module) -> None:
    """FSDP with layerdrop, after the step's backward: the gradients of the blocks that no rank
    ran in any micro-batch become None (module docstring). One small all-reduce and host read;
    nothing without run_dropped."""
    blocks = model.encoder.blocks
    if not blocks.run_dropped:
        return
    runs = torch.tensor(blocks.runs, dtype=torch.float32, device=next(blocks.parameters()).device)
    blocks.runs = [0] * len(blocks.runs)
    for block, n in zip(blocks.blocks, all_reduce_sum(runs).tolist()):
        if n == 0:
            for p in block.parameters():
                p.grad = None


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective), a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_states(model, teacher, optimizer, cfg) -> dict:
    """Full model / teacher / optimizer state dicts; collective under FSDP (call on every rank)."""
    if not _sharded(model):
        return {"model": model.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=opts),
            "teacher": get_model_state_dict(teacher.model, options=opts),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=opts)}


def load_states(model, teacher, optimizer, state: dict) -> None:
    """Inverse of gather_states (full state dicts into plain or sharded modules)."""
    if not _sharded(model):
        model.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(_optimizer_by_index(state["optimizer"], optimizer, model))
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=opts)
    set_model_state_dict(teacher.model, state["teacher"], options=opts)
    set_optimizer_state_dict(model, optimizer, _optimizer_by_name(state["optimizer"], optimizer, model),
                             options=opts)


def _sharded(model) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())


def _param_order(optimizer, model) -> list[str]:
    """The names of the optimizer's parameters, in the order torch numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _optimizer_by_name(sd: dict, optimizer, model) -> dict:
    """An optimizer state dict keyed by parameter name (a DDP / one-process checkpoint's numbers
    become the names FSDP's loader looks up)."""
    if all(isinstance(k, str) for g in sd["param_groups"] for k in g["params"]):
        return sd
    order = _param_order(optimizer, model)
    return {"state": {order[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                             for g in sd["param_groups"]]}


def _optimizer_by_index(sd: dict, optimizer, model) -> dict:
    """An optimizer state dict in torch's numbering (an FSDP checkpoint's names become numbers:
    torch's load_state_dict would pair them with parameters by position only)."""
    if all(isinstance(k, int) for g in sd["param_groups"] for k in g["params"]):
        return sd
    index = {n: i for i, n in enumerate(_param_order(optimizer, model))}
    unknown = [n for g in sd["param_groups"] for n in g["params"] if n not in index]
    if unknown:
        raise CheckpointError(f"checkpoint's optimizer state holds parameters this model's "
                              f"optimizer does not: {', '.join(unknown[:3])}")
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in sd["param_groups"]]}
