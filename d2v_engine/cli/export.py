"""d2v-export RUN_DIR_OR_CHECKPOINT OUT_DIR [--tokenizer TOKENIZER_JSON] [--overwrite]: the
student encoder of a run as a Hugging Face transformers directory (d2v_engine/handoff/export.py
says what it writes)."""
from __future__ import annotations

import argparse
import sys

from d2v_engine.errors import debug, error_line
from d2v_engine.handoff import export as export_module
from d2v_engine.handoff.export import export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2v-export",
                                     description=export_module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoint file")
    parser.add_argument("out", help="folder to write the Hugging Face model into")
    parser.add_argument("--tokenizer", default=None,
                        help="text: tokenizer.json to ship instead of the one in data.path")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder, replacing the export's own files")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tokenizer, args.overwrite)
    except Exception as e:
        line = error_line(e)
        if line is None or debug():
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"d2v-engine: exported {args.checkpoint} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
