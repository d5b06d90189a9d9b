"""The CLI: every command has --help; bad recipes exit 2 with one line; run → export → merge on a tiny model."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_recipe(tmp_path, model_dir, **over):
    r = {
        "description": "tiny test recipe",
        "model": {"name": str(model_dir)},
        "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "data": {"sources": [{"path": str(udhr_path("src")), "max_records": 6}], "format": "text", "max_seq_len": 32},
        "train": {"steps": 3, "micro_batch": 2, "lr": 1e-2},
        "output": {"dir": str(tmp_path / "run"), "save_merged": True},
    }
    for k, v in over.items():
        r[k] = v
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.mark.parametrize("cmd", [[], ["run"], ["validate"], ["recipes"], ["merge"], ["export"]])
def test_help(cmd):
    res = runner.invoke(app, cmd + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


@pytest.mark.parametrize(
    "mutate,where",
    [
        (lambda r: r["adapter"].update(rnak=4), "adapter.rnak: unknown key"),
        (lambda r: r["adapter"].update(rank=0), "adapter.rank"),
        (lambda r: r["train"].update(lr="fast"), "train.lr"),
        (lambda r: r["data"]["sources"][0].update(path="nope.jsonl"), "data.sources.0.path: file not found"),
        (lambda r: r.pop("model"), "model: required key is missing"),
        (lambda r: r["adapter"].update(kind="lorax"), "adapter"),
        (lambda r: r["quant"].update(mode="int3"), "quant.mode"),
    ],
)
def test_bad_recipe_exits_2_with_one_line(tmp_path, tiny_model_dir, mutate, where):
    p = write_recipe(tmp_path, tiny_model_dir)
    r = yaml.safe_load(p.read_text())
    mutate(r)
    p.write_text(yaml.safe_dump(r))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert str(p) in lines[0] and where in lines[0], lines[0]


def test_invalid_yaml_and_override_errors(tmp_path, tiny_model_dir):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {name: x\nadapter: [")
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "invalid YAML" in res.output
    good = write_recipe(tmp_path, tiny_model_dir)
    res = runner.invoke(app, ["validate", str(good), "--set", "train.micro_batch=-1"])
    assert res.exit_code == 2 and "train.micro_batch" in res.output
    res = runner.invoke(app, ["validate", str(good), "--set", "train.lr=1e-4", "--show"])
    assert res.exit_code == 0 and '"lr": 0.0001' in res.output


def test_recipes_lists_shipped_recipes():
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0
    assert "demo.yaml" in res.output


def test_run_export_merge(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = write_recipe(tmp_path, tiny_model_dir)
    res = runner.invoke(app, ["run", str(p), "--quiet"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["stages"][0]["steps"] == 3
    for sub in ("adapter_native", "adapter", "merged"):
        assert (run / sub).is_dir(), sub
    # export again through the CLI, then PEFT loads it onto the fp32 base with the merged model's logits
    res = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    res = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged32"), "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged32", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    # the adapter really trained: the merged model is not the base
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(ids).logits - fresh(ids).logits).abs().max() > 1e-3


def test_merge_errors_are_one_line(tmp_path):
    res = runner.invoke(app, ["merge", str(tmp_path), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "not a slimtune adapter folder" in res.output
