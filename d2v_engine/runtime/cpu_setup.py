"""Per-rank CPU set-up under torchrun: intra-op threads and CPU affinity.

Ranks sharing a machine each start one OpenMP thread per core by default, so 8 ranks run 8x
oversubscribed and 8 GPUs can be slower than 1 (fairseq#3342, #4452). Each rank therefore takes
its share of the CPUs this process may use (os.sched_getaffinity), from the node's topology
(d2v_engine.runtime.topology):

- where: a CUDA rank goes to its GPU's NUMA node (local rank r runs on visible GPU r; the node of
  its PCI device in /sys), and the ranks whose GPUs share a node split that node's usable CPUs.
  Without a GPU, or where some local rank's GPU node is unknown or has no usable CPU (a cpuset
  that leaves it out), ranks are spread over the NUMA nodes in rank order when there are at least
  as many ranks as nodes, else the usable CPUs are split flat. D2V_PIN_CPUS=0 turns pinning off.
- how: a share is whole physical cores, SMT siblings together, so two ranks never share a core's
  execution units. With fewer cores than ranks the share is single CPUs (each core's siblings
  dealt out last); with fewer CPUs than ranks, rank r gets one CPU, r mod n.
- threads: torch.set_num_threads(len(its CPUs)), and OMP_NUM_THREADS / MKL_NUM_THREADS set to the
  same for child processes, unless the user set OMP_NUM_THREADS.
- DALI: the report's cpu_order (the rank's CPUs, one per physical core first) is what the DALI
  loader puts in DALI_AFFINITY_MASK (d2v_engine.data.dali_common), unless the user exported one.

Why not slice each node's sorted CPU list by rank, as this module once did: Linux numbers a
core's second hardware thread far from its first (0 and 128 on a 2 x 64-core node), so slices of
the sorted list put ranks 0 and 2 on the same physical cores; and GPU r is not on node
r x nodes / ranks on common machines (DGX A100: GPUs 0-7 on nodes 3,3,1,1,7,7,5,5).

Who set OMP_NUM_THREADS: torchrun itself sets it to 1 (with a warning) when it starts several
processes per node and finds it unset, so a 1 seen by a rank is ambiguous. A rank tells them apart
by looking at the environment its parent (the torchrun process) was started with,
/proc/<ppid>/environ: torchrun's own assignment is not in it, a user's export is. Where that file
cannot be read, a 1 under several local ranks counts as torchrun's default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v_engine.runtime.topology import SYS, Topology, cuda_pci_address, read_topology


@dataclass(frozen=True)
class Placement:
    cpus: list  # this rank's CPUs, sorted
    node: int | None  # the NUMA node they are on; None: a flat split of the usable CPUs
    basis: str  # "gpu": its GPU's node; "spread": nodes in rank order; "flat"
    note: str = ""  # why the GPU's node was not used, where a GPU's was wanted


def _cores(cpus: list[int], topo: Topology) -> list[list[int]]:
    """`cpus` grouped by physical core, cores in the order of their first CPU."""
    groups: dict[int, list[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(topo.core(cpu), []).append(cpu)
    return sorted(groups.values())


def spread_order(cpus: list[int], topo: Topology) -> list[int]:
    """`cpus` with every core's first thread before any core's second: the first k entries
    are on k different physical cores wherever there are k."""
    cores = _cores(cpus, topo)
    depth = max(map(len, cores), default=0)
    return [core[i] for i in range(depth) for core in cores if i < len(core)]


def split_share(cpus: list[int], parts: int, index: int, topo: Topology) -> list[int]:
    """Share `index` of `parts` equal shares of `cpus`: whole physical cores where there are at
    least `parts` cores, else single CPUs, else one CPU round robin (the remainder stays idle)."""
    cores = _cores(cpus, topo)
    if len(cores) >= parts:
        share = len(cores) // parts
        return sorted(cpu for core in cores[index * share:(index + 1) * share] for cpu in core)
    order = spread_order(cpus, topo)
    share = len(order) // parts
    if share >= 1:
        return sorted(order[index * share:(index + 1) * share])
    return [order[index % len(order)]]


def _gpu_node_problem(gpu_nodes: tuple, local_world_size: int, usable: dict) -> str:
    """Why the local ranks cannot each take their GPU's NUMA node ('' when they can)."""
    if len(gpu_nodes) < local_world_size:
        return f"{local_world_size} local ranks but {len(gpu_nodes)} GPUs"
    if not usable:
        return "/sys shows no NUMA node"
    for gpu, node in enumerate(gpu_nodes):
        if node is None:
            return f"GPU {gpu}'s NUMA node is unknown"
        if node not in usable:
            return f"GPU {gpu}'s NUMA node {node} has no CPU this process may use"
    return ""


