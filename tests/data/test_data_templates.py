"""data.chat_template: built-in templates on a tokenizer without one; a clear error when none is chosen; the
Llama-2 metamath recipes render on a template-less base."""

import json
from pathlib import Path

import pytest

from slimtune.config.data import DataConfig
from slimtune.config.recipe import load_recipe
from slimtune.data import build_dataset
from slimtune.data.templates import TEMPLATES, resolve_template
from slimtune.errors import DataError, ModelError
from slimtune.models.tiny import train_tiny_tokenizer, udhr_texts

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ENG, SRC = udhr_texts("eng"), udhr_texts("src")


@pytest.fixture(scope="module")
def base_tok():
    """A private tiny tokenizer with its chat template removed (a base model's tokenizer)."""
    tok = train_tiny_tokenizer(ENG + SRC, vocab_size=400)
    tok.chat_template = None
    return tok


def _convs(n=4):
    return [[{"role": "system", "content": "Translate."}, {"role": "user", "content": ENG[i][:80]},
             {"role": "assistant", "content": SRC[i][:60]}, {"role": "user", "content": "Again"},
             {"role": "assistant", "content": SRC[i + 1][:40]}] for i in range(n)]


def test_no_template_is_a_clear_choice(tmp_path, base_tok):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in _convs()))
    cfg = DataConfig(sources=[{"path": "c.jsonl"}], format="chat", max_seq_len=256)
    with pytest.raises(ModelError, match="no chat template.*data.chat_template to one of chatml, llama3, alpaca, "
                                         "mistral, gemma, phi3"):
        build_dataset(cfg, base_tok, base_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match="unknown template 'chatlm'"):
        resolve_template("chatlm")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_builtin_templates_mask_exactly_the_replies(tmp_path, base_tok, name):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in _convs()))
    cfg = DataConfig(sources=[{"path": "c.jsonl"}], format="chat", max_seq_len=1024, chat_template=name,
                     shuffle=False)
    data = build_dataset(cfg, base_tok, base_dir=tmp_path, seed=0)
    assert base_tok.chat_template == TEMPLATES[name]  # set on the tokenizer: saved with the outputs
    for ex, conv in zip(data.examples, _convs()):
        labels = ex["labels"].tolist()
        runs, cur = [], []
        for t in labels + [-100]:
            if t != -100:
                cur.append(t)
            elif cur:
                runs.append(base_tok.decode(cur))
                cur = []
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(runs) == len(replies), (name, runs)
        for got, want in zip(runs, replies):
            # the reply and its end-of-turn token (mistral's reply starts with the space after [/INST])
            assert got.lstrip().startswith(want.strip()) and len(got) - len(want) < 16, (name, got, want)


def test_template_file(tmp_path, base_tok):
    (tmp_path / "t.jinja").write_text(TEMPLATES["chatml"])
    assert resolve_template("t.jinja", tmp_path) == TEMPLATES["chatml"]
    with pytest.raises(DataError, match="no such file"):
        resolve_template("missing.jinja", tmp_path)


@pytest.mark.parametrize("recipe", ["inttune_llama2_7b_metamath.yaml", "lamda_pp_llama2_7b_metamath.yaml"])
def test_llama2_metamath_recipes_work_on_a_template_less_base(tmp_path, base_tok, recipe):
    rows = [{"query": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. The answer is: {2 * i}"}
            for i in range(6)]
    (tmp_path / "mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = load_recipe(RECIPES / recipe, [f"data.sources.0.path={tmp_path / 'mm.jsonl'}",
                                        "data.sources.0.streaming=false"])
    assert r.data.chat_template == "alpaca"
    data = build_dataset(r.data, base_tok, base_dir=tmp_path, seed=0)
    assert len(data) == 6 and data.stats["target_tokens"] > 0
    text = base_tok.decode(data.examples[0]["input_ids"])
    assert "### Instruction:" in text and "### Response:" in text
