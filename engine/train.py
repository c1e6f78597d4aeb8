"""Entry point: python -m engine.train CONFIG [dotted.key=value ...]  (torchrun aware)."""
from __future__ import annotations

import os
import sys

from engine.errors import D2VError

USAGE = "usage: python -m engine.train CONFIG.yaml [dotted.key=value ...]"


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
    from engine.config import load_config
    from engine.distributed import shutdown
    from engine.trainer import train

    try:
        cfg = load_config(argv[0], argv[1:])
        result = train(cfg)
        if cfg.train.probe and int(os.environ.get("RANK", "0")) == 0 \
                and result["step"] == cfg.train.max_steps:
            from engine.probe import print_probe, run_probe

            print_probe(run_probe(result["run_dir"]))
    except D2VError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
