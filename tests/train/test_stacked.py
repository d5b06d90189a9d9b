"""``start_from: stacked``: the earlier stage's adapter stays frozen on the same 4-bit base while the next one trains
over it (y = base(x) + Δ₁x + Δ₂x), merged only at the end."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from slimtune.adapters.base import get_adapter_class
from slimtune.adapters.export import export_peft, load_native, stack_on
from slimtune.adapters.inject import adapters_of, innermost_base
from slimtune.config.recipe import load_recipe_dict
from slimtune.errors import SlimtuneError
from slimtune.models.fused import fuse_model
from slimtune.models.load import ModelConfig, QuantConfig, load_model
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
from slimtune.train import runner

TRAIN = {"lr": 1e-2, "steps": 2, "micro_batch": 2, "warmup": 0, "fused": False}
NF4 = QuantConfig(mode="nf4", compute_dtype="float32")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "base"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe(tmp_path, base, mode, steps2=3, **output):
    return load_recipe_dict({
        "name": "stk",
        "model": {"name": str(base)},
        "quant": {"mode": "nf4", "compute_dtype": "float32"},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "train": TRAIN,
        "data": {"sources": [{"path": str(udhr_path("glg")), "name": "glg"}], "format": "text", "max_seq_len": 32},
        "eval": {"perplexity": [{"path": str(udhr_path("glg")), "max_records": 2, "max_seq_len": 32, "name": "glg"}]},
        "output": {"dir": str(tmp_path / mode), **output},
        "stages": [{"name": "one", "start_from": "base"},
                   {"name": "two", "start_from": mode, "adapter": {"kind": "rslora", "rank": 8, "alpha": 4},
                    "train": {**TRAIN, "steps": steps2}}],
    })


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base):
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for mode in ("stacked", "merged"):
        runner.run_recipe(recipe(tmp, base, mode, save_merged=True, merged_dtype="float32"), base_dir=tmp)
        out[mode] = tmp / mode / "stages"
    return out


def test_stage_two_starts_exactly_at_the_stage_one_model(runs, base):
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(3))
    one = load_model(ModelConfig(name=str(base)), NF4, device="cpu").model
    load_native(one, runs["stacked"] / "one" / "adapter_native")
    trained = logits(one, ids)

    start = load_model(ModelConfig(name=str(base)), NF4, device="cpu").model
    new = stack_on(start, runs["stacked"] / "one" / "adapter_native",
                   get_adapter_class("rslora").Config(kind="rslora", rank=8, alpha=4))
    assert len(new) == len(adapters_of(start)) > 0
    assert all(not p.requires_grad for a in new.values() for n, p in a.base_layer.named_parameters())
    assert torch.equal(logits(start, ids), trained)  # the frozen Δ₁ on the same NF4 base: bit-identical

    report = fuse_model(start)  # the fused ops take one low-rank term: stacked projections fall back, with the reason
    assert any("stacked adapter (RsLoRA over a frozen LoRA)" in line for line in report.lines())
    assert torch.equal(logits(start, ids), trained)

    # merged: stage one merged into the base, re-quantized to NF4 for stage two, is another model
    requant = load_model(ModelConfig(name=str(runs["merged"] / "one" / "merged")), NF4, device="cpu").model
    diff = (logits(requant, ids) - trained).abs().max().item()
    assert diff > 1e-3 * trained.abs().max().item()

    ev = {m: json.loads((runs[m].parent / "eval.json").read_text()) for m in runs}
    ppl = {m: (ev[m]["after one"]["metrics"]["perplexity/glg"], ev[m]["before two"]["metrics"]["perplexity/glg"])
           for m in ev}
    assert ppl["stacked"][0] == pytest.approx(ppl["stacked"][1], rel=1e-6)
    assert ppl["merged"][0] != pytest.approx(ppl["merged"][1], rel=1e-6)


def test_two_stage_run_merges_base_plus_both_deltas(runs, base):
    st = runs["stacked"]
    meta = json.loads((st / "two" / "adapter_native" / "slimtune_adapter.json").read_text())
    assert meta["kind"] == "rslora" and meta["stacked_on"] == str((st / "one" / "adapter_native").resolve())
    w0 = load_file(base / "model.safetensors")
    s1 = load_file(st / "one" / "adapter_native" / "adapter_state.safetensors")
    s2 = load_file(st / "two" / "adapter_native" / "adapter_state.safetensors")
    assert not any(".base_layer." in k for k in s2)  # stage two saves its own delta only
    merged = load_file(st / "two" / "merged" / "model.safetensors")
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        d1 = (8 / 4) * s1[f"{mod}.lora_B"] @ s1[f"{mod}.lora_A"]  # lora: alpha / r
        d2 = (4 / 8 ** 0.5) * s2[f"{mod}.lora_B"] @ s2[f"{mod}.lora_A"]  # rslora: alpha / sqrt(r)
        assert d1.abs().max() > 0 and d2.abs().max() > 0
        torch.testing.assert_close(merged[f"{mod}.weight"], w0[f"{mod}.weight"] + d1 + d2, rtol=1e-5, atol=1e-6)

    # the PEFT export of the final stage is the combined delta, one plain LoRA of rank 4 + 8
    peft = load_file(st / "two" / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((st / "two" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and not cfg["use_rslora"]
    key = "base_model.model.model.layers.1.mlp.down_proj"
    mod = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(peft[f"{key}.lora_B.weight"] @ peft[f"{key}.lora_A.weight"],
                               merged[f"{mod}.weight"] - w0[f"{mod}.weight"], rtol=1e-4, atol=1e-6)


def test_peft_export_of_a_stacked_model_matches_its_logits(runs, base, tmp_path):
    from peft import PeftModel

    ids = torch.randint(0, 200, (1, 13), generator=torch.Generator().manual_seed(5))
    fp32 = QuantConfig(mode="none", compute_dtype="float32")
    ours = load_model(ModelConfig(name=str(base)), fp32, device="cpu").model
    load_native(ours, runs["stacked"] / "two" / "adapter_native")  # rebuilds the stack from stacked_on
    assert all(type(innermost_base(a)) is torch.nn.Linear for a in adapters_of(ours).values())
    export_peft(ours, tmp_path / "peft")
    ref = PeftModel.from_pretrained(load_model(ModelConfig(name=str(base)), fp32, device="cpu").model,
                                    str(tmp_path / "peft"))
    a, b = logits(ours, ids), logits(ref, ids)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_resume_inside_a_stacked_stage(tmp_path, base, runs):
    r = recipe(tmp_path, base, "stacked", steps2=3)
    first = runner.run_recipe(r, base_dir=tmp_path, stop_after=2)  # one: all 2 steps; two: 2 of 3, then stop
    assert first["interrupted"]
    second = runner.run_recipe(r, base_dir=tmp_path, resume=True)
    assert not second["interrupted"] and [s["steps"] for s in second["stages"]] == [2, 3]
    got = load_file(tmp_path / "stacked" / "stages" / "two" / "adapter_native" / "adapter_state.safetensors")
    want = load_file(runs["stacked"] / "two" / "adapter_native" / "adapter_state.safetensors")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_a_merged_recipe_after_a_stacked_one_on_a_shared_stage(tmp_path, base):
    """The shared first stage, done for a stacked recipe, wrote no merged model: the merged recipe merges it."""
    def shared(mode, sub):
        r = recipe(tmp_path / sub, base, mode, steps2=1).model_dump(mode="json")
        r["stages"][0]["output"] = {"dir": str(tmp_path / "shared_one")}
        return load_recipe_dict(r)

    runner.run_recipe(shared("stacked", "a"), base_dir=tmp_path)
    assert not (tmp_path / "shared_one" / "merged").exists()
    runner.run_recipe(shared("merged", "b"), base_dir=tmp_path)
    start = tmp_path / "b" / "merged" / "stages" / "two" / "start_merged"
    assert (start / "config.json").is_file()
    summary = json.loads((tmp_path / "b" / "merged" / "stages" / "two" / "stage_summary.json").read_text())
    assert summary["steps"] == 1


@pytest.mark.parametrize("kind, message", [("full", "needs an adapter stage"), ("dora", "has no PEFT form")])
def test_stacked_refuses_what_it_cannot_chain(tmp_path, base, kind, message):
    r = recipe(tmp_path, base, "stacked").model_dump(mode="json")
    r["stages"][1]["adapter"] = {"kind": kind} if kind == "full" else {"kind": kind, "rank": 4, "alpha": 8}
    with pytest.raises(SlimtuneError, match=message):
        runner.run_recipe(load_recipe_dict(r), base_dir=tmp_path)


def test_three_stacked_stages_merge_every_delta(tmp_path, base):
    r = recipe(tmp_path, base, "stacked", steps2=1, save_merged=True, merged_dtype="float32").model_dump(mode="json")
    r["stages"].append({"name": "three", "start_from": "stacked", "train": {**TRAIN, "steps": 1}})
    runner.run_recipe(load_recipe_dict(r), base_dir=tmp_path)
    st = tmp_path / "stacked" / "stages"
    mod = "model.layers.1.self_attn.v_proj"
    scales = {"one": 8 / 4, "two": 4 / 8 ** 0.5, "three": 8 / 4}
    want = load_file(base / "model.safetensors")[f"{mod}.weight"].clone()
    for name, s in scales.items():
        t = load_file(st / name / "adapter_native" / "adapter_state.safetensors")
        want += s * t[f"{mod}.lora_B"] @ t[f"{mod}.lora_A"]
    got = load_file(st / "three" / "merged" / "model.safetensors")[f"{mod}.weight"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
