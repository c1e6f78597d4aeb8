"""Process group set-up from torchrun's environment, and the few collectives the trainer needs."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from d2v_engine.errors import ConfigError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    cpu: dict = field(default_factory=dict)  # d2v_engine.runtime.cpu_setup's report, under torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def pick_device(preference: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """This rank's device: CUDA device `local_rank` (one GPU per local rank) or the CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': 'cuda' requested but no CUDA device is visible")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if local_world_size > visible:
        # Two ranks on one GPU fail much later, inside NCCL's set-up (duplicate GPU), or not at all.
        mask = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ConfigError(
            f"{local_world_size} ranks on this node (LOCAL_WORLD_SIZE) but {visible} CUDA "
            f"device(s) visible (CUDA_VISIBLE_DEVICES={mask}): start at most {visible} "
            f"(torchrun --nproc_per_node, GPUS=), or set train.device=cpu")
    return torch.device("cuda", local_rank)


def _attempt_store(rank: int, world_size: int):
    """The rendezvous store under torchrun, with a key prefix of its own for this attempt.

    torchrun keeps one TCPStore for every restart of a job (torch 2.13), so a restarted gloo
    group reads the addresses the failed attempt left there and hangs connecting to a dead peer.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 29500), world_size,
                          is_master=rank == 0 and not agent_store, multi_tenant=not agent_store,
                          timeout=dist.default_pg_timeout)
    return dist.PrefixStore(f"d2v/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def init_distributed(device_preference: str = "auto",
                     collective_timeout_s: float | None = None) -> DistInfo:
    """Reads RANK / LOCAL_RANK / WORLD_SIZE (torchrun) and joins the process group if needed; a
    collective waiting longer than `collective_timeout_s` for a rank fails (None: torch's default;
    the trainer passes train.collective_timeout_s)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    device = pick_device(device_preference, local_rank, local_world_size)
    cpu = {}
    if "LOCAL_WORLD_SIZE" in os.environ:  # under torchrun: threads and CPUs per rank
        from d2v_engine.runtime.cpu_setup import configure_rank

        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        cpu = configure_rank(local_rank, local_world_size, gpus)
    if world_size > 1 and not dist.is_initialized():
        timeout = None if collective_timeout_s is None \
            else datetime.timedelta(seconds=collective_timeout_s)
        _join(device, rank, world_size, timeout)
    return DistInfo(rank, local_rank, world_size, local_world_size, device, cpu)


def _join(device: torch.device, rank: int, world_size: int,
          timeout: datetime.timedelta | None) -> None:
    """init_process_group: nccl bound to this rank's GPU (device_id: the communicator is made
    now, not at the first collective, and on the right device), gloo on the CPU."""
    kwargs = {"timeout": timeout}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        kwargs.update(store=_attempt_store(rank, world_size), rank=rank, world_size=world_size)
    dist.init_process_group(backend=backend, **kwargs)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank; `obj` itself on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
