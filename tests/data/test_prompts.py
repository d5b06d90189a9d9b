"""`data.format: prompt` (GRPO): prompts rendered with the chat template and the generation prompt, the other fields
kept for the rewards, holdout, and a bad record reported with file:line (training and `slimtune validate`)."""

import json

import pytest

from slimtune.config.data import DataConfig
from slimtune.data.prompts import build_prompt_dataset
from slimtune.data.validate import check_record
from slimtune.data.readers import RecordError
from slimtune.errors import DataError
from slimtune.models.tiny import train_tiny_tokenizer


def _write(tmp_path, rows):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_prompts_rendered_fields_kept(tmp_path):
    tok = train_tiny_tokenizer(["What is 2 + 3? answer 5 hello"], vocab_size=300)
    rows = [{"prompt": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(10)]
    rows.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                 "answer": "x"})
    cfg = DataConfig(sources=[{"path": str(_write(tmp_path, rows))}], format="prompt", holdout=3, max_seq_len=64)
    d = build_prompt_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    assert len(d) == 8 and len(d.holdout) == 3
    e = next(x for x in d.examples + d.holdout if x["where"].endswith(":1"))
    want = tok.apply_chat_template([{"role": "user", "content": "What is 0 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert e["prompt"] == want and e["fields"] == {"answer": "3"}
    assert e["prompt_ids"].tolist() == tok(want, add_special_tokens=False)["input_ids"]
    last = next(x for x in d.examples + d.holdout if x["where"].endswith(":11"))
    assert "Be brief." in last["prompt"]


def test_bad_record_names_file_line(tmp_path):
    tok = train_tiny_tokenizer(["hello"], vocab_size=300)
    p = _write(tmp_path, [{"prompt": "ok"}, {"question": "no prompt"}])
    cfg = DataConfig(sources=[{"path": str(p)}], format="prompt")
    with pytest.raises(DataError, match=r"p.jsonl:2: no field 'prompt'"):
        build_prompt_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    with pytest.raises(RecordError, match="no field 'prompt'"):
        check_record({"question": "x"}, cfg.sources[0], "prompt")
    check_record({"prompt": "x"}, cfg.sources[0], "prompt")
