"""`detforge data ...`: import, validate, curate, inspect and export datasets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from detforge.cli.output import LazyConsole

if TYPE_CHECKING:
    from detforge.data.curation import Operation
    from detforge.data.records import Dataset
    from detforge.data.report import Report
    from detforge.tracking.datasets import DatasetVersion

console = LazyConsole()
data_app = typer.Typer(help="Import, validate, curate, inspect and export datasets.", no_args_is_help=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Output file.")]
Input = Annotated[
    str,
    typer.Argument(
        help="A COCO json (from `detforge data import` or any COCO file), or a dataset:NAME[:vN|@alias] ref."
    ),
]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Log = Annotated[
    str | None,
    typer.Option(
        "--log",
        metavar="NAME",
        help="Also log the output as a version of dataset NAME, recording the input versions and this operation.",
    ),
]
Uri = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else .detforge).")]


def print_report(report: Report, *, limit: int = 3) -> None:
    """Print a report's grouped findings, errors in red."""
    styles = {"Error": "red", "Skipped": "yellow", "Fixed": "cyan", "Warning": "yellow"}
    for line in report.summary_lines(examples=limit):
        style = styles.get(line.split(" ", 1)[0], "")
        console.print(f"[{style}]{line}[/]" if style else line, highlight=False, soft_wrap=True)


def _local(path: str) -> Path:
    """The file of a dataset path or ``dataset:`` ref (materialised into the local cache)."""
    from detforge.tracking.datasets import resolve_dataset_path

    return Path(resolve_dataset_path(path))


def _load(path: str) -> Dataset:
    from detforge.data.formats.coco import read_coco

    ds, report = read_coco(_local(path))
    print_report(report)
    report.raise_for_errors(what_to_do="Run `detforge data validate` for the full report.")
    return ds


def _save(ds: Dataset, out: Path, op: Operation | None = None) -> None:
    from detforge.data.formats.coco import save_coco

    save_coco(ds, out)
    if op is not None:
        console.print(f"{op.name}: {op.summary}", highlight=False)
    console.print(f"Wrote {out} ({ds.summary()})", highlight=False)


@data_app.command("import")
def import_cmd(
    src: Annotated[Path, typer.Argument(help="Annotation file or dataset folder.")],
    format: Annotated[str, typer.Option("--format", "-f", help="coco, yolo, voc, cvat, labelme or via.")],
    out: Out,
    images: Annotated[Path | None, typer.Option(help="Image folder, if not where the format puts it.")] = None,
    class_name: Annotated[str | None, typer.Option(help="VIA: the class of regions without one.")] = None,
    class_attribute: Annotated[str | None, typer.Option(help="VIA: region attribute holding the class.")] = None,
    check_images: Annotated[bool, typer.Option(help="Open every image header.")] = True,
    skip_invalid: Annotated[bool, typer.Option(help="Skip (and count) invalid annotations.")] = True,
) -> None:
    """Import annotations into one validated COCO json (file names relative to a recorded image root)."""
    from detforge.data.formats.registry import import_dataset

    result = import_dataset(
        src,
        format,
        images=images,
        out=out,
        class_name=class_name,
        class_attribute=class_attribute,
        check_images=check_images,
        skip_invalid=skip_invalid,
    )
    console.print(f"Imported {src} ({format}): {result.dataset.summary()}", highlight=False)
    print_report(result.report)
    result.report.raise_for_errors(what_to_do=f"{out} was not written. Fix the errors above and import again.")
    _save(result.dataset, out)


