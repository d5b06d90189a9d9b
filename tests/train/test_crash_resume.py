"""Crash safety, end to end: a real `slimtune run` killed at seeded random points and resumed with --resume produces
exactly the per-step losses and the final adapter of an uninterrupted run (DESIGN.md §7).

One run lineage, each launch resuming the previous one:

    L1  fresh        SIGKILL during start-up (seeded delay), before any checkpoint
    L2  --resume     SIGKILL at a seeded step + seeded delay (lands in a step, a checkpoint write or logging)
    L3  --resume     SLIMTUNE_FAULT=kill_ckpt@K: SIGKILL in the middle of writing checkpoint K
    L4  --resume     SIGINT at a seeded step: finishes the step, saves, prints how to resume, exit code 130
    L5  --resume     SIGKILL at a seeded step + delay
    L6  --resume     SIGKILL at a seeded step + delay
    end --resume     (in-process) runs to the end

5 SIGKILL points + 1 SIGINT. The reference (uninterrupted) run and the last resume run in-process with one thread,
as the subprocesses do (OMP_NUM_THREADS=1), so results are comparable bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimtune.train.state import list_checkpoints

STEPS = 24
KILL_POINTS: list[str] = []


def metric_rows(run_dir: Path) -> list[dict]:
    """Complete rows of metrics.jsonl (a line cut by SIGKILL is not a row)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().split("\n")[:-1]:  # the text after the last newline is incomplete
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def flat(text: str) -> str:
    """Text without whitespace: rich wraps long lines at the terminal width."""
    return "".join(text.split())


def comparable(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"], r["skipped"]) for r in rows]


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "adapter_native").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert out, f"no adapter tensors in {run_dir / 'adapter_native'}"
    return out


def latest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir / "checkpoints")
    return int(found[-1].name.split("-")[1]) if found else 0


class Lineage:
    """Launches `python -m slimtune.cli run RECIPE [--resume]` and interrupts it."""

    def __init__(self, recipe: Path, run_dir: Path, env: dict[str, str], rng: random.Random):
        self.recipe, self.run_dir, self.rng = recipe, run_dir, rng
        self.env = {**os.environ, **env}
        self.env.pop("SLIMTUNE_FAULT", None)
        self.launches = 0

    def start(self, *, resume: bool, fault: str | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "slimtune.cli", "run", str(self.recipe)] + (["--resume"] if resume else [])
        env = dict(self.env)
        if fault:
            env["SLIMTUNE_FAULT"] = fault
        self.launches += 1
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_step(self, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            rows = metric_rows(self.run_dir)
            if rows and rows[-1]["step"] >= step:
                return
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"run ended (rc {proc.returncode}) before step {step}:\n{out}\n{err}")
            time.sleep(0.005)
        proc.kill()
        pytest.fail(f"step {step} not reached in {timeout} s")

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str, str]:
        assert proc.poll() is None, "the run finished before it could be interrupted (raise STEPS)"
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err


def check_prefix(run_dir: Path, ref: list[tuple], label: str) -> int:
    """Every step the interrupted lineage logged equals the reference; returns the last step logged."""
    got = comparable(metric_rows(run_dir))
    assert got == ref[: len(got)], f"{label}: losses differ from the uninterrupted run"
    steps = [g[0] for g in got]
    assert steps == list(range(1, len(got) + 1)), f"{label}: steps {steps}"
    return len(got)


