"""The format tables: ``IMPORTERS`` and ``EXPORTERS`` map the names the CLI accepts to their functions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from detforge.data.formats.coco import import_coco, save_coco
from detforge.data.formats.common import ImportResult
from detforge.data.formats.cvat import import_cvat
from detforge.data.formats.labelme import import_labelme
from detforge.data.formats.via import import_via
from detforge.data.formats.voc import import_voc
from detforge.data.formats.yolo import export_yolo, import_yolo
from detforge.data.records import Dataset
from detforge.errors import DatasetError

IMPORTERS: dict[str, Any] = {
    "coco": import_coco,
    "yolo": import_yolo,
    "voc": import_voc,
    "cvat": import_cvat,
    "labelme": import_labelme,
    "via": import_via,
}

__all__ = ["EXPORTERS", "IMPORTERS", "ImportResult", "export_dataset", "import_dataset"]


def import_dataset(
    src: str | os.PathLike[str],
    format: str,
    *,
    images: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    class_name: str | None = None,
    class_attribute: str | None = None,
    check_images: bool = True,
    skip_invalid: bool = True,
) -> ImportResult:
    """Import annotations in ``format`` (one of IMPORTERS) into a validated Dataset.

    Args:
        src: the annotation file or dataset folder.
        images: the image folder, when it is not where the format puts it.
        out: where the COCO file will be written; LabelMe images that exist only as embedded ``imageData``
            are extracted into ``<out stem>_images/`` beside it.
        class_name: VIA only: the one class of regions that carry no class attribute.
        class_attribute: VIA only: the region attribute holding the class.
        check_images: open every image header (existence, readability, size).
        skip_invalid: skip (and count) annotations that fail validation instead of keeping them as errors.
    """
    importer = IMPORTERS.get(format)
    if importer is None:
        raise DatasetError(f"unknown format '{format}'; choose one of: {', '.join(IMPORTERS)}.")
    options: dict[str, Any] = {"images": images, "check_images": check_images, "skip_invalid": skip_invalid}
    if format == "via":
        options |= {"class_name": class_name, "class_attribute": class_attribute}
    elif class_name or class_attribute:
        raise DatasetError(f"--class-name/--class-attribute apply to the 'via' format only, not '{format}'.")
    if format == "labelme" and out is not None:
        out = Path(out)
        options["extract_dir"] = out.parent / f"{out.stem}_images"
    return importer(src, **options)  # type: ignore[no-any-return]


def _export_coco(ds: Dataset, out: Path) -> Path:
    """COCO export: ``out`` is the .json file, or a folder that receives ``annotations.json``."""
    return save_coco(ds, out if out.suffix == ".json" else out / "annotations.json")


EXPORTERS: dict[str, Any] = {"coco": _export_coco, "yolo": export_yolo}


def export_dataset(ds: Dataset, format: str, out: str | os.PathLike[str], **options: Any) -> Path:
    """Write ``ds`` in ``format`` (one of EXPORTERS) to ``out``; returns the main file written."""
    exporter = EXPORTERS.get(format)
    if exporter is None:
        raise DatasetError(f"unknown export format '{format}'; choose one of: {', '.join(EXPORTERS)}.")
    return exporter(ds, Path(out), **options)  # type: ignore[no-any-return]
