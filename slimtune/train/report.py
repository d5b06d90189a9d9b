"""How the training loop reports progress. The loop only calls a ``Reporter``; the CLI renders it with rich.
``metrics.jsonl`` (one row per optimizer step) is read, appended and cut back here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    def log(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def start(self, *, total: int, done: int) -> None: ...
    def step(self, result: Any, peak_memory_bytes: int) -> None: ...
    def stop(self) -> None: ...


class SilentReporter:
    """Collects messages (tests, library use)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.warnings: list[str] = []
        self.steps: list[Any] = []

    def log(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def start(self, *, total: int, done: int) -> None:
        pass

    def step(self, result: Any, peak_memory_bytes: int) -> None:
        self.steps.append(result)

    def stop(self) -> None:
        pass


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def metric_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash is dropped."""
    rows = []
    for ln in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(ln)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows past ``step`` (they belong to a run that was killed after its last checkpoint)."""
    if path.is_file():
        path.write_text("".join(json.dumps(row) + "\n" for row in metric_rows(path) if row["step"] <= step))
