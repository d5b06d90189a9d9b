"""Readers: turn a source (local json/jsonl/csv/tsv/txt/parquet/arrow file, glob, or `hub:` dataset) into located
raw records.

Every reader yields `(where, record)` pairs. `where` names the place for error messages:

- jsonl: `path:LINE` (1-based line number)
- json: `path:LINE` of the record's first character (a top-level list, or the list under "data")
- txt: `path:LINE` of the paragraph's (or line's) first line; `path` for `txt_split: file`
- csv/tsv: `path:LINE` of the record's first line (the header is line 1)
- parquet/arrow: `path:row N` (0-based row index, as `pyarrow`/`pandas` count)
- hub: `hub:name[split]:row N` (also when streaming)

A record is a dict (json/jsonl/parquet/hub), a str (txt), or an `Invalid` marker for a line that could not be
parsed; the builder decides whether that raises or is skipped (`on_error`). File-level problems (missing file,
unknown type, a JSON file that does not parse) always raise `DataError`.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.config.data import SourceConfig
from slimtune.errors import DataError

HUB_PREFIX = "hub:"
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt",
             ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".arrow": "arrow", ".feather": "arrow"}


@dataclass(frozen=True)
class Invalid:
    """A record that could not be parsed at all (the reason is one line)."""

    reason: str


class RecordError(Exception):
    """A malformed record; the builder prefixes it with the record's `where` and raises or skips it."""


def source_name(src: SourceConfig) -> str:
    """The name a source has in stats: `name`, else the hub dataset name or the file stem."""
    if src.name:
        return src.name
    if src.path.startswith(HUB_PREFIX):
        return src.path[len(HUB_PREFIX):] + (f"/{src.subset}" if src.subset else "")
    return Path(src.path).stem if not any(c in src.path for c in "*?[") else src.path


def _globs(src: SourceConfig) -> list[str]:
    return [src.data_files] if isinstance(src.data_files, str) else list(src.data_files or [])


