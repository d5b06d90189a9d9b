"""`slimtune chat` driven through stdin and `slimtune generate --file`, on a tiny model folder (greedy)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def _reply(model, tok, messages, n):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_chat_two_turns_then_exit(tiny_folder):
    folder, model, tok = tiny_folder
    res = CliRunner().invoke(app, ["chat", str(folder), "--temperature", "0", "--max-new-tokens", "6",
                                   "--system", "Be brief."], input="Hello there\n/reset\nWhat is a right?\nAnd a duty?\n/exit\nnever read\n")
    assert res.exit_code == 0, res.output
    sys_msg = [{"role": "system", "content": "Be brief."}]
    first = _reply(model, tok, sys_msg + [{"role": "user", "content": "Hello there"}], 6)
    second = _reply(model, tok, sys_msg + [{"role": "user", "content": "What is a right?"}], 6)  # after /reset
    third = _reply(model, tok, sys_msg + [{"role": "user", "content": "What is a right?"},
                                          {"role": "assistant", "content": second},
                                          {"role": "user", "content": "And a duty?"}], 6)
    flat = " ".join(res.output.split())
    for reply in (first, second, third):
        assert " ".join(reply.split()) in flat
    assert "conversation cleared" in res.output
    assert res.output.count("model>") == 3  # the line after /exit is never read


def test_generate_file_writes_rows(tiny_folder, tmp_path):
    from slimtune.eval.generate import generate

    folder, model, tok = tiny_folder
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(["Article 1", "Article 2"])))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["generate", str(folder), "--file", str(prompts), "--out", str(out),
                                   "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1]
    assert [r["output"] for r in rows] == generate(model, tok, ["Article 1", "Article 2"], max_new_tokens=5)


def test_generate_needs_prompts_and_valid_rows(tiny_folder, tmp_path):
    folder, _, _ = tiny_folder
    res = CliRunner().invoke(app, ["generate", str(folder)])
    assert res.exit_code == 2 and "--prompt" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    res = CliRunner().invoke(app, ["generate", str(folder), "--file", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output
