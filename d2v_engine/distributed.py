"""Process group set-up from torchrun's environment, and the few collectives the trainer needs."""
from __future__ import annotations

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
    cpu: dict = field(default_factory=dict)  # d2v_engine.cpu_setup's report, under torchrun

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


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': 'cuda' requested but no CUDA device is visible")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


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


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Reads RANK / LOCAL_RANK / WORLD_SIZE (torchrun) and joins the process group if needed."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    device = pick_device(device_preference, local_rank)
    cpu = {}
    if "LOCAL_WORLD_SIZE" in os.environ:  # under torchrun: threads and CPUs per rank
        from d2v_engine.cpu_setup import configure_rank

        cpu = configure_rank(local_rank, local_world_size)
    if world_size > 1:
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            if "TORCHELASTIC_RESTART_COUNT" in os.environ:
                dist.init_process_group(backend=backend, store=_attempt_store(rank, world_size),
                                        rank=rank, world_size=world_size)
            else:
                dist.init_process_group(backend=backend)
    return DistInfo(rank, local_rank, world_size, local_world_size, device, cpu)


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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