def resolve_files(src: SourceConfig, base_dir: Path) -> list[Path]:
    """The local files of a source (a glob expands to its sorted matches; a folder with `data_files` to the
    matches of its globs); raises DataError if there are none."""
    p = Path(os.path.expanduser(src.path))
    if not p.is_absolute():
        p = Path(base_dir) / p
    if src.data_files:
        files = [Path(f) for g in _globs(src) for f in sorted(glob.glob(str(p / g), recursive=True))
                 if Path(f).is_file()]
        if not files:
            raise DataError(f"{p}: no files match data_files {src.data_files}")
        return files
    if any(c in src.path for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
        if not files:
            raise DataError(f"{p}: no files match this pattern")
        return files
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if not p.is_file():
        raise DataError(f"{p}: not a file (use a glob such as {p}/*.jsonl for a folder)")
    return [p]


def file_format(path: Path, src: SourceConfig) -> str:
    if src.file_format:
        return src.file_format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown file type '{path.suffix}' (use .json, .jsonl, .csv, .tsv, .txt, .parquet or .arrow, "
            "or set file_format)"
        )
    return fmt


def iter_records(src: SourceConfig, base_dir: Path) -> Iterator[tuple[str, Any]]:
    """Yield `(where, record)` for every record of a source, in file order."""
    if src.path.startswith(HUB_PREFIX):
        yield from _hub_records(src, base_dir)
        return
    for path in resolve_files(src, base_dir):
        fmt = file_format(path, src)
        if fmt == "jsonl":
            yield from _jsonl_records(path)
        elif fmt == "json":
            yield from _json_records(path)
        elif fmt == "txt":
            yield from _txt_records(path, src.txt_split)
        elif fmt in ("csv", "tsv"):
            yield from _csv_records(path, "\t" if fmt == "tsv" else ",")
        elif fmt == "arrow":
            yield from _arrow_records(path)
        else:
            yield from _parquet_records(path)


# ----------------------------------------------------------------------------------------------------------- jsonl
def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, Invalid(f"invalid UTF-8 (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, Invalid(f"invalid JSON ({e.msg}, column {e.colno})")


# ------------------------------------------------------------------------------------------------------------ json
def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        items = data["data"]
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(f'{path}: expected a list of records or an object {{"data": [...]}}')
    lines = _element_lines(text)
    if lines is not None and len(lines) != len(items):
        lines = None
    for i, rec in enumerate(items):
        yield (f"{path}:{lines[i]}" if lines else f"{path}: record {i}"), rec


def _element_lines(text: str) -> list[int] | None:
    """1-based line numbers of the elements of the top-level list (or of the list under "data")."""
    dec = json.JSONDecoder()
    n = len(text)

    def ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    try:
        i = ws(0)
        if text[i] == "{":
            i = ws(i + 1)
            found = False
            while text[i] != "}":
                key, i = dec.raw_decode(text, i)
                i = ws(i)
                i = ws(i + 1)  # ':'
                if key == "data" and text[i] == "[":
                    found = True
                    break
                _, i = dec.raw_decode(text, i)
                i = ws(i)
                if text[i] == ",":
                    i = ws(i + 1)
            if not found:
                return None
        if text[i] != "[":
            return None
        i = ws(i + 1)
        starts: list[int] = []
        while text[i] != "]":
            starts.append(i)
            _, i = dec.raw_decode(text, i)
            i = ws(i)
            if text[i] == ",":
                i = ws(i + 1)
    except (IndexError, ValueError):
        return None
    newlines = [m.start() for m in re.finditer("\n", text)]
    return [bisect.bisect_left(newlines, s) + 1 for s in starts]


# ------------------------------------------------------------------------------------------------------------- txt
def _txt_records(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    text = text.replace("\r\n", "\n")
    if split == "file":
        if text.strip():
            yield str(path), text.strip("\n")
        return
    lines = text.split("\n")
    if split == "line":
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                yield f"{path}:{lineno}", line
        return
    para: list[str] = []
    start = 0
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            if not para:
                start = lineno
            para.append(line)
        elif para:
            yield f"{path}:{start}", "\n".join(para)
            para = []
    if para:
        yield f"{path}:{start}", "\n".join(para)


# --------------------------------------------------------------------------------------------------------- parquet
def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with multi-line messages
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield f"{path}:row {row}", rec
            row += 1


# ------------------------------------------------------------------------------------------------------- csv, tsv
def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    import csv

    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header:
                return
            start = reader.line_num + 1
            for row in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield where, Invalid(f"{len(row)} columns, the header has {len(header)}")
                    continue
                yield where, dict(zip(header, row))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 (byte {e.start})") from None
        except csv.Error as e:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise DataError(f"{path}:{reader.line_num}: invalid {kind} ({e})") from None


# ----------------------------------------------------------------------------------------------------------- arrow
def _arrow_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Arrow IPC files: the stream format `datasets` caches (`*.arrow`) and the random-access file format."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        batches = iter(reader)
    except Exception:  # not a stream: the file (Feather v2) format
        try:
            f = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = (f.get_batch(i) for i in range(f.num_record_batches))
        except Exception as e:
            raise DataError(f"{path}: not a readable Arrow IPC file ({type(e).__name__}: {e})") from None
    row = 0
    for batch in batches:
        for rec in batch.to_pylist():
            yield f"{path}:row {row}", rec
            row += 1


# ------------------------------------------------------------------------------------------------------------- hub
def _hub_records(src: SourceConfig, base_dir: Path) -> Iterator[tuple[str, Any]]:
    name = src.path[len(HUB_PREFIX):].strip()
    if not name:
        raise DataError(f"{src.path}: empty hub dataset name")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{src.path}: the `datasets` package is needed for hub sources") from None
    label = f"hub:{name}" + (f"/{src.subset}" if src.subset else "") + f"[{src.split}]"
    files = None
    if src.data_files:  # local globs are taken from the recipe's folder (hub repos resolve their own paths)
        files = [str(Path(base_dir) / g) if not Path(g).is_absolute() and (Path(base_dir) / g).parent.exists()
                 else g for g in _globs(src)]
    try:
        extra = {k: v for k, v in (("revision", src.revision), ("data_files", files), ("streaming", src.streaming))
                 if v}
        ds = datasets.load_dataset(name, src.subset, split=src.split, **extra)
    except Exception as e:  # offline, unknown name, missing split: one line for the user
        offline = " (HF_HUB_OFFLINE=1: only cached datasets load)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise DataError(f"{label}: cannot load{offline}: {type(e).__name__}: {e}") from None
    it = iter(ds)  # streaming: records are fetched as this iterator advances; the caller stops at max_records
    i = 0
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as e:  # a network or decoding failure while streaming
            raise DataError(f"{label}:row {i}: cannot read ({type(e).__name__}: {e})") from None
        yield f"{label}:row {i}", rec
        i += 1


# --------------------------------------------------------------------------------------------- record -> content
def extract_text(rec: Any, src: SourceConfig) -> str:
    """The document text of a record for `format: text`."""
    if isinstance(rec, str):
        return rec
    return _field(rec, src.text_field, str)


# ShareGPT / LLaMA-Factory role names → the chat-template roles.
ROLE_NAMES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "human": "user",
              "gpt": "assistant", "model": "assistant", "bot": "assistant", "function_call": "assistant",
              "observation": "tool", "function": "tool", "ipython": "tool"}


def _pick(rec: dict, given: str | None, defaults: tuple[str, ...]) -> str:
    """The field to read: the configured one, else the first default the record has (else the first default)."""
    if given:
        return given
    return next((k for k in defaults if k in rec), defaults[0])


def extract_messages(rec: Any, src: SourceConfig, fmt: str) -> list[dict]:
    """The conversation of a record for `format: chat` or `format: instruction`, as a list of {role, content}.

    chat: OpenAI `messages` ({role, content}) or ShareGPT `conversations` ({from, value}; roles human/gpt/system/
    tool), detected per record unless the fields are configured. instruction: alpaca instruction/input/output or
    prompt/completion (or response).
    """
    if isinstance(rec, str):
        raise RecordError(f"format: {fmt} needs structured records (json, jsonl, csv, parquet or hub), not plain text")
    if not isinstance(rec, dict):
        raise RecordError(f"record must be a JSON object, got {_type_name(rec)}")
    if fmt == "instruction":
        instruction = _field(rec, _pick(rec, src.instruction_field, ("instruction", "prompt", "question")), str)
        output = _field(rec, _pick(rec, src.output_field, ("output", "completion", "response", "answer")), str)
        extra = _field(rec, src.input_field, str, required=False)
        system = _field(rec, src.system_field, str, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    key = _pick(rec, src.messages_field, ("messages", "conversations", "conversation"))
    messages = _field(rec, key, list)
    if not messages:
        raise RecordError(f"field '{key}' is an empty list")
    out = []
    system = _field(rec, src.system_field, str, required=False)  # ShareGPT keeps the system prompt beside the turns
    if system:
        out.append({"role": "system", "content": system})
    roles = {**ROLE_NAMES, **src.roles}
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"{key}[{j}] must be an object with role and content, got {_type_name(m)}")
        rk = _pick(m, src.role_field, ("role", "from"))
        ck = _pick(m, src.content_field, ("content", "value", "text"))
        for k in (rk, ck):
            if k not in m:
                raise RecordError(f"{key}[{j}]: missing field '{k}'")
            if not isinstance(m[k], str):
                raise RecordError(f"{key}[{j}].{k} must be a string, got {_type_name(m[k])}")
        role = roles.get(m[rk])
        if role is None:
            raise RecordError(f"{key}[{j}].{rk}: unknown role {m[rk]!r} (known: {', '.join(sorted(roles))}; map "
                              f"others with the source's roles: {{{m[rk]}: assistant}})")
        out.append({"role": role, "content": m[ck]})
    return out


def _field(rec: Any, name: str, typ: type, *, required: bool = True) -> Any:
    if not isinstance(rec, dict):
        raise RecordError(f"record must be a JSON object, got {_type_name(rec)}")
    if name not in rec or (rec[name] is None and not required):
        if required:
            raise RecordError(f"missing field '{name}'")
        return None
    value = rec[name]
    if typ is list and hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from parquet
    if not isinstance(value, typ):
        kind = "a string" if typ is str else "a list"
        raise RecordError(f"field '{name}' must be {kind}, got {_type_name(value)}")
    return value


def _type_name(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)
