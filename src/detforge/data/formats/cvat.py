"""CVAT for images 1.1 XML (``annotations.xml``): boxes, polygons, ellipses and masks with their attributes.

The labels declared in ``<meta>`` (task, job or project) become the categories in declared order, used or
not. Every shape keeps ``occluded``, ``z_order`` (and ``group_id`` when set) and its ``<attribute>`` values,
typed by the label's declared ``input_type`` (checkbox → bool, number → int or float), in the annotation's
``attributes``, flat as CVAT's own COCO export has them. ``<tag>`` labels go into the image's ``tags``.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from detforge.data.formats.common import DatasetBuilder, ImportResult, ellipse_polygon, finish_import
from detforge.data.images import is_image_file, read_image_size
from detforge.data.records import make_segmentation
from detforge.data.report import Report
from detforge.errors import DatasetError
from detforge.progress import track

__all__ = ["import_cvat"]

_MAX_MASK_PIXELS = 1 << 28  # a crop this large is a corrupt file, not a mask
_UNSUPPORTED = ("polyline", "points", "cuboid", "skeleton")
_Types = dict[str, dict[str, str]]


def import_cvat(
    src: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    skip_invalid: bool = True,
) -> ImportResult:
    """Import a CVAT for images 1.1 XML file (``src`` is the XML, or a folder holding ``annotations.xml``).

    Images are in ``images``, else in ``images/`` beside the XML, else beside it; an image's ``name`` may
    hold subfolders and is kept as its relative file name (under ``<subset>/`` for project exports that put
    images there). box → box; polygon → polygon; ellipse → 32-point polygon; mask → COCO RLE. A box with a
    ``rotation`` becomes its enclosing axis-aligned box (counted as a warning; the angle and the unrotated
    corners stay in ``attributes``). polyline, points, cuboid and skeleton shapes are skipped and counted.
    Image files under the image folder that the XML does not list are reported as warnings.

    Raises:
        DatasetError: the file is not well-formed XML, is not CVAT annotations, or holds video tracks.
    """
    path = _find_xml(Path(src))
    source = str(path)
    root = _parse(path)
    if root.find("track") is not None:
        raise DatasetError(
            f"{source}: holds <track> elements, so it is 'CVAT for video 1.1'; export the task as "
            "'CVAT for images 1.1' and import that."
        )
    image_dir = Path(images) if images is not None else _default_image_dir(path)
    report = Report(source)
    builder = DatasetBuilder()
    types = _declare_labels(root, builder)
    declared = len(builder.categories)
    elements = root.findall("image")
    for index, element in track(list(enumerate(elements)), "Importing CVAT images"):
        _import_image(builder, report, element, index, image_dir, types, skip_invalid)
    for label in list(builder.categories)[declared:]:
        report.warning("label not declared in <meta>", f"{source}, label '{label}'", "added after the others")
    _report_unlisted(image_dir, {img.file_name for img in builder.images}, report)
    return finish_import(
        builder, report, image_root=image_dir, check_images=check_images, skip_invalid=skip_invalid
    )


class _BadShape(Exception):
    """A shape that cannot be imported; the message is the report detail."""


def _find_xml(src: Path) -> Path:
    if src.is_file():
        return src
    if not src.is_dir():
        raise DatasetError(f"{src}: no such file or folder; pass annotations.xml or the folder holding it.")
    if (src / "annotations.xml").is_file():
        return src / "annotations.xml"
    candidates = sorted(src.glob("*.xml"))
    if len(candidates) != 1:
        names = ", ".join(p.name for p in candidates) or "none"
        raise DatasetError(
            f"{src}: no annotations.xml, and expected one .xml file, found {names}; pass the file."
        )
    return candidates[0]


def _parse(path: Path) -> ET.Element:
    """The root element; ElementTree resolves no external entities and expat caps entity expansion."""
    try:
        root = ET.parse(path).getroot()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    except (ET.ParseError, ValueError, LookupError) as exc:
        raise DatasetError(
            f"{path}: not well-formed XML ({exc}); export the task again as 'CVAT for images 1.1'."
        ) from None
    if root.tag != "annotations":
        raise DatasetError(
            f"{path}: the root element is <{root.tag}>, expected <annotations>; this is not a "
            "'CVAT for images 1.1' file."
        )
    return root


def _default_image_dir(path: Path) -> Path:
    folder = path.parent / "images"
    return folder if folder.is_dir() else path.parent


def _declare_labels(root: ET.Element, builder: DatasetBuilder) -> _Types:
    """Add the declared labels as categories; return label -> attribute name -> input_type."""
    types: _Types = {}
    meta = root.find("meta")
    for label in meta.iter("label") if meta is not None else []:
        name = (label.findtext("name") or "").strip()
        if not name or (label.findtext("parent") or "").strip():  # skeleton points have a parent label
            continue
        builder.category_id(name)
        declared = types.setdefault(name, {})
        for attribute in label.iter("attribute"):
            attr_name = attribute.findtext("name")
            if attr_name:
                declared[attr_name] = (attribute.findtext("input_type") or "text").strip()
    return types


def _import_image(
    builder: DatasetBuilder,
    report: Report,
    element: ET.Element,
    index: int,
    image_dir: Path,
    types: _Types,
    skip_invalid: bool,
) -> None:
    name = element.get("name", "").strip()
    if not name:
        report.error(
            "image without a name", f"{report.source}, <image> {index}", "expected a 'name' attribute"
        )
        return
    where = f"{report.source}, image '{name}'"
    subset = element.get("subset")
    if subset and not (image_dir / name).exists() and (image_dir / subset / name).is_file():
        name = f"{subset}/{name}"
    size = _image_size(element, image_dir / name, report, where)
    if size is None:
        return
    image_id = builder.add_image(name, *size)
    attributes = builder.images[-1].attributes
    if subset:
        attributes["subset"] = subset
    tags = []
    for k, shape in enumerate(element):
        shape_where = f"{where}, <{shape.tag}> {k}"
        if shape.tag == "tag":
            tags.append(shape.get("label", ""))
        elif shape.tag in _UNSUPPORTED:
            report.skipped(f"unsupported shape <{shape.tag}>", shape_where, "only areas become objects")
        elif shape.tag not in _IMPORTERS:
            report.skipped(f"unknown element <{shape.tag:.40}>", shape_where)
        else:
            try:
                _IMPORTERS[shape.tag](builder, report, image_id, size, shape, types, shape_where)
            except _BadShape as exc:
                (report.skipped if skip_invalid else report.error)(
                    f"invalid <{shape.tag}>", shape_where, str(exc)
                )
    if tags:
        attributes["tags"] = tags


def _image_size(element: ET.Element, path: Path, report: Report, where: str) -> tuple[int, int] | None:
    try:
        return int(element.get("width", "")), int(element.get("height", ""))
    except ValueError:
        pass
    try:
        return read_image_size(path)
    except DatasetError as exc:
        report.error("image size unknown", where, f"no integer width/height in the XML and {exc}")
        return None


def _common(shape: ET.Element, types: _Types) -> tuple[str, dict[str, Any]]:
    """The shape's label and attributes (its own ``<attribute>`` values, then occluded, z_order, group_id)."""
    label = (shape.get("label") or "").strip()
    if not label:
        raise _BadShape("no 'label' attribute")
    declared = types.get(label, {})
    attributes: dict[str, Any] = {}
    for attribute in shape.findall("attribute"):
        attr_name = attribute.get("name")
        if attr_name:
            attributes[attr_name] = _typed(attribute.text or "", declared.get(attr_name, "text"))
    attributes["occluded"] = shape.get("occluded", "0") == "1"
    attributes["z_order"] = int(_float(shape, "z_order", 0.0))
    if shape.get("group_id", "0") not in ("", "0"):
        attributes["group_id"] = shape.get("group_id")
    return label, attributes


