"""User-facing errors: each renders as exactly one line, and the CLI maps it to an exit code.

Raise these (never print-and-exit) anywhere in the package; `slimtune.cli` catches them, prints
`error: <message>` and exits with `exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SlimtuneError(Exception):
    """Base class. `str(err)` must be one line that names the place (file, key path, file:line)."""

    exit_code: int = 2

    def __init__(self, message: str):
        # Collapse to one line: a user sees one sentence, never a wall of text.
        super().__init__(" ".join(str(message).split()))


class RecipeError(SlimtuneError):
    """A recipe that does not validate: names the file and the dotted key path."""


class DataError(SlimtuneError):
    """A data source or record that cannot be read: names file:line where there is one."""


class ModelError(SlimtuneError):
    """A base model, tokenizer or config that cannot be loaded."""


class ResourceError(SlimtuneError):
    """Out of memory or another resource limit hit during a run (exit code 3)."""

    exit_code = 3
