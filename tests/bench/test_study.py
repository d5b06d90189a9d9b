"""`slimtune study` in a tiny configuration: two kinds, two steps, the tiny Llama, through the real Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from slimtune.bench.study import Arm, render_markdown, run_study, write_results
from slimtune.config.recipe import load_recipe
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_llama")
    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_tiny_study(tiny_dir, tmp_path):
    recipe = {
        "model": {"name": str(tiny_dir)}, "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "data": {"format": "instruction", "max_seq_len": 160, "sources": [
            {"path": str(RECIPES / "data/demo_dates_train.jsonl"), "instruction_field": "prompt",
             "output_field": "answer", "max_records": 16}]},
        "train": {"lr": 1e-3, "steps": 2, "micro_batch": 2, "seed": 0, "fused": False},
        "eval": {"exact_match": [{"name": "dates", "path": str(RECIPES / "data/demo_dates_test.jsonl"),
                                  "max_examples": 2, "max_new_tokens": 3}], "batch_size": 2},
        "output": {"dir": str(tmp_path / "unused")},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(recipe))
    base = load_recipe(path)
    arms = [Arm("lora", {"kind": "lora"}, [1e-3]), Arm("full", {"kind": "full", "modules": "all-linear"}, [1e-4],
                                                        quant={"mode": "none"})]
    study = run_study(base, arms, base_dir=tmp_path, work_dir=tmp_path / "runs")
    runs = {r["arm"]: r for r in study["runs"]}
    assert set(runs) == {"lora", "full"}, runs
    assert all(r["error"] is None for r in runs.values()), [r["error"] for r in runs.values()]
    cfg = tiny_llama_config(vocab_size=len(tiny_tokenizer()))
    h, m = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)]  # (out, in) of q k v o gate up down
    assert runs["full"]["trainable_params"] == cfg.num_hidden_layers * sum(o * i for o, i in shapes)
    assert runs["lora"]["trainable_params"] == cfg.num_hidden_layers * sum(4 * (o + i) for o, i in shapes)
    for r in runs.values():  # AdamW: two fp32 moments per trained value (+ a step counter per tensor)
        assert 8 * r["trainable_params"] <= r["optimizer_bytes"] <= 8 * r["trainable_params"] + 4096
        assert r["saved_bytes_per_token"] > 0 and r["score"] is not None and r["step_seconds"] > 0
    paths = write_results(study, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["best"]["lora"]["lr"] == 1e-3
    assert "| lora | 0.001 |" in render_markdown(study) and paths["png"].stat().st_size > 1000
