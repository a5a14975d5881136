"""The callback protocol and the callbacks every run uses: progress, JSONL metrics, early stopping.

Callbacks run in list order. Evaluation, checkpointing, early stopping, progress and tracking are all
callbacks; the loop in ``trainer.py`` knows none of them by name.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from detforge.files import atomic_write_text
from detforge.progress import progress_mode

if TYPE_CHECKING:
    from detforge.engine.trainer import Trainer


@dataclass(frozen=True)
class StepOutput:
    """What one optimizer step produced (losses averaged over the accumulated batches)."""

    iteration: int
    losses: dict[str, float]
    total_loss: float
    lr: float
    data_time: float
    step_time: float


class Callback:
    """Base class: override the events you need. ``on_fit_end`` always runs, even after an error."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None: ...

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path, kind: str) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def better(value: float, best: float | None, mode: Literal["max", "min"]) -> bool:
    """True when ``value`` improves on ``best`` (None: nothing yet) in ``mode``; NaN never improves."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class EarlyStopping(Callback):
    """Stop after ``patience`` evaluations in a row without improving ``metric``."""

    def __init__(self, metric: str, *, mode: Literal["max", "min"] = "max", patience: int) -> None:
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best: float | None = None
        self.bad_evals = 0

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        if better(value, self.best, self.mode):
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            trainer.stop(f"early stopping: {self.metric} has not improved for {self.patience} evaluations")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state.get("best"), int(state.get("bad_evals", 0))


class MetricsLog(Callback):
    """Appends one JSON line per logged step and per evaluation to ``metrics.jsonl`` (main process only).

    On resume, lines from after the resumed iteration (written by the interrupted run) are dropped first, so
    the log reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, *, period: int = 20) -> None:
        self.path, self.period = Path(path), period

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if _line_iteration(ln) <= trainer.iteration]
            atomic_write_text(self.path, "".join(f"{ln}\n" for ln in kept))

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        if trainer.is_main and (out.iteration % self.period == 0 or out.iteration == trainer.max_iter):
            record = {
                "iteration": out.iteration,
                "loss": out.total_loss,
                **out.losses,
                "lr": out.lr,
                "data_time": out.data_time,
                "step_time": out.step_time,
            }
            self._append(record)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_main:
            self._append({"iteration": trainer.iteration, **{f"eval/{k}": v for k, v in metrics.items()}})

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _line_iteration(line: str) -> float:
    try:
        return float(json.loads(line).get("iteration", math.inf))
    except (ValueError, AttributeError):
        return math.inf


class ProgressBar(Callback):
    """A rich bar with ETA, it/s, the loss terms and the lr on terminals (main process only); elsewhere, such as
    in CI logs, one plain line every ``period`` steps (see :func:`detforge.progress.progress_mode`)."""

    def __init__(self, *, period: int = 20) -> None:
        self._bar: Progress | None = None
        self._task: Any = None
        self._started = 0.0
        self._first = 0
        self.period = period
        self._lines = False

    def on_fit_start(self, trainer: Trainer) -> None:
        self._started, self._first = time.perf_counter(), trainer.iteration
        self._lines = trainer.is_main and progress_mode() == "lines"
        if not (trainer.is_main and progress_mode() == "bar"):
            return
        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=trainer.max_iter, completed=trainer.iteration, rate="", info="")
        self._started = time.perf_counter()
        self._first = trainer.iteration

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        if self._bar is None and not self._lines:
            return
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = (out.iteration - self._first) / elapsed
        terms = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in out.losses.items())
        info = f"loss={out.total_loss:.3f} {terms} lr={out.lr:.2e}"
        if self._bar is not None:
            self._bar.update(self._task, completed=out.iteration, rate=f"{rate:.2f} it/s", info=info)
        elif out.iteration % self.period == 0 or out.iteration == trainer.max_iter:
            eta = (trainer.max_iter - out.iteration) / max(rate, 1e-9)
            print(
                f"iter {out.iteration}/{trainer.max_iter} {rate:.2f} it/s eta {eta:.0f}s {info}",
                file=sys.stderr,
                flush=True,
            )

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.count("/") == 1)
        if self._bar is not None:
            self._bar.console.print(f"[cyan]eval @ {trainer.iteration}:[/] {shown}", highlight=False)
        elif self._lines:
            print(f"eval @ {trainer.iteration}: {shown}", file=sys.stderr, flush=True)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
