"""Pre-quantized bitsandbytes 4-bit checkpoints (issue 23, item 8): a folder saved from a
``BitsAndBytesConfig(load_in_4bit=True)`` model loads as stored (no second quantization), trains, exports a PEFT
adapter that PEFT loads onto that same pre-quantized base, merges onto its dequantized weights and is sized by
``slimtune estimate``. The checkpoint is made here on the CPU by transformers + bitsandbytes themselves."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from slimtune.adapters.export import load_native
from slimtune.cli import app
from slimtune.errors import ModelError
from slimtune.models.load import ModelConfig, QuantConfig, load_model
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path
from slimtune.ops.nf4 import dequantize_nf4

runner = CliRunner()
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    """A tiny Llama saved by transformers from a BitsAndBytesConfig(nf4, double quant, fp32 compute) load."""
    root = tmp_path_factory.mktemp("bnb")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(root / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "dense", quantization_config=cfg,
                                                           device_map="cpu")
    assert isinstance(hf.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    hf.save_pretrained(root / "q4")
    tok.save_pretrained(root / "q4")
    return root / "q4"


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _saved_weight(saved: dict, name: str, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bytes, dequantized weight) of the stored 4-bit weight ``name`` (the NF4 reference formula)."""
    parts = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}
    qs = bnbf.QuantState.from_dict(parts, device="cpu")
    return saved[name], dequantize_nf4(saved[name], qs, dtype)


