"""TrainData.batches: deterministic per (seed, epoch), resumable at any batch; collate and target counting."""

import json

import pytest
import torch

from slimtune.config.data import DataConfig
from slimtune.data import TrainData, build_dataset, collate, count_target_tokens
from slimtune.models.tiny import shared_data_dir, tiny_tokenizer, udhr_texts


def _text_data(seed=0, shuffle=True):
    cfg = DataConfig(sources=[{"path": "eng.jsonl"}, {"path": "nld.jsonl"}], max_seq_len=32, shuffle=shuffle)
    return build_dataset(cfg, tiny_tokenizer(), base_dir=shared_data_dir() / "udhr", seed=seed)


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches_are_deterministic_per_seed_and_epoch():
    a, b = _text_data(seed=5), _text_data(seed=5)
    assert _same(list(a.batches(4, epoch=0)), list(b.batches(4, epoch=0)))
    assert not _same(list(a.batches(4, epoch=0)), list(a.batches(4, epoch=1)))
    order0 = a.order(0)
    assert sorted(order0.tolist()) == list(range(len(a)))  # each example once per epoch
    assert _text_data(seed=6).order(0).tolist() != order0.tolist()


def test_resume_at_start_equals_continuing():
    data = _text_data(seed=11)
    full = list(data.batches(3, epoch=2))
    assert len(full) == data.num_batches(3) == -(-len(data) // 3)
    for k in (0, 1, 7, len(full) - 1, len(full)):
        assert _same(list(data.batches(3, epoch=2, start=k)), full[k:])
    # a fresh object (a restarted process) continues identically
    again = _text_data(seed=11)
    assert _same(list(again.batches(3, epoch=2, start=5)), full[5:])
    with pytest.raises(ValueError):
        next(data.batches(3, epoch=2, start=len(full) + 1))


def test_drop_last_and_no_shuffle():
    data = _text_data(shuffle=False)
    assert data.order(3).tolist() == list(range(len(data)))
    n = len(data)
    sizes = [b["input_ids"].shape[0] for b in data.batches(4, epoch=0, drop_last=True)]
    assert sizes == [4] * (n // 4)
    last = list(data.batches(4, epoch=0))[-1]["input_ids"].shape[0]
    assert last == (n % 4 or 4)


def test_collate_pads_and_counts_targets():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
          {"input_ids": torch.tensor([8, 9, 10, 11, 12]), "labels": torch.tensor([-100, -100, 10, 11, 12])}]
    b = collate(ex, pad_id=3, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (2, 8) and b["input_ids"].dtype == torch.long
    assert b["input_ids"][0].tolist() == [5, 6, 7] + [3] * 5
    assert b["labels"][0].tolist() == [-100, 6, 7] + [-100] * 5
    assert b["attention_mask"].sum(1).tolist() == [3, 5]
    assert count_target_tokens(b) == 2 + 3
    # position 0 is never a target after the shift
    assert count_target_tokens({"labels": torch.tensor([[1, -100, 2]])}) == 1


def test_chat_batches_resume(tmp_path):
    rows = [{"instruction": e, "output": s} for e, s in zip(udhr_texts("eng"), udhr_texts("src"))]
    (tmp_path / "i.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(sources=[{"path": "i.jsonl"}], format="instruction", max_seq_len=2048, holdout=3)
    data = build_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)
    assert isinstance(data, TrainData) and len(data) == 28 and len(data.holdout) == 3
    full = list(data.batches(5, epoch=0))
    assert _same(list(data.batches(5, epoch=0, start=2)), full[2:])
    for b in full:
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        assert ((b["labels"] != -100) <= (b["attention_mask"] == 1)).all()
    assert sum(count_target_tokens(b) for b in full) == data.stats["target_tokens"]
