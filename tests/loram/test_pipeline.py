"""LoRAM as one recipe on a tiny Llama saved to disk: prune 50% → train LoRA on the pruned model → recover → merge
into the original → evaluate; re-runs skip; the QLoRAM loader hook; alignment; the CLI; the shipped recipes; the
estimator's pruned shapes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file

from slimtune.config.recipe import load_recipe, load_recipe_dict
from slimtune.errors import SlimtuneError
from slimtune.loram.prune import KeptIndex
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path, udhr_texts
from slimtune.train.report import SilentReporter
from slimtune.loram.pipeline import run_loram

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _recipe(tmp: Path, base: Path, *, out: str = "run", **over) -> object:
    data = {
        "name": "loram-tiny",
        "model": {"name": str(base), "attn_implementation": "eager"},
        "quant": {"mode": "nf4"},  # QLoRAM: the pruned base in NF4
        "adapter": {"kind": "lora", "rank": 8, "alpha": 16},
        "data": {"sources": [{"path": str(udhr_path("eng"))}], "format": "text", "max_seq_len": 32, "holdout": 4},
        "train": {"lr": 1e-2, "steps": 16, "micro_batch": 8, "warmup": 0, "seed": 3, "fused": False},
        "output": {"dir": str(tmp / out), "merged_dtype": "float32"},
        "loram": {"ratio": 0.5, "keep_first": 1, "keep_last": 1},
    }
    for key, value in over.items():
        data[key] = value
    return load_recipe_dict(data)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread is faster, and far faster on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny 4-layer Llama (GQA 4/2, MLP 136) + the tiny tokenizer, saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("base") / "tiny"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), num_hidden_layers=4))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loram")
    recipe = _recipe(tmp, base)
    reporter = SilentReporter()
    result = run_loram(recipe, base_dir=tmp, reporter=reporter)
    return SimpleNamespace(tmp=tmp, recipe=recipe, result=result, dir=Path(result["run_dir"]), reporter=reporter)


def _load(path: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def _text_loss(model, texts: list[str]) -> float:
    tok = tiny_tokenizer()
    total, n = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"][:64]])
        out = model(input_ids=ids, labels=ids)
        total += float(out.loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return total / n


def test_pipeline_prunes_trains_recovers_and_improves_the_original(run, base):
    d, info = run.dir, run.result["loram"]
    kept = KeptIndex.load(d / "pruned")
    assert sorted(kept.layers) == [1, 2] and all(len(v.kv_heads) == 1 and len(v.neurons) == 68
                                                  for v in kept.layers.values())
    red = info["prune"]["reduction"]
    assert red["param_reduction"] > 1 and red["paper_reduction"] > red["param_reduction"] * 3.9

    # trained on the pruned shapes, recovered to the original ones (zero rows/columns at pruned positions)
    trained = load_file(d / "train" / "adapter" / "adapter_model.safetensors")
    recovered = load_file(d / "adapter_recovered" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    assert trained[key].shape == (32, 8) and recovered[key].shape == (64, 8)
    keep = kept.channels(1, "q_proj")
    torch.testing.assert_close(recovered[key][keep], trained[key])
    mask = torch.ones(64, dtype=torch.bool)
    mask[keep] = False
    assert recovered[key][mask].abs().sum() == 0 and trained[key].abs().sum() > 0
    down_a = "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"
    assert trained[down_a].shape == (8, 68) and recovered[down_a].shape == (8, 136)
    rec_cfg = json.loads((d / "adapter_recovered" / "adapter_config.json").read_text())
    assert rec_cfg["base_model_name_or_path"] == str(base)

    # merged = original + recovered adapter, exactly what PEFT computes with the recovered adapter on the original
    from peft import PeftModel

    original, merged = _load(base), _load(d / "merged")
    ids = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(_load(base), d / "adapter_recovered").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
        delta = merged.model.layers[1].self_attn.q_proj.weight - original.model.layers[1].self_attn.q_proj.weight
    assert delta[mask].abs().max() == 0 and delta[~mask].abs().max() > 0

    # the ORIGINAL model got better on the training text and on the held-out articles
    assert _text_loss(merged, udhr_texts("eng")) < _text_loss(original, udhr_texts("eng")) - 0.05
    ev = info["eval"]
    assert ev["merged"]["heldout"]["loss"] < ev["original"]["heldout"]["loss"]
    assert ev["original"]["heldout"]["records"] == 4
    md = (d / "eval.md").read_text()
    assert "original + recovered adapter" in md and "held-out" in md
    assert json.loads((d / "run_summary.json").read_text())["loram"]["prune"]["reduction"] == red


def test_rerun_skips_every_finished_step(run):
    merged = run.dir / "merged" / "model.safetensors"
    stamp = merged.stat().st_mtime_ns
    reporter = SilentReporter()
    again = run_loram(run.recipe, base_dir=run.tmp, reporter=reporter)
    log = "\n".join(reporter.messages)
    assert "LoRAM prune: already done" in log and "already done" in log.split("LoRAM prune")[1]
    assert "LoRAM merge: already done" in log and "LoRAM eval: already done" in log
    assert not reporter.steps and merged.stat().st_mtime_ns == stamp
    assert again["loram"]["eval"] == run.result["loram"]["eval"]


def test_aligned_pipeline_resumes_an_interrupted_training(base, tmp_path):
    align = {"data": {"sources": [{"path": str(udhr_path("eng")), "max_records": 4}], "max_seq_len": 32},
             "train": {"lr": 1e-3, "steps": 2, "micro_batch": 4}}
    r = _recipe(tmp_path, base, quant={"mode": "none"},
                train={"lr": 1e-2, "steps": 4, "micro_batch": 4, "warmup": 0, "seed": 3, "fused": False},
                loram={"ratio": 0.5, "keep_first": 1, "keep_last": 1, "align": align})
    first = run_loram(r, base_dir=tmp_path, stop_after=2)
    d = Path(first["run_dir"])
    assert first["interrupted"] and first["stages"][-1]["steps"] == 2 and not (d / "adapter_recovered").exists()
    assert (d / "aligned" / "loram.json").is_file() and first["loram"]["align"]["steps"] == 2
    assert not (d / "train" / "adapter_native").exists()  # nothing exported before training finished
    reporter = SilentReporter()
    done = run_loram(r, base_dir=tmp_path, reporter=reporter, resume=True)
    assert not done["interrupted"] and done["stages"][-1]["steps"] == 4 and len(reporter.steps) == 2
    log = "\n".join(reporter.messages)
    assert "LoRAM prune: already done" in log and "LoRAM align: already done" in log
    native = json.loads((d / "train" / "adapter_native" / "slimtune_adapter.json").read_text())
    assert native["base_model"] == str(d / "aligned")  # the adapter was trained on the aligned pruned model
    assert (d / "merged" / "model.safetensors").is_file() and done["loram"]["eval"]["merged"]["heldout"]


def test_loader_loads_a_pruned_folder_quantized(run):
    """QLoRAM: the model loader recognises loram.json and quantizes the pruned shapes to NF4."""
    import bitsandbytes as bnb

    from slimtune.models.load import ModelConfig, QuantConfig, load_model

    loaded = load_model(ModelConfig(name=str(run.dir / "pruned")), QuantConfig(mode="nf4"), device="cpu")
    q = loaded.model.model.layers[1].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and (q.out_features, q.in_features) == (32, 64)
    assert loaded.model.model.layers[0].self_attn.q_proj.out_features == 64
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(out).all()


def test_align_trains_everything_but_lm_head(run, tmp_path):
    from slimtune.config.recipe import LoramAlignConfig
    from slimtune.loram.align import align_pruned
    from slimtune.loram.prune import load_pruned

    cfg = LoramAlignConfig.model_validate({
        "data": {"sources": [{"path": str(udhr_path("eng")), "max_records": 8}], "format": "text", "max_seq_len": 32},
        "train": {"lr": 3e-3, "steps": 4, "micro_batch": 4, "warmup": 0, "seed": 1},
    })
    summary = align_pruned(run.dir / "pruned", tmp_path / "aligned", cfg)
    assert summary["final_loss"] < summary["first_loss"]
    before, after = load_pruned(run.dir / "pruned"), load_pruned(tmp_path / "aligned")
    assert torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert not torch.equal(before.model.layers[1].mlp.down_proj.weight, after.model.layers[1].mlp.down_proj.weight)
    assert not torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight)
    assert KeptIndex.load(tmp_path / "aligned").to_dict() == KeptIndex.load(run.dir / "pruned").to_dict()
    assert align_pruned(run.dir / "pruned", tmp_path / "aligned", cfg) == summary  # done once, reused


def test_cli_prune_and_recover(run, base, tmp_path):
    from typer.testing import CliRunner

    from slimtune.cli import app

    cli = CliRunner()
    res = cli.invoke(app, ["loram", "prune", "--model", str(base), "--ratio", "0.5", "--out", str(tmp_path / "p"),
                           "--keep-first", "1", "--keep-last", "1"])
    assert res.exit_code == 0, res.output
    assert "2 layers" in res.output and "paper's convention" in res.output
    assert KeptIndex.load(tmp_path / "p").to_dict()["layers"] == KeptIndex.load(run.dir / "pruned").to_dict()["layers"]
    res = cli.invoke(app, ["loram", "recover", "--adapter", str(run.dir), "--pruned", str(tmp_path / "p"),
                           "--out", str(tmp_path / "rec")])
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "rec" / "adapter_model.safetensors")
    want = load_file(run.dir / "adapter_recovered" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    res = cli.invoke(app, ["loram", "prune", "--model", str(base), "--ratio", "1.5", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "ratio must be in [0, 1)" in res.output


def test_reusing_a_pruned_dir_with_other_settings_is_refused(run, base):
    from slimtune.loram.pipeline import prune_to_folder
    from slimtune.models.load import ModelConfig

    other = SimpleNamespace(ratio=0.25, method="magnitude", keep_first=1, keep_last=1, seed=0)
    with pytest.raises(SlimtuneError, match="pruned_dir"):
        prune_to_folder(ModelConfig(name=str(base)), other, run.dir / "pruned")


def test_unrecoverable_adapters_are_refused_before_training(run, base):
    from slimtune.loram.pipeline import _check_trainable_on_pruned

    kept = KeptIndex.load(run.dir / "pruned")
    dora = _recipe(run.tmp, base, adapter={"kind": "dora", "rank": 4})
    with pytest.raises(SlimtuneError, match="DoRA"):
        _check_trainable_on_pruned(dora, kept)
    _check_trainable_on_pruned(_recipe(run.tmp, base, adapter={"kind": "dora", "rank": 4, "layers": [0, 3]}), kept)
    full = _recipe(run.tmp, base, adapter={"kind": "lora", "rank": 4, "modules_to_save": ["up_proj"]})
    with pytest.raises(SlimtuneError, match="modules_to_save"):
        _check_trainable_on_pruned(full, kept)


def test_adapter_chain_follows_start_from(base, tmp_path):
    from slimtune.loram.pipeline import adapter_chain

    data = {"sources": [{"path": str(udhr_path("eng"))}], "format": "text"}
    r = _recipe(tmp_path, base, stages=[{"name": "a", "start_from": "base", "data": data},
                                         {"name": "b", "start_from": "merged"},
                                         {"name": "c", "start_from": "adapter"}])
    chain = adapter_chain(r, tmp_path / "train")
    assert [n for n, _ in chain] == ["a", "c"] and chain[1][1] == tmp_path / "train" / "stages" / "c" / "adapter"


def test_stacked_stages_recover_and_merge_every_adapter(base, tmp_path):
    """stages base → merged: stage b trains on the pruned model with a's adapter merged (the merged pruned folder
    keeps loram.json); both adapters are recovered and added to the original."""
    data = {"sources": [{"path": str(udhr_path("eng")), "max_records": 10}], "format": "text", "max_seq_len": 32}
    r = _recipe(tmp_path, base, quant={"mode": "none"},
                train={"lr": 1e-2, "steps": 3, "micro_batch": 4, "fused": False},
                stages=[{"name": "a", "start_from": "base", "data": data}, {"name": "b", "start_from": "merged"}])
    d = Path(run_loram(r, base_dir=tmp_path)["run_dir"])
    assert (d / "train" / "stages" / "a" / "merged" / "loram.json").is_file()
    deltas = []
    for name in ("a", "b"):
        t = load_file(d / "adapter_recovered" / name / "adapter_model.safetensors")
        key = "base_model.model.model.layers.2.mlp.down_proj.lora_"
        deltas.append(2.0 * t[key + "B.weight"] @ t[key + "A.weight"])  # alpha 16 / r 8
    got = _load(d / "merged").model.layers[2].mlp.down_proj.weight - _load(base).model.layers[2].mlp.down_proj.weight
    torch.testing.assert_close(got, deltas[0] + deltas[1], rtol=1e-4, atol=1e-6)


def test_shipped_loram_recipes_validate():
    paper = load_recipe(RECIPES / "loram_llama31_70b_gsm8k.yaml")
    lc = paper.loram
    assert paper.model.name == "meta-llama/Llama-3.1-70B" and paper.quant.mode == "nf4"
    assert (lc.ratio, lc.method, lc.keep_first, lc.keep_last) == (0.85, "magnitude", 4, 2)
    assert paper.data.sources[0].path == "hub:openai/gsm8k"
    small = load_recipe(RECIPES / "loram_smollm2_udhr.yaml")
    assert small.loram.ratio == 0.5 and small.model.name.startswith("pkg:") and small.data.holdout


def test_estimate_sizes_the_pruned_model():
    from slimtune.bench.configs import resolve_model_config
    from slimtune.bench.estimate import estimate, estimate_loram
    from slimtune.bench.recipe_estimate import estimate_for_recipe
    from slimtune.loram.estimate import pruned_layout
    from slimtune.loram.prune import parameter_reduction, prune_model

    # the pruned shapes are exactly prune.py's: parameter count of a really pruned tiny model
    cfg = tiny_llama_config(num_hidden_layers=5)
    model, kept = prune_model(transformers.LlamaForCausalLM(cfg), ratio=0.5, keep_first=1, keep_last=1, method="random")
    est = estimate_loram(cfg, ratio=0.5, keep_first=1, keep_last=1, quant="none", compute_dtype="float32")
    assert est.num_params == sum(p.numel() for p in model.parameters())
    lay = pruned_layout(cfg, 0.5, 1, 1)
    assert (lay["pruned_layers"], lay["num_key_value_heads"], lay["num_attention_heads"],
            lay["intermediate_size"]) == (3, 1, 2, 68)
    # ratio 0 = the plain estimate, exactly (one model, the pruned geometry per layer: nothing to subtract)
    for ckpt in ("none", "full", "offload"):
        plain = estimate(cfg, quant="nf4", grad_checkpointing=ckpt, seq_len=64)
        same = estimate_loram(cfg, ratio=0.0, keep_first=2, keep_last=1, quant="nf4", grad_checkpointing=ckpt,
                              seq_len=64)
        assert same.total_bytes == plain.total_bytes, ckpt
    # the 70B recipe: the estimator sizes the pruned model (weights ~ the paper's reduction)
    paper = load_recipe(RECIPES / "loram_llama31_70b_gsm8k.yaml")
    got = estimate_for_recipe(paper, gpu_mem_gib=24)
    full = estimate_for_recipe(paper.model_copy(update={"loram": None}), gpu_mem_gib=24)
    c70 = resolve_model_config("meta-llama/Llama-3.1-70B")
    red = parameter_reduction(c70, _kept_70b(c70))
    assert got.num_params == red["pruned_params"] and full.num_params == red["original_params"]
    assert got.total_bytes < full.total_bytes / 2 and any("LoRAM" in n for n in got.notes)
    assert isinstance(got.advice(8), list)


def _kept_70b(config) -> KeptIndex:
    """The 70B map at ratio 0.85, keep 4/2, built on the meta device (random method: no weights needed)."""
    from accelerate import init_empty_weights

    from slimtune.loram.prune import prune_model

    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    return prune_model(model, ratio=0.85, keep_first=4, keep_last=2, method="random")[1]


def test_align_is_the_trainer_interrupt_resume_and_callbacks(run, tmp_path):
    """Alignment runs through Trainer: an interrupted alignment resumes exactly (checkpoints of the trained
    weights), a fresh start over its checkpoints is refused, and on_nonfinite / callbacks apply to it."""
    from slimtune.config.recipe import LoramAlignConfig
    from slimtune.loram.align import align_pruned
    from slimtune.train.faults import NanLossAt

    def cfg(**train):
        return LoramAlignConfig.model_validate({
            "data": {"sources": [{"path": str(udhr_path("eng")), "max_records": 8}], "format": "text",
                     "max_seq_len": 32},
            "train": {"lr": 3e-3, "steps": 3, "micro_batch": 4, "warmup": 0, "seed": 1, "save_every": 1, **train}})

    pruned = run.dir / "pruned"
    ref = align_pruned(pruned, tmp_path / "ref", cfg())
    assert not ref["interrupted"] and ref["steps"] == 3 and ref["final_loss"] < ref["first_loss"]
    first = align_pruned(pruned, tmp_path / "a", cfg(), stop_after=1)
    assert first["interrupted"] and first["steps"] == 1 and not (tmp_path / "a").exists()
    with pytest.raises(SlimtuneError, match="unfinished alignment"):
        align_pruned(pruned, tmp_path / "a", cfg())
    done = align_pruned(pruned, tmp_path / "a", cfg(), resume=True)
    assert not done["interrupted"] and done["steps"] == 3 and not (tmp_path / "a.run" / "checkpoints").exists()
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(ln) for ln in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in ref_rows]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    skipped = align_pruned(pruned, tmp_path / "nan", cfg(on_nonfinite="skip"), callbacks=[NanLossAt(2)])
    assert skipped["skipped_steps"] == [2] and skipped["steps"] == 3


def test_apply_peft_deltas_matches_peft_merge_for_lora_and_dora(tmp_path):
    """The merge of a PEFT folder into raw weights (LoRAM's merge step) equals PEFT's own merge_and_unload, for
    LoRA and DoRA (whose formula is slimtune.adapters.dora.dora_merge)."""
    import peft

    from slimtune.loram.pipeline import apply_peft_deltas

    for use_dora in (False, True):
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=64))
        weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                          use_dora=use_dora))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n or "magnitude" in n:
                    p.add_(torch.randn_like(p) * 0.1)  # B = 0 and m = ‖W‖ at init would make the test trivial
        folder = tmp_path / f"dora{use_dora}"
        model.save_pretrained(folder)
        want = model.merge_and_unload().state_dict()
        changed = apply_peft_deltas(weights, folder)
        assert len(changed) == 2 * base.config.num_hidden_layers
        for k in changed:
            torch.testing.assert_close(weights[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["--ratio", "1.5"], "ratio must be in [0, 1), got 1.5"),
    (["--ratio", "0.5", "--method", "best"], "method must be 'magnitude' or 'random'"),
    (["--ratio", "0.5", "--keep-first", "-1"], "keep_first/keep_last must be ≥ 0"),
])
def test_prune_arguments_are_checked_once_before_loading(tmp_path, args, needle):
    """`slimtune loram prune` and a recipe's loram block share one check (slimtune.loram.prune.validate_prune_args),
    which runs before the model is fetched: the model named here does not exist."""
    from typer.testing import CliRunner

    from slimtune.cli import app
    from slimtune.loram.pipeline import prune_to_folder
    from slimtune.models.load import ModelConfig

    res = CliRunner().invoke(app, ["loram", "prune", "--model", str(tmp_path / "missing"), "--out",
                                   str(tmp_path / "p"), *args])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and needle in errors[0], res.output
    lc = SimpleNamespace(ratio=1.5, method="magnitude", keep_first=0, keep_last=0, seed=0)
    with pytest.raises(SlimtuneError, match=r"ratio must be in \[0, 1\)"):
        prune_to_folder(ModelConfig(name=str(tmp_path / "missing")), lc, tmp_path / "q")
