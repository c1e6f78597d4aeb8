"""One writer per run directory: rank 0 holds an advisory lock on <run dir>/run.lock for the run.

flock(2) locks belong to the open file: the kernel drops the lock when the holder exits in any way
(a crash, SIGKILL, a node's process killed by its scheduler), so nothing is ever left to clean up,
and a launcher's restart (torchrun --max-restarts, a requeued SLURM job) takes it over as soon as
the dead rank 0 is gone. A second start on a held directory fails at once, naming the holder's
host and pid, before it reads or writes anything there. The file itself stays (an empty-looking
marker with the last holder's host and pid); only the lock on it matters.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from d2v_engine.errors import ConfigError

LOCK_NAME = "run.lock"


class RunDirLock:
    """Held from acquire() until release() or the process ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"run directory {self.path.parent} is in use by {holder}: one run writes a run "
                f"directory at a time; wait for it to end, or choose another run.dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None
