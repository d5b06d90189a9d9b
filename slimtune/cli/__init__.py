"""The `slimtune` command. The only package that prints with rich.

One module per group of commands; each registers on `slimtune.cli.app.app`. A new command is a new module here
plus one import line below.
"""

from __future__ import annotations

import sys

# The order of these imports is the order of `slimtune --help`.
from slimtune.cli import runs  # noqa: F401,I001  (each import registers its commands)
from slimtune.cli import models  # noqa: F401
from slimtune.cli import chat  # noqa: F401
from slimtune.cli import loram  # noqa: F401
from slimtune.cli import evaluate  # noqa: F401
from slimtune.cli import bench  # noqa: F401
from slimtune.cli import study  # noqa: F401
from slimtune.cli import kernels  # noqa: F401
from slimtune.cli.app import _quiet_third_party, _resume_value, app, err_console  # noqa: F401
from slimtune.errors import SlimtuneError


def main() -> None:
    _quiet_third_party()
    sys.argv[1:] = _resume_value(sys.argv[1:])
    try:
        app()
    except SlimtuneError as e:  # pragma: no cover - commands are guarded; this is a last line of defence
        err_console.print(f"error: {e}", highlight=False)
        sys.exit(e.exit_code)