def _typed(text: str, input_type: str) -> Any:
    if input_type == "checkbox" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if input_type == "number":
        try:
            value = float(text)
        except ValueError:
            return text
        return int(value) if value.is_integer() else value
    return text


def _float(shape: ET.Element, key: str, default: float | None = None) -> float:
    text = shape.get(key)
    if text is None and default is not None:
        return default
    return _number(text, f"'{key}'")


def _number(text: str | None, what: str) -> float:
    try:
        value = float(text or "")
    except ValueError:
        raise _BadShape(f"{what} should be a number, found {text!r:.40}") from None
    if not math.isfinite(value):
        raise _BadShape(f"{what} is not finite ({text:.40})")
    return value


def _import_box(
    builder: DatasetBuilder,
    report: Report,
    image_id: int,
    size: tuple[int, int],
    shape: ET.Element,
    types: _Types,
    where: str,
) -> None:
    label, attributes = _common(shape, types)
    x1, y1, x2, y2 = (_float(shape, k) for k in ("xtl", "ytl", "xbr", "ybr"))
    rotation = _float(shape, "rotation", 0.0)
    if rotation % 360:
        corners = _rotated_corners(x1, y1, x2, y2, math.radians(rotation))
        attributes |= {"rotation": rotation, "unrotated_box_xyxy": [x1, y1, x2, y2]}
        x1, y1, x2, y2 = min(corners[0::2]), min(corners[1::2]), max(corners[0::2]), max(corners[1::2])
        report.warning("rotated box imported as its enclosing axis-aligned box", where, f"{rotation}°")
    ann = builder.add_box(image_id, label, (x1, y1, x2 - x1, y2 - y1))
    ann.attributes = attributes


