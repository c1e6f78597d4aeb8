"""The newest releases against the lock: `make test-latest` and `make lock`.

    python scripts/latest.py check [pytest args]     (run by `make test-latest`)
    python scripts/latest.py freeze --out requirements-lock.txt      (run by `make lock`)

Both run in the venv `make test-latest` builds from nothing: every dependency at its newest
release, torch as the CPU build the lock names (the newest CUDA builds are several GB; the GPU
image brings its own torch), and this project installed from a wheel, not the checkout.

check: prints every package whose installed version differs from requirements-lock.txt; runs the
console scripts in a folder outside the checkout (d2v-train a 2-step tiny_image, d2v-export,
d2v-probe, the export loaded by transformers' AutoModel); then the tests marked `latest` (each
integration once: every module's import, the names we install, the collision with Hugging Face's
`kernels`, a tiny run per modality, export + AutoModel + pipeline per modality, init_from an
export, the DALI loader, a 2-rank gloo run) with the checkout off sys.path, so that
`import d2v_engine` is the installed wheel (tests/conftest.py checks it: D2V_EXPECT_INSTALLED=1).
On a failure it names, for each failed test, the packages off the lock that its traceback passes
through: the release that broke us. Exit status: 0 when all passed.

freeze: writes the lock from this venv (every installed distribution at its version, this project
left out, torch without its local build tag so the same line resolves to the CPU wheel here and
on PyPI), with a header saying when and on which Python it was resolved.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"
OURS = "d2v-engine"
# Installer tooling: present in every venv, never a dependency of ours.
TOOLING = {"pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of the lock's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, tuple[str, str]]:
    """{canonical name: (name as published, version)} of this environment, tooling left out."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in TOOLING:
            out[canonical(name)] = (name, dist.version)
    return out


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def differences(pins: dict[str, str], have: dict[str, tuple[str, str]]) -> list[str]:
    """One line per package whose version here is not the lock's (local build tags ignored)."""
    lines = []
    for key, (name, version) in sorted(have.items()):
        if key == canonical(OURS):
            continue
        if key not in pins:
            lines.append(f"{name} {version} (not in the lock)")
        elif _public(version) != _public(pins[key]):
            lines.append(f"{name} {version} (lock {pins[key]})")
    lines += [f"{key} gone (lock {v})" for key, v in sorted(pins.items()) if key not in have]
    return lines


def culprits(failure_text: str, pins: dict[str, str]) -> list[str]:
    """The distributions off the lock whose files a traceback passes through."""
    owners = metadata.packages_distributions()
    have = installed()
    found = []
    for top in dict.fromkeys(re.findall(r"site-packages[/\\]([A-Za-z0-9_]+)", failure_text)):
        for dist in owners.get(top, []):
            key = canonical(dist)
            if key == canonical(OURS) or key not in have:
                continue
            name, version = have[key]
            if _public(version) != _public(pins.get(key, "")):
                found.append(f"{name} {version} (lock {pins.get(key, 'none')})")
    return list(dict.fromkeys(found))


def _outside_smoke(bin_dir: Path) -> list[str]:
    """The console scripts from a folder outside the checkout: a 2-step tiny run, its export and
    probe, the export loaded by transformers; [] or the failures."""
    failures = []
    with tempfile.TemporaryDirectory(prefix="d2v-outside-") as outside:
        run_dir, hf_dir = Path(outside, "run"), Path(outside, "hf")
        steps = [
            [bin_dir / "d2v-train", ROOT / "configs/tiny_image.yaml", f"run.dir={run_dir}",
             f"data.path={ROOT / 'data/images/digits'}", "train.max_steps=2",
             "train.progress=false"],
            [bin_dir / "d2v-export", run_dir, hf_dir],
            [bin_dir / "d2v-probe", run_dir, "--max-samples", "200"],
            [sys.executable, "-c", "import sys, transformers; "
             "m = transformers.AutoModel.from_pretrained(sys.argv[1]); print(type(m).__name__)",
             hf_dir],
        ]
        env = {**os.environ, "PYTHONSAFEPATH": "1", "TRITON_INTERPRET": "0"}
        env.pop("PYTHONPATH", None)
        for cmd in steps:
            done = subprocess.run([str(c) for c in cmd], cwd=outside, env=env,
                                  capture_output=True, text=True)
            name = Path(str(cmd[0])).name if cmd[0] != sys.executable else "AutoModel"
            print(f"  outside the checkout: {name}: exit {done.returncode}")
            if done.returncode:
                failures.append(f"{name}: {(done.stderr or done.stdout).strip()[-2000:]}")
    return failures


