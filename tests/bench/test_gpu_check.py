"""bench/gpu_check.sh --dry-run on CPU: lists every step within the 8-minute budget, checks the inputs, and runs the
check code itself at tiny shapes (correctness vs float64, micro-benchmarks, measured dispatch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)  # fmt: skip


@pytest.mark.slow
def test_dry_run_lists_steps_checks_inputs_and_runs_the_code(tmp_path):
    r = _run("--dry-run", "--out", str(tmp_path / "res"), tmp_path=tmp_path)
    assert r.returncode == 0 and "dry run: OK" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    for step in ("env", "setup", "correctness", "microbench", "dispatch", "bench", "maxctx"):
        assert f"  {step} " in r.stdout
    assert "--model-config Llama-3.1-8B --device cuda --seq-len 2048 --batch 2 --rank 16" in r.stdout
    assert "--max-context --mem-cap-gib 24" in r.stdout
    caps = int(r.stdout.split("time caps: ")[1].split()[0])
    assert caps <= 480
    rows = json.loads((tmp_path / "res" / "dry-run" / "correctness.json").read_text())
    assert len(rows) >= 25 and all(row["ok"] for row in rows)
    assert {row["backend"] for row in rows} >= {"torch", "dequant", "auto"}
    assert any(row["check"].startswith("decoder layer") for row in rows)
    verdicts = (tmp_path / "res" / "dry-run" / "dispatch.txt").read_text().splitlines()
    assert any(v.startswith("lora_mlp|float32|") for v in verdicts) and all("fastest correct" in v for v in verdicts)
    bench = json.loads((tmp_path / "res" / "dry-run" / "microbench.json").read_text())
    assert all(b["torch_ms"] > 0 and b["dequant_ms"] > 0 for b in bench)


def test_bad_argument_is_one_line(tmp_path):
    r = _run("--fast", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown argument --fast" in r.stderr
