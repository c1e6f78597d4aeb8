"""What this project installs: import names of its own, every module importable beside the newest
releases, and no stale module path in what users read.

The class of break these guard against: a top-level package of ours named `kernels` came first on
sys.path and hid Hugging Face's `kernels` distribution, which transformers 5.25 imports when its
model code loads, so every path through transformers failed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
OUR_DIST = "d2v-engine"
OUR_PACKAGES = ("d2v_engine", "d2v_kernels")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_names() -> set[str]:
    try:
        dist = metadata.distribution(OUR_DIST)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{OUR_DIST} is not installed here (make test installs it)")
    return set((dist.read_text("top_level.txt") or "").split())


def _other_owners(name: str) -> list[str]:
    owners = metadata.packages_distributions().get(name, [])
    return sorted({d for d in owners if _canonical(d) != OUR_DIST})


@pytest.mark.latest
def test_our_installed_top_level_names_are_ours_alone():
    names = _installed_names()
    assert set(OUR_PACKAGES) <= names, names
    assert all(n.startswith("d2v_") for n in names), f"a generic import name is installed: {names}"
    clashes = {n: _other_owners(n) for n in names if _other_owners(n)}
    assert not clashes, f"installed import names also provided by other distributions: {clashes}"
    shadowed = sorted(names & set(sys.stdlib_module_names))
    assert not shadowed, f"installed import names that shadow the standard library: {shadowed}"


@pytest.mark.latest
def test_what_the_checkout_puts_on_sys_path_shadows_nothing():
    """Run from the checkout (python -m ..., pytest), its root is on sys.path: its regular packages
    and modules (benchmarks/, setup.py's siblings) must not take another distribution's name."""
    names = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in ROOT.glob("*.py") if p.name != "setup.py"}
    assert "benchmarks" in names and set(OUR_PACKAGES) <= names, names
    clashes = {n: _other_owners(n) for n in sorted(names) if _other_owners(n)}
    assert not clashes, f"checkout names also provided by installed distributions: {clashes}"
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


def _our_modules() -> list[str]:
    found = []
    for top in OUR_PACKAGES:
        package = importlib.import_module(top)
        found.append(top)
        found += [m.name for m in pkgutil.walk_packages(package.__path__, f"{top}.")]
    return found


@pytest.mark.latest
def test_every_module_imports():
    modules = _our_modules()
    assert len(modules) > 40, modules  # the walk found the tree, not an empty namespace
    failed = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported, not the first
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, failed


@pytest.mark.latest
def test_transformers_hugging_face_kernels_and_ours_in_one_process(tmp_path, monkeypatch):
    """Hugging Face's `kernels` (imported by transformers' model code), our kernels, and an export
    of a tiny run loaded back through transformers, all in one interpreter."""
    transformers = pytest.importorskip("transformers")
    hf_kernels = importlib.import_module("kernels")
    init = Path("kernels", "__init__.py")
    theirs = Path(metadata.distribution("kernels").locate_file(init)).resolve()
    assert Path(hf_kernels.__file__).resolve() == theirs, hf_kernels.__file__
    importlib.import_module("transformers.integrations.hub_kernels")  # the import that failed
    from transformers import Data2VecVisionModel  # noqa: F401 - model code loads

    from d2v_engine.config import load_config
    from d2v_engine.handoff.export import export, load_encoder
    from d2v_engine.run.trainer import train
    from d2v_kernels import masking, ops, targets  # noqa: F401 - our kernels beside theirs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run_dir = tmp_path / "run"
    train(load_config(ROOT / "configs/tiny_image.yaml",
                      [f"run.dir={run_dir}", "train.max_steps=2", "train.progress=false",
                       f"data.path={ROOT / 'data/images/digits'}"]))
    export(run_dir, tmp_path / "hf")
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_encoder(run_dir)
    pixels = torch.randn(2, 3, ours.cfg.model.img_size, ours.cfg.model.img_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(pixel_values=pixels).last_hidden_state - ours(pixels)).abs().max().item()
    assert diff < 1e-4, diff


# The module paths before the packages took names of their own. Records of what ran then
# (benchmarks/results/) keep them; everything a user reads or runs must not.
_STALE = [re.compile(r"(?<![\w./-])(?:engine|kernels)\.(?=[a-z_])"),
          re.compile(r"\b(?:from|import) (?:engine|kernels)\b"),
          re.compile(r"(?<![\w./-])(?:engine|kernels)/")]
_SKIP_DIRS = {"runs", "build", "dist", "__pycache__", "data", "results"}
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".slurm", ".txt", ".cu", ".cuh", ".cpp",
                  ".toml", ".cfg", ".json", ""}


def _user_facing_files() -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")
                       and (d == ".ci" or not d.startswith("."))]
        for f in filenames:
            path = Path(dirpath) / f
            if path.suffix in _TEXT_SUFFIXES and path.name != "requirements-lock.txt":
                files.append(path)
    return files


def test_no_stale_module_path_in_what_users_read():
    files = _user_facing_files()
    assert ROOT / "README.md" in files and ROOT / "Makefile" in files
    assert ROOT / ".ci" / "run" in files
    stale = []
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(rx.search(line) for rx in _STALE):
                stale.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not stale, "stale module paths:\n" + "\n".join(stale)


def test_the_console_scripts_are_the_readmes():
    scripts = {e.name: e.value for e in metadata.distribution(OUR_DIST).entry_points
               if e.group == "console_scripts"} if _installed_names() else {}
    assert scripts == {"d2v-train": "d2v_engine.cli.train:main",
                       "d2v-prepare": "d2v_engine.cli.prepare:main",
                       "d2v-export": "d2v_engine.cli.export:main",
                       "d2v-probe": "d2v_engine.cli.probe:main",
                       "d2v-checkpoint": "d2v_engine.cli.checkpoint:main"}, scripts
    readme = (ROOT / "README.md").read_text()
    for name in scripts:
        assert f"{name} " in readme, f"the README never shows {name}"


def _latest_script():
    spec = importlib.util.spec_from_file_location("d2v_latest_script", ROOT / "scripts/latest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latest_check_names_the_release_a_traceback_passes_through():
    pytest.importorskip("transformers")
    latest = _latest_script()
    version = metadata.version("transformers")
    behind = {**latest.read_lock(), "transformers": "0.0.1"}
    text = ('Traceback (most recent call last):\n  File "/v/lib/python3.11/site-packages/'
            'transformers/modeling_utils.py", line 1, in <module>\nImportError: ...')
    assert latest.culprits(text, behind) == [f"transformers {version} (lock 0.0.1)"]
    on_lock = {**behind, "transformers": version}
    assert latest.culprits(text, on_lock) == []  # a package at its locked version is not blamed
    assert f"transformers {version} (lock 0.0.1)" in latest.differences(behind, latest.installed())


def test_the_lock_is_written_as_pins_without_this_project(tmp_path):
    latest = _latest_script()
    assert latest.freeze(tmp_path / "lock.txt") == 0
    pins = latest.read_lock(tmp_path / "lock.txt")
    assert "d2v-engine" not in pins and "pip" not in pins
    assert "+" not in pins["torch"]  # one line for the CPU wheel here and PyPI's torch
    assert pins["torch"] == torch.__version__.split("+")[0]
