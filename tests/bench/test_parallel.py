"""Per-rank memory of DDP / FSDP runs (slimtune.bench.parallel): one rank is the single GPU, DDP replicates, FSDP
shards the packed 4-bit base and the adapter state but not the quant state, lm_head or a tied embedding; the
hand-computable config checks every sharded byte; `slimtune estimate --nproc N` prints and emits it."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.bench.estimate import GiB, estimate, quantized_weight_bytes
from slimtune.bench.parallel import COMPONENTS, _fsdp_parts, _inventory_of, per_rank
from slimtune.cli import app
from slimtune.errors import SlimtuneError


def _hand_config():
    """hidden 128, MLP 320, 2 layers, 4 heads / 2 KV heads (head_dim 32), vocab 1000, untied."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


# Per layer: q 128x128, k 64x128, v 64x128, o 128x128, gate/up 320x128, down 128x320 (out x in).
_SHAPES = [(128, 128), (64, 128), (64, 128), (128, 128), (320, 128), (320, 128), (128, 320)]
_RANK = 8


@pytest.fixture(scope="module")
def hand():
    return estimate(_hand_config(), quant="nf4", compute_dtype="bf16", rank=_RANK, seq_len=64, micro_batch=2,
                    gpu_mem_gib=24)


@pytest.fixture(scope="module")
def llama70b():
    """The unpruned 70B of recipes/loram_llama31_70b_gsm8k.yaml: NF4, LoRA r8 on the seven projections, 512 x 4."""
    return estimate("Llama-3.1-70B", quant="nf4", rank=8, lora_dropout=0.05, seq_len=512, micro_batch=4,
                    grad_checkpointing="full", gpu_mem_gib=24)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_rank_is_the_single_gpu_estimate(hand, mode):
    one = per_rank(hand, 1, mode, grad_accum=1)
    assert one.components == {**hand.components(), "fsdp_unsharded": 0}
    assert one.total_bytes == hand.total_bytes
    assert one.max_seq_len_that_fits() == hand.max_seq_len_that_fits()
    # and the sharding formulas themselves are the identity on one rank (every shard is the whole tensor)
    parts = _fsdp_parts(hand, _inventory_of(hand), 1, 1, 2)
    assert all(full == rank for k, (full, rank) in parts.items() if k != "fsdp_unsharded"), parts
    assert parts["weights_linear"][0] > 0 and parts["fsdp_unsharded"] == (0, 0)


@pytest.mark.parametrize("n", [2, 8])
def test_ddp_holds_the_full_step_on_every_rank(llama70b, n):
    r = per_rank(llama70b, n, "ddp", grad_accum=32)
    assert r.components == r.single and r.total_bytes == llama70b.total_bytes