def _rotated_corners(x1: float, y1: float, x2: float, y2: float, angle: float) -> list[float]:
    """The box's corners turned by ``angle`` about its centre, clockwise on screen as CVAT draws them."""
    cx, cy, cos_a, sin_a = (x1 + x2) / 2, (y1 + y2) / 2, math.cos(angle), math.sin(angle)
    out: list[float] = []
    for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2)):
        dx, dy = x - cx, y - cy
        out += [cx + dx * cos_a - dy * sin_a, cy + dx * sin_a + dy * cos_a]
    return out


def _import_polygon(
    builder: DatasetBuilder,
    report: Report,
    image_id: int,
    size: tuple[int, int],
    shape: ET.Element,
    types: _Types,
    where: str,
) -> None:
    label, attributes = _common(shape, types)
    points = []
    for pair in (shape.get("points") or "").split(";"):
        xy = pair.split(",")
        if len(xy) != 2:
            raise _BadShape(f"'points' should be 'x1,y1;x2,y2;…', found {pair!r:.40}")
        points += [_number(xy[0], "a point's x"), _number(xy[1], "a point's y")]
    if len(points) < 6:
        raise _BadShape(f"polygon with {len(points) // 2} point(s), at least 3 needed")
    ann = builder.add_polygons(image_id, label, [points])
    ann.attributes = attributes


def _import_ellipse(
    builder: DatasetBuilder,
    report: Report,
    image_id: int,
    size: tuple[int, int],
    shape: ET.Element,
    types: _Types,
    where: str,
) -> None:
    label, attributes = _common(shape, types)
    cx, cy, rx, ry = (_float(shape, k) for k in ("cx", "cy", "rx", "ry"))
    rotation = _float(shape, "rotation", 0.0)
    if rotation:
        attributes["rotation"] = rotation
    ann = builder.add_polygons(image_id, label, [ellipse_polygon(cx, cy, rx, ry, math.radians(rotation))])
    ann.attributes = attributes


def _import_mask(
    builder: DatasetBuilder,
    report: Report,
    image_id: int,
    size: tuple[int, int],
    shape: ET.Element,
    types: _Types,
    where: str,
) -> None:
    """CVAT's mask RLE covers the crop (left, top, width, height) row-major, alternating 0- and 1-runs."""
    label, attributes = _common(shape, types)
    left, top, width, height = (_int(shape, k) for k in ("left", "top", "width", "height"))
    image_w, image_h = size
    if width < 1 or height < 1 or left < 0 or top < 0 or left + width > image_w or top + height > image_h:
        raise _BadShape(
            f"mask crop {left},{top} {width}x{height} is empty or leaves the {image_w}x{image_h} image"
        )
    if width * height > _MAX_MASK_PIXELS:
        raise _BadShape(f"mask crop of {width}x{height} pixels is larger than {_MAX_MASK_PIXELS}")
    try:
        counts = np.array([int(v) for v in (shape.get("rle") or "").split(",")], dtype=np.int64)
    except (ValueError, OverflowError):
        raise _BadShape("'rle' should be comma-separated run lengths") from None
    if (counts < 0).any() or int(counts.sum()) != width * height:
        raise _BadShape(f"'rle' runs sum to {int(counts.sum())}, expected width × height = {width * height}")
    crop = np.repeat(np.arange(len(counts)) % 2 == 1, counts).reshape(height, width)
    ys, xs = np.nonzero(crop)
    if not len(xs):
        raise _BadShape("empty mask")
    ann = builder.add_box(
        image_id,
        label,
        (left + xs.min(), top + ys.min(), xs.max() - xs.min() + 1.0, ys.max() - ys.min() + 1.0),
    )
    ann.segmentation = make_segmentation(_coco_rle(top + ys, left + xs, image_h, image_w))
    ann.area = float(len(xs))
    ann.attributes = attributes


def _int(shape: ET.Element, key: str) -> int:
    try:
        return int(shape.get(key) or "")
    except ValueError:
        raise _BadShape(f"'{key}' should be an integer, found {shape.get(key)!r:.40}") from None


def _coco_rle(ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """Compressed COCO RLE of the pixels (ys, xs), built from the column-major indices of the set pixels."""
    from pycocotools import mask as mask_utils

    index = np.sort(xs.astype(np.int64) * height + ys)
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([index[:1], index[breaks]])
    ends = np.concatenate([index[breaks - 1], index[-1:]]) + 1
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0:-1:2] = starts - np.concatenate([[0], ends[:-1]])
    counts[1::2] = ends - starts
    counts[-1] = height * width - ends[-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


_IMPORTERS = {
    "box": _import_box,
    "polygon": _import_polygon,
    "ellipse": _import_ellipse,
    "mask": _import_mask,
}


def _report_unlisted(image_dir: Path, listed: set[str], report: Report) -> None:
    """Warn about each image file under ``image_dir`` that the XML does not mention."""
    if not image_dir.is_dir():
        return
    for folder, dirs, files in os.walk(image_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            relative = path.relative_to(image_dir).as_posix()
            if is_image_file(path) and relative not in listed:
                report.warning("image file not in the annotations", f"{report.source}, image '{relative}'")
