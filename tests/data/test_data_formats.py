"""Formats people have on disk: OpenAI messages / ShareGPT conversations, alpaca / prompt-completion, csv, tsv,
json, jsonl, parquet, arrow, txt, data_files globs, streaming hub sources (a local file through `datasets`), and
`slimtune validate`'s record check (file:line, no model)."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from slimtune.config.data import DataConfig, SourceConfig
from slimtune.data import build_dataset
from slimtune.data.readers import RecordError, extract_messages, iter_records
from slimtune.data.validate import check_sources
from slimtune.errors import DataError
from slimtune.models.tiny import tiny_tokenizer

OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello"}]}
RECORDS = [{"instruction": f"Say {i}", "input": "" if i % 2 else "loudly", "output": f"{i}!"} for i in range(7)]


def _src(**kw):
    return SourceConfig(path="x.jsonl", **kw)


def test_sharegpt_and_openai_records_are_detected():
    want = extract_messages(OPENAI, _src(), "chat")
    assert extract_messages(SHAREGPT, _src(), "chat") == want
    assert [m["role"] for m in want] == ["system", "user", "assistant"]
    tool = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "function_call", "value": "calc"},
                              {"from": "observation", "value": "4"}, {"from": "gpt", "value": "4"}]}
    assert [m["role"] for m in extract_messages(tool, _src(), "chat")] == ["user", "assistant", "tool", "assistant"]


def test_configurable_keys_and_role_names():
    rec = {"dialog": [{"speaker": "me", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}
    src = _src(messages_field="dialog", role_field="speaker", content_field="text", roles={"me": "user",
                                                                                          "bot": "assistant"})
    assert extract_messages(rec, src, "chat") == [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello"}]
    with pytest.raises(RecordError, match="unknown role 'me'"):
        extract_messages(rec, _src(messages_field="dialog", role_field="speaker", content_field="text"), "chat")


def test_instruction_accepts_alpaca_and_prompt_completion():
    alpaca = extract_messages({"instruction": "Add", "input": "2 2", "output": "4"}, _src(), "instruction")
    assert alpaca == [{"role": "user", "content": "Add\n\n2 2"}, {"role": "assistant", "content": "4"}]
    pc = extract_messages({"prompt": "Add 2 2", "completion": "4"}, _src(), "instruction")
    assert pc == [{"role": "user", "content": "Add 2 2"}, {"role": "assistant", "content": "4"}]


def _write_all(d):
    """The same records in every supported file type."""
    files = {}
    files["jsonl"] = d / "r.jsonl"
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    files["json"] = d / "r.json"
    files["json"].write_text(json.dumps(RECORDS, indent=1))
    for ext, delim in (("csv", ","), ("tsv", "\t")):
        files[ext] = d / f"r.{ext}"
        with files[ext].open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(RECORDS[0]), delimiter=delim)
            w.writeheader()
            w.writerows(RECORDS)
    table = pa.Table.from_pylist(RECORDS)
    files["parquet"] = d / "r.parquet"
    pq.write_table(table, files["parquet"])
    files["arrow"] = d / "r.arrow"
    with pa.ipc.new_stream(str(files["arrow"]), table.schema) as w:  # the format `datasets` caches
        w.write_table(table)
    return files


def test_every_file_type_reads_the_same_records(tmp_path):
    files = _write_all(tmp_path)
    for fmt, path in files.items():
        recs = [r for _, r in iter_records(SourceConfig(path=str(path)), tmp_path)]
        assert recs == RECORDS, fmt
    wheres = [w for w, _ in iter_records(SourceConfig(path=str(files["csv"])), tmp_path)]
    assert wheres[0].endswith("r.csv:2") and wheres[-1].endswith("r.csv:8")  # the header is line 1
    (tmp_path / "t.txt").write_text("one doc\n\nsecond doc\n")
    assert [r for _, r in iter_records(SourceConfig(path="t.txt"), tmp_path)] == ["one doc", "second doc"]


def test_data_files_globs_in_a_folder(tmp_path):
    (tmp_path / "shards").mkdir()
    for i in range(3):
        (tmp_path / "shards" / f"part{i}.jsonl").write_text(json.dumps(RECORDS[i]) + "\n")
    (tmp_path / "shards" / "notes.md").write_text("not data")
    src = SourceConfig(path="shards", data_files="part*.jsonl")
    assert [r for _, r in iter_records(src, tmp_path)] == RECORDS[:3]


def test_streaming_hub_source_stops_at_max_records(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(500)))
    made = []
    real = datasets.load_dataset

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(datasets, "load_dataset", spy)
    cfg = DataConfig(sources=[{"path": "hub:json", "data_files": str(path), "streaming": True, "max_records": 5}],
                     format="text", max_seq_len=8, packing=False)
    data = build_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)
    assert isinstance(made[0], datasets.IterableDataset)  # records come as they are read, nothing is loaded whole
    assert data.stats["records"] == 5
    ids = [r for _, r in iter_records(cfg.sources[0], tmp_path)]
    assert len(ids) == 500 and ids[7]["text"] == "document number 7"


def test_sharegpt_csv_and_parquet_train_data(tmp_path):
    files = _write_all(tmp_path)
    tok = tiny_tokenizer()
    for fmt in ("csv", "parquet"):
        cfg = DataConfig(sources=[{"path": str(files[fmt])}], format="alpaca", max_seq_len=64)
        assert len(build_dataset(cfg, tok, base_dir=tmp_path, seed=0)) == len(RECORDS)
    (tmp_path / "sg.json").write_text(json.dumps([SHAREGPT] * 3))
    cfg = DataConfig(sources=[{"path": "sg.json"}], format="sharegpt", max_seq_len=64)
    assert len(build_dataset(cfg, tok, base_dir=tmp_path, seed=0)) == 3


def test_check_sources_names_file_and_line(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps(SHAREGPT) + "\n" + json.dumps(OPENAI) + "\n")
    rows = check_sources(DataConfig(sources=[{"path": str(good)}], format="chat"), tmp_path)
    assert rows == [{"source": str(good), "records": 2, "checked": True}]
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,output\nAdd,4\nSubtract\nMul,6\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: .*columns.*data\.sources\.0"):
        check_sources(DataConfig(sources=[{"path": str(bad)}], format="instruction"), tmp_path)
    with pytest.raises(DataError, match=r"ok\.jsonl:1: missing field 'instruction'"):
        check_sources(DataConfig(sources=[{"path": str(good)}], format="instruction"), tmp_path)


def test_validate_checks_records_without_a_model(tmp_path):
    from slimtune.cli import app

    data = tmp_path / "sg.jsonl"
    data.write_text(json.dumps(SHAREGPT) + "\n" + json.dumps({"conversations": [{"from": "alien", "value": "x"}]})
                    + "\n")
    recipe = {"model": {"name": "no/such-model"}, "adapter": {"kind": "lora", "rank": 4},
              "data": {"format": "chat", "sources": [{"path": "sg.jsonl"}]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and "sg.jsonl:2:" in res.output and "unknown role 'alien'" in res.output, res.output
    data.write_text(json.dumps(SHAREGPT) + "\n")
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert res.exit_code == 0 and "1 records of 1 local sources checked" in res.output, res.output


def test_eval_sources_are_validation_records_never_trained_on(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    held = [{"prompt": f"Held {i}", "completion": f"out {i}"} for i in range(3)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    cfg = DataConfig(sources=[{"path": "train.jsonl"}], eval_sources=[{"path": "val.jsonl"}], format="instruction",
                     max_seq_len=128, val_split=2)
    data = build_dataset(cfg, tiny_tokenizer(), base_dir=tmp_path, seed=0)
    assert len(data) == len(RECORDS) - 2 and len(data.holdout) == 2 + 3
    assert [h["source"] for h in data.holdout[2:]] == ["val"] * 3
    assert all((h["labels"] != -100).any() for h in data.holdout)
    trained = {tuple(e["input_ids"].tolist()) for e in data.examples}
    assert not trained & {tuple(h["input_ids"].tolist()) for h in data.holdout}
