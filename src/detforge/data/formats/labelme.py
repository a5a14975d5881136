"""LabelMe JSON (one file per image): polygons, rectangles and circles, grouped shapes, embedded images.

Each file names its image in ``imagePath`` (relative to the JSON, possibly with Windows backslashes) and
may embed the image itself as base64 ``imageData``; shapes sharing a ``label`` and ``group_id`` on one image
are one object with several polygons (LabelMe's convention for occluded, split objects).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from detforge.data.formats.common import DatasetBuilder, ImportResult, ellipse_polygon, finish_import
from detforge.data.images import read_image_size
from detforge.data.records import UNSET
from detforge.data.report import Report
from detforge.errors import DatasetError
from detforge.files import atomic_write_bytes
from detforge.progress import track

__all__ = ["import_labelme"]

_SHAPES = ("polygon", "rectangle", "circle")


def import_labelme(
    src: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    skip_invalid: bool = True,
    extract_dir: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """Import LabelMe JSON files (``src`` is one file, or a folder searched recursively).

    polygon (≥ 3 points) → polygon; rectangle (2 corners in any order) → box and rectangle polygon; circle
    (centre, point on the rim) → 32-point polygon; other shape types are skipped and counted. Categories are
    in order of first appearance over the files sorted by path. JSON files in the folder that are not
    LabelMe files are ignored with a warning; files and folders starting with "." are not searched.

    Each image is ``imagePath`` relative to the JSON (or, with ``images``, relative to that folder), else a
    file of the same name beside it. A missing image whose JSON embeds ``imageData`` is written into
    ``extract_dir`` (in the JSON's subfolder there, keeping its file name); without ``extract_dir`` that is
    an error. The dataset's image root is the common folder of all images, file names are relative to it.

    Raises:
        DatasetError: ``src`` is a single file that is not LabelMe JSON.
    """
    src = Path(src)
    files = _find_files(src)
    base = src if src.is_dir() else src.parent
    report = Report(str(src))
    builder = DatasetBuilder()
    paths: list[Path] = []
    ctx = _Context(builder, report, images, extract_dir, skip_invalid, paths)
    for path in track(files, "Importing LabelMe files"):
        data = _read_json(path, report, single=not src.is_dir())
        if data is not None:
            _import_file(ctx, path, path.parent.relative_to(base) if src.is_dir() else Path(), data)
    root = _common_folder(paths, default=base, source=str(src))
    for img, path in zip(builder.images, paths, strict=True):
        img.file_name = Path(os.path.relpath(path, root)).as_posix()
    return finish_import(
        builder, report, image_root=root, check_images=check_images, skip_invalid=skip_invalid
    )


@dataclass
class _Context:
    builder: DatasetBuilder
    report: Report
    images: str | os.PathLike[str] | None
    extract_dir: str | os.PathLike[str] | None
    skip_invalid: bool
    paths: list[Path] = field(default_factory=list)

    def problem(self, kind: str, where: str, detail: str = "") -> None:
        (self.report.skipped if self.skip_invalid else self.report.error)(kind, where, detail)


class _BadShape(Exception):
    """A shape that cannot be imported; the message is the report detail."""


def _find_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DatasetError(f"{src}: no such file or folder; pass a LabelMe .json or a folder of them.")
    found = [
        p
        for p in src.rglob("*.json")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
    ]
    if not found:
        raise DatasetError(f"{src}: no .json files found (searched subfolders too).")
    return sorted(found, key=lambda p: p.relative_to(src).as_posix())


def _read_json(path: Path, report: Report, *, single: bool) -> dict[str, Any] | None:
    """The file's LabelMe object; a broken or foreign file raises when it is ``single``, else is reported."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        _unreadable(path, report, f"cannot read ({exc.strerror})", single=single)
        return None
    except (ValueError, RecursionError) as exc:
        _unreadable(path, report, f"not valid JSON ({exc})", single=single)
        return None
    if isinstance(data, dict) and isinstance(data.get("shapes"), list):
        return data
    if single:
        raise DatasetError(
            f"{path}: not a LabelMe file (expected an object with a 'shapes' list and 'imagePath')."
        )
    report.warning("JSON file that is not LabelMe ignored", str(path), "no 'shapes' list")
    return None


def _unreadable(path: Path, report: Report, problem: str, *, single: bool) -> None:
    if single:
        raise DatasetError(f"{path}: {problem}; expected a LabelMe JSON file.")
    report.error("unreadable LabelMe file", str(path), problem)


def _import_file(ctx: _Context, path: Path, subfolder: Path, data: dict[str, Any]) -> None:
    where = str(path)
    image = _locate_image(ctx, path, subfolder, data, where)
    if image is None:
        return
    image_path, size = image
    if size is None:
        try:
            size = read_image_size(image_path)
        except DatasetError as exc:
            ctx.report.error("image size unknown", where, f"no imageWidth/imageHeight in the JSON and {exc}")
            return
    image_id = ctx.builder.add_image(image_path.name, *size)
    ctx.paths.append(image_path)
    flags = data.get("flags")
    if isinstance(flags, dict) and flags:
        ctx.builder.images[-1].attributes = {"flags": flags}
    objects: dict[tuple[str, Any], _Object] = {}
    for k, shape in enumerate(data["shapes"]):
        _collect_shape(ctx, objects, shape, f"{where}, shape {k}")
    for (label, _), obj in objects.items():
        ann = ctx.builder.add_polygons(image_id, label, obj.polygons)
        ann.attributes = obj.attributes or UNSET


@dataclass
class _Object:
    polygons: list[list[float]] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)


