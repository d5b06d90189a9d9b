"""Guards, through the CLI (in-process): injected NaN / OOM, SIGTERM, skip modes, untrusted code, offline hub ids.

Documented behaviour (README "Reliability"):
- non-finite loss, train.on_nonfinite: stop → exit 4, one line naming the step and the last good checkpoint (kept);
  train.on_nonfinite: skip → the step is skipped and listed in the summary.
- out of memory → exit 3, one line with what to lower and `slimtune estimate`.
- SIGINT / SIGTERM → the step finishes, a checkpoint is saved, the resume command is printed, exit 130.
- data.on_error: skip → malformed records are dropped and counted in the summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimtune.models.tiny import udhr_records
from slimtune.train.state import list_checkpoints


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir / "checkpoints")]


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nan_stops_keeps_checkpoint_then_skip_resumes(tmp_path, tiny_model_dir, rel):
    # data with two malformed lines, skipped (data.on_error: skip)
    data = tmp_path / "src.jsonl"
    lines = [json.dumps(r) for r in udhr_records("src")[:12]]
    lines[3:3] = ['{"text": ', '{"text": 42}']
    data.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    recipe = rel.recipe(tiny_model_dir, run_dir, steps=5)
    recipe["data"]["sources"] = [{"path": str(data)}]
    recipe["data"]["on_error"] = "skip"
    path = rel.write_recipe(tmp_path / "r.yaml", recipe)

    res = rel.invoke(["run", str(path), "--quiet"], env={**rel.env, "SLIMTUNE_FAULT": "nan@3"})
    assert res.exit_code == 4, res.output
    assert "Traceback" not in res.output and len(error_lines(res.output)) == 1, res.output
    msg = error_lines(res.output)[0]
    assert "non-finite loss at step 3" in msg and "step-00000002" in msg and "--resume" in msg, msg
    assert checkpoint_steps(run_dir) == [1, 2] and metric_steps(run_dir) == [1, 2]

    # resume with on_nonfinite: skip (not a key that changes an exact resume): step 3 is skipped and listed
    res = rel.invoke(["run", str(path), "--resume", "latest", "--quiet", "--set", "train.on_nonfinite=skip"],
                     env={**rel.env, "SLIMTUNE_FAULT": "nan@3"})
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "1 steps skipped for a non-finite loss or gradient (train.on_nonfinite: skip): 3" in flat, res.output
    assert "2 malformed data records skipped (data.on_error: skip)" in flat, res.output
    summary = json.loads((run_dir / "stage_summary.json").read_text())
    assert summary["skipped_steps"] == [3] and summary["data"]["skipped_records"] == 2
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5]


def test_oom_exit_3_with_advice_and_checkpoint_kept(tmp_path, tiny_model_dir, rel):
    run_dir = tmp_path / "run"
    path = rel.write_recipe(tmp_path / "r.yaml", rel.recipe(tiny_model_dir, run_dir, steps=4))
    res = rel.invoke(["run", str(path), "--quiet"], env={**rel.env, "SLIMTUNE_FAULT": "oom@2"})
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output and len(error_lines(res.output)) == 1, res.output
    msg = error_lines(res.output)[0]
    assert "out of memory at step 2" in msg and "train.micro_batch" in msg and "data.max_seq_len" in msg, msg
    assert "slimtune estimate" in msg and "estimated peak" in msg, msg
    assert checkpoint_steps(run_dir) == [1]


def test_sigterm_saves_and_exits_130(tmp_path, tiny_model_dir, rel, monkeypatch):
    from slimtune.train import faults
    from slimtune.train.callbacks import TrainerCallback

    run_dir = tmp_path / "run"
    path = rel.write_recipe(tmp_path / "r.yaml", rel.recipe(tiny_model_dir, run_dir, steps=6, save_every=0))

    class TermAfterStep2(TrainerCallback):
        def on_step_end(self, trainer, result):
            if result.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: the step is done, stop after it

    monkeypatch.setattr(faults, "from_env", lambda: [TermAfterStep2()])  # what `slimtune run` registers
    handler = signal.getsignal(signal.SIGTERM)
    res = rel.invoke(["run", str(path)], env=rel.env)
    assert res.exit_code == 130, res.output
    nospace = "".join(res.output.split())
    assert "stoppedatstep2/6" in nospace and "".join(f"slimtune run {path} --resume".split()) in nospace, res.output
    assert checkpoint_steps(run_dir) == [2]  # saved on the stop although save_every is 0
    assert signal.getsignal(signal.SIGTERM) == handler  # the trainer's handler is removed again


def test_untrusted_remote_code_is_not_run(tmp_path, tiny_model_dir):
    from slimtune.errors import ModelError
    from slimtune.models.load import ModelConfig, QuantConfig, load_model

    remote = tmp_path / "remote"
    remote.mkdir()
    for f in tiny_model_dir.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "code_ran"
    (remote / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (remote / "config.json").write_text(json.dumps(cfg))
    try:
        load_model(ModelConfig(name=str(remote)), QuantConfig(mode="none"), device="cpu")
    except ModelError as e:  # refusing is fine; running the code is not
        assert "\n" not in str(e) and e.exit_code == 2
    assert not marker.exists(), "remote code ran although the recipe did not set model.trust_remote_code"
    assert ModelConfig(name="x").trust_remote_code is False


def test_hub_id_offline_fails_fast_one_line(tmp_path, rel):
    """A real process: with HF_HUB_OFFLINE=1 a hub id that is not cached fails fast, one line, exit 2."""
    recipe = rel.recipe(Path("."), tmp_path / "run", steps=1)
    recipe["model"]["name"] = "slimtune-tests/no-such-model-7f3a"
    path = rel.write_recipe(tmp_path / "hub.yaml", recipe)
    env = {**os.environ, **rel.env, "HF_HOME": str(tmp_path / "hf_home")}  # an empty cache
    env.pop("SLIMTUNE_FAULT", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "slimtune.cli", "run", str(path), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "model.name" in errors[0] and "slimtune-tests/no-such-model-7f3a" in errors[0], \
        proc.stderr
    # "fast": no network retry loop (those take minutes); the imports alone take ~5 s, more on a loaded CI machine
    assert elapsed < 40, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_nonfinite_gradient_is_guarded(tmp_path, tiny_model_dir, rel, on_nonfinite):
    """A finite loss with an infinite gradient is caught too (the guard checks the gradient norm)."""
    import torch

    from slimtune.config.recipe import load_recipe
    from slimtune.train.loop import NonFiniteLoss, Trainer

    path = rel.write_recipe(tmp_path / "r.yaml", rel.recipe(tiny_model_dir, tmp_path / "run", steps=3,
                                                            on_nonfinite=on_nonfinite, save_every=0))
    with rel.one_thread():
        t = Trainer(load_recipe(path), run_dir=tmp_path / "run", base_dir=tmp_path)
        t.setup()
        p = next(p for p in t.model.parameters() if p.requires_grad)
        before = {n: q.detach().clone() for n, q in t.model.named_parameters() if q.requires_grad}
        calls = {"n": 0}

        def poison(g):
            calls["n"] += 1
            return torch.full_like(g, float("inf")) if calls["n"] <= 2 else g  # the 2 micro-batches of step 1

        p.register_hook(poison)
        if on_nonfinite == "stop":
            with pytest.raises(NonFiniteLoss, match="non-finite gradient at step 1") as exc:
                t.train()
            assert exc.value.exit_code == 4
            assert all(torch.equal(q, before[n]) for n, q in t.model.named_parameters() if q.requires_grad)
        else:
            summary = t.train()
            assert summary["skipped_steps"] == [1] and summary["steps"] == 3


def test_oom_message_on_cuda_has_estimate_figures(tmp_path, tiny_model_dir, rel, monkeypatch):
    """On a GPU the OOM line carries the estimator's peak and the longest sequence that fits the card."""
    import types

    import torch

    from slimtune.bench.hints import estimate_line
    from slimtune.config.recipe import load_recipe

    recipe = load_recipe(rel.write_recipe(tmp_path / "r.yaml", rel.recipe(tiny_model_dir, tmp_path / "run")))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=8 << 30))
    line = estimate_line(recipe, torch.device("cuda"))
    assert line.startswith("estimated peak ") and "of 8.0 GiB" in line, line
    assert "longest sequence that fits at this micro_batch:" in line, line


@pytest.mark.parametrize("adapter,expected", [
    ({"targets": ["nope_proj"]}, "adapter.targets ['nope_proj'] matched no linear layer"),
    ({"layers": [0, 7]}, "adapter.layers: [7] out of range (the model has 2 decoder layers)"),
])
def test_recipe_that_does_not_fit_the_model_is_a_recipe_error(tmp_path, tiny_model_dir, rel, adapter, expected):
    """Values only checkable against the loaded model still end as one RecipeError line (exit code 2)."""
    from slimtune.config.recipe import load_recipe
    from slimtune.errors import RecipeError
    from slimtune.train.loop import Trainer

    recipe = rel.recipe(tiny_model_dir, tmp_path / "run")
    recipe["adapter"].update(adapter)
    r = load_recipe(rel.write_recipe(tmp_path / "r.yaml", recipe))
    with pytest.raises(RecipeError) as exc:
        Trainer(r, run_dir=tmp_path / "run", base_dir=tmp_path).setup()
    assert str(exc.value).startswith(expected) and exc.value.exit_code == 2, str(exc.value)
