"""Readers (jsonl, json, txt, parquet, hub) and their one-line file:line errors."""

import json
import sys
import types

import pytest

from slimtune.config.data import DataConfig, SourceConfig
from slimtune.data import build_dataset
from slimtune.data.readers import iter_records
from slimtune.errors import DataError
from slimtune.models.tiny import tiny_tokenizer, udhr_texts

TEXTS = udhr_texts("src")[:6]


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def _records(path, tmp_path, **kw):
    return list(iter_records(SourceConfig(path=str(path), **kw), tmp_path))


def _build(tmp_path, *, fmt="text", seq=64, **src):
    cfg = DataConfig(sources=[src], format=fmt, max_seq_len=seq, shuffle=False,
                     on_error=src.pop("on_error", "raise"))
    return build_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)


def _one_line_error(excinfo, expected):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(expected), msg
    return msg


# ---------------------------------------------------------------------------------------------------------- jsonl
def test_jsonl_reads_records_with_line_numbers(tmp_path):
    p = _write_jsonl(tmp_path / "a.jsonl", [{"text": TEXTS[0]}, "", {"text": TEXTS[1]}])
    recs = _records("a.jsonl", tmp_path)
    assert [w for w, _ in recs] == [f"{p}:1", f"{p}:3"]  # blank line 2 is ignored
    assert [r["text"] for _, r in recs] == TEXTS[:2]


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    p = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b c"}, {"text": "d e f"}, '{"text": "oops"'])
    with pytest.raises(DataError) as e:
        _build(tmp_path, path="bad.jsonl")
    msg = _one_line_error(e, f"{p}:3: invalid JSON (")
    assert e.value.exit_code == 2 and msg.endswith(")")


def test_jsonl_missing_field_and_wrong_type(tmp_path):
    p = _write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError) as e:
        _build(tmp_path, path="m.jsonl")
    assert _one_line_error(e, f"{p}:2: missing field 'text'") == f"{p}:2: missing field 'text'"

    p = _write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": "ok"}, {"text": 7}])
    with pytest.raises(DataError) as e:
        _build(tmp_path, path="t.jsonl")
    _one_line_error(e, f"{p}:3: field 'text' must be a string, got number")

    p = _write_jsonl(tmp_path / "l.jsonl", [[1, 2]])
    with pytest.raises(DataError) as e:
        _build(tmp_path, path="l.jsonl")
    _one_line_error(e, f"{p}:1: record must be a JSON object, got list")


def test_jsonl_custom_text_field_and_max_records(tmp_path):
    _write_jsonl(tmp_path / "c.jsonl", [{"body": t} for t in TEXTS])
    data = _build(tmp_path, path="c.jsonl", text_field="body", max_records=4)
    assert data.stats["sources"]["c"]["records"] == 4


def test_on_error_skip_counts_skipped_records(tmp_path):
    _write_jsonl(tmp_path / "s.jsonl", [{"text": TEXTS[0]}, "{broken", {"nope": 1}, {"text": 3},
                                        {"text": TEXTS[1]}, {"text": "   "}])
    data = _build(tmp_path, path="s.jsonl", on_error="skip")
    st = data.stats["sources"]["s"]
    assert (st["records"], st["skipped"], st["empty"]) == (2, 3, 1)
    assert data.stats["skipped_records"] == 3


