"""bench/gpu_check.sh --dry-run on CPU: lists every step, checks the inputs (the carried wheels against the device's
Python), runs the check code itself at tiny shapes (correctness vs float64, micro-benchmarks, measured dispatch),
and estimates each step's time on the device against its cap (bench/gpu/budget.py), failing when one cannot fit.
check_kernels.py writes each row as it is made, so a step killed at its cap keeps what it did."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "bench" / "gpu"
ORDER = ("env", "setup", "correctness", "dispatch", "bench", "microbench", "maxctx")


def _run(*args, tmp_path, env=None):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=900, cwd=tmp_path)  # fmt: skip


def _py(*args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-check")
    return _run("--dry-run", "--out", str(tmp / "res"), tmp_path=tmp), tmp / "res" / "dry-run"


@pytest.mark.slow
def test_dry_run_lists_steps_checks_inputs_and_runs_the_code(dry_run):
    r, res = dry_run
    assert r.returncode == 0 and "dry run: OK" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    listed = [line.split()[0] for line in r.stdout.split("== steps")[1].split("== inputs")[0].splitlines()[1:]]
    assert tuple(listed) == ORDER  # the most valuable first
    assert "--model-config Llama-3.1-8B --device cuda --seq-len 2048 --batch 2 --rank 16" in r.stdout
    assert "--max-context --mem-cap-gib 24" in r.stdout
    rows = json.loads((res / "correctness.json").read_text())
    assert len(rows) >= 25 and all(row["ok"] for row in rows)
    assert {row["backend"] for row in rows} >= {"torch", "dequant", "auto"}
    assert any(row["check"].startswith("decoder layer") for row in rows)
    streamed = [json.loads(line) for line in (res / "correctness.jsonl").read_text().splitlines()]
    assert streamed == rows  # every row was also appended as it was made
    verdicts = (res / "dispatch.txt").read_text().splitlines()
    assert any(v.startswith("lora_mlp|float32|") for v in verdicts) and all("fastest correct" in v for v in verdicts)
    bench = json.loads((res / "microbench.json").read_text())
    assert all(b["torch_ms"] > 0 and b["dequant_ms"] > 0 for b in bench)


@pytest.mark.slow
def test_dry_run_estimates_every_step_within_its_cap(dry_run):
    r, res = dry_run
    assert r.returncode == 0, r.stdout[-3000:]
    budget = json.loads((res / "budget.json").read_text())
    steps = {s["name"]: s for s in budget["steps"]}
    assert tuple(steps) == ORDER and budget["ok"]
    assert sum(s["cap"] for s in steps.values()) <= 480
    for name, s in steps.items():
        assert 0 < s["estimate"] <= s["cap"], s
        assert f"  {name} " in r.stdout.split("== time budget")[1]
        assert s["estimate"] == pytest.approx(sum(s["terms"].values()), abs=0.05)
    here = budget["here"]
    assert here["skeleton_s"] > 0 and here["compile_heavy_s"] > 0 and here["imports_s"] > 0
    assert here["heavy_variants"] + here["light_variants"] >= 20  # from the shipped compile matrix
    # the base is drawn once per bench process, on the device, in seconds (not 2 x 8 B values on a CPU generator)
    assert "random base (once)" in steps["bench"]["terms"] and "random base (once)" in steps["maxctx"]["terms"]
    assert steps["bench"]["terms"]["random base (once)"] < 15
    assert any(k.startswith("slimtune search") for k in steps["maxctx"]["terms"])
    assert "first 3 minutes: correctness, dispatch, bench done by" in r.stdout
    assert "time caps: 480 s in all (budget 480)" in r.stdout


def _steps_file(tmp_path, res, caps: dict[str, int], order=None) -> Path:
    lines = (res / "steps.txt").read_text().splitlines()
    by_name = {line.split("|")[0]: line.split("|", 2) for line in lines}
    out = tmp_path / "steps.txt"
    out.write_text("".join(f"{n}|{caps.get(n, by_name[n][1])}|{by_name[n][2]}\n" for n in (order or ORDER)))
    return out


@pytest.fixture(scope="module")
def budget():
    """bench/gpu/budget.py imported in this process (its imports paid once, not per check)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_budget", GPU / "budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.slow
@pytest.mark.parametrize("caps,order,needle", [
    ({"bench": 20}, None, "TOO LONG"),  # the 8B bench cannot fit 20 s
    ({"maxctx": 40}, None, "TOO LONG"),  # nor the max-context search 40 s
    ({"microbench": 100}, None, "the caps exceed the budget"),
    ({}, ("env", "setup", "microbench", "correctness", "dispatch", "bench", "maxctx"), "FIRST 3 MINUTES"),
    ({}, None, None),  # the shipped steps and caps fit
])
def test_budget_fails_when_a_step_cannot_fit(dry_run, budget, tmp_path, capsys, caps, order, needle):
    _, res = dry_run
    code = budget.main(["--steps", str(_steps_file(tmp_path, res, caps, order)), "--here", str(res / "budget.json")])
    out = capsys.readouterr().out
    if needle is None:
        assert code == 0, out
        return
    assert code == 1 and needle in out, out
    if caps and needle == "TOO LONG":
        (name, _), = caps.items()
        assert [line for line in out.splitlines() if line.startswith(f"  {name} ")][0].count("TOO LONG") == 1


def test_carried_wheels_cover_the_device_python(tmp_path):
    for name in ("bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.slim.zip", "pydantic-2.14.4-py3-none-any.whl",
                 "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                 "annotated_types-0.8.0-py3-none-any.whl", "typing_inspection-0.4.5-py3-none-any.whl",
                 "gguf-0.19.0-py3-none-any.whl"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    assert _py(GPU / "carried.py", "cover", tmp_path, "3.12").returncode == 0
    r = _py(GPU / "carried.py", "cover", tmp_path, "3.12", "3.13")
    assert r.returncode == 1 and r.stdout.strip() == "MISSING  wheel of pydantic_core for 3.13", r.stdout
    r = _py(GPU / "carried.py", "pick", tmp_path, "3.13")
    assert r.returncode == 1 and "no wheel of pydantic_core for Python 3.13" in r.stderr
    picked = _py(GPU / "carried.py", "pick", tmp_path, "3.12").stdout.split()
    assert len(picked) == 6 and any("cp312" in p for p in picked)


def test_check_kernels_writes_each_row_as_it_is_made(tmp_path):
    """Killed mid-run (as a step's time cap does), the correctness step keeps every row it made."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(GPU / "check_kernels.py"), "correctness", "--small", "--out",
                             str(tmp_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    jsonl, deadline = tmp_path / "correctness.jsonl", time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode < 0, "the run ended before it could be cut off"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) >= 3 and all(r["ok"] and r["max_rel_err"] < 2e-3 for r in rows), rows
    assert not (tmp_path / "correctness.json").exists()  # the tables come at the end: the rows survive without them


def test_bad_argument_is_one_line(tmp_path):
    r = _run("--fast", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown argument --fast" in r.stderr
