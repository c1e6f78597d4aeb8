"""CPU pinning from a node's topology: fake /sys trees of recorded machines (DGX H100, DGX A100,
dual socket with adjacent SMT siblings, one socket, none at all), GPUS= and CUDA_VISIBLE_DEVICES
subsets. Each rank lands on its GPU's NUMA node, on whole physical cores, disjoint from the others,
and the start line says so."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from d2v_engine.runtime import cpu_setup
from d2v_engine.runtime.cpu_setup import dali_cpus, describe, rank_cpus, spread_order
from d2v_engine.runtime.topology import parse_cpulist, read_cores, read_topology


def _ranges(cpus) -> str:
    return cpu_setup._ranges(sorted(cpus))


def fake_sys(root: Path, nodes: dict, cores: list, gpus: dict, siblings_file: bool = True) -> Path:
    """A /sys tree: node{n}/cpulist, cpu{c}/topology (thread_siblings_list, or only core_id and
    physical_package_id), bus/pci/devices/<address>/numa_node. `cores`: [(package, [cpus])]."""
    for node, cpus in nodes.items():
        path = root / f"devices/system/node/node{node}"
        path.mkdir(parents=True)
        (path / "cpulist").write_text(_ranges(cpus) + "\n")
    for core_id, (package, cpus) in enumerate(cores):
        for cpu in cpus:
            topo = root / f"devices/system/cpu/cpu{cpu}/topology"
            topo.mkdir(parents=True)
            if siblings_file:
                (topo / "thread_siblings_list").write_text(_ranges(cpus) + "\n")
            (topo / "core_id").write_text(f"{core_id}\n")
            (topo / "physical_package_id").write_text(f"{package}\n")
    for address, node in gpus.items():
        path = root / "bus/pci/devices" / address
        path.mkdir(parents=True)
        (path / "numa_node").write_text(f"{node}\n")
    return root


def _smt_cores(first: int, count: int, sibling_offset: int, package: int) -> list:
    return [(package, [c, c + sibling_offset]) for c in range(first, first + count)]


# DGX H100: 2 x 56-core Xeon 8480C, SMT; node 0 = CPUs 0-55 + 112-167, node 1 = 56-111 + 168-223;
# GPUs 0-3 on node 0, 4-7 on node 1 (nvidia-smi topo -m).
H100_GPUS = ["0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
             "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0"]


def dgx_h100(root):
    nodes = {0: [*range(0, 56), *range(112, 168)], 1: [*range(56, 112), *range(168, 224)]}
    cores = _smt_cores(0, 56, 112, 0) + _smt_cores(56, 56, 112, 1)
    return fake_sys(root, nodes, cores, dict(zip(H100_GPUS, [0, 0, 0, 0, 1, 1, 1, 1])))


# DGX A100: 2 x 64-core EPYC 7742, SMT, NPS4: node n = CPUs 16n..16n+15 + 128+16n..; GPUs 0-7 on
# nodes 3,3,1,1,7,7,5,5.
A100_GPUS = ["0000:07:00.0", "0000:0f:00.0", "0000:47:00.0", "0000:4e:00.0",
             "0000:87:00.0", "0000:90:00.0", "0000:b7:00.0", "0000:bd:00.0"]
A100_NODES = [3, 3, 1, 1, 7, 7, 5, 5]


def dgx_a100(root):
    nodes = {n: [*range(16 * n, 16 * n + 16), *range(128 + 16 * n, 128 + 16 * n + 16)]
             for n in range(8)}
    cores = _smt_cores(0, 64, 128, 0) + _smt_cores(64, 64, 128, 1)
    return fake_sys(root, nodes, cores, dict(zip(A100_GPUS, A100_NODES)))


# Dual socket, 2 x 8 cores, SMT siblings numbered next to each other (2k, 2k + 1), as some BIOSes
# enumerate them; 4 GPUs, 2 per socket.
PAIR_GPUS = ["0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0", "0000:af:00.0"]


def dual_socket_adjacent(root, siblings_file=True):
    nodes = {0: list(range(0, 16)), 1: list(range(16, 32))}
    cores = [(c // 16, [c, c + 1]) for c in range(0, 32, 2)]
    return fake_sys(root, nodes, cores, dict(zip(PAIR_GPUS, [0, 0, 1, 1])), siblings_file)


def one_socket(root):
    """32 cores without SMT, one NUMA node; the kernel writes -1 as every device's numa_node."""
    return fake_sys(root, {0: list(range(32))}, [(0, [c]) for c in range(32)],
                    {f"0000:0{i + 1}:00.0": -1 for i in range(4)})


