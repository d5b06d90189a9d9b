"""One run per output folder: an advisory lock held for the whole life of a ``slimtune run``.

Two runs writing one folder interleave ``metrics.jsonl`` and overwrite each other's adapters and summaries, and both
exit 0. The run takes ``fcntl.flock`` on ``<run dir>/.slimtune.lock`` before it writes anything; a second run on that
folder gets one line naming the process that holds it (exit 2). The operating system releases the lock when the
holder's process ends in any way, SIGKILL included, so ``--resume`` after a crash finds the folder free; a stale lock
file is only a file. Under torchrun rank 0 holds it (the other ranks write nothing under the folder).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from slimtune.errors import SlimtuneError

LOCK_NAME = ".slimtune.lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the folder's lock for the block (``acquire`` / ``release`` by hand: the
    ``--restart`` path moves the folder aside and locks the new one)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise SlimtuneError(f"{self.run_dir} is in use by another run ({holder}); wait for it to end, or give this "
                                f"run another folder (--set output.dir=...)") from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The holder as the lock file describes it: 'process PID, started T: slimtune run ...'."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if "pid" not in info:
        return "a process that has not yet written its name"
    argv = " ".join(["slimtune", *info.get("argv", [])[1:]])[:160]
    return f"process {info['pid']}, started {info.get('started', '?')}: {argv}"
