import pytest
from pydantic import ValidationError

from slimtune.config.eval import DEFAULT_TRANSLATION_PROMPT, EvalConfig, TranslationEval


def test_full_config_parses_with_shorthands():
    cfg = EvalConfig.model_validate(
        {
            "batch_size": 2,
            "perplexity": {"path": "data/x.jsonl", "max_records": 5, "max_seq_len": 128},
            "translation": [
                {"src": "eng.jsonl", "tgt": {"path": "src.jsonl", "id_field": "article"}},
                {"direction": "en→sc", "flores": {"tgt_lang": "srd_Latn"}, "max_examples": 10},
            ],
            "generations": ["Hello", "Tell me a story"],
            "exact_match": [{"path": "arith.jsonl"}],
        }
    )
    assert cfg.perplexity[0].display_name == "x"
    t0, t1 = cfg.translation
    assert t0.src.path == "eng.jsonl" and t0.display_direction == "eng→src"
    assert t1.display_direction == "en→sc" and t1.flores.src_lang == "eng_Latn" and t1.flores.split == "devtest"
    assert t1.prompt == DEFAULT_TRANSLATION_PROMPT
    assert cfg.generations.prompts == ["Hello", "Tell me a story"] and cfg.generations.do_sample is False
    assert cfg.exact_match[0].display_name == "arith"
    assert EvalConfig().perplexity == [] and EvalConfig().generations is None


@pytest.mark.parametrize(
    "bad",
    [
        {"bogus": 1},
        {"perplexity": [{"path": "a.txt", "hub": "wikitext"}]},
        {"perplexity": [{"field": "text"}]},
        {"perplexity": [{"path": "a/x.txt"}, {"path": "b/x.txt"}]},
        {"translation": [{"src": "a.jsonl"}]},
        {"translation": [{"src": "a.jsonl", "tgt": "b.jsonl", "flores": {"tgt_lang": "srd_Latn"}}]},
        {"translation": [{"flores": {"tgt_lang": "srd_Latn", "split": "train"}}]},
        {"translation": [{"src": "a.jsonl", "tgt": "b.jsonl", "prompt": "no placeholder"}]},
        {"generations": {"prompts": []}},
        {"batch_size": 0},
    ],
)
def test_invalid_configs_raise(bad):
    with pytest.raises(ValidationError):
        EvalConfig.model_validate(bad)


def test_translation_needs_a_source():
    with pytest.raises(ValidationError):
        TranslationEval.model_validate({"direction": "en→sc"})
