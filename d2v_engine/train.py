"""Entry point: d2v-train CONFIG [dotted.key=value ...]  (the same as python -m d2v_engine.train).

torchrun aware: `torchrun --nproc_per_node N -m d2v_engine.train CONFIG ...` or
`torchrun --nproc_per_node N --no-python d2v-train CONFIG ...`.
"""
from __future__ import annotations

import os
import sys

from d2v_engine.errors import D2VError

USAGE = "usage: d2v-train CONFIG.yaml [dotted.key=value ...]"


def one_line(error: Exception) -> str:
    """The error's own message; a DataLoader worker wraps it in its traceback, which is dropped."""
    text = str(error).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv else 2
    from d2v_engine.config import load_config
    from d2v_engine.distributed import shutdown
    from d2v_engine.trainer import train

    try:
        cfg = load_config(argv[0], argv[1:])
        result = train(cfg)
        if cfg.train.probe and int(os.environ.get("RANK", "0")) == 0 \
                and result["step"] == cfg.train.max_steps:
            from d2v_engine.probe import print_probe, run_probe

            print_probe(run_probe(result["run_dir"]))
    except D2VError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