@pytest.mark.slow
def test_killed_and_resumed_run_is_exact(tmp_path, tiny_model_dir, rel):
    rng = random.Random(20240607)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "lineage"
    ref_recipe = rel.write_recipe(tmp_path / "ref.yaml", rel.recipe(tiny_model_dir, ref_dir, steps=STEPS))
    recipe = rel.write_recipe(tmp_path / "lineage.yaml", rel.recipe(tiny_model_dir, run_dir, steps=STEPS))

    # The uninterrupted reference (in-process).
    res = rel.invoke(["run", str(ref_recipe), "--quiet"], env=rel.env)
    assert res.exit_code == 0, res.output
    ref = comparable(metric_rows(ref_dir))
    assert [r[0] for r in ref] == list(range(1, STEPS + 1))
    ref_adapter = adapter_tensors(ref_dir)

    lin = Lineage(recipe, run_dir, rel.env, rng)

    # L1: SIGKILL during start-up (imports, model load, first steps): nothing or little saved.
    proc = lin.start(resume=False)
    deadline = time.monotonic() + rng.uniform(0.5, 2.5)
    while time.monotonic() < deadline and not metric_rows(run_dir):  # a fast machine: at the latest at step 1
        time.sleep(0.005)
    rc, out, err = lin.kill(proc)
    assert rc == -signal.SIGKILL, (rc, out, err)
    last = check_prefix(run_dir, ref, "L1")
    KILL_POINTS.append(f"start-up (logged {last} steps, checkpoint {latest_step(run_dir)})")

    # L2: SIGKILL at a seeded step + delay (--resume with or without a checkpoint to resume from).
    start = latest_step(run_dir)
    proc = lin.start(resume=True)
    target = start + rng.randint(2, 3)
    lin.wait_for_step(proc, target)
    time.sleep(rng.uniform(0.0, 0.15))
    rc, out, err = lin.kill(proc)
    assert rc == -signal.SIGKILL and "Traceback" not in err, (rc, err)
    last = check_prefix(run_dir, ref, "L2")
    KILL_POINTS.append(f"step {target} + delay (logged {last}, checkpoint {latest_step(run_dir)})")

    # L3: SIGKILL in the middle of writing checkpoint K: the half-written folder is ignored, K-1 stays.
    start = latest_step(run_dir)
    k = start + 2
    proc = lin.start(resume=True, fault=f"kill_ckpt@{k}")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    assert latest_step(run_dir) == k - 1
    assert list((run_dir / "checkpoints").glob(f".tmp-step-{k:08d}-*")), "the half-written checkpoint is missing"
    check_prefix(run_dir, ref, "L3")
    KILL_POINTS.append(f"inside the write of checkpoint {k}")

    # L4: SIGINT: finish the step, save, say how to resume, exit code 130.
    start = latest_step(run_dir)
    proc = lin.start(resume=True)
    lin.wait_for_step(proc, start + 2)
    rc, out, err = lin.kill(proc, signal.SIGINT)
    assert rc == 130, (rc, out, err)
    assert "--resume" in out and flat("checkpoint saved. Continue with: slimtune run") in flat(out), out
    assert flat("ignoring half-written checkpoint") in flat(out + err)  # L3's leftover was seen (and cleaned up)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    last = check_prefix(run_dir, ref, "L4")
    assert latest_step(run_dir) == last, "SIGINT must checkpoint the last finished step"
    assert flat(f"resumed from {run_dir / 'checkpoints' / f'step-{start:08d}'}") in flat(out)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["stages"][-1]["interrupted"] is True

    # L5, L6: SIGKILL at seeded steps + delays.
    for label in ("L5", "L6"):
        start = latest_step(run_dir)
        proc = lin.start(resume=True)
        target = start + rng.randint(2, 3)
        lin.wait_for_step(proc, target)
        time.sleep(rng.uniform(0.0, 0.15))
        rc, out, err = lin.kill(proc)
        assert rc == -signal.SIGKILL, (rc, err)
        last = check_prefix(run_dir, ref, label)
        KILL_POINTS.append(f"step {target} + delay (logged {last}, checkpoint {latest_step(run_dir)})")
    assert last < STEPS

    # A fresh run over unfinished checkpoints is refused (nothing is overwritten), then --resume finishes.
    res = rel.invoke(["run", str(recipe), "--quiet"], env=rel.env)
    assert res.exit_code == 2 and "--resume" in res.output, res.output
    res = rel.invoke(["run", str(recipe), "--resume", "latest", "--quiet"], env=rel.env)
    assert res.exit_code == 0, res.output
    assert comparable(metric_rows(run_dir)) == ref, "per-step losses differ from the uninterrupted run"
    got = adapter_tensors(run_dir)
    assert got.keys() == ref_adapter.keys()
    for name, t in ref_adapter.items():
        assert torch.equal(got[name], t), f"{name} is not bit-identical"
    assert json.loads((run_dir / "run_summary.json").read_text())["interrupted"] is False
    assert len(KILL_POINTS) == 5 and lin.launches == 6
    print(f"\nkill points ({len(KILL_POINTS)} SIGKILL + 1 SIGINT, {lin.launches} launches): {KILL_POINTS}")


def test_resume_flag_without_value_means_latest():
    from slimtune.cli import _resume_value

    assert _resume_value(["run", "r.yaml", "--resume"]) == ["run", "r.yaml", "--resume", "latest"]
    assert _resume_value(["run", "--resume", "r.yaml"]) == ["run", "--resume", "latest", "r.yaml"]
    assert _resume_value(["run", "r.yaml", "--resume", "-q"]) == ["run", "r.yaml", "--resume", "latest", "-q"]
    assert _resume_value(["run", "r.yaml", "--resume", "runs/x/checkpoints/step-00000003"])[-1].endswith("3")


def test_resume_refuses_changed_recipe_through_cli(tmp_path, tiny_model_dir, rel):
    run_dir = tmp_path / "run"
    recipe = rel.write_recipe(tmp_path / "r.yaml", rel.recipe(tiny_model_dir, run_dir, steps=4))
    res = rel.invoke(["run", str(recipe), "--quiet"], env={**rel.env, "SLIMTUNE_FAULT": "nan@3"})
    assert res.exit_code == 4, res.output  # stopped after checkpoint 2
    assert latest_step(run_dir) == 2
    changed = rel.recipe(tiny_model_dir, run_dir, steps=4, lr=1e-3, micro_batch=1)
    rel.write_recipe(recipe, changed)
    res = rel.invoke(["run", str(recipe), "--resume", "latest", "--quiet"], env=rel.env)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(errors) == 1 and errors[0].startswith("error: cannot resume"), res.output
    assert "train.lr" in errors[0] and "train.micro_batch" in errors[0], errors[0]
    # a damaged checkpoint file is one line too, naming the checkpoint
    rel.write_recipe(recipe, rel.recipe(tiny_model_dir, run_dir, steps=4))
    (run_dir / "checkpoints" / "step-00000002" / "trainer.pt").write_bytes(b"not a torch file")
    res = rel.invoke(["run", str(recipe), "--resume", "latest", "--quiet"], env=rel.env)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and "Traceback" not in res.output and len(errors) == 1, res.output
    assert "step-00000002: cannot read the checkpoint" in errors[0], errors[0]
    # an explicit checkpoint folder works as --resume PATH
    ckpt = run_dir / "checkpoints" / "step-00000001"
    res = rel.invoke(["run", str(recipe), "--resume", str(ckpt)], env=rel.env)
    assert res.exit_code == 0 and flat(f"resumed from {ckpt} at step 1") in flat(res.output), res.output
