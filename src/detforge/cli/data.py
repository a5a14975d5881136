"""`detforge data ...`: import, validate, curate, inspect and export datasets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from detforge.data.curation import Operation
    from detforge.data.records import Dataset
    from detforge.data.report import Report

console = Console()
data_app = typer.Typer(help="Import, validate, curate, inspect and export datasets.", no_args_is_help=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Output file.")]
Input = Annotated[Path, typer.Argument(help="A COCO json (from `detforge data import` or any COCO file).")]
Seed = Annotated[int, typer.Option(help="Random seed.")]


def print_report(report: Report, *, limit: int = 3) -> None:
    """Print a report's grouped findings, errors in red."""
    styles = {"Error": "red", "Skipped": "yellow", "Fixed": "cyan", "Warning": "yellow"}
    for line in report.summary_lines(examples=limit):
        style = styles.get(line.split(" ", 1)[0], "")
        console.print(f"[{style}]{line}[/]" if style else line, highlight=False, soft_wrap=True)


def _load(path: Path) -> Dataset:
    from detforge.data.formats.coco import read_coco

    ds, report = read_coco(path)
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
    images: Annotated[
        Path | None, typer.Option(help="Image folder, if not where the format puts it.")
    ] = None,
    class_name: Annotated[str | None, typer.Option(help="VIA: the class of regions without one.")] = None,
    class_attribute: Annotated[
        str | None, typer.Option(help="VIA: region attribute holding the class.")
    ] = None,
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
    images: Annotated[
        Path | None, typer.Option(help="Image folder (default: the file's image root).")
    ] = None,
    check_images: Annotated[bool, typer.Option(help="Open every image header.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> None:
    """Check a COCO json and its images; print a report; exit 1 when there are errors."""
    import orjson

    from detforge.data.formats.coco import read_coco
    from detforge.files import atomic_write_bytes

    ds, report = read_coco(path, image_root=images, check_images=check_images)
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
) -> None:
    """Keep only some categories (ids renumbered from 1 in the given order)."""
    from detforge.data.curation import filter_categories

    ds, op = filter_categories(_load(path), categories, keep_empty=keep_empty)
    _save(ds, out, op)


@data_app.command()
def balance(
    path: Input,
    out: Out,
    require_all: Annotated[bool, typer.Option(help="Keep only images holding every category.")] = False,
    categories: Annotated[list[str] | None, typer.Option(help="Categories for --require-all.")] = None,
    max_per_class: Annotated[int | None, typer.Option(help="Cap instances per class (drops images).")] = None,
    seed: Seed = 0,
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


@data_app.command()
def subset(
    path: Input,
    fraction: Annotated[float, typer.Option(help="Fraction of the images to keep.")],
    out: Out,
    after: Annotated[float, typer.Option(help="Skip this leading fraction first.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Shuffle with this seed first.")] = None,
) -> None:
    """Take a contiguous fraction of the images after an offset (optionally shuffled)."""
    from detforge.data.curation import subset as subset_op

    ds, op = subset_op(_load(path), fraction=fraction, after=after, seed=seed)
    _save(ds, out, op)


@data_app.command()
def split(
    path: Input,
    fractions: Annotated[list[float], typer.Option(help="Two or three fractions summing to 1.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (train.json, val.json, test.json).")
    ],
    names: Annotated[list[str] | None, typer.Option(help="Part names (default train val [test]).")] = None,
    seed: Seed = 0,
) -> None:
    """Split into train/val(/test), stratified so every class appears in every part."""
    from detforge.data.curation import split as split_op
    from detforge.data.formats.coco import save_coco

    parts, op = split_op(_load(path), fractions, seed=seed, names=names or None)
    console.print(f"{op.name}: {op.summary}", highlight=False)
    for name, part in parts.items():
        save_coco(part, out / f"{name}.json")
        console.print(f"Wrote {out / f'{name}.json'} ({part.summary()})", highlight=False)


@data_app.command()
def merge(
    paths: Annotated[list[Path], typer.Argument(help="COCO jsons to merge.")],
    out: Out,
) -> None:
    """Merge datasets: categories joined by name, ids renumbered, clashing file names kept apart."""
    from detforge.data.curation import merge as merge_op

    ds, op = merge_op([_load(p) for p in paths], names=[str(p) for p in paths])
    _save(ds, out, op)


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
    seed: Annotated[
        int | None, typer.Option(help="Sample images with this seed (default: the first n).")
    ] = None,
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
) -> None:
    """Write a deterministic synthetic shapes dataset (circles, squares, triangles with masks)."""
    from detforge.data.synth import synth_shapes

    path = synth_shapes(out, images=images, seed=seed, size=(size, size))
    console.print(f"Wrote {path}", highlight=False)
