"""What one node looks like to a rank, read from /sys: NUMA nodes and their CPUs, physical cores
(SMT siblings) and the NUMA node of each visible GPU.

A GPU's node is its PCI device's /sys/bus/pci/devices/<address>/numa_node, the address made from
torch.cuda.get_device_properties(i).pci_domain_id / pci_bus_id / pci_device_id (function 0: a
GPU is function 0 of its device), as torch.numa.binding does. Visible index i is CUDA's, so
CUDA_VISIBLE_DEVICES subsets map to the right physical GPU. NVML's CPU affinity is not used: it
numbers GPUs its own way (every GPU, PCI order) and would need this same bus id to map back.

Every read goes under a root (default /sys) and the GPU -> PCI address function is a parameter,
so tests build the /sys trees of recorded machines under a temporary directory. A file that is
missing or unreadable is information the kernel does not give: it never stops a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

SYS = Path("/sys")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


@dataclass(frozen=True)
class Topology:
    nodes: dict = field(default_factory=dict)  # NUMA node id -> sorted CPUs; {}: no node info
    core_of: dict = field(default_factory=dict)  # CPU -> lowest CPU of its core (SMT siblings)
    gpu_nodes: tuple = ()  # visible GPU i -> its NUMA node id, None where unknown
    gpu_pci: tuple = ()  # visible GPU i -> its PCI address, None where unknown

    def core(self, cpu: int) -> int:
        """The physical core `cpu` belongs to (itself where /sys says nothing)."""
        return self.core_of.get(cpu, cpu)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def read_nodes(root: Path = SYS) -> dict[int, list[int]]:
    """NUMA node id -> its CPUs, for the nodes that have CPUs."""
    nodes = {}
    for path in (Path(root) / "devices/system/node").glob("node[0-9]*"):
        text = _read(path / "cpulist")
        try:
            cpus = parse_cpulist(text) if text is not None else []
        except ValueError:
            continue
        if cpus:
            nodes[int(path.name[4:])] = sorted(cpus)
    return dict(sorted(nodes.items()))


def read_cores(root: Path = SYS) -> dict[int, int]:
    """CPU -> the lowest CPU of its physical core: thread_siblings_list, else CPUs sharing
    (physical_package_id, core_id); CPUs /sys says nothing about are left out."""
    siblings, by_id = {}, {}
    for path in (Path(root) / "devices/system/cpu").glob("cpu[0-9]*"):
        cpu, topo = int(path.name[3:]), path / "topology"
        text = _read(topo / "thread_siblings_list")
        try:
            group = parse_cpulist(text) if text is not None else []
        except ValueError:
            group = []
        if group:
            siblings[cpu] = min(group)
            continue
        core_id, package = _read(topo / "core_id"), _read(topo / "physical_package_id")
        if core_id is not None and package is not None:
            by_id.setdefault((package.strip(), core_id.strip()), []).append(cpu)
    for cpus in by_id.values():
        siblings.update({cpu: min(cpus) for cpu in cpus})
    return dict(sorted(siblings.items()))


def pci_numa_node(address: str, root: Path = SYS) -> Optional[int]:
    """The NUMA node of PCI device `address` ('0000:07:00.0'); None where unknown (-1, absent)."""
    text = _read(Path(root) / "bus/pci/devices" / address.lower() / "numa_node")
    try:
        node = int(text) if text is not None else -1
    except ValueError:
        return None
    return node if node >= 0 else None


def cuda_pci_address(index: int) -> Optional[str]:
    """Visible CUDA device `index`'s PCI address as /sys names it, None where torch cannot say."""
    import torch
    try:
        p = torch.cuda.get_device_properties(index)
        return f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    except (AttributeError, RuntimeError, AssertionError):
        return None


def read_topology(gpus: int = 0, root: Path = SYS,
                  pci_address: Callable[[int], Optional[str]] = cuda_pci_address) -> Topology:
    """This node's topology with the NUMA node of visible GPUs 0 .. gpus - 1."""
    nodes = read_nodes(root)
    addresses = tuple(pci_address(i) for i in range(gpus))
    gpu_nodes = []
    for address in addresses:
        node = pci_numa_node(address, root) if address else None
        # One NUMA node: the kernel often writes -1 for every device; there is only one to be on.
        if node is None and address and len(nodes) == 1:
            node = next(iter(nodes))
        gpu_nodes.append(node)
    return Topology(nodes, read_cores(root), tuple(gpu_nodes), addresses)
