"""Preference data: the three paired layouts give the same tokens, labels cover only the final reply, truncation
keeps the prompt and cuts the completion, KTO records and batches (with their KL rows), file:line errors."""

import json

import pytest
import torch

from slimtune.config.data import DataConfig
from slimtune.data.chat import IGNORE_INDEX
from slimtune.data.preference import build_preference_dataset, collate_pairs
from slimtune.errors import DataError
from slimtune.models.tiny import tiny_tokenizer

Q, A, B = "Write 2031-04-07 in words.", "April 7, 2031", "May 7, 2031"


def _write(tmp_path, name, records):
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def _build(tmp_path, records, fmt="preference", **kw):
    path = _write(tmp_path, f"{fmt}.jsonl", records)
    cfg = DataConfig(format=fmt, sources=[{"path": str(path)}], shuffle=False, **kw)
    return build_preference_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)


LAYOUTS = {
    "text": {"prompt": Q, "chosen": A, "rejected": B},
    "ultrafeedback": {"prompt": Q, "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
                      "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]},
    "hh": {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {A}", "rejected": f"\n\nHuman: {Q}\n\nAssistant: {B}"},
    "sharegpt_lists_no_prompt": {"chosen": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}],
                                 "rejected": [{"from": "human", "value": Q}, {"from": "gpt", "value": B}]},
}


def test_layouts_give_the_same_pair(tmp_path):
    tok = tiny_tokenizer()
    want = {}
    for side, reply in (("chosen", A), ("rejected", B)):
        text = tok.apply_chat_template([{"role": "user", "content": Q}, {"role": "assistant", "content": reply}],
                                       tokenize=False)
        want[side] = tok(text, add_special_tokens=False)["input_ids"]
    for name, rec in LAYOUTS.items():
        ex = _build(tmp_path / name, [rec]).examples[0]
        for side, reply in (("chosen", A), ("rejected", B)):
            ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
            assert ids.tolist() == want[side], name
            scored = tok.decode(ids[labels != IGNORE_INDEX])
            assert scored == reply + "<|im_end|>", (name, scored)  # the final reply and its end-of-turn only


def test_multi_turn_prompt_scores_only_the_last_reply(tmp_path):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": Q}]
    rec = {"chosen": conv + [{"role": "assistant", "content": A}], "rejected": conv + [{"role": "assistant",
                                                                                          "content": B}]}
    ex = _build(tmp_path, [rec]).examples[0]
    assert tiny_tokenizer().decode(ex["chosen_input_ids"][ex["chosen_labels"] != IGNORE_INDEX]) == A + "<|im_end|>"


def test_truncation_keeps_the_prompt_and_drops_a_prompt_too_long(tmp_path):
    long_reply = " ".join(["words"] * 200)
    data = _build(tmp_path, [{"prompt": Q, "chosen": long_reply, "rejected": B},
                             {"prompt": " ".join(["long"] * 200), "chosen": A, "rejected": B}], max_seq_len=40)
    assert len(data.examples) == 1 and data.stats["dropped_examples"] == 1 and data.stats["truncated_examples"] == 1
    ex = data.examples[0]
    assert len(ex["chosen_input_ids"]) == 40
    assert tiny_tokenizer().decode(ex["chosen_input_ids"]).startswith("<|im_start|>user\n" + Q)
    assert (ex["chosen_labels"][-5:] != IGNORE_INDEX).all()


def test_pair_batch_is_chosen_rows_then_rejected_rows(tmp_path):
    data = _build(tmp_path, [LAYOUTS["text"], {"prompt": "Q2", "chosen": "yes", "rejected": "no no no"}])
    batch = next(data.batches(2, epoch=0))
    assert batch["input_ids"].shape[0] == 4
    for i, e in enumerate(data.examples):
        n, m = len(e["chosen_input_ids"]), len(e["rejected_input_ids"])
        assert torch.equal(batch["input_ids"][i, :n], e["chosen_input_ids"])
        assert torch.equal(batch["input_ids"][2 + i, :m], e["rejected_input_ids"])
    e = [dict(x, ref_chosen=-1.0, ref_rejected=-2.0) for x in data.examples]
    assert collate_pairs(e, 3)["ref_logps"].tolist() == [-1.0, -1.0, -2.0, -2.0]


def test_kto_records_and_kl_rows(tmp_path):
    recs = [{"prompt": Q, "completion": A, "label": True}, {"prompt": "Q2", "completion": "nope", "label": False},
            {"prompt": "Q3", "completion": [{"role": "assistant", "content": "yes"}], "label": True}]
    data = _build(tmp_path, recs, fmt="kto")
    batch = next(data.batches(3, epoch=0))
    assert batch["kto_label"].tolist() == [True, False, True]
    tok = tiny_tokenizer()
    # the KL row of an example: its prompt + the completion of the example before it in data order (cyclic)
    kl1 = batch["kl_input_ids"][1][batch["kl_attention_mask"][1].bool()]
    assert tok.decode(kl1) == tok.decode(data.examples[1]["input_ids"][: data.examples[1]["prompt_len"]]) + \
        tok.decode(data.examples[0]["input_ids"][data.examples[0]["prompt_len"]:])  # prompt 1 + completion 0
    assert tok.decode(batch["kl_input_ids"][1][batch["kl_labels"][1] != IGNORE_INDEX]) == A + "<|im_end|>"


@pytest.mark.parametrize("rec,msg", [({"prompt": Q, "chosen": A}, "missing field 'rejected'"),
                                     ({"prompt": Q, "chosen": A, "rejected": 3}, "rejected"),
                                     ({"chosen": A, "rejected": B}, "no prompt")])
def test_bad_records_name_file_and_line(tmp_path, rec, msg):
    with pytest.raises(DataError, match=rf"preference.jsonl:2: .*{msg}"):
        _build(tmp_path, [LAYOUTS["text"], rec])


def test_kto_label_must_be_boolean(tmp_path):
    with pytest.raises(DataError, match=r"kto.jsonl:1: field 'label' must be true or false"):
        _build(tmp_path, [{"prompt": Q, "completion": A, "label": "yes"}], fmt="kto")


def test_validate_names_file_line_and_key(tmp_path):
    from slimtune.data.validate import check_sources

    path = _write(tmp_path, "pairs.jsonl", [LAYOUTS["hh"], {"prompt": Q, "chosen": A}])
    cfg = DataConfig(format="preference", sources=[{"path": str(path)}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: missing field 'rejected' \(data.sources.0, format: "
                                        r"preference\)"):
        check_sources(cfg, tmp_path)
    ok = _write(tmp_path, "ok.jsonl", [LAYOUTS["ultrafeedback"], LAYOUTS["text"]])
    assert check_sources(DataConfig(format="preference", sources=[{"path": str(ok)}]), tmp_path)[0]["records"] == 2
