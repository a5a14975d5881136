"""The console every command prints to."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console

PIPE_WIDTH = 200  # tables written to a file or a pipe are not wrapped at 80 columns


def make_console() -> Console:
    """A console at the terminal's width; on a pipe or file, 200 columns unless ``COLUMNS`` says otherwise."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPE_WIDTH if piped else None)


class LazyConsole:
    """Forwards to a console made at each use, so the width follows the environment at the time of printing
    (``COLUMNS`` set after import, output redirected by a test runner)."""

    def __getattr__(self, name: str) -> Any:  # Any: whatever rich.Console has under that name
        return getattr(make_console(), name)
