"""SFT → DPO as a two-stage recipe with `start_from: stacked`: the DPO reference is the SFT model (the SFT adapter
stays frozen under the DPO adapter and is kept when the adapters are switched off), computed in the step or
precomputed to the run folder; held-out pairs are evaluated during training; exports as for SFT."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from slimtune.config.recipe import load_recipe_dict
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer
from slimtune.objectives.reference import REF_FILE
from slimtune.train import runner

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"
TRAIN = {"lr": 1e-2, "steps": 2, "micro_batch": 2, "warmup": 0, "fused": False, "seed": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe(tmp_path, base, precompute):
    return load_recipe_dict({
        "name": "sft-dpo", "model": {"name": str(base)}, "quant": {"mode": "nf4", "compute_dtype": "float32"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8}, "train": TRAIN,
        "data": {"sources": [{"path": str(DATA / "demo_dates_train.jsonl"), "instruction_field": "prompt",
                              "output_field": "answer", "max_records": 8}], "format": "instruction",
                 "max_seq_len": 128},
        "output": {"dir": str(tmp_path / "run"), "export_peft": True},
        "stages": [{"name": "sft", "start_from": "base"},
                   {"name": "dpo", "start_from": "stacked",
                    "data": {"sources": [{"path": str(DATA / "demo_dates_pref_train.jsonl"), "max_records": 10}],
                             "format": "preference", "max_seq_len": 128, "val_split": 4},
                    "train": {**TRAIN, "steps": 3, "objective": "dpo", "eval_every": 3,
                              "preference": {"beta": 0.5, "precompute_reference": precompute}}}],
    })


@pytest.mark.parametrize("precompute", [False, True])
def test_sft_then_dpo_stacked(tmp_path, base, precompute):
    runner.run_recipe(recipe(tmp_path, base, precompute), base_dir=tmp_path)
    stage = tmp_path / "run" / "stages" / "dpo"
    rows = [json.loads(ln) for ln in (stage / "metrics.jsonl").read_text().splitlines()]
    # step 1: the DPO adapter starts at zero over the frozen SFT adapter, so the policy is the SFT model; the loss is
    # log 2 only if the reference is the SFT model too (the bare base would give other log-probs)
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # fp32 sums of other batch shapes
    assert rows[-1]["rewards/margins"] != 0.0
    val = [json.loads(ln) for ln in (stage / "val_metrics.jsonl").read_text().splitlines()]
    assert val[-1]["step"] == 3 and val[-1]["val_examples"] == 4 and 0 <= val[-1]["val_rewards_accuracies"] <= 1
    assert (stage / REF_FILE).is_file() == precompute
    if precompute:  # stored: 6 training + 4 held-out pairs, (chosen, rejected) each
        assert load_file(stage / REF_FILE)["values"].shape == (10, 2)
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()  # the PEFT export of SFT + DPO
