"""Trainer callbacks: the hooks fire where documented, and the fault-injection callbacks do what the crash tests
rely on (NaN loss, OOM, the OOM hint), registered in-process — no environment variable in the loop."""

from __future__ import annotations

import ast
import contextlib
import inspect
import math

import pytest

import slimtune.train.loop as loop_mod
from slimtune.errors import ResourceError, SlimtuneError
from slimtune.train import faults
from slimtune.train.callbacks import TrainerCallback
from slimtune.train.loop import Trainer
from slimtune.train.state import COMPLETE

from test_loop import make_loaded, make_recipe


class Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.phases: list[tuple] = []

    def on_train_start(self, trainer):
        self.events.append(("start", trainer.pos.step))

    def on_step_start(self, trainer, step):
        self.events.append(("step_start", step))

    def on_micro_batch_loss(self, trainer, index, loss_sum):
        self.events.append(("micro", trainer.pos.step + 1, index, loss_sum.dim()))

    @contextlib.contextmanager
    def _phase(self, name):
        self.phases.append((name, "in"))
        yield
        self.phases.append((name, "out"))

    def phase(self, trainer, name):
        return self._phase(name)

    def on_step_end(self, trainer, result):
        self.events.append(("step_end", result.step, math.isfinite(result.loss)))

    def on_checkpoint_write(self, trainer, tmp_dir):
        # halfway: the adapter is there, trainer.pt and the COMPLETE marker are not
        self.events.append(("ckpt_write", trainer.pos.step, (tmp_dir / "adapter").is_dir(),
                            (tmp_dir / "trainer.pt").exists(), (tmp_dir / COMPLETE).exists()))

    def on_checkpoint(self, trainer, path):
        self.events.append(("ckpt", trainer.pos.step, (path / COMPLETE).is_file()))

    def on_train_end(self, trainer, summary):
        self.events.append(("end", summary["steps"]))


def _trainer(tmp_path, callbacks, **train):
    t = Trainer(make_recipe(tmp_path, records=4, **train), run_dir=tmp_path / "run", loaded=make_loaded(),
                callbacks=callbacks)
    t.setup()
    return t


def test_hooks_fire_in_order(tmp_path):
    rec = Recorder()
    t = _trainer(tmp_path, [rec], steps=3, grad_accum=2, save_every=2)
    t.train()
    assert rec.events == [
        ("start", 0),
        ("step_start", 1), ("micro", 1, 0, 0), ("micro", 1, 1, 0), ("step_end", 1, True),
        ("step_start", 2), ("micro", 2, 0, 0), ("micro", 2, 1, 0), ("step_end", 2, True),
        ("ckpt_write", 2, True, False, False), ("ckpt", 2, True),
        ("step_start", 3), ("micro", 3, 0, 0), ("micro", 3, 1, 0), ("step_end", 3, True),
        ("end", 3),
    ]
    one_step = [("forward", "in"), ("forward", "out"), ("backward", "in"), ("backward", "out")] * 2
    assert rec.phases == (one_step + [("optimizer", "in"), ("optimizer", "out")]) * 3


def test_nan_callback_skips_that_step(tmp_path):
    t = _trainer(tmp_path, [faults.NanLossAt(2)], steps=3, on_nonfinite="skip")
    summary = t.train()
    assert summary["skipped_steps"] == [2]
    assert [math.isfinite(h.loss) for h in t.history] == [True, False, True]


def test_oom_callback_gives_one_resource_error_with_hints(tmp_path):
    class Hint(TrainerCallback):
        def on_oom(self, trainer, error):
            return f"hint for {trainer.stage} ({type(error).__name__})"

    class BrokenHint(TrainerCallback):
        def on_oom(self, trainer, error):
            raise RuntimeError("a hint must never break the message")

    t = _trainer(tmp_path, [Hint(), faults.OomAt(2)], steps=3)
    with pytest.raises(ResourceError) as exc:
        t.train()
    msg = str(exc.value)
    assert msg.startswith("out of memory at step 2 (CUDA out of memory") and exc.value.exit_code == 3, msg
    assert "hint for main (OutOfMemoryError); " in msg and "train.micro_batch" in msg, msg
    assert t.pos.step == 1

    t = _trainer(tmp_path / "b", [BrokenHint(), faults.OomAt(1)], steps=2)
    with pytest.raises(ResourceError, match=r"^out of memory at step 1 .*; lower train.micro_batch"):
        t.train()


def test_fault_spec():
    cbs = faults.from_spec("nan@3, oom@5,kill_ckpt@7")
    assert [(type(c), c.step) for c in cbs] == [(faults.NanLossAt, 3), (faults.OomAt, 5),
                                                 (faults.KillInCheckpointAt, 7)]
    assert faults.from_spec("") == []
    with pytest.raises(SlimtuneError, match="'boom@1' is not KIND@STEP"):
        faults.from_spec("boom@1")


def test_loop_does_not_know_about_faults():
    """Fault injection is registered from outside: the loop imports no faults module and reads no environment
    variable for it."""
    tree = ast.parse(inspect.getsource(loop_mod))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom | ast.Import) for a in n.names}
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "faults" not in names and "slimtune.train.faults" not in mods | names
    assert "SLIMTUNE_FAULT" not in inspect.getsource(loop_mod)