@pytest.mark.parametrize("n", [2, 3, 8])
def test_fsdp_shards_every_parameter_byte_by_hand(hand, n):
    """Every component against bytes computed here from the shapes: bf16 quant_storage elements chunked on dim 0."""
    r = per_rank(hand, n, "fsdp", grad_accum=1)
    sizes = [o * i for o, i in _SHAPES] * 2
    quant_state = sum(quantized_weight_bytes(x) - x // 2 for x in sizes)
    packed_rank = sum(math.ceil(x // 2 // 2 / n) * 2 for x in sizes)  # bf16 elements of the packed bytes
    assert r.components["weights_linear"] == quant_state + packed_rank
    # lm_head (1000 x 128, bf16) and the frozen untied input table: both whole on every rank
    assert r.components["weights_embed"] == 2 * 1000 * 128 * 2
    assert r.components["weights_other"] == math.ceil((2 * 2 * 128 + 128) / n) * 2
    lora = [x for o, i in _SHAPES for x in (_RANK * i, o * _RANK)] * 2  # A (r, in), B (out, r), fp32
    assert r.components["adapter_params"] == sum(math.ceil(x / n) * 4 for x in lora)
    assert r.components["optimizer"] == sum(2 * math.ceil(x / n) * 4 for x in lora)  # AdamW: two fp32 moments
    one_layer = sum(lora) // 2 * 4
    assert r.components["adapter_grads"] == sum(math.ceil(x / n) * 4 for x in lora) + one_layer
    layer = sum(x // 2 for x in sizes) // 2 + 2 * 128 * 2 + one_layer  # packed base + two norms + adapter
    assert r.components["fsdp_unsharded"] == 2 * layer + 128 * 2  # + the root's own: the final norm
    for k in ("layer_inputs", "activations", "logits", "dequant", "cuda_context"):
        assert r.components[k] == hand.components()[k]


def test_fsdp_sharded_parts_scale_as_one_over_n_and_replicated_parts_do_not(llama70b):
    runs = {n: per_rank(llama70b, n, "fsdp", grad_accum=32) for n in (2, 4, 8)}
    for n, r in runs.items():
        assert r.replicated == runs[2].replicated  # the same bytes stay whole whatever N
        for k in ("weights_linear", "weights_embed", "weights_other", "adapter_params", "optimizer"):
            shard = r.components[k] - r.replicated[k]
            assert r.sharded[k] / n <= shard <= r.sharded[k] / n * 1.01 + 8 * n, (k, n)
    # the quant state stays: 70B linears in NF4 + double quant keep ~1/64 byte per value whole on every rank
    numel = sum(int(x) for x in (8192 * 8192 * 2 + 1024 * 8192 * 2 + 28672 * 8192 * 3,)) * 80
    assert numel / 64 < runs[8].replicated["weights_linear"] < numel / 64 * 1.02
    assert runs[8].sharded["weights_linear"] == numel // 2
    # grad_accum > 1: the micro-steps skip the reduce-scatter: whole gradients on every rank
    assert runs[8].components["adapter_grads"] == llama70b.adapter_grad_bytes
    assert per_rank(llama70b, 8, "fsdp", grad_accum=1).components["adapter_grads"] < llama70b.adapter_grad_bytes / 4


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B", "SmolLM2-135M"])
def test_a_tied_embedding_stays_replicated(name):
    est = estimate(name, quant="nf4", rank=16, seq_len=1024)
    r = per_rank(est, 8, "fsdp", grad_accum=4)
    assert r.components["weights_embed"] == est.weights_embed_bytes and r.sharded["weights_embed"] == 0
    assert r.components["weights_linear"] < est.weights_linear_bytes / 4


def test_llama70b_fits_24gib_only_sharded(llama70b):
    ddp = per_rank(llama70b, 8, "ddp", grad_accum=32)
    fsdp = per_rank(llama70b, 8, "fsdp", grad_accum=32)
    assert not ddp.fits(24) and ddp.max_seq_len_that_fits(24) == 0
    assert fsdp.total_bytes < 0.5 * ddp.total_bytes and fsdp.fits(24)
    assert fsdp.max_seq_len_that_fits(24) >= 512
    assert fsdp.components["fsdp_unsharded"] > 0 and fsdp.to_json(24)["fits"] is True


def test_refusals_and_bad_input(hand):
    with pytest.raises(SlimtuneError, match="train.distributed"):
        per_rank(hand, 2, "zero")
    with pytest.raises(SlimtuneError, match="nproc"):
        per_rank(hand, 0, "ddp")
    eight = hand.reestimate(optimizer="adamw8bit", adapter_dtype="bfloat16")  # masters + 8-bit state, sharded
    assert per_rank(eight, 1, "fsdp").total_bytes == eight.total_bytes
    assert per_rank(eight, 4, "fsdp").components["optimizer"] < eight.optimizer_bytes / 2
    host = hand.reestimate(optimizer_on="cpu")
    assert per_rank(host, 4, "fsdp").components["optimizer"] == host.optimizer_bytes == 0
    with pytest.raises(SlimtuneError, match="LoRAM"):
        per_rank(hand.reestimate(loram={"ratio": 0.5, "keep_first": 0, "keep_last": 0}), 2, "fsdp")


# ----------------------------------------------------------------------------------------------- the CLI
runner = CliRunner()


def _recipe(tmp_path, **train):
    from slimtune.models.tiny import udhr_path

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "model": {"name": "meta-llama/Llama-3.1-8B"}, "quant": {"mode": "nf4"},
        "adapter": {"kind": "lora", "rank": 16, "alpha": 32},
        "data": {"sources": [{"path": str(udhr_path("src"))}], "format": "text", "max_seq_len": 2048},
        "train": {"micro_batch": 1, "grad_accum": 8, "grad_checkpointing": "full", **train},
        "output": {"dir": str(tmp_path / "run")}}))
    return p


def test_cli_estimate_nproc_fsdp_table_and_json(tmp_path):
    p = _recipe(tmp_path)
    res = runner.invoke(app, ["estimate", str(p), "--nproc", "2", "--set", "train.distributed=fsdp"])
    assert res.exit_code == 0, res.output
    flat = "".join(res.output.split())
    assert "perrank:fsdpon2GPUs" in flat and "perrank(fsdp,2)" in flat and "perrankofanFSDPrunon2GPUs" in flat
    assert "all-gatheredlayersinflight" in flat and "globalbatch1x8x2=16sequences" in flat

    out = runner.invoke(app, ["estimate", str(p), "--json", "--nproc", "2", "--set", "train.distributed=fsdp"])
    ddp = runner.invoke(app, ["estimate", str(p), "--json", "--nproc", "2"])
    assert out.exit_code == 0 and ddp.exit_code == 0, out.output + ddp.output
    a, b = json.loads(out.output)["per_rank"], json.loads(ddp.output)["per_rank"]
    assert (a["mode"], a["nproc"], a["grad_accum"], b["mode"]) == ("fsdp", 2, 8, "ddp")
    assert set(a["components_bytes"]) == set(COMPONENTS)
    assert a["total_bytes"] == sum(a["components_bytes"].values()) == json.loads(out.output)["per_rank_total_bytes"]
    assert b["total_bytes"] == json.loads(ddp.output)["total_bytes"] == b["single_gpu_total_bytes"]
    assert a["total_bytes"] < b["total_bytes"] - GiB  # half the 3.6 GiB NF4 base goes to the other rank
    assert a["fits"] is True and a["gpu_mem_gib"] == 24.0


def test_cli_estimate_nproc_bad_input_is_one_line(tmp_path):
    p = _recipe(tmp_path)
    for args in (["--set", "train.distributed=zero"], ["--set", "train.distributed=fsdp",
                                                        "--set", "adapter.kind=full"]):
        res = runner.invoke(app, ["estimate", str(p), "--nproc", "2", *args])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "distributed" in res.output
