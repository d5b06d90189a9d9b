"""Multi-stage runs: resume without redoing finished stages, merge/eval/arithmetic stages, shared stage folders."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from slimtune.config.recipe import load_recipe_dict
from slimtune.errors import RecipeError
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
from slimtune.train import runner
from slimtune.train.loop import Trainer


def tiny_dir(path, seed=0):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp("tiny") / "base")


def make(tmp_path, base, stages, **extra):
    data = {
        "name": "st",
        "model": {"name": str(base)},
        "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "train": {"lr": 1e-2, "steps": 2, "micro_batch": 2, "warmup": 0, "fused": False},
        "data": {"sources": [{"path": str(udhr_path("glg")), "name": "glg"}], "format": "text", "max_seq_len": 32},
        "eval": {"perplexity": [{"path": str(udhr_path("glg")), "max_records": 2, "max_seq_len": 32, "name": "glg"}]},
        "output": {"dir": str(tmp_path / "run")},
        "stages": stages,
        **extra,
    }
    return load_recipe_dict(data)


@pytest.fixture
def made(monkeypatch):
    """Names of the stages a Trainer was built for."""
    names: list[str] = []

    class Recording(Trainer):
        def __post_init__(self):
            names.append(self.stage)
            super().__post_init__()

    monkeypatch.setattr(runner, "Trainer", Recording)
    return names


def test_interrupted_stage_two_resumes_without_redoing_stage_one(tmp_path, base, made):
    stages = [{"name": "one", "start_from": "base"},
              {"name": "two", "start_from": "merged",
               "train": {"lr": 1e-2, "steps": 4, "micro_batch": 2, "warmup": 0, "fused": False}}]
    r = make(tmp_path, base, stages)
    first = runner.run_recipe(r, base_dir=tmp_path, stop_after=3)
    assert first["interrupted"] and made == ["one", "two"]
    one = tmp_path / "run" / "stages" / "one"
    done_one = (one / "stage_summary.json").read_bytes()
    metrics_one = (one / "metrics.jsonl").read_bytes()
    assert json.loads(done_one)["tokens_per_source"]["glg"] > 0

    made.clear()
    second = runner.run_recipe(r, base_dir=tmp_path, resume=True)
    assert not second["interrupted"] and made == ["two"]  # stage one is not redone
    assert (one / "stage_summary.json").read_bytes() == done_one and (one / "metrics.jsonl").read_bytes() == metrics_one
    assert [s["steps"] for s in second["stages"]] == [2, 4]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(report) == ["before one", "after one", "before two", "after two"]

    made.clear()
    third = runner.run_recipe(r, base_dir=tmp_path)
    assert made == [] and [s["stage"] for s in third["stages"]] == ["one", "two"]


def test_merge_eval_and_arithmetic_stages(tmp_path, base, made):
    instruct = tiny_dir(tmp_path / "instruct", seed=1)
    stages = [{"name": "a", "start_from": "base"},
              {"name": "m", "kind": "merge"},
              {"name": "e", "kind": "eval", "start_from": "merged"},
              {"name": "x", "kind": "arithmetic", "arithmetic": {"instruct": str(instruct), "lam": 0.5}}]
    r = make(tmp_path, base, stages, output={"dir": str(tmp_path / "run"), "merged_dtype": "float32"})
    result = runner.run_recipe(r, base_dir=tmp_path)
    assert made == ["a"] and [s["stage"] for s in result["stages"]] == ["a", "m", "e", "x"]
    st = tmp_path / "run" / "stages"
    prev = load_file(st / "m" / "merged" / "model.safetensors")
    out = load_file(st / "x" / "merged" / "model.safetensors")
    b, i = load_file(base / "model.safetensors"), load_file(instruct / "model.safetensors")
    for key in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(out[key], prev[key] + 0.5 * (i[key] - b[key]), rtol=1e-5, atol=1e-6)
    assert not torch.equal(prev["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"])
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(report) == ["before a", "after a", "e", "after x"]
    assert all("perplexity/glg" in report[k]["metrics"] for k in report)
    assert json.loads((st / "x" / "merged" / "slimtune_arithmetic.json").read_text())["lam"] == 0.5

    made.clear()
    runner.run_recipe(r, base_dir=tmp_path)  # everything done: nothing is recomputed
    assert made == []


def test_stages_share_a_folder_across_recipes(tmp_path, base, made):
    shared = {"name": "cpt", "start_from": "base", "output": {"dir": str(tmp_path / "shared_cpt")},
              "data": {"sources": [{"path": str(udhr_path("glg")), "name": "glg"}], "format": "text",
                       "max_seq_len": 32, "holdout": 3}}
    ev = {"holdout_perplexity": True,
          "perplexity": [{"path": str(udhr_path("glg")), "max_records": 1, "max_seq_len": 32, "name": "glg"}]}
    a = make(tmp_path / "a", base, [shared, {"name": "sft", "start_from": "merged"}], eval=ev)
    b = make(tmp_path / "b", base, [shared, {"name": "sft", "start_from": "merged",
                                             "adapter": {"kind": "rslora", "rank": 8, "alpha": 8}}], eval=ev)
    runner.run_recipe(a, base_dir=tmp_path)
    assert made == ["cpt", "sft"]
    made.clear()
    runner.run_recipe(b, base_dir=tmp_path)
    assert made == ["sft"]
    report = json.loads((tmp_path / "b" / "run" / "eval.json").read_text())
    assert "after cpt" in report and "perplexity/holdout:glg" in report["after cpt"]["metrics"]
    assert (tmp_path / "shared_cpt" / "merged" / "config.json").is_file()


@pytest.mark.parametrize("stages, message", [
    ([{"name": "m", "kind": "merge"}], "a merge stage needs a previous stage"),
    ([{"name": "x", "kind": "arithmetic"}], "arithmetic: required exactly when kind is arithmetic"),
    ([{"name": "t"}, {"name": "e", "kind": "eval", "data": {"sources": [{"path": "x.jsonl"}]}}],
     "data: not allowed in a eval stage"),
    ([{"name": "t", "arithmetic": {"instruct": "x"}}], "arithmetic: required exactly"),
])
def test_stage_kind_errors(tmp_path, base, stages, message):
    with pytest.raises(RecipeError, match=message):
        make(tmp_path, base, stages)
