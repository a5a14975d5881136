"""What every importer shares: the result type, a builder that numbers ids and computes boxes and areas, and
the polygon of an ellipse (VIA, CVAT and LabelMe shapes)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detforge.data.records import UNSET, Annotation, Category, Dataset, Image, make_segmentation
from detforge.data.report import Report
from detforge.data.validate import polygon_area, validate_dataset

ELLIPSE_POINTS = 32  # vertices of the polygon an ellipse or circle becomes


@dataclass
class ImportResult:
    """An imported dataset and everything the importer noticed (skips, fixes, errors)."""

    dataset: Dataset
    report: Report


@dataclass
class DatasetBuilder:
    """Collects categories, images and annotations with contiguous ids starting at 1.

    Categories keep the order in which they are declared or first met; ``category_id(name)`` adds unknown
    names at the end.
    """

    categories: dict[str, int] = field(default_factory=dict)
    images: list[Image] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)

    def category_id(self, name: str) -> int:
        if name not in self.categories:
            self.categories[name] = len(self.categories) + 1
        return self.categories[name]

    def add_image(self, file_name: str, width: int, height: int, *, attributes: dict[str, Any] | None = None) -> int:
        image_id = len(self.images) + 1
        self.images.append(
            Image(id=image_id, file_name=file_name, width=width, height=height, attributes=dict(attributes or {}))
        )
        return image_id

    def add_box(
        self, image_id: int, category: str, bbox_xywh: Sequence[float], *, attributes: dict[str, Any] | None = None
    ) -> Annotation:
        """Add a box-only annotation."""
        x, y, w, h = (float(v) for v in bbox_xywh)
        ann = Annotation(
            id=len(self.annotations) + 1,
            image_id=image_id,
            category_id=self.category_id(category),
            bbox=(x, y, w, h),
            area=w * h,
            attributes=dict(attributes) if attributes else UNSET,
        )
        self.annotations.append(ann)
        return ann

    def add_polygons(
        self, image_id: int, category: str, polygons: list[list[float]], *, attributes: dict[str, Any] | None = None
    ) -> Annotation:
        """Add an annotation from flat ``[x1, y1, ...]`` polygons; its box encloses all their points."""
        ann = self.add_box(image_id, category, box_from_polygons(polygons), attributes=attributes)
        ann.segmentation = make_segmentation([[float(v) for v in p] for p in polygons])
        ann.area = sum(polygon_area(p) for p in polygons if len(p) >= 6 and len(p) % 2 == 0)
        return ann

    def build(
        self, *, image_root: str | os.PathLike[str] | None, info: dict[str, Any] | None = None
    ) -> Dataset:
        cats = [Category(id=i, name=n) for n, i in self.categories.items()]
        return Dataset(
            info=info if info is not None else UNSET,
            image_root=str(Path(image_root).resolve()) if image_root is not None else UNSET,
            images=self.images,
            annotations=self.annotations,
            categories=cats,
        )


def box_from_polygons(polygons: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """The ``(x, y, w, h)`` box enclosing every point of flat polygons (NaN box when there are none)."""
    xs = [float(v) for p in polygons for v in p[0::2]]
    ys = [float(v) for p in polygons for v in p[1::2]]
    if not xs or not ys:
        return (math.nan, math.nan, math.nan, math.nan)
    return (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))


def finish_import(
    builder: DatasetBuilder,
    report: Report,
    *,
    image_root: Path,
    check_images: bool = True,
    skip_invalid: bool = True,
    info: dict[str, Any] | None = None,
) -> ImportResult:
    """Build the dataset and validate it into ``report``.

    With ``skip_invalid`` an annotation that fails validation (zero-area box, 2-point polygon, …) is removed
    and its error recorded as a skip, so it is counted and reported; other errors (missing image files,
    duplicate names) stay errors.
    """
    ds = builder.build(image_root=image_root, info=info)
    found = validate_dataset(ds, source=report.source, check_images=check_images)
    if skip_invalid:
        found = skip_invalid_annotations(ds, found)
    report.extend(found)
    return ImportResult(ds, report)


def skip_invalid_annotations(ds: Dataset, report: Report) -> Report:
    """Drop the annotations ``report`` has errors about; return the report with those errors as skips."""
    bad = {p.annotation_id for p in report.errors if p.annotation_id is not None}
    if not bad:
        return report
    ds.annotations = [a for a in ds.annotations if a.id not in bad]
    out = Report(report.source)
    for p in report.problems:
        severity = "skipped" if p.severity == "error" and p.annotation_id in bad else p.severity
        out.add(severity, p.kind, p.where, p.detail, annotation_id=p.annotation_id)
    return out


def ellipse_polygon(
    cx: float, cy: float, rx: float, ry: float, angle_rad: float = 0.0, *, points: int = ELLIPSE_POINTS
) -> list[float]:
    """A flat ``[x1, y1, ...]`` polygon of ``points`` vertices on an ellipse rotated by ``angle_rad``.

    The angle turns the ``rx`` axis towards +y, i.e. clockwise on screen (image y points down).
    """
    cos_a, sin_a = math.cos(angle_rad), math.sin(angle_rad)
    out: list[float] = []
    for k in range(points):
        t = 2.0 * math.pi * k / points
        dx, dy = rx * math.cos(t), ry * math.sin(t)
        out += [round(cx + dx * cos_a - dy * sin_a, 3), round(cy + dx * sin_a + dy * cos_a, 3)]
    return out
