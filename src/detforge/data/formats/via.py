"""VIA (VGG Image Annotator) 1.x and 2.x project JSON: polygons, rectangles, circles and ellipses.

Both versions hold one entry per image (``filename``, ``size`` in bytes, ``regions``, ``file_attributes``);
VIA 1.x keeps ``regions`` as a dict keyed "0", "1", … and VIA 2.x as a list, inside ``_via_img_metadata``
when the file is a whole project. VIA stores no image sizes, so every image header is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from detforge.data.formats.common import DatasetBuilder, ImportResult, ellipse_polygon, finish_import
from detforge.data.images import read_image_size
from detforge.data.records import UNSET
from detforge.data.report import Report
from detforge.errors import DatasetError
from detforge.progress import track

__all__ = ["import_via"]

_UNSUPPORTED = ("point", "polyline")
_CLASS_TYPES = ("dropdown", "radio", "checkbox")


def import_via(
    src: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    skip_invalid: bool = True,
    class_name: str | None = None,
    class_attribute: str | None = None,
) -> ImportResult:
    """Import a VIA 1.x or 2.x project (``src`` is the JSON, or a folder holding it).

    polygon → polygon; rect → box and rectangle polygon; circle and ellipse → 32-point polygons; point and
    polyline regions are skipped and counted. Images are looked up in ``images`` or beside the JSON.

    The class comes from ``class_attribute`` (regions without it get ``class_name`` when given, else they are
    skipped and counted); without it, ``class_name`` names the one class of every region. With neither, the
    class attribute is detected: the only dropdown/radio/checkbox region attribute a VIA 2.x project
    declares, else the one key every region with attributes has non-empty. Other region attributes go into
    the annotation's ``attributes``, ``file_attributes`` into the image's.

    Raises:
        DatasetError: the file is not VIA JSON, or the class cannot be determined (the message says which of
            ``--class-name`` / ``--class-attribute`` to pass).
    """
    path = _find_json(Path(src))
    entries, declared = _read_project(path)
    source = str(path)
    report = Report(source)
    key = _choose_class_attribute(entries, declared, source, class_attribute, class_name)
    builder = DatasetBuilder()
    for option in _declared_classes(declared.get(key)) if key is not None else []:
        builder.category_id(option)
    if class_name is not None:
        builder.category_id(class_name)
    image_dir = Path(images) if images is not None else path.parent
    for index, entry in track(list(enumerate(entries)), "Importing VIA regions"):
        _import_image(builder, report, entry, index, image_dir, _ClassRule(key, class_name), skip_invalid)
    return finish_import(
        builder, report, image_root=image_dir, check_images=check_images, skip_invalid=skip_invalid
    )


class _BadRegion(Exception):
    """A region that cannot be imported; the message is the report detail."""


def _find_json(src: Path) -> Path:
    if src.is_file():
        return src
    if not src.is_dir():
        raise DatasetError(f"{src}: no such file or folder; pass the VIA project .json or its folder.")
    candidates = sorted(src.glob("*.json"))
    if len(candidates) > 1:
        candidates = [p for p in candidates if p.name.lower().startswith("via")]
    if len(candidates) != 1:
        names = ", ".join(p.name for p in sorted(src.glob("*.json"))) or "none"
        raise DatasetError(
            f"{src}: expected one VIA project .json in the folder, found {names}; pass the file."
        )
    return candidates[0]


def _read_project(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The per-image entries and the declared region attributes (VIA 2.x projects only, else empty)."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    except (ValueError, RecursionError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); expected a VIA project file.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object of VIA images, found a {type(data).__name__}.")
    if {"project", "file", "metadata"} <= data.keys():
        raise DatasetError(
            f"{path}: this is a VIA 3.x project, which detforge does not read; save the annotations with "
            "VIA 2.x (or export them as COCO from VIA and use --format coco)."
        )
    declared: Any = {}
    if "_via_img_metadata" in data:
        attributes = data.get("_via_attributes")
        declared = attributes.get("region") if isinstance(attributes, dict) else {}
        data = data["_via_img_metadata"]
        if not isinstance(data, dict):
            raise DatasetError(
                f"{path}: '_via_img_metadata' should be an object, found {type(data).__name__}."
            )
    entries = list(data.values())
    if entries and not any(isinstance(e, dict) and "filename" in e for e in entries):
        raise DatasetError(
            f"{path}: no VIA image entries (objects with 'filename' and 'regions') found; this is not a VIA "
            "1.x/2.x project or annotation export."
        )
    return entries, declared if isinstance(declared, dict) else {}


def _declared_classes(spec: Any) -> list[str]:
    """The options of a declared dropdown/radio/checkbox attribute, in declared order."""
    if isinstance(spec, dict) and spec.get("type") in _CLASS_TYPES and isinstance(spec.get("options"), dict):
        return [str(name) for name in spec["options"] if str(name).strip()]
    return []


def _region_attribute_dicts(entries: list[Any]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        regions = entry.get("regions") if isinstance(entry, dict) else None
        values = (
            regions.values() if isinstance(regions, dict) else regions if isinstance(regions, list) else []
        )
        for region in values:
            attrs = region.get("region_attributes") if isinstance(region, dict) else None
            out.append(attrs if isinstance(attrs, dict) else {})
    return out


def _choose_class_attribute(
    entries: list[Any],
    declared: dict[str, Any],
    source: str,
    class_attribute: str | None,
    class_name: str | None,
) -> str | None:
    """The region attribute holding the class, or None when ``class_name`` is the class of every region."""
    if class_attribute is not None or class_name is not None:
        return class_attribute
    choices = [k for k, spec in declared.items() if _declared_classes(spec)]
    if len(choices) == 1:
        return choices[0]
    keys = [{k for k, v in attrs.items() if _non_empty(v)} for attrs in _region_attribute_dicts(entries)]
    found = set().union(*keys) if keys else set()
    if not keys:
        return None
    if not found:
        raise DatasetError(
            f"{source}: the regions carry no region attributes, so there is no class to read; pass "
            "--class-name NAME (class_name=) to give every region that one class."
        )
    if len(found) == 1 and all(len(k) <= 1 for k in keys):
        return found.pop()
    raise DatasetError(
        f"{source}: cannot tell which region attribute holds the class (found: {', '.join(sorted(found))}); "
        "pass --class-attribute NAME (class_attribute=), or --class-name NAME for a single class."
    )


def _non_empty(value: Any) -> bool:
    if isinstance(value, dict):
        return any(v is True for v in value.values())
    return value is not None and str(value).strip() != ""


class _ClassRule:
    """Reads a region's class from its attributes (``key``), falling back to ``default``."""

    def __init__(self, key: str | None, default: str | None) -> None:
        self.key, self.default = key, default

    def __call__(self, attrs: dict[str, Any]) -> str:
        value = attrs.get(self.key) if self.key is not None else None
        if isinstance(value, dict):
            checked = [str(k) for k, v in value.items() if v is True]
            if len(checked) > 1:
                raise _BadRegion(f"several classes checked in '{self.key}': {', '.join(checked)}")
            value = checked[0] if checked else None
        elif value is not None and not isinstance(value, str | int | float):
            raise _BadRegion(f"class attribute '{self.key}' is a {type(value).__name__}, expected text")
        name = str(value).strip() if value is not None else ""
        if name:
            return name
        if self.default is not None:
            return self.default
        raise _BadRegion(f"no class: region attribute '{self.key}' is missing or empty")


