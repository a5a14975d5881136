"""The tracker protocol: a callback that records a run (params, metrics, images, model versions) somewhere.

The training loop has no tracker branches: :func:`build_tracker` returns one callback for ``tracking.backend``
(:class:`~detforge.tracking.mlflow_tracker.MlflowTracker`, ``WandbTracker`` or :class:`NullTracker`) and it
joins the other callbacks. What every backend needs beyond the trainer (the config, the validation set, the
dataset and parent-model references) comes in a :class:`RunContext`.
"""

from __future__ import annotations

import getpass
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from detforge.config import Config
from detforge.data.records import Dataset
from detforge.engine.callbacks import Callback, StepOutput, better
from detforge.errors import ConfigError

if TYPE_CHECKING:
    from detforge.engine.trainer import Trainer

__all__ = [
    "BestAliases",
    "NullTracker",
    "RunContext",
    "Tracker",
    "alias_for_metric",
    "build_tracker",
    "flatten_config",
    "run_environment",
    "save_evaluated_weights",
    "step_values",
]

PACKAGES = ("detforge", "torch", "torchvision", "mlflow", "faster-coco-eval", "pycocotools", "numpy", "wandb")


@dataclass
class RunContext:
    """What a tracker knows of the run besides the trainer.

    Attributes:
        config: the resolved config.
        out_dir: the run's output folder (the tracker keeps its spool and run id in ``out_dir/tracking``).
        val: the validation set (prediction images are drawn from its first images), or None.
        class_names: the model's classes, in label order.
        datasets: role (``train``/``val``) -> exact dataset version ref ``dataset:NAME:vN``, when known.
        parent_model: the exact ``model:NAME:vN`` the weights came from, when they came from the registry.
        metadata: what every checkpoint carries (config, class and keypoint names, arch).
    """

    config: Config
    out_dir: Path
    val: Dataset | None = None
    class_names: list[str] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)
    parent_model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Tracker(Callback):
    """A callback that records the run. Subclasses override the callback events they need."""

    backend = "none"

    def describe(self) -> str:
        """One line for the user: where the run is recorded."""
        return "tracking off"


class NullTracker(Tracker):
    """``tracking.backend=none``: records nothing (the JSONL metrics log and checkpoints are still written)."""


def build_tracker(ctx: RunContext, *, is_main: bool) -> Tracker:
    """The tracker for ``ctx.config.tracking.backend``; other ranks than the main one get a NullTracker."""
    backend = ctx.config.tracking.backend
    if backend == "none" or not is_main:
        return NullTracker()
    if backend == "wandb":
        from detforge.tracking.wandb_tracker import WandbTracker

        return WandbTracker(ctx)
    from detforge.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(ctx)


# ---------------------------------------------------------------------------------------------------------
# best-<metric> aliases


def alias_for_metric(metric: str) -> str:
    """The model alias for the best value of ``metric``: ``segm/AP`` -> ``best-segm-AP``.

    Registry aliases may hold only letters, digits, ``_`` and ``-`` (MLflow's rule), so every other character
    becomes ``-``. References accept either spelling: ``model:NAME@best-segm/AP`` means ``@best-segm-AP``.
    """
    return "best-" + re.sub(r"[^\w-]", "-", metric.removesuffix(":min").removesuffix(":max"))


def sanitise_alias(alias: str) -> str:
    """``alias`` as stored in the registry (see :func:`alias_for_metric`)."""
    return re.sub(r"[^\w-]", "-", alias)


class BestAliases:
    """Which ``best-<metric>`` aliases an evaluation moves.

    The metrics are ``eval.best_metric`` (direction ``eval.best_mode``) and every entry of ``eval.best_metrics``
    (``NAME`` is larger-is-better, ``NAME:min`` smaller-is-better).
    """

    def __init__(self, config: Config) -> None:
        self.modes: dict[str, Literal["max", "min"]] = {config.eval.best_metric: config.eval.best_mode}
        for spec in config.eval.best_metrics:
            name, _, mode = spec.partition(":")
            self.modes[name] = "min" if mode == "min" else "max"
        self.best: dict[str, float] = {}

    def improved(self, metrics: dict[str, float]) -> list[str]:
        """The metrics of ``metrics`` that beat their best so far (the bests are updated)."""
        unknown = [name for name in self.modes if name not in metrics]
        if unknown:
            raise ConfigError(
                f"eval.best_metrics: {', '.join(unknown)} not among the evaluation's metrics "
                f"({', '.join(sorted(metrics))}). Use those names, e.g. eval.best_metrics=[bbox/AP50]."
            )
        moved = []
        for name, mode in self.modes.items():
            value = metrics.get(name)
            if value is None or not math.isfinite(value) or value == -1.0:  # -1: COCO had nothing to average
                continue
            if better(value, self.best.get(name), mode):
                self.best[name] = value
                moved.append(name)
        return moved

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = {k: float(v) for k, v in state.get("best", {}).items()}


# ---------------------------------------------------------------------------------------------------------
# what every run records


def step_values(out: StepOutput) -> dict[str, float]:
    """The metric points of one logged training step: loss terms, total loss, lr, data and step time."""
    values = {f"train/{k}": v for k, v in out.losses.items()}
    values.update({"train/loss": out.total_loss, "train/lr": out.lr, "time/data": out.data_time,
                   "time/step": out.step_time})  # fmt: skip
    return values


def save_evaluated_weights(trainer: Trainer, ctx: RunContext, metrics: dict[str, float], path: Path) -> Path:
    """The weights just evaluated (the EMA when there is one) as a weights-only checkpoint with metadata."""
    from detforge.engine.checkpoint import save_checkpoint

    model = trainer.ema.module if trainer.ema is not None else trainer.unwrapped_model
    state = {"model": model.state_dict(), "iteration": trainer.iteration, "metadata": {**ctx.metadata,
             "metrics": dict(metrics)}}  # fmt: skip
    return save_checkpoint(state, path)


def flatten_config(config: Config) -> dict[str, str]:
    """The config as dotted ``key -> value`` strings (lists and dicts as compact JSON-ish text)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return flat


def run_environment(repo: Path | None = None) -> dict[str, str]:
    """Git commit and dirty flag, package versions and machine facts, as run tags."""
    tags = {f"detforge.version.{name}": version for name in PACKAGES if (version := _version(name))}
    tags.update(_git(repo or Path.cwd()))
    tags.update(
        {
            "detforge.machine.host": platform.node(),
            "detforge.machine.platform": platform.platform(),
            "detforge.machine.python": platform.python_version(),
            "detforge.machine.cpus": str(os.cpu_count() or 0),
            "detforge.machine.gpus": _gpus(),
            "detforge.user": _user(),
        }
    )
    return tags


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(repo: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "detforge.git.dirty": str(bool(dirty)).lower()}


def _gpus() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none"
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
