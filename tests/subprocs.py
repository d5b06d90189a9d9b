"""Subprocesses for tests that never outlive the test: output goes to files (no pipe that an orphan can hold
open), every wait has a timeout, and a kill takes the whole process tree, whatever session each descendant is in
(torchrun starts every worker in a session of its own, so killing torchrun's process group misses them).

Importable from any test: pytest puts tests/ on sys.path for tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest


def descendants(pid: int) -> list[psutil.Process]:
    """Every living descendant of ``pid`` (children, their children, ...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, known: list[psutil.Process] = ()) -> None:
    """SIGKILL ``pid`` and every descendant; ``known`` adds processes seen earlier (orphans re-parented to init are
    no longer descendants once their parent died). Waits at most 10 s for them to go."""
    procs = {p.pid: p for p in [*known, *descendants(pid)]}
    try:
        procs[pid] = psutil.Process(pid)
    except psutil.NoSuchProcess:
        pass
    for p in procs.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs.values()), timeout=10)


class Proc:
    """A started command whose stdout and stderr are files; ``wait`` never blocks past its timeout."""

    def __init__(self, cmd: list[str], **kw) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="slimtune-proc-")
        self.out_path, self.err_path = Path(self._dir.name) / "stdout", Path(self._dir.name) / "stderr"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                          start_new_session=True, **kw)
        self.pid = self.popen.pid
        self.seen: dict[int, psutil.Process] = {}

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def poll(self) -> int | None:
        self.seen.update({p.pid: p for p in descendants(self.pid)})  # remembered: a dead parent orphans them
        return self.popen.poll()

    def output(self) -> tuple[str, str]:
        return self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace")

    def wait(self, timeout: float, what: str = "process") -> tuple[str, str]:
        """Wait up to ``timeout`` s; past it kill the tree and fail the test. Returns (stdout, stderr)."""
        t0 = time.monotonic()
        while self.poll() is None:
            if time.monotonic() - t0 > timeout:
                self.kill()
                out, err = self.output()
                pytest.fail(f"{what} did not end within {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
            time.sleep(0.05)
        return self.output()

    def kill(self) -> None:
        kill_tree(self.pid, list(self.seen.values()))
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc) -> None:
        if self.poll() is None or any(p.is_running() for p in self.seen.values()):
            self.kill()
        self._dir.cleanup()
