"""Atomic checkpoints and exact resume.

A checkpoint is written to a temporary name in the run directory, fsync'd, then renamed to
`checkpoint_<step>.pt` and the directory fsync'd: a crash leaves either the old set or the new
file whole, and a half-written file never carries a final name, so it is never picked up.
Retention keeps the newest `keep_last` and every checkpoint whose step is a multiple of
`keep_every`; older ones are deleted only after the new one is safely in place.

Loading never runs code from the file: every read goes through `load_checkpoint`, which unpickles
with `torch.load(weights_only=True)` after a static look at the pickle, and refuses, in one line
naming the file, a truncated or damaged file, a file that is not ours (no FORMAT marker: a foreign
pickle, a plain torch.save of something else) and a file whose pickle asks for anything beyond
tensors and plain containers. So a checkpoint holds only tensors, dicts, lists, tuples, ints,
floats, strings, bools and None: the RNG states are stored in those types (`rng_state`).
Checkpoints written before this format (NumPy arrays in the RNG state) are converted by
`d2v-checkpoint upgrade OLD NEW` (d2v_engine.cli.checkpoint), run on trusted files.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from d2v_engine.errors import CheckpointError

_NAME = re.compile(r"^checkpoint_(\d{8,})\.pt$")
# Written into every checkpoint by save_checkpoint and required by load_checkpoint: what tells our
# files from any other torch.save. Version 2: weights-only loadable (no NumPy arrays).
FORMAT_KEY, FORMAT = "d2v_engine_format", 2
# What the RNG state of checkpoints before FORMAT 2 pickled (np.random.get_state's uint32 array):
# the refusal of such a file points to the upgrade.
LEGACY_NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                        "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType")
UPGRADE_HINT = ("if it is a d2v-engine checkpoint from before weights-only loading and you trust "
                "where it came from, convert it: d2v-checkpoint upgrade {path} NEW.pt")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_loadable(run_dir: Path, before: Path) -> Path | None:
    """The newest checkpoint of run_dir older than `before` that loads (mmap: a look, not a read)."""
    found = _NAME.match(Path(before).name)
    limit = int(found.group(1)) if found else None
    for step, path in reversed(list_checkpoints(run_dir)):
        if limit is not None and step >= limit:
            continue
        try:
            load_checkpoint(path, mmap=True)
        except CheckpointError:
            continue
        return path
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep_last: int = 2,
                    keep_every: int = 0) -> Path:
    """Writes state atomically as checkpoint_<step>.pt; keeps the newest `keep_last` and every
    `keep_every`-th step. On any error the previous checkpoints are untouched and it re-raises."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    # A writer killed mid-save (SIGKILL, node loss) leaves its temp file; only one process writes
    # checkpoints, so any other temp file is such a leftover.
    for stale in run_dir.glob(".checkpoint_*.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    write_atomic(final, state)
    for old_step, old in list_checkpoints(run_dir)[:-keep_last]:
        if not (keep_every and old_step % keep_every == 0):
            old.unlink(missing_ok=True)
    return final


def write_atomic(final: Path, state: dict) -> None:
    """torch.save of state plus the FORMAT marker to a temp name, fsync'd, renamed to `final`."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, FORMAT_KEY: FORMAT}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """One of our checkpoints, on the CPU, loaded weights-only; anything else is a one-line
    CheckpointError naming the file and why, raised before anything in the file runs.
    mmap=True maps the tensors instead of reading them (for a look at the small entries)."""
    path = Path(path)
    _check_archive(path)
    try:  # static disassembly of the pickle: nothing in it runs
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        if "Unsupported" in str(e):  # an opcode weights-only unpickling does not know
            raise CheckpointError(f"refused checkpoint {path}: its pickle uses what a weights-only "
                                  f"checkpoint may not ({error_line(e, 'Unsupported')}); nothing "
                                  "in it was run") from None
        raise CheckpointError(f"checkpoint {path} is damaged: its pickle does not parse "
                              f"({error_line(e)})") from None
    if unsafe:
        _refuse_globals(path, unsafe)
    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:  # a global pushed dynamically, hidden from the scan
        _refuse_globals(path, [error_line(e, "Unsupported")])
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or damaged: {error_line(e)}; "
                              "copy it again") from None
    if not isinstance(state, dict) or state.get(FORMAT_KEY) != FORMAT:
        raise CheckpointError(f"{path} is not a d2v-engine checkpoint: {_describe(state)} "
                              f"without the '{FORMAT_KEY}' marker our checkpoints carry")
    return state


def _check_archive(path: Path) -> None:
    """torch.save's zip archive, whole: its end record is written last, so a cut file lacks it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("/data.pkl") for n in z.namelist()):
                return
        raise CheckpointError(f"{path} is not a d2v-engine checkpoint: a zip archive, not a "
                              "torch.save file")
    if not head:
        raise CheckpointError(f"checkpoint {path} is truncated: the file is empty")
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"checkpoint {path} is truncated: its zip archive ends early (an "
                              "interrupted write or copy); copy it again")
    raise CheckpointError(f"{path} is not a d2v-engine checkpoint: not the zip archive torch.save "
                          "writes (a legacy or foreign pickle, or another kind of file)")


def _refuse_globals(path: Path, names: list[str]) -> None:
    hint = ""
    if set(names) <= set(LEGACY_NUMPY_GLOBALS):
        hint = "; " + UPGRADE_HINT.format(path=path)
    raise CheckpointError(f"refused checkpoint {path}: its pickle needs {', '.join(names)}, which "
                          "a weights-only checkpoint may not (loading it could run code; nothing "
                          f"in it was run){hint}")


def error_line(error: Exception, containing: str = "") -> str:
    """The line of a (multi-line) error message that holds `containing`, else its first line."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()] or [type(error).__name__]
    return next((l for l in lines if containing and containing in l), lines[0])


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
    return f"a {type(obj).__name__}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and, on CUDA, `device`'s: the one it
    trains on, default the current device), in types torch.load(weights_only=True) accepts:
    NumPy's uint32 key array becomes an int64 tensor."""
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": numpy_rng_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        state["cuda_device"] = torch.cuda.get_rng_state(_cuda_index(device))
    return state


def _cuda_index(device: torch.device | None) -> int:
    if device is None or device.index is None:
        return torch.cuda.current_device()
    return device.index


def numpy_rng_plain(state: tuple) -> dict:
    """np.random.get_state()'s tuple with its uint32 key array as an int64 tensor (exact)."""
    kind, keys, pos, has_gauss, cached_gaussian = state
    return {"bit_generator": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restores `rng_state`'s states; the CUDA one goes to `device` (default the current
    device) only, so a run resumes on any number of visible GPUs."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        index = _cuda_index(device)
        own = cuda_state_for(state, index)
        if own is not None:
            torch.cuda.set_rng_state(own, index)


def cuda_state_for(state: dict, index: int) -> torch.Tensor | None:
    """The CUDA generator state device `index` resumes with. Checkpoints before "cuda_device"
    hold every device the writer (rank 0) saw, as a list, which set_rng_state_all restored
    whole (an IndexError where fewer devices are visible): device i keeps entry i where there is
    one, a device past the list (more GPUs than the writer saw) takes entry 0, the one rank 0
    trained on."""
    if "cuda_device" in state:
        return state["cuda_device"]
    every = state.get("cuda")
    if not every:
        return None
    return every[index] if index < len(every) else every[0]