def check(pytest_args: list[str]) -> int:
    pins = read_lock()
    have = installed()
    start = time.perf_counter()
    print(f"python {platform.python_version()}; {len(have)} distributions installed")
    changed = differences(pins, have)
    print(f"{len(changed)} differ from {LOCK.name}:" if changed else f"all match {LOCK.name}")
    for line in changed:
        print(f"  {line}")
    bin_dir = Path(sys.executable).parent
    failed = [("outside the checkout", text) for text in _outside_smoke(bin_dir)]
    with tempfile.TemporaryDirectory(prefix="d2v-latest-") as scratch:
        junit = Path(scratch) / "junit.xml"
        # From the checkout's root (the configs' relative data paths), but with the checkout off
        # sys.path: the pytest script (not python -m) and PYTHONSAFEPATH for the tests' own
        # `python -m` children, so `import d2v_engine` is the wheel (D2V_EXPECT_INSTALLED).
        env = {**os.environ, "D2V_REQUIRE_OPTIONAL": "1", "D2V_EXPECT_INSTALLED": "1",
               "PYTHONSAFEPATH": "1"}
        env.pop("PYTHONPATH", None)
        # Only the files that hold `latest` tests are collected: the others may import the
        # checkout's benchmarks/, which is not installed.
        files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                       if "pytest.mark.latest" in f.read_text())
        cmd = [str(bin_dir / "pytest"), "-q", "-m", "latest", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "--durations=15", *files, *pytest_args]
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if junit.is_file():
            for case in ET.parse(junit).getroot().iter("testcase"):
                for bad in list(case.findall("failure")) + list(case.findall("error")):
                    text = (bad.get("message") or "") + "\n" + (bad.text or "")
                    failed.append((f"{case.get('classname')}::{case.get('name')}", text))
    for test, text in failed:
        blamed = culprits(text, pins)
        print(f"broke: {test}: " + ("; ".join(blamed) if blamed else
                                     "its traceback passes through no package off the lock"))
    rc = rc or (1 if failed else 0)
    print(f"test-latest: {'passed' if rc == 0 else f'FAILED (exit {rc})'}, "
          f"{time.perf_counter() - start:.0f} s")
    return rc


def freeze(out: Path) -> int:
    lines = []
    for key, (name, version) in sorted(installed().items()):
        if key == canonical(OURS):
            continue
        lines.append(f"{name}=={_public(version) if key == 'torch' else version}")
    header = [
        "# Exact versions for `make train` / `make test` (Makefile), as a green `make test-latest`",
        f"# resolved them on {datetime.date.today().isoformat()}, Python "
        f"{platform.python_version()} ({platform.machine()}).",
        "# Regenerate with `make lock` (then `make test` on it, and commit). torch: the CPU wheel",
        "# here; with a GPU the Makefile leaves the torch and triton lines out.",
    ]
    out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {out}: {len(lines)} packages")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/latest.py")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="the `latest` tests on this venv's releases")
    frz = sub.add_parser("freeze", help="write the lock from this venv")
    frz.add_argument("--out", type=Path, default=LOCK)
    args, rest = parser.parse_known_args(argv)
    if args.command == "check":
        return check(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return freeze(args.out)


if __name__ == "__main__":
    sys.exit(main())
