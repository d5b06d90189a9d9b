"""One run per output folder (slimtune.train.runlock): a second `slimtune run` on a folder in use is one line, exit 2;
the lock dies with its process, so SIGKILL then --resume works."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from subprocs import Proc

from slimtune.errors import SlimtuneError
from slimtune.train.runlock import LOCK_NAME, RunLock


def test_a_second_lock_on_the_folder_names_the_holder_and_a_released_one_is_free(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(SlimtuneError, match=rf"in use by another run \(process {os.getpid()}, started "):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run") as again:  # released on exit: free again, the stale file does not matter
        assert json.loads(again.path.read_text())["pid"] == os.getpid()


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
def test_second_run_on_a_folder_in_use_exits_2_and_sigkill_then_resume_works(tmp_path, tiny_model_dir, rel):
    run_dir = tmp_path / "run"
    recipe = rel.write_recipe(tmp_path / "r.yaml", rel.recipe(tiny_model_dir, run_dir, steps=400))
    env = {**os.environ, **rel.env}
    cmd = [sys.executable, "-m", "slimtune", "run", str(recipe), "--quiet"]
    with Proc(cmd, env=env) as first:
        t0 = time.monotonic()
        while _steps(run_dir) < 1:
            assert first.poll() is None, first.output()
            assert time.monotonic() - t0 < 120, "the first run logged no step in 120 s"
            time.sleep(0.05)
        with Proc(cmd, env=env) as second:
            out, err = second.wait(60, "the second run")
        assert second.returncode == 2, (out, err)
        assert "Traceback" not in err
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and f"{run_dir} is in use by another run (process {first.pid}" in lines[0], err
        assert "slimtune run" in lines[0] and "output.dir" in lines[0]
        assert first.poll() is None, "the first run must go on"
        first.signal(signal.SIGKILL)
        first.wait(30)
    assert (run_dir / LOCK_NAME).is_file()  # left behind by the killed run: only a file, not a lock
    steps = _steps(run_dir)
    with Proc([*cmd, "--resume"], env=env) as resumed:  # the killed run's lock file is there: it must not matter
        t0 = time.monotonic()
        while _steps(run_dir) <= steps:
            assert resumed.poll() is None, resumed.output()
            assert time.monotonic() - t0 < 120, "the resumed run logged no step in 120 s"
            time.sleep(0.05)
        resumed.kill()