def _collect_shape(ctx: _Context, objects: dict[tuple[str, Any], _Object], shape: Any, where: str) -> None:
    try:
        if not isinstance(shape, dict):
            raise _BadShape(f"expected an object, found {type(shape).__name__}")
        kind = shape.get("shape_type") or "polygon"  # files before labelme 3 have no shape_type
        if kind not in _SHAPES:
            ctx.report.skipped(f"unsupported shape type '{kind!s:.40}'", where, "only areas become objects")
            return
        label = shape.get("label")
        if not isinstance(label, str) or not label.strip():
            raise _BadShape(f"'label' should be a non-empty string, found {label!r:.40}")
        polygon = _shape_polygon(kind, _points(shape.get("points")))
    except _BadShape as exc:
        ctx.problem("invalid shape", where, str(exc))
        return
    group = shape.get("group_id")
    key: tuple[str, Any] = (label, group if isinstance(group, int | str) else ("single", len(objects)))
    obj = objects.setdefault(key, _Object())
    obj.polygons.append(polygon)
    if isinstance(group, int | str):
        obj.attributes["group_id"] = group
    if isinstance(shape.get("flags"), dict) and shape["flags"]:
        obj.attributes.setdefault("flags", {}).update(shape["flags"])
    if isinstance(shape.get("description"), str) and shape["description"]:
        obj.attributes["description"] = shape["description"]


def _points(value: Any) -> list[tuple[float, float]]:
    if not isinstance(value, list):
        raise _BadShape(f"'points' should be a list of [x, y] pairs, found {value!r:.40}")
    out = []
    for point in value:
        if not (isinstance(point, list) and len(point) == 2):
            raise _BadShape(f"'points' should hold [x, y] pairs, found {point!r:.40}")
        xy = []
        for v in point:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _BadShape(f"point coordinate {v!r:.40} is not a number")
            try:
                xy.append(float(v))
            except OverflowError:
                raise _BadShape(f"point coordinate {v} is out of range") from None
        out.append((xy[0], xy[1]))
    return out


def _shape_polygon(kind: str, points: list[tuple[float, float]]) -> list[float]:
    if kind == "polygon":
        if len(points) < 3:
            raise _BadShape(f"polygon with {len(points)} point(s), at least 3 needed")
        return [v for p in points for v in p]
    if kind == "rectangle":
        if len(points) < 2:
            raise _BadShape(f"rectangle with {len(points)} point(s), expected 2 corners")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    if len(points) != 2:
        raise _BadShape(f"circle with {len(points)} point(s), expected the centre and a point on the rim")
    (cx, cy), (px, py) = points
    r = math.hypot(px - cx, py - cy)
    return ellipse_polygon(cx, cy, r, r)


def _locate_image(
    ctx: _Context, path: Path, subfolder: Path, data: dict[str, Any], where: str
) -> tuple[Path, tuple[int, int] | None] | None:
    """The image's absolute path and size (from the JSON, else the file); None after an error."""
    name = data.get("imagePath")
    if not isinstance(name, str) or not name.strip():
        ctx.report.error("no imagePath", where, "expected 'imagePath', the image file relative to the JSON")
        return None
    relative = Path(name.replace("\\", "/"))
    if relative.name in ("", ".", ".."):
        ctx.report.error("no image file name", where, f"imagePath {name!r:.60} names no file")
        return None
    folder = Path(ctx.images) if ctx.images is not None else path.parent
    candidates = [folder / relative, folder / relative.name]
    found = next((p for p in candidates if p.is_file()), None)
    size = _declared_size(data)
    if found is not None:
        return _absolute(found), size
    embedded = data.get("imageData")
    if not isinstance(embedded, str) or not embedded:
        return _absolute(candidates[0]), size  # validation reports the missing file when checking images
    if ctx.extract_dir is None:
        ctx.report.error(
            "image file missing",
            where,
            f"{candidates[0]}; pass extract_dir (the CLI derives it from --out) to write the embedded "
            "imageData there",
        )
        return None
    out = Path(ctx.extract_dir) / subfolder / relative.name
    decoded = _extract(embedded, out, ctx.report, where)
    if decoded is None:
        return None
    return _absolute(out), size or decoded


def _declared_size(data: dict[str, Any]) -> tuple[int, int] | None:
    width, height = data.get("imageWidth"), data.get("imageHeight")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)):
        return (width, height)  # type: ignore[return-value]
    return None


def _extract(embedded: str, out: Path, report: Report, where: str) -> tuple[int, int] | None:
    """Decode base64 ``imageData`` and write it to ``out``; its ``(width, height)`` or None after an error."""
    try:
        raw = base64.b64decode(embedded, validate=True)
        with PILImage.open(io.BytesIO(raw)):
            pass
    except (binascii.Error, ValueError, OSError, SyntaxError, PILImage.DecompressionBombError) as exc:
        report.error("bad imageData", where, f"the embedded image cannot be decoded ({exc})")
        return None
    try:
        atomic_write_bytes(out, raw)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{out}: cannot write the image extracted from {where} ({exc}).") from None
    report.fixed("image extracted from imageData", where, str(out))
    return read_image_size(out)


def _absolute(path: Path) -> Path:
    """``path`` made absolute with its folder resolved (so the image root and file names agree)."""
    return path.parent.resolve() / path.name


def _common_folder(paths: list[Path], *, default: Path, source: str) -> Path:
    if not paths:
        return default
    try:
        return Path(os.path.commonpath([p.parent for p in paths]))
    except ValueError:
        raise DatasetError(
            f"{source}: the images lie on different drives, so they have no common folder; copy them "
            "into one folder (or pass --images)."
        ) from None
