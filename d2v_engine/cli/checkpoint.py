"""d2v-checkpoint upgrade OLD NEW: converts a checkpoint written before weights-only
loading (NumPy's RNG key array pickled as a NumPy object) to the current format, which every reader
(resume, restarts, model.init_from, export, probe) loads with torch.load(weights_only=True).

Meant for files you trust, and still runs nothing from them: it lists, without unpickling, what
the file's pickle needs beyond tensors and plain containers, refuses the file unless that is only
the NumPy array types our old checkpoints hold, and then loads it weights-only with just those
allowed, for this one load (they rebuild an array and call nothing else). Every checkpoint the
engine wrote before needs no more than that, so no path of the engine loads with
weights_only=False.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from d2v_engine.checkpoint import (
    LEGACY_NUMPY_GLOBALS, error_line, load_checkpoint, numpy_rng_plain, write_atomic,
)
from d2v_engine.errors import CheckpointError, D2VError

USAGE = "d2v-checkpoint upgrade OLD.pt NEW.pt"


def _legacy_numpy_types() -> list:
    """The installed NumPy's objects for LEGACY_NUMPY_GLOBALS, under the names the file may use
    (NumPy 1 pickled the array rebuild as numpy.core..., NumPy 2 as numpy._core...)."""
    reconstruct = getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy._core.multiarray._reconstruct"),
            (reconstruct, "numpy.core.multiarray._reconstruct")]


def _load_old(old: Path) -> dict:
    try:  # static disassembly of the pickle: nothing in it runs
        needs = torch.serialization.get_unsafe_globals_in_checkpoint(old)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {old}: {error_line(e)}") from None
    extra = sorted(set(needs) - set(LEGACY_NUMPY_GLOBALS))
    if extra:
        raise CheckpointError(f"{old} needs {', '.join(extra)} to load, which no d2v-engine "
                              "checkpoint holds; not converted (loading it could run code)")
    with torch.serialization.safe_globals(_legacy_numpy_types()):
        return torch.load(old, map_location="cpu", weights_only=True)


def upgrade(old: str | Path, new: str | Path) -> Path:
    """Writes OLD's content in the current format to NEW (never overwriting); returns NEW."""
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise CheckpointError(f"checkpoint not found: {old}")
    if new.exists():
        raise CheckpointError(f"{new} already exists; upgrade writes a new file")
    try:
        state = _load_old(old)
    except D2VError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {old}: {error_line(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{old} is not a d2v-engine checkpoint (no 'model'/'config')")
    rng = state.get("rng", {})
    if isinstance(rng.get("numpy"), tuple):
        state["rng"] = {**rng, "numpy": numpy_rng_plain(rng["numpy"])}
    new.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(new, state)
    try:
        load_checkpoint(new)  # the readers' own check
    except CheckpointError as e:
        new.unlink()
        raise CheckpointError(f"{old} not converted: the result would be refused ({e})") from None
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2v-checkpoint", usage=USAGE,
                                     description="Converts a checkpoint written before weights-only "
                                     "loading to the current format.")
    parser.add_argument("command", choices=["upgrade"])
    parser.add_argument("old", help="checkpoint written before weights-only loading")
    parser.add_argument("new", help="where to write the converted checkpoint (must not exist)")
    args = parser.parse_args(argv)
    try:
        out = upgrade(args.old, args.new)
    except D2VError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"d2v-engine: upgraded {args.old} -> {out} (read weights-only, NumPy arrays allowed; "
          "nothing in it ran)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
