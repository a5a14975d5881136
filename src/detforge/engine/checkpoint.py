"""Checkpoints: atomic save, safe load, periodic + last + best files, and finding where to resume."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from detforge.engine.callbacks import Callback, StepOutput, better
from detforge.errors import CheckpointError
from detforge.files import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from detforge.engine.trainer import Trainer

LAST_POINTER = "last_checkpoint"
BEST_NAME = "model_best.pt"
FINAL_NAME = "model_final.pt"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through a temporary file and a rename: a crash never leaves half a checkpoint."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only, no code).

    Raises:
        CheckpointError: the file is missing, truncated, or holds objects other than tensors and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers ({exc}). "
            "Only load checkpoints you trust, re-saved as a state dict."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc}). It may be truncated.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(state).__name__}.")
    return state


def find_resume_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The checkpoint named in ``folder/last_checkpoint``, or None when the run has none yet."""
    pointer = Path(folder) / LAST_POINTER
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    if not path.is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist. Delete {pointer} to start over.")
    return path


class Checkpointer(Callback):
    """Saves the full training state every ``period`` steps and at the end, keeps the last ``keep_last``
    periodic files, and keeps ``model_best.pt`` for the best value of ``best_metric``.

    ``metadata`` (config, class names, dataset ids…) goes into every file. Only the main process writes.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        period: int,
        keep_last: int = 2,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.folder, self.period, self.keep_last = Path(folder), period, keep_last
        self.best_metric, self.best_mode = best_metric, best_mode
        self.metadata = metadata or {}
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.metrics: dict[str, float] = {}

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        done = out.iteration >= trainer.max_iter or trainer.stop_reason is not None
        if out.iteration % self.period and not done:
            return
        trainer.gather_rng_states()  # every rank takes part; rank 0 writes them all
        if trainer.is_main:
            path = self._write(trainer, f"model_{out.iteration:07d}.pt")
            atomic_write_text(self.folder / LAST_POINTER, path.name)
            self._prune()
            trainer.dispatch("on_checkpoint", path, "periodic")
            if done:
                final = self._write(trainer, FINAL_NAME, weights_only=True)
                trainer.dispatch("on_checkpoint", final, "final")

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.metrics = dict(metrics)
        if self.best_metric is None:
            return
        value = metrics.get(self.best_metric)
        if value is None:
            known = ", ".join(sorted(metrics))
            raise CheckpointError(f"eval.best_metric '{self.best_metric}' is not among the metrics ({known}).")
        if better(value, self.best, self.best_mode):
            self.best, self.best_iteration = value, trainer.iteration
            if trainer.is_main:
                path = self._write(trainer, BEST_NAME, weights_only=True)
                trainer.dispatch("on_checkpoint", path, "best")

    def _write(self, trainer: Trainer, name: str, *, weights_only: bool = False) -> Path:
        state = trainer.state_dict()
        if weights_only:
            state = {"model": state["model"], "ema": state["ema"], "iteration": state["iteration"]}
        state["metadata"] = {
            **self.metadata,
            "metrics": self.metrics,
            "best_metric": self.best_metric,
            "best": self.best,
        }
        return save_checkpoint(state, self.folder / name)

    def _prune(self) -> None:
        periodic = sorted(self.folder.glob("model_[0-9]*.pt"))
        for old in periodic[: max(0, len(periodic) - self.keep_last)]:
            old.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_iteration": self.best_iteration, "metrics": self.metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_iteration = state.get("best"), state.get("best_iteration")
        self.metrics = dict(state.get("metrics", {}))
