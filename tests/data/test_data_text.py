"""format: text (packing, truncation), token-ratio mixing, replay and holdout."""

import json

import pytest
import torch

from slimtune.config.data import DataConfig
from slimtune.data import build_dataset
from slimtune.errors import DataError
from slimtune.models.tiny import shared_data_dir, tiny_tokenizer, udhr_texts

UDHR = shared_data_dir() / "udhr"


def _build(seed=0, **kw):
    return build_dataset(DataConfig(**kw), tiny_tokenizer(), base_dir=UDHR, seed=seed)


def _stream(texts):
    tok = tiny_tokenizer()
    out = []
    for t in texts:
        out += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_packing_blocks_are_full_and_concatenate_to_the_token_stream():
    L = 96
    data = _build(sources=[{"path": "src.jsonl"}], max_seq_len=L, shuffle=False)
    stream = _stream(udhr_texts("src"))
    n = len(stream) // L
    assert len(data.examples) == n and data.stats["tail_tokens_dropped"] == len(stream) - n * L
    for ex in data.examples:
        assert ex["input_ids"].shape == (L,) and torch.equal(ex["input_ids"], ex["labels"])
    assert torch.cat([e["input_ids"] for e in data.examples]).tolist() == stream[: n * L]
    assert data.stats["tokens"] == len(stream) == data.stats["sources"]["src"]["tokens_available"]
    batch = next(data.batches(3, epoch=0))
    assert batch["attention_mask"].all() and batch["input_ids"].shape == (3, L)


def test_packing_shuffles_documents_deterministically():
    a = _build(sources=[{"path": "src.jsonl"}], max_seq_len=64, seed=1)
    b = _build(sources=[{"path": "src.jsonl"}], max_seq_len=64, seed=1)
    c = _build(sources=[{"path": "src.jsonl"}], max_seq_len=64, seed=2)
    flat = lambda d: torch.cat([e["input_ids"] for e in d.examples]).tolist()  # noqa: E731
    assert flat(a) == flat(b) != flat(c)


def test_no_packing_truncates_and_pads_with_ignored_labels():
    L = 40
    data = _build(sources=[{"path": "eng.jsonl"}], max_seq_len=L, packing=False, shuffle=False)
    docs = [_stream([t]) for t in udhr_texts("eng")]
    assert [e["input_ids"].tolist() for e in data.examples] == [d[:L] for d in docs]
    assert data.stats["truncated_examples"] == sum(len(d) > L for d in docs)
    short = min(range(len(docs)), key=lambda i: len(docs[i]))
    ex = [data.examples[short], data.examples[0]]
    from slimtune.data import collate

    b = collate(ex, pad_id=tiny_tokenizer().pad_token_id)
    n = len(docs[short])
    assert n < L and b["input_ids"].shape == (2, L)
    assert (b["labels"][0, n:] == -100).all() and (b["attention_mask"][0, n:] == 0).all()
    assert (b["input_ids"][0, n:] == tiny_tokenizer().pad_token_id).all()
    assert b["labels"][0, :n].tolist() == docs[short]


def test_replay_ratio_within_two_percent():
    ratio = 0.17
    data = _build(sources=[{"path": "src.jsonl"}], max_seq_len=128,
                  replay={"ratio": ratio, "sources": [{"path": p} for p in ("ita.jsonl", "spa.jsonl", "cat.jsonl")]})
    st = data.stats
    main = st["sources"]["src"]["tokens"]
    replay = sum(st["sources"][k]["tokens"] for k in ("ita", "spa", "cat"))
    assert main == st["sources"]["src"]["tokens_available"]  # the main data is used exactly once
    assert abs(replay / (main + replay) - ratio) < 0.02
    assert abs(st["replay_ratio"] - ratio) < 0.02
    # replay sources split their share by weight (equal here)
    shares = [st["sources"][k]["tokens"] for k in ("ita", "spa", "cat")]
    assert max(shares) - min(shares) <= 1
    # the packed blocks hold the mixed stream (minus the partial tail block)
    assert len(data.examples) * 128 + st["tail_tokens_dropped"] == main + replay


def test_chat_replay_ratio_within_two_percent(tmp_path):
    eng, src, ita = udhr_texts("eng"), udhr_texts("src"), udhr_texts("ita")

    def write(name, target):
        rows = [{"instruction": f"Translate: {e}", "output": t} for e, t in zip(eng, target)]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")

    write("sc.jsonl", src)
    write("it.jsonl", ita)
    cfg = DataConfig(sources=[{"path": "sc.jsonl"}], format="instruction", max_seq_len=2048,
                     replay={"ratio": 0.2, "sources": [{"path": "it.jsonl"}]})
    data = build_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)
    total = sum(e["input_ids"].numel() for e in data.examples)
    assert total == data.stats["tokens"]
    assert abs(data.stats["sources"]["it"]["tokens"] / total - 0.2) < 0.02


def test_source_weights_are_token_shares():
    data = _build(sources=[{"path": "nld.jsonl", "weight": 3}, {"path": "swh.jsonl", "weight": 1}],
                  max_seq_len=64)
    st = data.stats["sources"]
    total = st["nld"]["tokens"] + st["swh"]["tokens"]
    assert total == st["nld"]["tokens_available"] + st["swh"]["tokens_available"]  # volume kept
    assert abs(st["nld"]["tokens"] / total - 0.75) < 0.02
    assert st["nld"]["repeat"] > 1 > st["swh"]["repeat"]  # up- and down-sampled


def test_holdout_fraction_and_count_are_deterministic():
    a = _build(sources=[{"path": "glg.jsonl"}], max_seq_len=64, holdout=0.1, seed=3)
    b = _build(sources=[{"path": "glg.jsonl"}], max_seq_len=64, holdout=0.1, seed=3)
    assert len(a.holdout) == 3 and [h["where"] for h in a.holdout] == [h["where"] for h in b.holdout]
    assert a.stats["holdout_records"] == 3 == a.stats["sources"]["glg"]["holdout"]
    texts = set(udhr_texts("glg"))
    assert all(h["text"] in texts and h["input_ids"].numel() <= 64 for h in a.holdout)
    # held-out documents are not in the training stream
    full = _stream(udhr_texts("glg"))
    kept = a.stats["sources"]["glg"]["tokens_available"]
    assert kept == len(full) - sum(len(_stream([h["text"]])) for h in a.holdout)
    c = _build(sources=[{"path": "glg.jsonl"}], max_seq_len=64, holdout=5, seed=3)
    assert len(c.holdout) == 5
    with pytest.raises(DataError, match="data.holdout: 31 leaves no training records"):
        _build(sources=[{"path": "glg.jsonl"}], max_seq_len=64, holdout=31)


def test_too_little_data_for_one_block():
    with pytest.raises(DataError, match="fewer than one block of max_seq_len=100000"):
        _build(sources=[{"path": "urd.jsonl"}], max_seq_len=100_000)
