"""`slimtune validate`'s data check: open every local source and check its first records against the format.

No tokenizer and no model: the records are parsed and turned into what the format needs (document text, or a
conversation with an assistant turn), so a wrong format, a missing field or an unknown role is reported as
`file:line: ...` before any model is loaded. Hub sources are not opened (that may download); they are read by
the run itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.config.data import DataConfig
from slimtune.data.preference import check_preference_record
from slimtune.data.prompts import prompt_messages
from slimtune.data.readers import HUB_PREFIX, Invalid, RecordError, extract_messages, extract_text, iter_records
from slimtune.errors import DataError

CHECK_RECORDS = 200  # records checked per source: enough to catch a wrong format, fast on any file


def check_record(rec: Any, src, fmt: str) -> None:
    """Raise RecordError when `rec` cannot be used for `fmt`."""
    if isinstance(rec, Invalid):
        raise RecordError(rec.reason)
    if fmt in ("preference", "kto"):
        check_preference_record(rec, src, fmt)
        return
    if fmt == "prompt":
        prompt_messages(rec, src)
        return
    if fmt == "text":
        extract_text(rec, src)
        return
    msgs = extract_messages(rec, src, fmt)
    if not any(m["role"] == "assistant" for m in msgs):
        raise RecordError("no assistant message (nothing to learn from)")


def check_sources(cfg: DataConfig, base_dir: Path, *, limit: int = CHECK_RECORDS, where: str = "data"
                  ) -> list[dict[str, Any]]:
    """Check the first `limit` records of every local source of `cfg` (main and replay).

    Returns one {"source", "records", "checked"} row per source ("checked" False for hub sources). Raises
    DataError naming `file:line` and the recipe key of the first bad record (whatever `on_error` says: validate
    shows what a run would meet).
    """
    rows = []
    groups = [("sources", cfg.sources)] + ([("replay.sources", cfg.replay.sources)] if cfg.replay else [])
    groups.append(("eval_sources", cfg.eval_sources))
    for group, sources in groups:
        for i, src in enumerate(sources):
            if src.path.startswith(HUB_PREFIX) and not src.data_files:
                rows.append({"source": src.path, "records": 0, "checked": False})
                continue
            n = 0
            for loc, rec in _local(src, base_dir):
                try:
                    check_record(rec, src, cfg.format)
                except RecordError as e:
                    raise DataError(f"{loc}: {e} ({where}.{group}.{i}, format: {cfg.format})") from None
                n += 1
                if n >= limit:
                    break
            if n == 0:
                raise DataError(f"{where}.{group}.{i}: {src.path}: no records")
            rows.append({"source": src.path, "records": n, "checked": True})
    return rows


def _local(src, base_dir: Path):
    if src.path.startswith(HUB_PREFIX):  # hub:json / hub:csv with local data_files: read them through datasets
        yield from iter_records(src.model_copy(update={"streaming": True}), base_dir)
    else:
        yield from iter_records(src, base_dir)
