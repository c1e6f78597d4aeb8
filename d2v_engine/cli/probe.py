"""d2v-probe RUN_DIR_OR_CHECKPOINT [--max-samples N] [--data PATH]: the linear probe of a run's
encoder against the same encoder at random init (d2v_engine/handoff/probe.py)."""
from __future__ import annotations

import argparse
import sys

from d2v_engine.errors import debug, error_line
from d2v_engine.handoff import probe as probe_module
from d2v_engine.handoff.probe import print_probe, run_probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2v-probe",
                                     description=probe_module.__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run directory (latest checkpoint) or checkpoint file")
    parser.add_argument("--max-samples", type=int, default=1000,
                        help="probe at most this many labelled samples (seeded subset); 0 = all")
    parser.add_argument("--data", default=None, help="labelled data instead of the default set")
    args = parser.parse_args(argv)
    try:
        r = run_probe(args.checkpoint, args.max_samples, args.data)
    except Exception as e:
        line = error_line(e)
        if line is None or debug():
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    print_probe(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
