"""The house's rules, read from the imports: no import cycle between modules, and no import from a
lower floor to a higher one (d2v_engine/__init__.py draws the floors). Every import counts,
those inside functions too: a lazy import is still a dependency."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("d2v_kernels", "d2v_engine")
SHARED = ("d2v_engine.config", "d2v_engine.errors", "d2v_engine.seeding", "d2v_engine.checkpoint")
# folder -> floor; a module may import its own folder or a lower floor, never a floor above it
# and never another folder of its own floor.
FLOORS = {
    "d2v_kernels": 0,
    "d2v_engine (shared)": 1,
    "d2v_engine.runtime": 2,
    "d2v_engine.data": 3, "d2v_engine.models": 3,
    "d2v_engine.objective": 4,
    "d2v_engine.planning": 5, "d2v_engine.handoff": 5, "d2v_engine.prepare": 5,
    "d2v_engine.run": 6,
    "d2v_engine.cli": 7,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a `from pkg import name` of a submodule counts
    as that submodule)."""
    graph = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _folder(module: str) -> str:
    if module.startswith("d2v_kernels"):
        return "d2v_kernels"
    if module == "d2v_engine" or module.startswith(SHARED):
        return "d2v_engine (shared)"
    return ".".join(module.split(".")[:2])


def test_every_module_has_a_floor():
    unplaced = sorted({_folder(m) for m in _modules()} - set(FLOORS))
    assert not unplaced, f"folders with no floor in this test (add them to FLOORS): {unplaced}"


def test_no_import_runs_up_a_floor_or_across_one():
    modules = _modules()
    bad = []
    for module, targets in _imports(modules).items():
        here = _folder(module)
        for target in targets:
            there = _folder(target)
            if there != here and FLOORS[there] >= FLOORS[here]:
                bad.append(f"{module} (floor {FLOORS[here]}) imports {target} "
                           f"(floor {FLOORS[there]})")
    assert not bad, "imports against the floors:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _imports(_modules())
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(_modules()):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_import_reader_sees_lazy_and_package_imports():
    graph = _imports(_modules())
    assert "d2v_engine.handoff.export" in graph["d2v_engine.cli.export"]
    assert "d2v_engine.objective.data2vec_v2" in graph["d2v_engine.objective"]
    assert "d2v_kernels.targets" in graph["d2v_engine.objective.data2vec"]


def test_the_readme_layout_is_the_tree_and_its_floors():
    import re

    block = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    subpackages = sorted(p.name for p in (ROOT / "d2v_engine").iterdir()
                         if (p / "__init__.py").is_file())
    shown = dict(re.findall(r"^  ([a-z_]+)/\s+(\d)\s", block, flags=re.M))
    assert sorted(shown) == subpackages, (sorted(shown), subpackages)
    assert {k: int(v) for k, v in shown.items()} == {
        name: FLOORS[f"d2v_engine.{name}"] for name in subpackages}
    for top in re.findall(r"^([a-z_]+)/", block, flags=re.M):
        assert (ROOT / top).is_dir(), f"README's layout names {top}/, which is not in the tree"
    for module in ("config", "errors", "seeding", "checkpoint"):
        assert f"{module}.py" in block and (ROOT / "d2v_engine" / f"{module}.py").is_file()
