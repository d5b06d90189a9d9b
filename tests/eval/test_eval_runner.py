import json

import pytest
import torch
import transformers

from slimtune.config.eval import EvalConfig, FloresSpec
from slimtune.errors import DataError
from slimtune.eval.loaders import load_flores
from slimtune.eval.runner import read_report, run_eval, write_report
from slimtune.models.tiny import tiny_llama_config, train_tiny_tokenizer, udhr_path, udhr_texts


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(udhr_texts("eng") + udhr_texts("src"))


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "em.jsonl").write_text(
        '{"prompt": "2+2=", "answer": 4}\n{"prompt": "1+2=", "answer": "3"}\n', encoding="utf-8"
    )
    return EvalConfig.model_validate(
        {
            "batch_size": 2,
            "perplexity": [{"path": str(udhr_path("src")), "max_records": 3, "max_seq_len": 64}],
            "translation": [
                {
                    "direction": "en→sc",
                    "src": {"path": str(udhr_path("eng")), "id_field": "article"},
                    "tgt": {"path": str(udhr_path("src")), "id_field": "article"},
                    "max_examples": 3,
                    "max_new_tokens": 4,
                    "examples": 2,
                }
            ],
            "exact_match": [{"path": "em.jsonl", "max_new_tokens": 3}],
            "generations": {"prompts": ["Hello | there", "Article 1"], "max_new_tokens": 4},
        }
    )


def _model(tok, seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), max_position_embeddings=2048))


def test_run_eval_and_report(tok, cfg, tmp_path):
    base = run_eval(_model(tok, 0), tok, cfg, base_dir=tmp_path, label="base")
    assert list(base["metrics"]) == ["perplexity/src", "BLEU/en→sc", "chrF/en→sc", "exact_match/em"]
    assert base["perplexity"]["src"]["tokens"] > 0 and base["perplexity"]["src"]["ppl"] > 1
    tr = base["translation"]["en→sc"]
    assert tr["n"] == 3 and len(tr["examples"]) == 2
    assert tr["examples"][0]["src"] == udhr_texts("eng")[0] and tr["examples"][0]["ref"] == udhr_texts("src")[0]
    assert base["exact_match"]["em"]["n"] == 2
    assert [g["prompt"] for g in base["generations"]] == ["Hello | there", "Article 1"]
    # Deterministic: the same model state gives the same figures.
    assert run_eval(_model(tok, 0), tok, cfg, base_dir=tmp_path, label="base") == base

    results = {
        "base": base,
        "after cpt": run_eval(_model(tok, 1), tok, cfg, base_dir=tmp_path, label="after cpt"),
        "after sft": run_eval(_model(tok, 2), tok, cfg, base_dir=tmp_path, label="after sft"),
    }
    out = tmp_path / "report"
    json_path, md_path = write_report(results, out)
    assert json.loads(json_path.read_text(encoding="utf-8")) == results
    assert read_report(out) == results
    md = md_path.read_text(encoding="utf-8")
    assert "| metric | base | after cpt | after sft |" in md
    for metric in base["metrics"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {metric} "))
        assert row.count("|") == 5  # metric + three labels
    ppl_row = next(line for line in md.splitlines() if line.startswith("| perplexity/src ↓"))
    assert f"{results['after sft']['metrics']['perplexity/src']:.2f}" in ppl_row
    assert "## Sample generations" in md and "Hello | there" in md and "**after sft**" in md
    assert "## Translation examples: en→sc" in md
    # Byte-identical on rewrite.
    first = (json_path.read_bytes(), md_path.read_bytes())
    write_report(results, out)
    assert (json_path.read_bytes(), md_path.read_bytes()) == first


def test_report_with_missing_metric_and_empty_config(tok, tmp_path):
    r = run_eval(_model(tok, 0), tok, EvalConfig(), base_dir=tmp_path, label="base")
    assert r["metrics"] == {} and r["generations"] == []
    results = {"base": {"label": "base", "metrics": {"perplexity/x": 12.3456}},
               "after sft": {"label": "after sft", "metrics": {"perplexity/x": 3.0, "BLEU/a→b": 7.0}}}
    _, md = write_report(results, tmp_path)
    text = md.read_text(encoding="utf-8")
    assert "| perplexity/x ↓ | 12.35 | 3.00 |" in text
    assert "| BLEU/a→b ↑ | — | 7.00 |" in text


def test_load_flores_aligns_by_id(monkeypatch):
    import datasets

    data = {
        "eng_Latn": {"id": [1, 2, 3], "text": ["one", "two", "three"]},
        "srd_Latn": {"id": [3, 1, 2], "text": ["tres", "unu", "duos"]},
    }
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if config not in data:
            raise FileNotFoundError(f"no config {config}")
        return datasets.Dataset.from_dict(data[config])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs = load_flores(FloresSpec(src_lang="eng_Latn", tgt_lang="srd_Latn"))
    assert [(p.src, p.tgt) for p in pairs] == [("one", "unu"), ("two", "duos"), ("three", "tres")]
    assert calls[0] == ("openlanguagedata/flores_plus", "eng_Latn", "devtest")
    with pytest.raises(DataError, match="cannot load"):
        load_flores(FloresSpec(src_lang="eng_Latn", tgt_lang="xxx_Latn"))