def _address(addresses, visible=None):
    """The GPU -> PCI address function, under CUDA_VISIBLE_DEVICES=`visible` (physical ids)."""
    physical = list(range(len(addresses))) if visible is None else visible
    return lambda i: addresses[physical[i]]


def _placements(root, allowed, ranks, gpus, pci_address):
    topo = read_topology(gpus, root, pci_address)
    return topo, [rank_cpus(allowed, r, ranks, topo) for r in range(ranks)]


def _check_whole_disjoint_on_gpu_nodes(topo, places, want_nodes):
    """Each rank on its GPU's node, on whole cores (every SMT sibling of a CPU it has is its
    too), no CPU shared with another rank, all shares the same size."""
    seen = {}
    for rank, (place, node) in enumerate(zip(places, want_nodes)):
        assert (place.node, place.basis) == (node, "gpu"), \
            f"rank {rank}: node {place.node} ({place.basis}: {place.note}), GPU's is {node}"
        assert set(place.cpus) <= set(topo.nodes[node]), \
            f"rank {rank}: CPUs {_ranges(place.cpus)} not all on node {node}"
        for cpu in place.cpus:
            siblings = {c for c, core in topo.core_of.items() if core == topo.core(cpu)}
            assert siblings <= set(place.cpus), \
                f"rank {rank}: CPU {cpu} without its SMT siblings {sorted(siblings)}"
            assert cpu not in seen, f"CPU {cpu} pinned by ranks {seen[cpu]} and {rank}"
            seen[cpu] = rank
    sizes = {len(p.cpus) for p in places}
    assert len(sizes) == 1, f"unequal shares: {[len(p.cpus) for p in places]}"


def test_dgx_a100_each_rank_on_its_gpus_node_by_whole_cores(tmp_path):
    topo, places = _placements(dgx_a100(tmp_path), range(256), 8, 8, _address(A100_GPUS))
    _check_whole_disjoint_on_gpu_nodes(topo, places, A100_NODES)
    assert [_ranges(p.cpus) for p in places[:2]] == ["48-55,176-183", "56-63,184-191"], \
        [_ranges(p.cpus) for p in places]


def test_dgx_h100_four_ranks_per_node_keep_siblings_together(tmp_path):
    topo, places = _placements(dgx_h100(tmp_path), range(224), 8, 8, _address(H100_GPUS))
    _check_whole_disjoint_on_gpu_nodes(topo, places, [0, 0, 0, 0, 1, 1, 1, 1])
    # 56 cores per node / 4 ranks = 14 cores, 28 CPUs each; the old sorted-list slicing gave
    # rank 0 CPUs 0-27 and rank 2 CPUs 112-139: the same physical cores.
    assert _ranges(places[0].cpus) == "0-13,112-125", _ranges(places[0].cpus)
    assert _ranges(places[2].cpus) == "28-41,140-153", _ranges(places[2].cpus)


def test_dual_socket_with_adjacent_siblings_and_the_core_id_fallback(tmp_path):
    for siblings_file in (True, False):
        root = dual_socket_adjacent(tmp_path / str(siblings_file), siblings_file)
        topo, places = _placements(root, range(32), 4, 4, _address(PAIR_GPUS))
        _check_whole_disjoint_on_gpu_nodes(topo, places, [0, 0, 1, 1])
        assert [_ranges(p.cpus) for p in places] == ["0-7", "8-15", "16-23", "24-31"], \
            (siblings_file, [_ranges(p.cpus) for p in places])


def test_one_socket_gpus_with_unknown_numa_node_take_the_only_node(tmp_path):
    topo, places = _placements(one_socket(tmp_path), range(32), 4, 4,
                               _address([f"0000:0{i + 1}:00.0" for i in range(4)]))
    assert topo.gpu_nodes == (0, 0, 0, 0), topo.gpu_nodes
    _check_whole_disjoint_on_gpu_nodes(topo, places, [0, 0, 0, 0])
    assert [len(p.cpus) for p in places] == [8, 8, 8, 8]


