"""How the training loop reports progress. The loop only calls a ``Reporter``; the CLI renders it with rich."""

from __future__ import annotations

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