def test_chat_record_errors_name_the_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    p = _write_jsonl(tmp_path / "c.jsonl", [good, {"messages": "hello"}])
    with pytest.raises(DataError) as e:
        _build(tmp_path, fmt="chat", path="c.jsonl")
    _one_line_error(e, f"{p}:2: field 'messages' must be a list, got string")
    p = _write_jsonl(tmp_path / "d.jsonl", [good, {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError) as e:
        _build(tmp_path, fmt="chat", path="d.jsonl")
    _one_line_error(e, f"{p}:2: messages[0]: missing field 'content'")
    p = _write_jsonl(tmp_path / "i.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(DataError) as e:
        _build(tmp_path, fmt="instruction", path="i.jsonl")
    _one_line_error(e, f"{p}:2: missing field 'output'")


# ----------------------------------------------------------------------------------------------------------- json
def test_json_list_and_data_object_with_line_numbers(tmp_path):
    p = tmp_path / "l.json"
    p.write_text(json.dumps([{"text": t} for t in TEXTS[:3]], indent=2, ensure_ascii=False), encoding="utf-8")
    recs = _records(p, tmp_path)
    assert [r["text"] for _, r in recs] == TEXTS[:3]
    assert [w for w, _ in recs] == [f"{p}:2", f"{p}:5", f"{p}:8"]

    q = tmp_path / "d.json"
    q.write_text('{"version": 1, "meta": {"a": [1, 2]},\n "data": [\n  {"text": "x"},\n  {"nope": "y"}\n]}\n')
    assert [w for w, _ in _records(q, tmp_path)] == [f"{q}:3", f"{q}:4"]
    with pytest.raises(DataError) as e:
        _build(tmp_path, path="d.json")
    _one_line_error(e, f"{q}:4: missing field 'text'")


def test_json_invalid_file_and_wrong_shape(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError) as e:
        _records(p, tmp_path)
    _one_line_error(e, f"{p}:3: invalid JSON (")
    q = tmp_path / "obj.json"
    q.write_text('{"rows": []}')
    with pytest.raises(DataError, match="expected a list of records"):
        _records(q, tmp_path)


# ------------------------------------------------------------------------------------------------------------ txt
def test_txt_paragraph_file_and_line_modes(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("first para\nstill first\n\n\nsecond para\n  \nthird\n", encoding="utf-8")
    paras = _records(p, tmp_path)
    assert paras == [(f"{p}:1", "first para\nstill first"), (f"{p}:5", "second para"), (f"{p}:7", "third")]
    assert _records(p, tmp_path, txt_split="file") == [(str(p), "first para\nstill first\n\n\nsecond para\n  \nthird")]
    assert [w for w, _ in _records(p, tmp_path, txt_split="line")] == [f"{p}:{i}" for i in (1, 2, 5, 7)]
    with pytest.raises(DataError, match="doc.txt:1: format: chat needs structured records"):
        _build(tmp_path, fmt="chat", path="doc.txt")


def test_glob_and_file_level_errors(tmp_path):
    (tmp_path / "parts").mkdir()
    for i in range(3):
        (tmp_path / "parts" / f"{i}.txt").write_text(TEXTS[i])
    assert [r for _, r in _records("parts/*.txt", tmp_path)] == TEXTS[:3]
    with pytest.raises(DataError, match="no files match"):
        _records("parts/*.jsonl", tmp_path)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        _build(tmp_path, path="missing.jsonl")
    (tmp_path / "x.xml").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.xml: unknown file type '.xml'"):
        _records("x.xml", tmp_path)
    assert _records("x.xml", tmp_path, file_format="txt") == [(f"{tmp_path / 'x.xml'}:1", "a,b")]
    assert _records("x.xml", tmp_path, file_format="csv") == []  # a header only


# -------------------------------------------------------------------------------------------------------- parquet
def test_parquet_reader_and_row_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": TEXTS[:3] + [None]}), p)
    recs = _records(p, tmp_path)
    assert [w for w, _ in recs] == [f"{p}:row {i}" for i in range(4)]
    with pytest.raises(DataError) as e:
        _build(tmp_path, path="d.parquet")
    _one_line_error(e, f"{p}:row 3: field 'text' must be a string, got null")
    data = _build(tmp_path, path="d.parquet", on_error="skip")
    assert data.stats["sources"]["d"]["skipped"] == 1

    q = tmp_path / "chat.parquet"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TEXTS[0]}]
    pq.write_table(pa.table({"messages": [conv, conv]}), q)
    data = _build(tmp_path, fmt="chat", seq=512, path="chat.parquet")
    assert len(data.examples) == 2
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        _build(tmp_path, path="junk.parquet")


# ------------------------------------------------------------------------------------------------------------ hub
def test_hub_source_uses_load_dataset(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, subset=None, split=None, **kw):
        calls.append((name, subset, split, kw))
        if name == "missing/ds":
            raise FileNotFoundError("Couldn't find dataset\nmissing/ds on the Hub")
        return [{"content": t} for t in TEXTS[:4]] + [{"other": 1}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    recs = _records("hub:wiki/sc", tmp_path, subset="sc", split="train")
    assert calls == [("wiki/sc", "sc", "train", {})]
    _records("hub:wiki/sc", tmp_path, subset="sc", revision="v2", streaming=True)
    assert calls[-1] == ("wiki/sc", "sc", "train", {"revision": "v2", "streaming": True})
    assert recs[0][0] == "hub:wiki/sc/sc[train]:row 0"
    data = _build(tmp_path, path="hub:wiki/sc", text_field="content", on_error="skip")
    assert data.stats["sources"]["wiki/sc"]["records"] == 4 and data.stats["skipped_records"] == 1
    with pytest.raises(DataError) as e:
        _build(tmp_path, path="hub:missing/ds")
    _one_line_error(e, "hub:missing/ds[train]: cannot load")


def test_data_config_is_strict():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="extra_forbidden"):
        DataConfig(sources=[{"path": "a.jsonl", "wieght": 2}])
    with pytest.raises(ValidationError):
        DataConfig(sources=[])
    with pytest.raises(ValidationError):
        DataConfig(sources=[{"path": "a.jsonl", "weight": 0}])
    with pytest.raises(ValidationError):
        DataConfig(sources=[{"path": "a.jsonl"}], replay={"ratio": 1.0, "sources": [{"path": "b.jsonl"}]})
    cfg = DataConfig(sources=[{"path": "a.jsonl"}], holdout=5)
    assert cfg.holdout == 5 and isinstance(cfg.holdout, int)
    assert DataConfig(sources=[{"path": "a.jsonl"}], holdout=0.1).holdout == 0.1
    assert DataConfig.model_fields["packing"].description  # attribute docstrings become descriptions