@pytest.mark.parametrize("visible,want", [
    (None, [3, 3, 1, 1]),  # GPUS=4 with all 8 visible: ranks 0-3 on GPUs 0-3
    ([4, 5, 6, 7], [7, 7, 5, 5]),  # CUDA_VISIBLE_DEVICES=4,5,6,7
    ([6, 1], [5, 3]),  # CUDA_VISIBLE_DEVICES=6,1
])
def test_gpu_subsets_follow_the_physical_gpu(tmp_path, visible, want):
    ranks = len(want)
    topo, places = _placements(dgx_a100(tmp_path), range(256), ranks, len(visible or want),
                               _address(A100_GPUS, visible))
    _check_whole_disjoint_on_gpu_nodes(topo, places, want)
    # The two ranks on one node split its 16 cores; a rank alone on its node takes all 16.
    per_node = {n: want.count(n) for n in want}
    assert [len(p.cpus) for p in places] == [32 // per_node[n] for n in want], \
        [len(p.cpus) for p in places]


def test_no_sys_is_a_flat_split_by_cpus(tmp_path):
    topo, places = _placements(tmp_path / "nothing", range(16), 4, 4, _address(H100_GPUS))
    assert topo.nodes == {} and topo.gpu_nodes == (None,) * 4, topo
    assert [(p.cpus, p.node, p.basis) for p in places] == [
        (list(range(4 * r, 4 * r + 4)), None, "flat") for r in range(4)]
    assert places[0].note == "/sys shows no NUMA node", places[0].note


def test_a_cpuset_without_the_gpus_node_falls_back_and_says_why(tmp_path):
    """Slurm gave this job socket 0 only: GPUs 4-7's node 1 has no usable CPU, so the ranks
    split what there is (one usable node: flat, by whole cores) and the note names GPU 4."""
    root = dgx_h100(tmp_path)
    allowed = [*range(0, 56), *range(112, 168)]
    topo, places = _placements(root, allowed, 8, 8, _address(H100_GPUS))
    assert {p.basis for p in places} == {"flat"}
    assert places[0].note == "GPU 4's NUMA node 1 has no CPU this process may use", places[0].note
    assert [len(p.cpus) for p in places] == [14] * 8  # 7 whole cores each
    assert not set().union(*(set(p.cpus) for p in places)) - set(allowed)


def test_cpu_ranks_without_gpus_spread_over_nodes_by_whole_cores(tmp_path):
    topo, places = _placements(dgx_h100(tmp_path), range(224), 4, 0, _address(H100_GPUS))
    assert [(p.node, p.basis) for p in places] == [(0, "spread"), (0, "spread"), (1, "spread"),
                                                   (1, "spread")]
    assert _ranges(places[0].cpus) == "0-27,112-139", _ranges(places[0].cpus)


def test_more_ranks_than_cores_deal_out_each_cores_first_thread_first(tmp_path):
    root = fake_sys(tmp_path, {0: [0, 1, 2, 3]}, [(0, [0, 2]), (0, [1, 3])], {})
    topo = read_topology(0, root)
    assert [rank_cpus(range(4), r, 3, topo).cpus for r in range(3)] == [[0], [1], [2]]
    assert spread_order([0, 1, 2, 3], topo) == [0, 1, 2, 3]
    assert read_cores(root) == {0: 0, 2: 0, 1: 1, 3: 1}


def test_start_line_names_cores_node_and_gpu_and_dali_gets_one_core_per_thread_first(
        tmp_path, monkeypatch):
    root = dgx_a100(tmp_path)
    affinity = [set(range(256))]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity[0]))
    monkeypatch.setattr(os, "sched_setaffinity",
                        lambda pid, cpus: affinity.__setitem__(0, set(cpus)))
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's: configure_rank leaves torch alone
    monkeypatch.delenv("D2V_PIN_CPUS", raising=False)
    monkeypatch.delenv("DALI_AFFINITY_MASK", raising=False)
    report = cpu_setup.configure_rank(2, 8, 8, root, _address(A100_GPUS))
    line = describe(report, 2)
    assert line.endswith("pinned to CPUs 16-23,144-151 (8 cores) on NUMA node 1, GPU 2's "
                         "(PCI 0000:47:00.0)"), line
    assert dali_cpus(report) == [*range(16, 24), *range(144, 152)], dali_cpus(report)
    monkeypatch.setenv("DALI_AFFINITY_MASK", "5,6")
    assert dali_cpus(cpu_setup.configure_rank(2, 8, 8, root, _address(A100_GPUS))) is None, \
        "a user's DALI_AFFINITY_MASK was overridden"


def test_parse_cpulist_ranges():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