@data_app.command()
def validate(
    path: Input,
    images: Annotated[Path | None, typer.Option(help="Image folder (default: the file's image root).")] = None,
    check_images: Annotated[bool, typer.Option(help="Open every image header.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> None:
    """Check a COCO json and its images; print a report; exit 1 when there are errors."""
    import orjson

    from detforge.data.formats.coco import read_coco
    from detforge.files import atomic_write_bytes

    ds, report = read_coco(_local(path), image_root=images, check_images=check_images)
    console.print(f"{path}: {ds.summary()}", highlight=False)
    print_report(report, limit=5)
    if json_out:
        atomic_write_bytes(json_out, orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
    if not report.ok:
        console.print(f"[red]{len(report.errors)} error(s).[/]")
        raise typer.Exit(1)
    console.print("[green]No errors.[/]")


@data_app.command()
def export(
    path: Input,
    format: Annotated[str, typer.Option("--format", "-f", help="coco or yolo.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (or .json for coco).")],
    segments: Annotated[
        bool | None, typer.Option("--segments/--boxes", help="YOLO: polygons or boxes (default: auto).")
    ] = None,
) -> None:
    """Export a dataset as COCO or YOLO (images, labels and data.yaml)."""
    from detforge.data.formats.registry import export_dataset
    from detforge.data.report import Report

    report = Report(str(out))
    options = {"segments": segments, "report": report} if format == "yolo" else {}
    written = export_dataset(_load(path), format, out, **options)
    print_report(report)
    console.print(f"Wrote {written}", highlight=False)


@data_app.command("filter")
def filter_cmd(
    path: Input,
    categories: Annotated[list[str], typer.Option(help="Category names to keep, in their new id order.")],
    out: Out,
    keep_empty: Annotated[bool, typer.Option(help="Keep images left without annotations.")] = False,
    log: Log = None,
) -> None:
    """Keep only some categories (ids renumbered from 1 in the given order)."""
    from detforge.data.curation import filter_categories

    ds, op = filter_categories(_load(path), categories, keep_empty=keep_empty)
    _save(ds, out, op)
    _log_output(log, out, op, [path])


@data_app.command()
def balance(
    path: Input,
    out: Out,
    require_all: Annotated[bool, typer.Option(help="Keep only images holding every category.")] = False,
    categories: Annotated[list[str] | None, typer.Option(help="Categories for --require-all.")] = None,
    max_per_class: Annotated[int | None, typer.Option(help="Cap instances per class (drops images).")] = None,
    seed: Seed = 0,
    log: Log = None,
) -> None:
    """Keep images holding every class, and/or cap instances per class."""
    from detforge.data.curation import balance as balance_op

    ds, op = balance_op(
        _load(path),
        require_all=require_all,
        categories=categories or None,
        max_per_class=max_per_class,
        seed=seed,
    )
    _save(ds, out, op)
    _log_output(log, out, op, [path])


@data_app.command()
def subset(
    path: Input,
    fraction: Annotated[float, typer.Option(help="Fraction of the images to keep.")],
    out: Out,
    after: Annotated[float, typer.Option(help="Skip this leading fraction first.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Shuffle with this seed first.")] = None,
    log: Log = None,
) -> None:
    """Take a contiguous fraction of the images after an offset (optionally shuffled)."""
    from detforge.data.curation import subset as subset_op

    ds, op = subset_op(_load(path), fraction=fraction, after=after, seed=seed)
    _save(ds, out, op)
    _log_output(log, out, op, [path])


@data_app.command()
def split(
    path: Input,
    fractions: Annotated[list[float], typer.Option(help="Two or three fractions summing to 1.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (train.json, val.json, test.json).")],
    names: Annotated[list[str] | None, typer.Option(help="Part names (default train val [test]).")] = None,
    seed: Seed = 0,
    log: Annotated[
        str | None,
        typer.Option(
            "--log", metavar="NAME", help="Also log each part as a version of dataset NAME-<part> (NAME-train, ...)."
        ),
    ] = None,
) -> None:
    """Split into train/val(/test), stratified so every class appears in every part."""
    from detforge.data.curation import Operation
    from detforge.data.curation import split as split_op
    from detforge.data.formats.coco import save_coco

    parts, op = split_op(_load(path), fractions, seed=seed, names=names or None)
    console.print(f"{op.name}: {op.summary}", highlight=False)
    for name, part in parts.items():
        save_coco(part, out / f"{name}.json")
        console.print(f"Wrote {out / f'{name}.json'} ({part.summary()})", highlight=False)
    if log:
        parents = _parent_refs(log, [path])
        for name in parts:
            part_op = Operation(op.name, {**op.params, "part": name}, op.summary)
            _log_output(f"{log}-{name}", out / f"{name}.json", part_op, parents=parents)


@data_app.command()
def merge(
    paths: Annotated[list[str], typer.Argument(help="COCO jsons or dataset: refs to merge.")],
    out: Out,
    log: Log = None,
) -> None:
    """Merge datasets: categories joined by name, ids renumbered, clashing file names kept apart."""
    from detforge.data.curation import merge as merge_op

    ds, op = merge_op([_load(p) for p in paths], names=list(paths))
    _save(ds, out, op)
    _log_output(log, out, op, paths)


@data_app.command()
def stats(
    path: Input,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the statistics as JSON.")] = None,
    plots: Annotated[Path | None, typer.Option(help="Folder for PNG plots.")] = None,
) -> None:
    """Per-class counts, COCO size buckets, image and box size distributions (table, JSON, plots)."""
    from detforge.data.stats import dataset_stats, plot_stats, stats_table, write_stats_json

    result = dataset_stats(_load(path))
    console.print(stats_table(result))
    if json_out:
        write_stats_json(result, json_out)
        console.print(f"Wrote {json_out}", highlight=False)
    if plots:
        for png in plot_stats(result, plots):
            console.print(f"Wrote {png}", highlight=False)


@data_app.command()
def show(
    path: Input,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the drawings.")],
    n: Annotated[int, typer.Option("--n", help="How many images.")] = 8,
    seed: Annotated[int | None, typer.Option(help="Sample images with this seed (default: the first n).")] = None,
) -> None:
    """Draw ground truth (boxes, masks, labels) on images."""
    from detforge.data.show import show_dataset

    written = show_dataset(_load(path), out, n=n, seed=seed)
    console.print(f"Wrote {len(written)} images to {out}", highlight=False)


@data_app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (annotations.json + images/).")],
    images: Annotated[int, typer.Option(help="Number of images.")] = 200,
    seed: Seed = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    max_objects: Annotated[int, typer.Option(help="At most this many shapes per image.")] = 6,
    extent: Annotated[
        tuple[float, float], typer.Option(help="Smallest and largest shape extent, as a share of the side.")
    ] = (0.10, 0.40),
) -> None:
    """Write a deterministic synthetic shapes dataset (circles, squares, triangles with masks)."""
    from detforge.data.synth import synth_shapes

    try:
        path = synth_shapes(out, images=images, seed=seed, size=(size, size), max_objects=max_objects, extent=extent)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--images/--size/--max-objects/--extent") from exc
    console.print(f"Wrote {path}", highlight=False)


# ---------------------------------------------------------------------------------------------------------
# dataset versions


def _parent_refs(name: str, inputs: list[str]) -> list[str]:
    """Versions of the inputs: a ``dataset:`` ref as given; a plain file logged reference-only under ``name``.

    Logging is content-addressed, so a file holding a version already logged under ``name`` (for example the
    output of an earlier ``--log name`` step) is that version, and chained commands record a chain.
    """
    from detforge.tracking.datasets import get_dataset_version, is_dataset_ref, log_dataset

    refs = []
    for text in inputs:
        if is_dataset_ref(text):
            refs.append(get_dataset_version(text).ref)
            continue
        version = log_dataset(name, text, reference=True)
        _print_logged(version, what=f"input {text}")
        refs.append(version.ref)
    return refs


def _log_output(
    name: str | None, out: Path, op: Operation, inputs: list[str] | None = None, *, parents: list[str] | None = None
) -> None:
    """Log a curation command's output as a version of ``name`` (when ``--log`` was given)."""
    from detforge.tracking.datasets import log_dataset

    if not name:
        return
    if parents is None:
        parents = _parent_refs(name, inputs or [])
    operation = {"name": op.name, "params": op.params, "summary": op.summary}
    _print_logged(log_dataset(name, out, parents=parents, operation=operation))


def _print_logged(version: DatasetVersion, *, what: str = "") -> None:
    prefix = f"{what}: " if what else ""
    if version.unchanged:
        console.print(f"{prefix}unchanged: {version.ref}", highlight=False, soft_wrap=True)
        return
    images = "referenced in place" if version.reference else "stored"
    console.print(
        f"{prefix}logged {version.ref} ({version.num_images} images {images}, {version.num_annotations} annotations, "
        f"{len(version.classes)} classes; digest {version.digest[:12]})",
        highlight=False,
        soft_wrap=True,
    )


@data_app.command("log")
def log_cmd(
    name: Annotated[str, typer.Argument(help="Dataset name (letters, digits, '_', '.', '-').")],
    path: Annotated[str, typer.Argument(help="A COCO json, a dataset folder (with --format), or a dataset: ref.")],
    reference: Annotated[
        bool, typer.Option(help="Record image paths and hashes instead of copying the images into the store.")
    ] = False,
    alias: Annotated[list[str] | None, typer.Option(help="Point this alias at the version (repeatable).")] = None,
    format: Annotated[
        str | None, typer.Option("--format", "-f", help="Import from this format first (yolo, voc, ...).")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="Image folder, if not where the file says.")] = None,
    uri: Uri = None,
) -> None:
    """Log a dataset as a content-addressed version (the same content gives back the existing version)."""
    from detforge.tracking.datasets import log_dataset
    from detforge.tracking.store import open_store

    source: Dataset | str = path
    if format is not None or images is not None or Path(path).is_dir():
        from detforge.data.formats.registry import import_dataset

        result = import_dataset(path, format or "coco", images=images)
        print_report(result.report)
        result.report.raise_for_errors(what_to_do="Nothing was logged. Fix the errors above and log again.")
        source = result.dataset
    _print_logged(log_dataset(name, source, store=open_store(uri), reference=reference, aliases=alias or ()))


@data_app.command()
def versions(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    uri: Uri = None,
) -> None:
    """List the versions of a dataset: aliases, digest, counts, lineage."""
    from rich.table import Table

    from detforge.tracking.datasets import list_dataset_versions
    from detforge.tracking.store import open_store

    found = list_dataset_versions(name, store=open_store(uri))
    table = Table(title=f"dataset {name}")
    for column in ("version", "aliases", "digest", "images", "annotations", "classes", "parents", "operation"):
        table.add_column(column, overflow="fold")
    table.add_column("created", no_wrap=True)
    for v in found:
        aliases = ["latest"] if v is found[-1] else []
        table.add_row(
            f"v{v.version}",
            ", ".join([*v.aliases, *aliases]),
            v.digest[:12],
            str(v.num_images),
            str(v.num_annotations),
            _classes_text(v.classes),
            ", ".join(v.parents),
            _operation_text(v.operation) + (" (referenced)" if v.reference else ""),
            f"{v.created:%Y-%m-%d %H:%M}" if v.created else "",
        )
    console.print(table)


def _classes_text(classes: tuple[str, ...], limit: int = 6) -> str:
    shown = ", ".join(classes[:limit])
    return shown if len(classes) <= limit else f"{len(classes)}: {shown}, …"


def _operation_text(operation: dict[str, Any] | None) -> str:
    if not operation:
        return ""
    params = ", ".join(f"{k}={v}" for k, v in operation.get("params", {}).items() if v is not None)
    return f"{operation['name']}({params})"


@data_app.command("alias")
def alias_cmd(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    version: Annotated[str, typer.Argument(help="Version: 3 or v3.")],
    alias: Annotated[str, typer.Argument(help="Alias to point at it (moved from the version that had it).")],
    uri: Uri = None,
) -> None:
    """Point an alias (dataset:NAME@ALIAS) at a version."""
    from detforge.errors import DatasetError
    from detforge.tracking.datasets import set_dataset_alias
    from detforge.tracking.store import open_store

    number = version.removeprefix("v")
    if not number.isdigit():
        raise DatasetError(f"version '{version}' is not a version number; write 3 or v3.")
    found = set_dataset_alias(name, int(number), alias, store=open_store(uri))
    console.print(f"{found.ref}: aliases {', '.join(found.aliases)}", highlight=False)
