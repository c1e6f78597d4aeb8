"""python -m d2v_engine.cli.tokenize SRC OUT [options]: `d2v-prepare text` under another name
(the text folder the loader reads, d2v_engine/prepare/text.py)."""
from __future__ import annotations

import sys

from d2v_engine.cli.prepare import main as prepare_main


def main(argv: list[str] | None = None) -> int:
    """`d2v-prepare text` under this module's name; the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return prepare_main(["text", *argv], prog="python -m d2v_engine.cli.tokenize")


if __name__ == "__main__":
    sys.exit(main())
