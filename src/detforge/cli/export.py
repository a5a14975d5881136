"""`detforge export`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from detforge.cli.output import LazyConsole
from detforge.errors import ConfigError
from detforge.inference.quantize import DEFAULT_CALIBRATION_IMAGES

console = LazyConsole()


def export_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint path, http(s) URL or model:NAME[:vN|@ALIAS].")],
    out: Annotated[Path, typer.Option(help="The file to write (model.onnx, model.torchscript.pt).")],
    format: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset (11 or later).")] = 17,
    score_threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Lowest score the exported model returns (default: the checkpoint's model.score_threshold).",
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: quantize the fully connected layers to int8; int8-static: the convolutions too, calibrated on "
            "--calibration images (ONNX only; faster on CPUs, see docs/export.md)."
        ),
    ] = None,
    calibration: Annotated[
        list[str] | None,
        typer.Option(help="Images, folders or globs to calibrate --quantize int8-static on (repeatable)."),
    ] = None,
    calibration_images: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"Calibrate on at most this many of them (the first; each folder sorted by path) [default: "
            f"{DEFAULT_CALIBRATION_IMAGES}].",
        ),
    ] = None,
    register: Annotated[
        str | None,
        typer.Option(
            help="Register the file as a version of this model (a model: ref's export: NAME-FORMAT by default)."
        ),
    ] = None,
    no_register: Annotated[bool, typer.Option("--no-register", help="Do not register a model: ref's export.")] = False,
) -> None:
    """Export a model to ONNX or TorchScript, with its class names; register it when it came from the registry."""
    from detforge.inference.export import export_model, register_export
    from detforge.tracking.registry import get_model_version, is_model_ref

    if register and no_register:
        raise ConfigError("--register and --no-register contradict each other; give one.")
    source = get_model_version(model).ref if is_model_ref(model) else model  # pin @alias / latest once
    started = time.perf_counter()
    written = export_model(
        source, out, format=format, opset=opset, score_threshold=score_threshold, quantize=quantize,
        calibration=calibration or (), calibration_count=calibration_images,
    )  # fmt: skip
    size_mb = written.stat().st_size / 1e6
    kind = f"{format}, {quantize}" if quantize else format
    console.print(
        f"Exported {source} to {written} ({kind}, {size_mb:.1f} MB) in {time.perf_counter() - started:.1f} s",
        highlight=False,
        emoji=False,  # "model:balloon:v1" must not become a balloon
        soft_wrap=True,
    )
    if no_register or not (register or is_model_ref(source)):
        return
    version = register_export(written, source=source, format=format, name=register, quantize=quantize or "")
    console.print(f"Registered {version.ref} (exported from {source})", highlight=False, emoji=False, soft_wrap=True)
