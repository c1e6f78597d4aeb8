"""Per-rank CPU set-up under torchrun: intra-op threads and CPU affinity.

Ranks sharing a machine each start one OpenMP thread per core by default, so 8 ranks run 8x
oversubscribed and 8 GPUs can be slower than 1 (fairseq#3342, #4452). Each rank therefore takes
its share of the CPUs this process may use (os.sched_getaffinity):

- pinning: the usable CPUs are split between the local ranks; where /sys shows several NUMA nodes
  and there are at least as many local ranks as nodes, ranks are spread over the nodes and each
  gets a slice of its own node's CPUs. With more local ranks than CPUs, rank r gets CPU r mod n.
  D2V_PIN_CPUS=0 turns pinning off.
- threads: torch.set_num_threads(len(its CPUs)), and OMP_NUM_THREADS / MKL_NUM_THREADS set to the
  same for child processes, unless the user set OMP_NUM_THREADS.

Who set OMP_NUM_THREADS: torchrun itself sets it to 1 (with a warning) when it starts several
processes per node and finds it unset, so a 1 seen by a rank is ambiguous. A rank tells them apart
by looking at the environment its parent (the torchrun process) was started with,
/proc/<ppid>/environ: torchrun's own assignment is not in it, a user's export is. Where that file
cannot be read, a 1 under several local ranks counts as torchrun's default.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

NODE_ROOT = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def numa_nodes(root: Path = NODE_ROOT) -> list[list[int]]:
    """CPUs of each NUMA node the kernel shows (empty when /sys has no node information)."""
    nodes = []
    for path in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = parse_cpulist((path / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        if cpus:
            nodes.append(cpus)
    return nodes


def rank_cpus(allowed: list[int], local_rank: int, local_world_size: int,
              nodes: list[list[int]] = ()) -> tuple[list[int], int | None]:
    """(this rank's CPUs, its NUMA node index or None) out of `allowed`."""
    allowed = sorted(allowed)
    lws = max(1, local_world_size)
    allowed_set = set(allowed)
    usable = [[c for c in node if c in allowed_set] for node in nodes]
    usable = [(i, cpus) for i, cpus in enumerate(usable) if cpus]
    if len(usable) > 1 and lws >= len(usable):
        slot = local_rank * len(usable) // lws
        node_index, node_cpus = usable[slot]
        on_node = [r for r in range(lws) if r * len(usable) // lws == slot]
        pos, share = on_node.index(local_rank), len(node_cpus) // len(on_node)
        if share >= 1:
            return node_cpus[pos * share:(pos + 1) * share], node_index
        return [node_cpus[pos % len(node_cpus)]], node_index
    share = len(allowed) // lws
    if share >= 1:
        return allowed[local_rank * share:(local_rank + 1) * share], None
    return [allowed[local_rank % len(allowed)]], None


def _parent_environ() -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def omp_threads_from_user(value: str | None, local_world_size: int,
                          parent_environ: dict[str, str] | None) -> bool:
    """Whether OMP_NUM_THREADS=`value` is the user's choice rather than torchrun's default."""
    if value is None:
        return False
    if value.strip() != "1" or local_world_size <= 1:
        return True  # torchrun only ever sets 1, and only for several processes per node
    if parent_environ is None:
        return False
    return "OMP_NUM_THREADS" in parent_environ


def configure_rank(local_rank: int, local_world_size: int) -> dict:
    """Pins this rank and sets its threads; returns what was done (for the start-up report)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))
    nodes = numa_nodes()
    cpus, node = rank_cpus(allowed, local_rank, local_world_size, nodes)
    pinned = False
    if os.environ.get("D2V_PIN_CPUS", "1") != "0" and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
            pinned = True
        except OSError:
            pass
    omp = os.environ.get("OMP_NUM_THREADS")
    from_user = omp_threads_from_user(omp, local_world_size,
                                      _parent_environ() if omp is not None else None)
    if not from_user:
        threads = max(1, len(cpus))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    return {
        "local_rank": local_rank,
        "local_world_size": local_world_size,
        "usable_cpus": len(allowed),
        "threads": torch.get_num_threads(),
        "threads_from": "OMP_NUM_THREADS (user)" if from_user else "share of the cores",
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus,
        "pinned": pinned,
        "numa_node": node,
        "numa_nodes": len(nodes),
    }


def _ranges(cpus: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


def describe(report: dict, rank: int) -> str:
    """One line: rank, threads and where they came from, CPUs and NUMA node."""
    where = f", NUMA node {report['numa_node']}" if report["numa_node"] is not None else ""
    pin = f"pinned to CPUs {_ranges(report['cpus'])}{where}" if report["pinned"] \
        else f"not pinned (CPUs {_ranges(report['cpus'])})"
    return (f"rank {rank} (local {report['local_rank']}/{report['local_world_size']}): "
            f"{report['threads']} intra-op thread(s) from {report['threads_from']} of "
            f"{report['usable_cpus']} usable CPUs, {pin}")