def _on_nodes(usable: dict, node_of_rank: list, local_rank: int, topo: Topology, basis: str,
              note: str = "") -> Placement:
    node = node_of_rank[local_rank]
    peers = [r for r, n in enumerate(node_of_rank) if n == node]
    cpus = split_share(usable[node], len(peers), peers.index(local_rank), topo)
    return Placement(cpus, node, basis, note)


def rank_cpus(allowed: list[int], local_rank: int, local_world_size: int,
              topo: Topology = Topology()) -> Placement:
    """Where local rank `local_rank` of `local_world_size` runs, out of the `allowed` CPUs
    (module docstring: its GPU's node, else spread over nodes, else a flat split)."""
    lws = max(1, local_world_size)
    allowed_set = set(allowed)
    usable = {n: [c for c in cpus if c in allowed_set] for n, cpus in topo.nodes.items()}
    usable = {n: cpus for n, cpus in usable.items() if cpus}
    gpu_nodes = topo.gpu_nodes[:lws]
    note = _gpu_node_problem(gpu_nodes, lws, usable) if topo.gpu_nodes else ""
    if topo.gpu_nodes and not note:
        return _on_nodes(usable, list(gpu_nodes), local_rank, topo, "gpu")
    if len(usable) > 1 and lws >= len(usable):
        order = list(usable)
        return _on_nodes(usable, [order[r * len(order) // lws] for r in range(lws)], local_rank,
                         topo, "spread", note)
    return Placement(split_share(sorted(allowed), lws, local_rank, topo), None, "flat", note)


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


def configure_rank(local_rank: int, local_world_size: int, gpus: int = 0, root: Path = SYS,
                   pci_address=cuda_pci_address) -> dict:
    """Pins this rank and sets its threads; returns what was done (for the start-up report).
    `gpus`: the CUDA devices visible (0 for a CPU run); local rank r trains on device r."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))
    topo = read_topology(gpus, root, pci_address)
    place = rank_cpus(allowed, local_rank, local_world_size, topo)
    pinned = False
    if os.environ.get("D2V_PIN_CPUS", "1") != "0" and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, place.cpus)
            pinned = True
        except OSError:
            pass
    omp = os.environ.get("OMP_NUM_THREADS")
    from_user = omp_threads_from_user(omp, local_world_size,
                                      _parent_environ() if omp is not None else None)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else place.cpus
    if not from_user:
        threads = max(1, len(place.cpus))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    gpu = local_rank if local_rank < gpus else None
    return {
        "local_rank": local_rank,
        "local_world_size": local_world_size,
        "usable_cpus": len(allowed),
        "threads": torch.get_num_threads(),
        "threads_from": "OMP_NUM_THREADS (user)" if from_user else "share of the cores",
        "cpus": cpus,
        "cores": len(_cores(cpus, topo)),
        "cpu_order": spread_order(cpus, topo),
        "pinned": pinned,
        "numa_node": place.node,
        "numa_nodes": len(topo.nodes),
        "numa_basis": place.basis,
        "numa_note": place.note,
        "gpu": gpu,
        "gpu_pci": topo.gpu_pci[gpu] if gpu is not None else None,
        "dali_mask_from_user": "DALI_AFFINITY_MASK" in os.environ,
    }


def dali_cpus(report: dict) -> list[int] | None:
    """The CPUs DALI's threads take, in thread order: this rank's, where it was pinned and the
    user exported no DALI_AFFINITY_MASK of their own; None leaves DALI to its defaults."""
    if not report.get("pinned") or report.get("dali_mask_from_user"):
        return None
    return list(report["cpu_order"])


def _ranges(cpus: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


def _where(report: dict) -> str:
    """' on NUMA node 3, GPU 0's (PCI 0000:07:00.0)' and the like; '' where no node applies."""
    node, note = report.get("numa_node"), report.get("numa_note", "")
    if report.get("numa_basis") == "gpu":
        return f" on NUMA node {node}, GPU {report['gpu']}'s (PCI {report['gpu_pci']})"
    why = f": {note}" if note else ""
    if node is not None:
        return f" on NUMA node {node} (nodes dealt out in rank order{why})"
    return f" ({note})" if note else ""


def describe(report: dict, rank: int) -> str:
    """One line: rank, threads and where they came from, CPUs, cores and NUMA node."""
    cpus = _ranges(report["cpus"])
    n = report.get("cores")
    cores = f" ({n} core{'s' if n != 1 else ''})" if n is not None else ""
    pin = f"pinned to CPUs {cpus}{cores}{_where(report)}" if report["pinned"] \
        else f"not pinned (CPUs {cpus})"
    return (f"rank {rank} (local {report['local_rank']}/{report['local_world_size']}): "
            f"{report['threads']} intra-op thread(s) from {report['threads_from']} of "
            f"{report['usable_cpus']} usable CPUs, {pin}")