def _4bit_layers(model) -> dict[str, bnb.nn.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("load", ["auto", "full"])
def test_loaded_as_stored_whatever_the_recipe_quant_says(prequantized, load):
    saved = _saved(prequantized)
    q = QuantConfig(mode="fp4", double_quant=False, blocksize=128, compute_dtype="float32")  # not the stored ones
    loaded = load_model(ModelConfig(name=str(prequantized), load=load), q, device="cpu")
    assert loaded.load_path == "stream (pre-quantized bitsandbytes nf4: kept as stored)"
    layers = _4bit_layers(loaded.model)
    assert len(layers) == 14 and "lm_head" not in layers
    for name, layer in layers.items():
        w, qs = layer.weight, layer.weight.quant_state
        assert torch.equal(w.data, saved[f"{name}.weight"]), name  # the stored bytes, not re-quantized
        assert torch.equal(qs.absmax, saved[f"{name}.weight.absmax"]), name
        assert qs.quant_type == "nf4" and qs.nested and qs.blocksize == 64 and qs.dtype == torch.float32, name
    for n, p in loaded.model.named_parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            assert p.dtype == torch.float32 and torch.equal(p, saved[n].float()), n
    # transformers' own load of the folder (bitsandbytes layers it builds itself) computes the same logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(prequantized, device_map="cpu").eval()
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_bf16_compute_declares_bf16_and_mode_none_dequantizes(prequantized):
    saved = _saved(prequantized)
    bf16 = load_model(ModelConfig(name=str(prequantized)), QuantConfig(compute_dtype="bfloat16"), device="cpu")
    assert {m.weight.quant_state.dtype for m in _4bit_layers(bf16.model).values()} == {torch.bfloat16}
    dense = load_model(ModelConfig(name=str(prequantized)), QuantConfig(mode="none", compute_dtype="float32"),
                       device="cpu")
    assert dense.load_path == "stream (pre-quantized bitsandbytes nf4: dequantized, quant.mode: none)"
    assert not _4bit_layers(dense.model)
    for i in range(2):
        for proj in PROJ:
            name = f"model.layers.{i}.{'mlp' if proj in PROJ[4:] else 'self_attn'}.{proj}"
            _, want = _saved_weight(saved, f"{name}.weight")
            assert torch.equal(dense.model.get_submodule(name).weight, want), name


def test_an_8bit_checkpoint_is_one_line(tmp_path, prequantized):
    cfg = json.loads((prequantized / "config.json").read_text())
    cfg["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True, _load_in_8bit=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="8-bit bitsandbytes checkpoint"):
        load_model(ModelConfig(name=str(tmp_path)), QuantConfig(), device="cpu")


def _recipe(tmp_path, model_dir) -> Path:
    r = {
        "description": "pre-quantized base",
        "model": {"name": str(model_dir)},
        "quant": {"mode": "fp4", "double_quant": False},  # the checkpoint's nf4 + double quant win
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8},
        "data": {"sources": [{"path": str(udhr_path("src")), "max_records": 2}], "format": "text",
                 "max_seq_len": 32},
        "train": {"steps": 8, "micro_batch": 4, "lr": 5e-2, "warmup": 0, "seed": 3},
        "output": {"dir": str(tmp_path / "run")},
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def test_run_export_peft_merge_and_gguf(tmp_path, prequantized, monkeypatch):
    import slimtune.train.loop as loop

    saved = _saved(prequantized)
    seen = []

    def spy(*args, **kwargs):  # the model the run trains, as loaded
        seen.append(load_model(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(loop, "load_model", spy)
    p = _recipe(tmp_path, prequantized)
    res = runner.invoke(app, ["run", str(p), "--quiet"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    (loaded,) = seen
    packed = {id(p.data.untyped_storage()): p for p in loaded.model.parameters() if isinstance(p, bnb.nn.Params4bit)}
    assert len(packed) == 14
    stored = [saved[k] for k in saved if k.endswith("_proj.weight")]
    for p4 in packed.values():  # every 4-bit weight trained on holds bytes of the checkpoint, untouched
        assert sum(torch.equal(p4.data, s) for s in stored) == 1

    # PEFT loads the exported adapter onto the pre-quantized base by its recorded name: slimtune's model's logits
    res = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "peft")])
    assert res.exit_code == 0, res.output
    acfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert Path(acfg["base_model_name_or_path"]) == prequantized.resolve()
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(acfg["base_model_name_or_path"], device_map="cpu")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ours = load_model(ModelConfig(name=str(prequantized)), QuantConfig(compute_dtype="float32"), device="cpu")
    load_native(ours.model, run / "adapter_native")
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.model.eval()(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=1e-5, atol=1e-5)
        with peft_model.disable_adapter():
            assert (peft_model(ids).logits - want).abs().max() > 1e-2  # the adapter trained

    # merge (both targets): the stored weights dequantized, plus scale · B A from the exported adapter
    delta = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for onto in ("original", "dequantized"):
        out = tmp_path / f"merged_{onto}"
        res = runner.invoke(app, ["merge", str(run), "--out", str(out), "--dtype", "float32", "--onto", onto])
        assert res.exit_code == 0, res.output
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        for i in range(2):
            for proj in PROJ:
                name = f"model.layers.{i}.{'mlp' if proj in PROJ[4:] else 'self_attn'}.{proj}"
                _, w = _saved_weight(saved, f"{name}.weight")
                a = delta[f"base_model.model.{name}.lora_A.weight"]
                b = delta[f"base_model.model.{name}.lora_B.weight"]
                torch.testing.assert_close(merged.get_submodule(name).weight, w + 2.0 * b @ a, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)

    # the merged GGUF reads the stored 4-bit weights dequantized (transformers' GGUF loader reads it back)
    res = runner.invoke(app, ["export", str(run), "--format", "gguf", "--quant", "F16", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    (gguf,) = (tmp_path / "g").glob("*.gguf")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=1e-2, atol=1e-2)


def test_estimate_sizes_the_stored_4bit_weights(tmp_path, prequantized):
    """``slimtune estimate`` on the recipe: the checkpoint's nf4 + double quant, not the recipe's fp4, byte for byte
    what the loaded model holds."""
    p = _recipe(tmp_path, prequantized)
    res = runner.invoke(app, ["estimate", str(p), "--json"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.output)
    assert est["inputs"]["quant"] == "nf4" and est["inputs"]["double_quant"] is True
    assert est["host_load_full_bytes"] == est["host_load_peak_bytes"]  # streamed whatever model.load says
    loaded = load_model(ModelConfig(name=str(prequantized)), QuantConfig(compute_dtype="float32"), device="cpu")
    real = 0
    for layer in _4bit_layers(loaded.model).values():
        qs = layer.weight.quant_state
        tensors = [layer.weight.data, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
        real += sum(t.numel() * t.element_size() for t in tensors)
    assert est["components_bytes"]["weights_linear"] == real


def test_loram_prunes_the_dequantized_weights(tmp_path, prequantized):
    """LoRAM's prune reads a pre-quantized base in memory, its 4-bit weights dequantized (the checkpoint streamer
    would prune the packed bytes as if they were weights)."""
    from types import SimpleNamespace

    from slimtune.loram.pipeline import prune_to_folder
    from slimtune.models.pruned import KeptIndex

    lc = SimpleNamespace(ratio=0.5, method="random", keep_first=0, keep_last=0, seed=0)
    summary = prune_to_folder(ModelConfig(name=str(prequantized)), lc, tmp_path / "pruned")
    assert summary["how"] == "in memory"
    kept = KeptIndex.load(tmp_path / "pruned")
    pruned = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    saved = _saved(prequantized)
    assert kept.layers
    for i, lk in kept.layers.items():
        name = f"model.layers.{i}.mlp.up_proj.weight"
        _, w = _saved_weight(saved, name)
        torch.testing.assert_close(pruned[name].float(), w[lk.neurons], rtol=0, atol=0)
