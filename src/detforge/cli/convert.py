"""`detforge convert`: Detectron/Detectron2 weights to a detforge checkpoint."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from detforge.cli.output import LazyConsole
from detforge.errors import ConfigError

console = LazyConsole()


def convert_cmd(
    src: Annotated[
        str, typer.Argument(help="Detectron2 .pkl/.pth, Detectron (Caffe2) .pkl, http(s) URL or detectron2://PATH.")
    ],
    out: Annotated[Path, typer.Option(help="The detforge checkpoint to write (.pt).")],
    classes_file: Annotated[
        Path | None,
        typer.Option(help="Class names, one a line [default: COCO's 80 for 81-output models, else class_N]."),
    ] = None,
    no_fold_input: Annotated[
        bool, typer.Option("--no-fold-input", help="Keep conv1 for Detectron2's BGR 0-255 input.")
    ] = False,
    input_format: Annotated[
        str | None, typer.Option(help="BGR or RGB: the model's INPUT.FORMAT [default: from pixel_mean, else BGR].")
    ] = None,
    pixel_std: Annotated[
        str | None,
        typer.Option(help="MODEL.PIXEL_STD as 3 numbers, e.g. 57.375,57.12,58.395 [default: the file's, else 1,1,1]."),
    ] = None,
    all_tensors: Annotated[bool, typer.Option("--all", help="List every tensor instead of one row per group.")] = False,
) -> None:
    """Convert Detectron/Detectron2 weights to a detforge checkpoint and show which tensors went where."""
    from detforge.engine.checkpoint import save_checkpoint
    from detforge.models.detectron import convert_detectron_state_dict, read_detectron_file
    from detforge.models.weights import resolve_weights

    path = resolve_weights(src)
    state, report = convert_detectron_state_dict(
        read_detectron_file(path),
        source=src,
        fold_input=not no_fold_input,
        input_format=input_format,
        pixel_std=_parse_std(pixel_std),
    )
    names = _read_class_names(classes_file) if classes_file else None
    checkpoint = build_checkpoint(state, report, src=src, class_names=names, fold_input=not no_fold_input)
    save_checkpoint(checkpoint, out)
    console.print(_mapping_table(report.mapped, every_tensor=all_tensors))
    meta = checkpoint["metadata"]
    console.print(report.summary(), highlight=False)
    if meta["arch"] is None:
        console.print(
            f"Wrote {out}: no detforge architecture fits it (a backbone alone, or not a ResNet-50/101 FPN R-CNN); "
            "use it as model.backbone_weights or load its state dict yourself.",
            highlight=False,
        )
    else:
        console.print(f"Wrote {out}: {meta['arch']}, {len(meta['class_names'])} classes", highlight=False)


def build_checkpoint(
    state: dict[str, Any], report: Any, *, src: str, class_names: list[str] | None, fold_input: bool
) -> dict[str, Any]:
    """``{"model": state, "metadata": {...}}`` with what :meth:`Predictor.load` needs (config, arch, classes)."""
    from detforge.config import Config
    from detforge.models.detectron import default_class_names, infer_arch

    arch = infer_arch(state)
    names = class_names if class_names is not None else default_class_names(report.num_outputs)
    if report.num_outputs and len(names) != report.num_outputs - 1:
        raise ConfigError(
            f"--classes-file has {len(names)} names; the model has {report.num_outputs - 1} classes + background."
        )
    metadata: dict[str, Any] = {"arch": arch, "class_names": names, "keypoint_names": [], "source": src}
    metadata["conversion"] = {"naming": report.naming, "fold_input": fold_input, "ignored": report.ignored}
    if arch is not None:  # Detectron2's test-time defaults: 800 px short side, 1333 long, score 0.05, NMS 0.5
        data = {"train": "", "min_size": [800], "max_size": 1333}  # no training set: "" (Predictor.load ignores it)
        metadata["config"] = Config.model_validate({"data": data, "model": {"arch": arch}}).model_dump(mode="json")
    return {"model": state, "metadata": metadata}


def _parse_std(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise ConfigError(f"--pixel-std: expected 3 positive comma-separated numbers, found {text!r}.")
    return values  # type: ignore[return-value]


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--classes-file {path}: file not found.")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _group(name: str) -> str:
    """``backbone.bottom_up.res2.0.conv1.weight`` -> ``backbone.bottom_up.res2``; ``res2_0_branch2a_w`` -> ``res2_*``;
    otherwise the module (the name without its last part)."""
    if "." not in name:  # Caffe2 blob
        stage = re.match(r"(res\d)_\d+_", name)
        return f"{stage.group(1)}_*" if stage else re.sub(r"_(w|b|bn_s|bn_b|s)$", "", name)
    parts = name.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"(res|layer)\d", part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def _mapping_table(mapped: list[tuple[str, str, str]], *, every_tensor: bool) -> Table:
    table = Table("Detectron name", "torchvision name", "tensors", "note", title="Tensors mapped")
    if every_tensor:
        for src, dst, note in mapped:
            table.add_row(src, dst, "1", note)
        return table
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, dst, note in mapped:
        groups[(_group(src), _group(dst))].append(note)
    for (src, dst), notes in groups.items():
        table.add_row(src, dst, str(len(notes)), "; ".join(sorted({n for n in notes if n})))
    return table
