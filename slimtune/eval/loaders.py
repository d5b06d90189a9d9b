"""Read the eval data named in an `EvalConfig`: texts for perplexity, aligned pairs, exact-match items.

Local files: `.jsonl` (one object per line), `.json` (a list of objects) or `.txt` (one record per non-empty line).
Every problem is a `DataError` naming file:line. Hub sources import `datasets` only when they are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from slimtune.config.eval import AlignedFile, ExactMatchEval, FloresSpec, TextSource
from slimtune.errors import DataError


class Pair(NamedTuple):
    """One aligned segment pair; `id` is the alignment key (line number, or the `id_field` value)."""

    id: str
    src: str
    tgt: str


def resolve(path: str | Path, base_dir: Path) -> Path:
    """`path` as given when absolute, else relative to `base_dir` (the recipe's folder)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def read_records(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) for each record of a local file; `.txt` records are the stripped lines."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".txt":
        return [(i, line.strip()) for i, line in enumerate(raw.splitlines(), 1) if line.strip()]
    if suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}:1: expected a JSON list of records")
        return [(i, rec) for i, rec in enumerate(data, 1)]  # record index stands in for the line
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        return out
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .txt)")


def _field(path: Path, line: int, record: Any, field: str, *, allow_number: bool = False) -> str:
    if isinstance(record, str):  # .txt record
        return record
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line}: expected a JSON object")
    if field not in record:
        raise DataError(f"{path}:{line}: missing field {field!r}")
    value = record[field]
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def load_texts(source: TextSource, *, base_dir: Path) -> list[str]:
    """The texts of a perplexity source (at most `max_records`, empty texts dropped)."""
    if source.path is not None:
        path = resolve(source.path, base_dir)
        texts = [_field(path, i, rec, source.field) for i, rec in read_records(path)]
        where = str(path)
    else:
        texts = _load_hub_texts(source)
        where = f"hub dataset {source.display_name}"
    texts = [t for t in texts if t.strip()][: source.max_records]
    if not texts:
        raise DataError(f"{where}: no non-empty texts in field {source.field!r}")
    return texts


def _load_hub_texts(source: TextSource) -> list[str]:
    from datasets import load_dataset  # imported only when a hub source is used

    try:
        ds = load_dataset(source.hub, source.subset, split=source.split, streaming=True)
        texts = []
        for rec in ds:
            if source.field not in rec:
                raise DataError(f"hub dataset {source.display_name}: missing field {source.field!r}")
            if isinstance(rec[source.field], str) and rec[source.field].strip():
                texts.append(rec[source.field])
            if source.max_records is not None and len(texts) >= source.max_records:
                break
    except DataError:
        raise
    except Exception as e:  # network, auth, unknown dataset: one line naming the source
        raise DataError(f"hub dataset {source.display_name} (split {source.split}): cannot load: {e}") from None
    return texts


def _keyed(spec: AlignedFile, base_dir: Path) -> tuple[Path, list[tuple[str, str]]]:
    path = resolve(spec.path, base_dir)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for n, (line, rec) in enumerate(read_records(path)):
        text = _field(path, line, rec, spec.field)
        if spec.id_field is None:
            key = str(n)
        else:
            if isinstance(rec, str):
                raise DataError(f"{path}: id_field {spec.id_field!r} needs .jsonl or .json records")
            key = _field(path, line, rec, spec.id_field, allow_number=True)
            if key in seen:
                raise DataError(f"{path}:{line}: duplicate {spec.id_field} {key!r}")
            seen.add(key)
        out.append((key, text))
    return path, out


def load_aligned(src: AlignedFile, tgt: AlignedFile, *, base_dir: Path) -> list[Pair]:
    """Pairs of a local parallel set, in the source file's order.

    With `id_field` on both sides, records are matched by that id (ids on one side only are skipped); without,
    by position (the files must then have the same number of records).
    """
    if (src.id_field is None) != (tgt.id_field is None):
        raise DataError(f"{src.path} / {tgt.path}: set id_field on both sides or on neither")
    src_path, src_recs = _keyed(src, base_dir)
    tgt_path, tgt_recs = _keyed(tgt, base_dir)
    if src.id_field is None and len(src_recs) != len(tgt_recs):
        raise DataError(
            f"{src_path} has {len(src_recs)} records but {tgt_path} has {len(tgt_recs)}; "
            "align by line needs equal counts (or set id_field)"
        )
    tgt_by_id = dict(tgt_recs)
    pairs = [Pair(k, s, tgt_by_id[k]) for k, s in src_recs if k in tgt_by_id]
    pairs = [p for p in pairs if p.src.strip() and p.tgt.strip()]
    if not pairs:
        raise DataError(f"{src_path} / {tgt_path}: no aligned pairs")
    return pairs


def load_flores(spec: FloresSpec) -> list[Pair]:
    """FLORES-200/FLORES+ pairs for one direction (two per-language configurations of `spec.dataset`)."""
    from datasets import load_dataset  # imported only when FLORES is used

    sides = []
    for code in (spec.src_lang, spec.tgt_lang):
        try:
            ds = load_dataset(spec.dataset, code, split=spec.split)
        except Exception as e:
            raise DataError(f"hub dataset {spec.dataset} ({code}, {spec.split}): cannot load: {e}") from None
        field = spec.field or ("text" if "text" in ds.column_names else "sentence")
        if field not in ds.column_names:
            raise DataError(f"hub dataset {spec.dataset} ({code}): no field {field!r} in {ds.column_names}")
        ids = [str(i) for i in ds["id"]] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        sides.append(dict(zip(ids, ds[field])))
    src, tgt = sides
    pairs = [Pair(k, s, tgt[k]) for k, s in src.items() if k in tgt]
    if not pairs:
        raise DataError(f"hub dataset {spec.dataset}: no aligned {spec.src_lang}/{spec.tgt_lang} pairs")
    return pairs


def load_exact_match(task: ExactMatchEval, *, base_dir: Path) -> list[tuple[str, str]]:
    """(prompt, answer) items of an exact-match task (answers may be numbers in the file)."""
    path = resolve(task.path, base_dir)
    items = []
    for line, rec in read_records(path):
        if isinstance(rec, str):
            raise DataError(f"{path}:{line}: exact-match items need .jsonl or .json records")
        items.append(
            (
                _field(path, line, rec, task.prompt_field),
                _field(path, line, rec, task.answer_field, allow_number=True),
            )
        )
    if not items:
        raise DataError(f"{path}: no items")
    return items[: task.max_examples]
