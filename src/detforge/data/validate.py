"""Dataset validation: ids, references, boxes, polygons, RLE, keypoints and (optionally) the image files.

Validation runs when a file is loaded or imported. It fixes what is safe to fix and says so (boxes that poke
out of the image by at most one pixel are clipped; missing areas are computed) and records everything else as
an error naming the file, image and annotation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence

import msgspec
import numpy as np

from detforge.data.images import read_image_size
from detforge.data.records import Annotation, Dataset, Image
from detforge.data.report import Report
from detforge.errors import DatasetError
from detforge.progress import track

CLIP_TOLERANCE_PX = 1.0

__all__ = ["CLIP_TOLERANCE_PX", "check_image_files", "polygon_area", "validate_dataset"]


def validate_dataset(
    ds: Dataset, *, source: str, check_images: bool = False, report: Report | None = None
) -> Report:
    """Check ``ds`` in place and return the report (errors are recorded, not raised).

    Args:
        ds: the dataset; clipped boxes and computed areas are written back into it.
        source: the file the dataset came from, named in every finding.
        check_images: also open every image header (existence, readability, size after EXIF).
        report: a report to add to (an importer's), else a new one.
    """
    report = report or Report(source)
    cat_ids = _check_categories(ds, report, source)
    images = _check_images(ds, report, source)
    _check_annotations(ds, images, cat_ids, report, source)
    if check_images:
        check_image_files(ds, report, source)
    return report


def _unique(ids: Iterable[int]) -> tuple[set[int], set[int]]:
    seen: set[int] = set()
    dupes: set[int] = set()
    for i in ids:
        (dupes if i in seen else seen).add(i)
    return seen, dupes


def _check_categories(ds: Dataset, report: Report, source: str) -> dict[int, int]:
    """Category id -> number of keypoints; duplicate ids and names are errors."""
    ids, dupes = _unique(c.id for c in ds.categories)
    for i in sorted(dupes):
        report.error("duplicate category id", f"{source}, category {i}")
    names: set[str] = set()
    dupe_names: set[str] = set()
    for c in ds.categories:
        (dupe_names if c.name in names else names).add(c.name)
        if not c.name.strip():
            report.error("empty category name", f"{source}, category {c.id}")
    for name in sorted(dupe_names):
        report.error("duplicate category name", f"{source}, category '{name}'", "names must be unique")
    if not ds.categories:
        report.warning("no categories", source)
    return {c.id: len(c.keypoints) for c in ds.categories}


def _check_images(ds: Dataset, report: Report, source: str) -> dict[int, Image]:
    """Image id -> image; duplicate ids, duplicate file names and non-positive sizes are errors."""
    by_id: dict[int, Image] = {}
    names: set[str] = set()
    for img in ds.images:
        where = f"{source}, image {img.id} ('{img.file_name}')"
        if img.id in by_id:
            report.error("duplicate image id", where)
        by_id[img.id] = img
        if img.file_name in names:
            report.error("duplicate file_name", where)
        names.add(img.file_name)
        if img.width <= 0 or img.height <= 0:
            report.error("non-positive image size", where, f"width {img.width}, height {img.height}")
    return by_id


class _AnnotationReport:
    """Records errors about one annotation with its id, so importers can skip exactly those annotations."""

    def __init__(self, report: Report, ann_id: int) -> None:
        self.report, self.ann_id = report, ann_id

    def error(self, kind: str, where: str, detail: str = "") -> None:
        self.report.error(kind, where, detail, annotation_id=self.ann_id)

    def fixed(self, kind: str, where: str, detail: str = "") -> None:
        self.report.fixed(kind, where, detail)


def _check_annotations(
    ds: Dataset, images: dict[int, Image], cat_ids: dict[int, int], full_report: Report, source: str
) -> None:
    seen: set[int] = set()
    deferred: list[Annotation] = []
    known = ", ".join(str(i) for i in sorted(cat_ids)[:20])
    for ann in ds.annotations:
        report = _AnnotationReport(full_report, ann.id)
        img = images.get(ann.image_id)
        where = _where(source, ann, img)
        if ann.id in seen:
            report.error("duplicate annotation id", where)
        seen.add(ann.id)
        if img is None:
            report.error("unknown image_id", where, f"image_id {ann.image_id} is not in 'images'")
            continue
        if ann.category_id not in cat_ids:
            report.error(
                "unknown category_id",
                where,
                f"category_id {ann.category_id} is not in 'categories' (known: {known})",
            )
        if _check_box(ann, img, report, where):
            if ann.area > 0 and isinstance(ann.segmentation, msgspec.Raw):
                deferred.append(ann)  # checked in bulk below
            else:
                _check_segmentation(ann, img, report, where)
        _check_keypoints(ann, cat_ids.get(ann.category_id, 0), report, where)
    for ann in _unplain_polygons(deferred):
        img = images[ann.image_id]
        _check_segmentation(ann, img, _AnnotationReport(full_report, ann.id), _where(source, ann, img))


# JSON number and blank characters, the exponent excepted (1e999 is out of range): what a skeleton drops.
_NUMBER_BYTES = b"0123456789.-+ \t\r\n"
# Skeletons of polygon lists, each ended by NUL: "[[" then per polygon an odd number (>= 5) of commas.
# Possessive quantifiers (Python >= 3.11) keep the regex from backtracking: 6x faster than plain ones.
_PLAIN_POLYGONS = re.compile(rb"(?:\[\[,{5}(?:,,)*+(?:\],\[,{5}(?:,,)*+)*+\]\]\x00)*+")
_CHUNK = 20_000


def _unplain_polygons(anns: list[Annotation]) -> Iterator[Annotation]:
    """The annotations whose segmentation is not plainly valid polygons, found without decoding any.

    Dropping the number characters from polygon JSON leaves a skeleton such as ``[[,,,,,],[,,,,,,,]]`` (a
    polygon has commas + 1 numbers). One regex over the NUL-joined skeletons of a chunk finds those that are
    not lists of >= 6, even-length number lists (RLE, null, strings, exponents, ...): only they are decoded
    and checked one by one. JSON cannot hold a raw NUL, so the separators are unambiguous.
    """
    for start in range(0, len(anns), _CHUNK):
        chunk = anns[start : start + _CHUNK]
        joined = b"\x00".join([ann.segmentation for ann in chunk]) + b"\x00"  # type: ignore[misc]
        skeleton = joined.translate(None, _NUMBER_BYTES)
        if skeleton.count(b"\x00") != len(chunk):  # a hand-made Raw holding NUL: check one by one
            yield from chunk
            continue
        pos = index = 0
        while pos < len(skeleton):
            end = _PLAIN_POLYGONS.match(skeleton, pos).end()  # type: ignore[union-attr]
            index += skeleton.count(b"\x00", pos, end)
            if end == len(skeleton):
                break
            yield chunk[index]
            pos, index = skeleton.index(b"\x00", end) + 1, index + 1


def _where(source: str, ann: Annotation, img: Image | None) -> str:
    name = f" (image '{img.file_name}')" if img is not None else ""
    return f"{source}, annotation {ann.id}{name}"


def _check_box(ann: Annotation, img: Image, report: _AnnotationReport, where: str) -> bool:
    """Check the box, clipping it when it leaves the image by at most one pixel; False when unusable."""
    x, y, w, h = ann.bbox
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        report.error("non-finite box", where, f"bbox {list(ann.bbox)}")
        return False
    if w < 0 or h < 0:
        report.error("negative box size", where, f"bbox {list(ann.bbox)}")
        return False
    if w == 0 or h == 0:
        report.error("zero-area box", where, f"bbox {list(ann.bbox)}")
        return False
    x1, y1, x2, y2 = x, y, x + w, y + h
    tol = CLIP_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > img.width + tol or y2 > img.height + tol:
        report.error(
            "box outside image",
            where,
            f"bbox {list(ann.bbox)} vs image {img.width}x{img.height} (tolerance {tol} px)",
        )
        return False
    if x1 < 0 or y1 < 0 or x2 > img.width or y2 > img.height:
        cx1, cy1 = max(x1, 0.0), max(y1, 0.0)
        cx2, cy2 = min(x2, float(img.width)), min(y2, float(img.height))
        if cx2 <= cx1 or cy2 <= cy1:
            report.error("zero-area box", where, f"bbox {list(ann.bbox)} is empty once clipped")
            return False
        ann.bbox = (cx1, cy1, cx2 - cx1, cy2 - cy1)
        report.fixed("box clipped to the image (≤ 1 px outside)", where)
    return True


def _check_segmentation(ann: Annotation, img: Image, report: _AnnotationReport, where: str) -> None:
    if not isinstance(ann.segmentation, msgspec.Raw):
        if ann.area <= 0:
            ann.area = float(ann.bbox[2] * ann.bbox[3])
        return
    try:
        value = ann.segmentation_value()
    except msgspec.DecodeError:
        report.error("segmentation is not valid JSON", where)
        return
    if value is None:
        if ann.area <= 0:
            ann.area = float(ann.bbox[2] * ann.bbox[3])
        return
    if isinstance(value, dict):
        _check_rle(ann, value, img, report, where)
    elif isinstance(value, list):
        _check_polygons(ann, value, report, where)
    else:
        report.error("bad segmentation", where, f"expected polygons or RLE, found {type(value).__name__}")


def _check_polygons(ann: Annotation, polys: Sequence[object], report: _AnnotationReport, where: str) -> None:
    area = 0.0
    for k, poly in enumerate(polys):
        if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
            report.error("bad polygon", where, f"polygon {k} is not a list of numbers")
            return
        if len(poly) % 2:
            report.error("polygon with an odd number of coordinates", where, f"polygon {k} has {len(poly)}")
            return
        if len(poly) < 6:
            report.error("polygon with fewer than 3 points", where, f"polygon {k} has {len(poly) // 2}")
            return
        if not all(_is_finite(v) for v in poly):
            report.error("non-finite polygon coordinate", where, f"polygon {k}")
            return
        if ann.area <= 0:
            area += polygon_area(poly)  # type: ignore[arg-type]
    if ann.area <= 0:
        ann.area = area if area > 0 else float(ann.bbox[2] * ann.bbox[3])


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_finite(v: object) -> bool:
    """Finite as a float: a huge JSON integer (which float() cannot hold) is not."""
    try:
        return math.isfinite(v)  # type: ignore[arg-type]
    except OverflowError:
        return False


def _check_rle(
    ann: Annotation, rle: dict[str, object], img: Image, report: _AnnotationReport, where: str
) -> None:
    size = rle.get("size")
    counts = rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2) or not isinstance(counts, str | list):
        report.error("bad RLE", where, "expected {'size': [h, w], 'counts': str or list}")
        return
    if list(size) != [img.height, img.width]:
        report.error(
            "RLE size disagrees with the image", where, f"RLE {size} vs image [{img.height}, {img.width}]"
        )
        return
    if ann.area <= 0:
        from pycocotools import mask as mask_utils

        encoded = rle if isinstance(counts, str) else mask_utils.frPyObjects(rle, *size)
        ann.area = float(mask_utils.area(encoded))


def _check_keypoints(ann: Annotation, num_keypoints: int, report: _AnnotationReport, where: str) -> None:
    if not isinstance(ann.keypoints, list):
        return
    if len(ann.keypoints) % 3:
        report.error("keypoints not in [x, y, v] triples", where, f"{len(ann.keypoints)} values")
    elif num_keypoints and len(ann.keypoints) != 3 * num_keypoints:
        report.error(
            "keypoint count disagrees with the category",
            where,
            f"{len(ann.keypoints) // 3} keypoints, category declares {num_keypoints}",
        )


def polygon_area(poly: list[float]) -> float:
    """Area of a flat ``[x1, y1, x2, y2, ...]`` polygon (shoelace formula)."""
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def check_image_files(ds: Dataset, report: Report, source: str) -> None:
    """Open every image header: missing and unreadable files and size disagreements are errors."""
    for img in track(ds.images, "Checking images", total=len(ds.images)):
        where = f"{source}, image {img.id} ('{img.file_name}')"
        path = ds.image_path(img)
        if not path.is_file():
            report.error("image file not found", where, str(path))
            continue
        try:
            width, height = read_image_size(path)
        except DatasetError as exc:
            report.error("unreadable image", where, str(exc))
            continue
        if (width, height) != (img.width, img.height):
            report.error(
                "image size disagrees with the file",
                where,
                f"annotations say {img.width}x{img.height}, file is {width}x{height} after EXIF orientation",
            )
