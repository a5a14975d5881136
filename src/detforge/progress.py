"""Progress bars for long jobs (rich), shown on terminals and quiet elsewhere unless asked for."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")


def progress_mode() -> str:
    """ "bar" on a terminal, "lines" elsewhere (logs), "off" with DETFORGE_PROGRESS=0; =1 forces bars."""
    forced = os.environ.get("DETFORGE_PROGRESS")
    if forced is not None:
        return "off" if forced in ("0", "", "false", "no") else "bar"
    return "bar" if sys.stderr.isatty() else "lines"


def progress_enabled() -> bool:
    """Whether to draw bars (see :func:`progress_mode`)."""
    return progress_mode() == "bar"


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``23.4 frames/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def track(items: Iterable[T], description: str, *, total: int | None = None, unit: str | None = None) -> Iterator[T]:
    """Yield ``items`` while drawing a bar with count, rate and ETA (and ``unit``/s when a unit is given)."""
    if not progress_enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *([RateColumn(unit)] if unit else []),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