def _import_image(
    builder: DatasetBuilder,
    report: Report,
    entry: Any,
    index: int,
    image_dir: Path,
    class_of: _ClassRule,
    skip_invalid: bool,
) -> None:
    source = report.source
    name = entry.get("filename") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name.strip():
        report.error(
            "bad image entry", f"{source}, image entry {index}", "expected an object with 'filename'"
        )
        return
    where = f"{source}, image '{name}'"
    regions = entry.get("regions", [])
    if isinstance(regions, dict):
        regions = [regions[k] for k in sorted(regions, key=_numeric_key)]
    if not isinstance(regions, list):
        report.error("bad regions", where, f"expected a list or object, found {type(regions).__name__}")
        return
    size = _image_size(image_dir, name, report, where, len(regions))
    if size is None:
        return
    image_id = builder.add_image(name, *size)
    file_attributes = entry.get("file_attributes")
    if isinstance(file_attributes, dict) and file_attributes:
        builder.images[-1].attributes = dict(file_attributes)
    for k, region in enumerate(regions):
        _import_region(builder, report, image_id, region, f"{where}, region {k}", class_of, skip_invalid)


def _numeric_key(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdecimal() else (1 << 62, key)


def _image_size(
    image_dir: Path, name: str, report: Report, where: str, regions: int
) -> tuple[int, int] | None:
    lost = f"{regions} region(s) not imported"
    if "://" in name:
        report.error(
            "remote image", where, f"{lost}; download it into the image folder and import with --images"
        )
        return None
    path = image_dir / name
    if not path.is_file():
        report.error("image file not found", where, f"{path}; {lost} (VIA stores no image sizes)")
        return None
    try:
        return read_image_size(path)
    except DatasetError as exc:
        report.error("unreadable image", where, f"{exc}; {lost}")
        return None


def _import_region(
    builder: DatasetBuilder,
    report: Report,
    image_id: int,
    region: Any,
    where: str,
    class_of: _ClassRule,
    skip_invalid: bool,
) -> None:
    try:
        if not isinstance(region, dict) or not isinstance(region.get("shape_attributes"), dict):
            raise _BadRegion("expected an object with 'shape_attributes'")
        shape = region["shape_attributes"]
        if shape.get("name") in _UNSUPPORTED:
            report.skipped(f"unsupported region shape '{shape['name']}'", where, "only areas become objects")
            return
        attrs = region.get("region_attributes")
        attrs = attrs if isinstance(attrs, dict) else {}
        category = class_of(attrs)
        polygon = _region_polygon(shape)
    except _BadRegion as exc:
        (report.skipped if skip_invalid else report.error)("invalid region", where, str(exc))
        return
    ann = builder.add_polygons(image_id, category, [polygon])
    extra = {k: v for k, v in attrs.items() if k != class_of.key and _non_empty(v)}
    ann.attributes = extra or UNSET


def _region_polygon(shape: dict[str, Any]) -> list[float]:
    name = shape.get("name")
    if name == "polygon":
        xs, ys = _numbers(shape, "all_points_x"), _numbers(shape, "all_points_y")
        if len(xs) != len(ys):
            raise _BadRegion(f"all_points_x has {len(xs)} values but all_points_y has {len(ys)}")
        return [v for xy in zip(xs, ys, strict=True) for v in xy]
    if name == "rect":
        x, y, w, h = (_number(shape, k) for k in ("x", "y", "width", "height"))
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    if name == "circle":
        r = _number(shape, "r")
        return ellipse_polygon(_number(shape, "cx"), _number(shape, "cy"), r, r)
    if name == "ellipse":
        cx, cy, rx, ry = (_number(shape, k) for k in ("cx", "cy", "rx", "ry"))
        return ellipse_polygon(cx, cy, rx, ry, _number(shape, "theta") if "theta" in shape else 0.0)
    raise _BadRegion(
        f"unknown shape name {name!r} (expected polygon, rect, circle, ellipse, polyline, point)"
    )


def _number(shape: dict[str, Any], key: str) -> float:
    value = shape.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRegion(f"'{key}' should be a number, found {value!r:.40}")
    try:
        out = float(value)
    except OverflowError:
        raise _BadRegion(f"'{key}' is out of range") from None
    if not math.isfinite(out):
        raise _BadRegion(f"'{key}' is not finite")
    return out


def _numbers(shape: dict[str, Any], key: str) -> list[float]:
    values = shape.get(key)
    if not isinstance(values, list):
        raise _BadRegion(f"'{key}' should be a list of numbers, found {values!r:.40}")
    return [_number({key: v}, key) for v in values]
