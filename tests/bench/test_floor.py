"""The memory floor of issue 16: Llama-3.1-8B QLoRA r16 all-linear at 2048 x 2 in <= 6.0 GiB with the recipe's
settings, >= 128k tokens at batch 1 on 24 GiB, and ``estimate --explain``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.bench.estimate import GiB, estimate
from slimtune.bench.recipe_estimate import estimate_for_recipe
from slimtune.bench.floor import explain, host_ram
from slimtune.config.recipe import load_recipe
from slimtune.errors import SlimtuneError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama31_8b_floor.yaml"


def test_floor_recipe_is_under_6_gib_and_reaches_128k_at_batch_1():
    est = estimate_for_recipe(load_recipe(RECIPE), 24)
    assert est.inputs["seq_len"] == 2048 and est.inputs["micro_batch"] == 2 and est.inputs["rank"] == 16
    assert est.total_bytes <= 6.0 * GiB, est.total_bytes / GiB
    assert est.reestimate(micro_batch=1).max_seq_len_that_fits(24) >= 128 * 1024
    comp = est.components()
    assert comp["dequant"] == 0  # the NF4 head is streamed: no dense copy of it
    assert est.host_bytes["embedding table (pinned)"] == 128256 * 4096 * 2
    assert est.host_bytes["offloaded layer inputs (pinned)"] == 32 * 2048 * 2 * 4096 * 2


def test_each_switch_is_worth_what_its_term_says():
    base = estimate("Llama-3.1-8B", seq_len=2048, micro_batch=2, rank=16)
    head = base.reestimate(quantize_lm_head=True)
    # the head: 0.98 GiB bf16 -> its NF4 bytes, and no dequantized copy
    assert base.weights_embed_bytes - head.weights_embed_bytes == 128256 * 4096 * 2
    assert head.dequant_bytes == 0 and head.weights_linear_bytes > base.weights_linear_bytes
    table = head.reestimate(embeddings_on="cpu")
    assert table.weights_embed_bytes == 0 and head.total_bytes - table.total_bytes == 128256 * 4096 * 2
    # bf16 adapters with fp32 masters on the device: the same bytes as fp32 adapters (2 + 2 + 4 = 4 + 4)
    bf16 = base.reestimate(adapter_dtype="bfloat16")
    assert (bf16.adapter_param_bytes + bf16.adapter_grad_bytes + bf16.optimizer_bytes
            == base.adapter_param_bytes + base.adapter_grad_bytes + base.optimizer_bytes)
    host = bf16.reestimate(optimizer_on="cpu")
    assert host.optimizer_bytes == 0 and host.host_bytes["optimizer: fp32 masters + state"] == bf16.optimizer_bytes


def test_explain_ladder_goes_down_and_marks_the_recipe():
    est = estimate_for_recipe(load_recipe(RECIPE), 24)
    rows = explain(est, 24)
    assert rows[0].label == "every memory switch off" and rows[0].gpu_bytes > 7.5 * GiB
    assert all(b.gpu_bytes <= a.gpu_bytes for a, b in zip(rows, rows[1:]))
    on = [r for r in rows if r.in_recipe]
    assert [r.keys for r in on] == ["quant.quantize_lm_head: true", "train.embeddings_on: cpu",
                                    "train.grad_checkpointing: offload", "train.optimizer: adamw8bit"]
    assert on[-1].gpu_bytes == est.total_bytes
    assert rows[-1].max_seq_len_batch1 >= rows[0].max_seq_len_batch1
    assert "load peak (streamed: one tensor + one quantization chunk)" in host_ram(est)


def test_tied_dense_head_cannot_leave_the_table_on_the_host():
    with pytest.raises(SlimtuneError, match="embeddings_on: cpu: lm_head is tied"):
        estimate("SmolLM2-135M", embeddings_on="cpu")
    est = estimate("SmolLM2-135M", embeddings_on="cpu", quantize_lm_head=True)  # the head gets its own NF4 copy
    assert est.weights_embed_bytes == 0


def test_cli_explain(tmp_path):
    from typer.testing import CliRunner

    from slimtune.cli import app

    res = CliRunner().invoke(app, ["estimate", str(RECIPE), "--explain"])
    assert res.exit_code == 0, res.output
    assert "memory floor" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["estimate", str(RECIPE), "--json", "--explain"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["host_bytes"]["embedding table (pinned)"] == 128256 * 4096 * 2
    floor = data["floor"]
    assert floor[0]["label"] == "every memory switch off"
    assert [r["keys"] for r in floor if r["in_recipe"]][1] == "train.embeddings_on: cpu"
    assert min(r["gpu_bytes"] for r in floor) <= 6.0 * GiB <= floor[0]["gpu_bytes"]
