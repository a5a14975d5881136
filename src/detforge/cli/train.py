"""`detforge train` and `detforge eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from detforge.cli.output import LazyConsole

console = LazyConsole()

Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides such as train.lr=0.005 model.arch=maskrcnn_resnet50_fpn.")
]


def train_cmd(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/ and docs/config.md).")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in output.dir.")] = False,
) -> None:
    """Train a detector or segmenter."""
    from detforge.api import train

    result = train(config, overrides or [], resume=resume)
    if result.stop_reason:
        console.print(f"stopped at iteration {result.iteration}: {result.stop_reason}", highlight=False)
    console.print(f"output: {result.output_dir}", highlight=False)
    if result.best_checkpoint:
        console.print(f"best checkpoint: {result.best_checkpoint}", highlight=False)
    if result.final_checkpoint:
        console.print(f"final checkpoint: {result.final_checkpoint}", highlight=False)
    shown = {k: v for k, v in result.metrics.items() if k.count("/") == 1}
    if shown:
        console.print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()), highlight=False)


def eval_cmd(
    config: Annotated[Path, typer.Argument(help="YAML config; set model.weights and data.val.")],
    overrides: Overrides = None,
) -> None:
    """Evaluate a checkpoint on data.val: COCO AP, per-class AP, results JSON."""
    from detforge.api import evaluate

    result = evaluate(config, overrides or [])
    console.print(result.table())
    shown = {k: v for k, v in result.metrics.items() if k.count("/") == 1}
    console.print(", ".join(f"{k}={v:.4f}" for k, v in shown.items()), highlight=False)
