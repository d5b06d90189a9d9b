import json

import pytest

from slimtune.config.eval import AlignedFile, ExactMatchEval, TextSource
from slimtune.errors import DataError
from slimtune.eval.loaders import load_aligned, load_exact_match, load_texts
from slimtune.models.tiny import udhr_path, udhr_records


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_udhr_pairs_align_by_article(tmp_path):
    eng, src = udhr_records("eng"), udhr_records("src")
    by_article_src = {r["article"]: r["text"] for r in src}
    # Shuffle the target side: alignment must follow the id, not the line.
    shuffled = _write_jsonl(tmp_path / "src_shuffled.jsonl", list(reversed(src)))
    pairs = load_aligned(
        AlignedFile(path=str(udhr_path("eng")), id_field="article"),
        AlignedFile(path=shuffled.name, id_field="article"),
        base_dir=tmp_path,
    )
    assert len(pairs) == 31
    assert [p.id for p in pairs] == [r["article"] for r in eng]  # source order kept
    p1 = next(p for p in pairs if p.id == "1")
    assert p1.src == next(r["text"] for r in eng if r["article"] == "1")
    assert p1.tgt == by_article_src["1"]
    assert all(p.tgt == by_article_src[p.id] for p in pairs)


def test_align_by_line_and_missing_ids(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "one"}, {"id": 2, "text": "two"}, {"id": 3, "text": "x"}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"id": 3, "text": "tre"}, {"id": 1, "text": "unu"}])
    by_id = load_aligned(AlignedFile(path="a.jsonl", id_field="id"), AlignedFile(path="b.jsonl", id_field="id"),
                         base_dir=tmp_path)
    assert [(p.id, p.src, p.tgt) for p in by_id] == [("1", "one", "unu"), ("3", "x", "tre")]
    with pytest.raises(DataError, match="equal counts"):
        load_aligned(AlignedFile(path=str(a)), AlignedFile(path=str(b)), base_dir=tmp_path)
    (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("unu\n\nduos\n", encoding="utf-8")
    by_line = load_aligned(AlignedFile(path="a.txt"), AlignedFile(path="b.txt"), base_dir=tmp_path)
    assert [(p.src, p.tgt) for p in by_line] == [("one", "unu"), ("two", "duos")]


def test_load_texts_and_errors_name_file_line(tmp_path):
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"text": ""}, {"text": "c"}, {"text": "d"}])
    assert load_texts(TextSource(path="t.jsonl", max_records=2), base_dir=tmp_path) == ["a b", "c"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_texts(TextSource(path="bad.jsonl"), base_dir=tmp_path)
    _write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(DataError, match=r"nofield.jsonl:2: missing field 'text'"):
        load_texts(TextSource(path="nofield.jsonl"), base_dir=tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_texts(TextSource(path="missing.jsonl"), base_dir=tmp_path)


def test_load_exact_match(tmp_path):
    _write_jsonl(tmp_path / "em.jsonl", [{"prompt": "2+2=", "answer": 4}, {"prompt": "3+3=", "answer": "6"}])
    items = load_exact_match(ExactMatchEval(path="em.jsonl"), base_dir=tmp_path)
    assert items == [("2+2=", "4"), ("3+3=", "6")]
    assert load_exact_match(ExactMatchEval(path="em.jsonl", max_examples=1), base_dir=tmp_path) == [("2+2=", "4")]
