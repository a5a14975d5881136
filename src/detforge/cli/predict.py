"""`detforge predict` and `detforge show-predictions`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from detforge.cli.output import LazyConsole

console = LazyConsole()


def predict_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint path, http(s) URL or model:NAME[:vN|@ALIAS].")],
    inputs: Annotated[list[str], typer.Argument(help="Images, folders, glob patterns or videos (mp4, avi, mov, mkv).")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
    score_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Minimum score kept.")] = 0.5,
    classes: Annotated[list[str] | None, typer.Option(help="Keep only these classes (repeat, or list them).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images or frames per forward pass.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 …")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, bf16 (autocast) or auto (bf16 where the CPU has it).")] = "auto",
    backend: Annotated[
        str,
        typer.Option(
            help="auto (fastest for the job: ONNX Runtime on CPU from a cached export when it pays off), "
            "torch, or onnxruntime (an exported .onnx, or MODEL exported once into the cache)."
        ),
    ] = "auto",
    no_images: Annotated[bool, typer.Option("--no-images", help="Write JSON only, no annotated images.")] = False,
) -> None:
    """Detect (and segment) objects in images and videos: annotated images/mp4 and JSON."""
    from detforge.inference.run import predict

    summary = predict(
        model, inputs, out, score_threshold=score_threshold, classes=classes, batch_size=batch_size, device=device,
        precision=precision, backend=backend, save_images=not no_images,
    )  # fmt: skip
    for line in summary.lines():
        console.print(line, highlight=False, markup=False)


def show_predictions_cmd(
    results: Annotated[Path, typer.Argument(help="COCO results JSON (from predict, eval or any COCO tool).")],
    dataset: Annotated[Path, typer.Option(help="The COCO json the results refer to (its images are read).")],
    out: Annotated[Path, typer.Option(help="Output folder for the drawn images.")] = Path("shown"),
    score_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Minimum score drawn.")] = 0.3,
    limit: Annotated[int | None, typer.Option(min=1, help="Draw only the first N images.")] = None,
    ground_truth: Annotated[bool, typer.Option(help="Draw the dataset's annotations beside the predictions.")] = True,
) -> None:
    """Draw saved predictions on their images (ground truth beside them when the dataset has annotations)."""
    from detforge.inference.show import show_predictions

    written, skipped = show_predictions(
        results, dataset, out, score_threshold=score_threshold, limit=limit, ground_truth=ground_truth
    )
    console.print(f"{written} images drawn into {out}", highlight=False)
    for line in skipped:
        console.print(f"[yellow]skipped {line}", highlight=False)
