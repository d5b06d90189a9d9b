"""`slimtune compare` (one table of several runs' evals) and `slimtune eval` (a column added to a run's report)."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.errors import SlimtuneError
from slimtune.eval.compare import compare_runs, render_markdown
from slimtune.eval.metrics import bleu, chrf
from slimtune.models.tiny import tiny_llama_config, tiny_tokenizer, udhr_path


def write_run(path, evals):
    path.mkdir(parents=True)
    (path / "eval.json").write_text(json.dumps(
        {label: {"label": label, "metrics": metrics} for label, metrics in evals.items()}))
    return path


@pytest.fixture
def runs(tmp_path):
    ref = ["Totu sos èsseres umanos naschent lìberos e eguales in dignidade e in deretos."]
    perfect = bleu(ref, ref)  # identical hypothesis and reference: 100 (as tests/eval/test_eval_metrics checks)
    assert perfect == pytest.approx(100) and chrf(ref, ref) == pytest.approx(100)
    a = write_run(tmp_path / "sardinian_rslora", {
        "before cpt": {"perplexity/flores-srd": 30.0},
        "after sft": {"BLEU/en→sc": perfect, "chrF/en→sc": 60.0, "perplexity/flores-srd": 7.0}})
    b = write_run(tmp_path / "sardinian_lora_r64", {
        "after sft": {"BLEU/en→sc": 20.0, "chrF/en→sc": 55.0, "perplexity/flores-srd": 6.5}})
    return a, b


def test_compare_takes_the_last_label_and_marks_the_best(runs):
    comp = compare_runs(list(runs))
    assert [(r.run, r.label) for r in comp.rows] == [("sardinian_rslora", "after sft"),
                                                     ("sardinian_lora_r64", "after sft")]
    assert comp.metrics == ["BLEU/en→sc", "chrF/en→sc", "perplexity/flores-srd"]
    assert comp.best("BLEU/en→sc") == pytest.approx(100) and comp.best("perplexity/flores-srd") == 6.5
    md = render_markdown(comp)
    assert "| sardinian_rslora | after sft | **100.00** | **60.00** | 7.00 |" in md
    assert "| sardinian_lora_r64 | after sft | 20.00 | 55.00 | **6.50** |" in md
    every = compare_runs(list(runs), all_labels=True)
    assert [r.label for r in every.rows] == ["before cpt", "after sft", "after sft"]
    only = compare_runs(list(runs), labels=["before cpt"])
    assert [r.run for r in only.rows] == ["sardinian_rslora"]


def test_compare_errors(tmp_path, runs):
    with pytest.raises(SlimtuneError, match="no eval.json"):
        compare_runs([tmp_path / "missing"])
    with pytest.raises(SlimtuneError, match="no run has an evaluation labelled 'before cpt'"):
        compare_runs([runs[1]], labels=["before cpt"])


def test_compare_cli_prints_and_writes(tmp_path, runs):
    out = tmp_path / "cmp" / "ablations.md"
    res = CliRunner().invoke(app, ["compare", str(runs[0]), str(runs[1]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "sardinian_lora_r64" in res.output and "BLEU" in res.output and "100.00" in res.output
    md = out.read_text()
    assert "| sardinian_lora_r64 | after sft |" in md and "**6.50**" in md
    assert json.loads(out.with_suffix(".json").read_text())["rows"][1]["run"] == "sardinian_lora_r64"
    bad = CliRunner().invoke(app, ["compare", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no eval.json" in bad.output


def test_eval_command_adds_a_column(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name": str(tmp_path / "tiny")}, "quant": {"mode": "none"},
        "adapter": {"kind": "lora", "rank": 4},
        "data": {"sources": [{"path": str(udhr_path("src"))}]},
        "eval": {"perplexity": [{"path": str(udhr_path("src")), "max_records": 2, "max_seq_len": 32, "name": "src"}],
                 "translation": [{"direction": "en→sc", "src": {"path": str(udhr_path("eng")), "id_field": "article"},
                                  "tgt": {"path": str(udhr_path("src")), "id_field": "article"},
                                  "max_examples": 1, "max_new_tokens": 4}]},
        "output": {"dir": str(tmp_path / "run")}}))
    write_run(tmp_path / "run", {"after": {"perplexity/src": 1.0}})
    res = CliRunner().invoke(app, ["eval", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(report) == ["after", "base"]
    assert {"perplexity/src", "BLEU/en→sc", "chrF/en→sc"} <= set(report["base"]["metrics"])
    assert "| metric | after | base |" in (tmp_path / "run" / "eval.md").read_text()
    res = CliRunner().invoke(app, ["eval", str(recipe), "--adapter", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a slimtune adapter" in res.output
