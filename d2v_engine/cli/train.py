"""Entry point: d2v-train CONFIG [dotted.key=value ...]  (the same as python -m d2v_engine.cli.train).

torchrun aware: `torchrun --nproc_per_node N -m d2v_engine.cli.train CONFIG ...` or
`torchrun --nproc_per_node N --no-python d2v-train CONFIG ...`.
"""
from __future__ import annotations

import os
import signal
import sys

from d2v_engine.errors import debug, error_line

USAGE = "usage: d2v-train CONFIG.yaml [dotted.key=value ...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0 if argv else 2
    from d2v_engine.config import load_config
    from d2v_engine.runtime.distributed import shutdown
    from d2v_engine.run.preemption import STOP_SIGNALS, absorb_after_stop, stop_requested
    from d2v_engine.run.trainer import train

    previous = {sig: signal.signal(sig, absorb_after_stop) for sig in STOP_SIGNALS}
    try:
        cfg = load_config(argv[0], argv[1:])
        result = train(cfg)  # takes SIGTERM / SIGUSR1 over while it runs
        if cfg.train.probe and int(os.environ.get("RANK", "0")) == 0 \
                and result["step"] == cfg.train.max_steps:
            from d2v_engine.handoff.probe import print_probe, run_probe

            print_probe(run_probe(result["run_dir"]))
    except Exception as e:
        line = error_line(e)
        if line is None or debug():
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        shutdown()
        for sig, handler in previous.items():
            # After a stop, later signals are ignored until the exit: Python's own handlers go
            # back to the default while the interpreter shuts down, SIG_IGN does not.
            signal.signal(sig, signal.SIG_IGN if stop_requested() else handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
