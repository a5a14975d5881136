"""Pascal VOC XML: one ``<annotation>`` file per image with ``<object>`` boxes.

Layouts: a VOC root (``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main/*.txt``), a folder
holding exactly one such root (``VOCdevkit/``), or any folder of XML files whose images are in the same
folder, a sibling folder, or the folder given as ``images``. Images are found by ``<filename>`` (then by the
XML's own name); ``<folder>`` and ``<path>`` are ignored: tools write absolute paths of another machine there.

Boxes: VOC corners are 1-based and inclusive (pixel ``xmin`` to pixel ``xmax``), so the COCO box is
``x = xmin - 1, y = ymin - 1, w = xmax - xmin + 1, h = ymax - ymin + 1``. Tools that write 0-based corners
give boxes up to one pixel outside the image; validation clips those and reports them as fixed.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from detforge.data.formats.common import DatasetBuilder, ImportResult, finish_import
from detforge.data.images import IMAGE_SUFFIXES, is_image_file, read_image_size
from detforge.data.report import Report, Severity
from detforge.errors import DatasetError, first_line
from detforge.progress import track

__all__ = ["import_voc"]

_SPLIT_FILES = ("trainval", "train", "val", "test")  # later files win: train/val/test over trainval
_OBJECT_ATTRIBUTES = ("difficult", "truncated", "occluded", "pose")
_MAX_SIDE = 2**31 - 1


@dataclass
class _Object:
    name: str
    bbox_xywh: tuple[float, float, float, float]
    attributes: dict[str, Any]


@dataclass
class _Record:
    """What one XML file says, before ids are given out."""

    xml: Path
    file_name: str
    size: tuple[int, int] | None
    objects: list[_Object] = field(default_factory=list)


def import_voc(
    src: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    skip_invalid: bool = True,
) -> ImportResult:
    """Import Pascal VOC XML files into a validated COCO-style Dataset.

    One image per XML file, in natural order of the XML names (``2.xml`` before ``10.xml``). Categories are
    sorted by name (the official VOC class list is alphabetical too), so adding files never renumbers them.
    ``difficult``, ``truncated``, ``occluded`` and ``pose`` go into each annotation's ``attributes``; the
    split from ``ImageSets/Main/{train,val,test,trainval}.txt`` into ``Image.attributes["split"]``
    (train/val/test win over trainval). Sizes come from ``<size>``, else from the image header.

    Args:
        src: the VOC root, a folder holding exactly one VOC root, or a folder of XML files.
        images: the image folder, when it is not ``JPEGImages`` or next to the XML files.
        check_images: open every image header (existence, readability, size against ``<size>``).
        skip_invalid: skip and count unreadable XML files and unusable objects instead of recording errors.

    Raises:
        DatasetError: ``src`` does not exist or holds no VOC XML files.
    """
    src = Path(src)
    if not src.exists():
        raise DatasetError(
            f"{src}: no such file or folder; expected a Pascal VOC root (Annotations/, JPEGImages/) or a "
            "folder of VOC XML files."
        )
    if images is not None and not Path(images).is_dir():
        raise DatasetError(f"{images}: image folder not found; pass the folder holding the VOC images.")
    xml_dir, default_images, sets_dir = _find_layout(src)
    xml_files = sorted(xml_dir.glob("*.xml"), key=_natural_key)
    if not xml_files:
        raise DatasetError(f"{xml_dir}: no .xml files; expected Pascal VOC annotation files.")
    report = Report(str(src))
    severity: Severity = "skipped" if skip_invalid else "error"
    records = [r for r in (_read_xml(p, report, severity) for p in _track(xml_files)) if r is not None]
    image_root = Path(images) if images is not None else _guess_image_root(records, xml_dir, default_images)
    splits = _read_splits(sets_dir, report) if sets_dir is not None else {}
    builder = DatasetBuilder()
    for name in sorted({o.name for r in records for o in r.objects}):
        builder.category_id(name)
    for record in records:
        _add_record(builder, record, image_root, splits, report, severity)
    _report_unlisted(splits, records, sets_dir, report)
    _report_images_without_xml(image_root, records, xml_dir, report)
    info = {"description": f"imported from Pascal VOC {src}"}
    return finish_import(
        builder,
        report,
        image_root=image_root,
        check_images=check_images,
        skip_invalid=skip_invalid,
        info=info,
    )


def _track(files: list[Path]) -> list[Path]:
    return list(track(files, "Reading VOC XML", total=len(files)))


def _natural_key(path: Path) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.stem)]


# --- layout ------------------------------------------------------------------------------------------


def _find_layout(src: Path) -> tuple[Path, Path | None, Path | None]:
    """``(folder of XMLs, default image folder or None, ImageSets/Main or None)``."""
    if src.is_file():
        raise DatasetError(
            f"{src}: expected a Pascal VOC folder (with Annotations/ and JPEGImages/) or a folder of XML "
            "files, found a file; pass its folder."
        )
    roots = [src] if (src / "Annotations").is_dir() else _voc_roots_below(src)
    if len(roots) > 1:
        names = ", ".join(str(r.relative_to(src)) for r in roots)
        raise DatasetError(f"{src}: holds several VOC roots ({names}); import them one at a time.")
    if not roots:
        return src, None, None
    root = roots[0]
    sets_dir = root / "ImageSets" / "Main"
    images = root / "JPEGImages"
    return root / "Annotations", images if images.is_dir() else None, sets_dir if sets_dir.is_dir() else None


def _voc_roots_below(src: Path) -> list[Path]:
    """VOC roots one or two levels down (``VOC2007/`` or ``VOCdevkit/VOC2007/``)."""
    found = [p.parent for p in sorted(src.glob("*/Annotations")) + sorted(src.glob("*/*/Annotations"))]
    return [p for p in found if (p / "Annotations").is_dir()]


def _guess_image_root(records: list[_Record], xml_dir: Path, default: Path | None) -> Path:
    """JPEGImages for a VOC root; else the XML folder or the sibling folder holding most of the images."""
    if default is not None:
        return default
    siblings = [p for p in sorted(xml_dir.parent.iterdir()) if p.is_dir() and p != xml_dir]
    candidates = [xml_dir, *siblings]
    sample = [r.file_name for r in records[:: max(1, len(records) // 32)][:32]]
    found = [sum((c / name).is_file() for name in sample) for c in candidates]
    return candidates[found.index(max(found))]


# --- one XML file ------------------------------------------------------------------------------------


def _read_xml(path: Path, report: Report, severity: Severity) -> _Record | None:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, ValueError, LookupError) as exc:
        report.add(severity, "XML file not readable (image not imported)", path.name, first_line(exc))
        return None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    if root.tag != "annotation":
        report.add(
            severity, "not a VOC annotation XML (image not imported)", path.name, f"root element <{root.tag}>"
        )
        return None
    record = _Record(path, _file_name(root, path), _size(root))
    for k, obj in enumerate(root.findall("object"), start=1):
        parsed = _parse_object(obj)
        if isinstance(parsed, str):
            report.add(severity, "unusable object", f"{path.name}, object {k}", parsed)
        else:
            record.objects.append(parsed)
    return record


def _text(element: ET.Element, tag: str) -> str:
    child = element.find(tag)
    return (child.text or "").strip() if child is not None else ""


def _file_name(root: ET.Element, xml: Path) -> str:
    """``<filename>`` without any folder (Windows or POSIX), else the XML's name with a .jpg suffix."""
    name = PureWindowsPath(_text(root, "filename")).name
    return name or f"{xml.stem}.jpg"


def _size(root: ET.Element) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None:
        return None
    width, height = _number(_text(size, "width")), _number(_text(size, "height"))
    if width is None or height is None or not width.is_integer() or not height.is_integer():
        return None
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        return None
    return int(width), int(height)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _parse_object(obj: ET.Element) -> _Object | str:
    """The object, or why it cannot be used."""
    name = _text(obj, "name")
    if not name:
        return "no <name>"
    box = obj.find("bndbox")
    if box is None:
        return f"'{name}' has no <bndbox>"
    corners = [_number(_text(box, tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
    if any(v is None for v in corners):
        found = ", ".join(f"{t}={_text(box, t)!r}" for t in ("xmin", "ymin", "xmax", "ymax"))
        return f"'{name}': expected numbers in <bndbox>, found {found}"
    xmin, ymin, xmax, ymax = (float(v) for v in corners)  # type: ignore[arg-type]
    bbox = (xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1)
    attributes = {tag: _attribute(_text(obj, tag)) for tag in _OBJECT_ATTRIBUTES if _text(obj, tag)}
    return _Object(name, bbox, attributes)


def _attribute(text: str) -> int | str:
    return int(text) if re.fullmatch(r"-?\d{1,9}", text) else text


# --- building ----------------------------------------------------------------------------------------


def _add_record(
    builder: DatasetBuilder,
    record: _Record,
    image_root: Path,
    splits: dict[str, str],
    report: Report,
    severity: Severity,
) -> None:
    file_name = _existing_file_name(record, image_root, report)
    size = record.size
    if size is None:
        try:
            size = read_image_size(image_root / file_name)
        except DatasetError as exc:
            detail = f"no usable <size> and {exc}"
            report.add(severity, "image size unknown (image not imported)", record.xml.name, detail)
            return
    split = splits.get(record.xml.stem) or splits.get(Path(file_name).stem)
    attributes = {"split": split} if split else {}
    image_id = builder.add_image(file_name, size[0], size[1], attributes=attributes)
    for obj in record.objects:
        builder.add_box(image_id, obj.name, obj.bbox_xywh, attributes=obj.attributes)


def _existing_file_name(record: _Record, image_root: Path, report: Report) -> str:
    """``<filename>``, or an image named like the XML when ``<filename>`` is not in the image folder."""
    if (image_root / record.file_name).is_file():
        return record.file_name
    for suffix in sorted(IMAGE_SUFFIXES):
        for candidate in (f"{record.xml.stem}{suffix}", f"{record.xml.stem}{suffix.upper()}"):
            if (image_root / candidate).is_file():
                detail = f"<filename> {record.file_name!r} not found, using {candidate!r}"
                report.warning("image found by the XML's name", record.xml.name, detail)
                return candidate
    return record.file_name


def _read_splits(sets_dir: Path, report: Report) -> dict[str, str]:
    """Image id -> split from ``ImageSets/Main/<split>.txt`` (first token of each line)."""
    splits: dict[str, str] = {}
    for split in _SPLIT_FILES:
        path = sets_dir / f"{split}.txt"
        if not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8-sig", errors="replace")
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
        for line in text.splitlines():
            if line.strip():
                splits[line.split()[0]] = split
    if not splits:
        report.warning(
            "no split lists found", str(sets_dir), "expected train.txt, val.txt, test.txt or trainval.txt"
        )
    return splits


def _report_unlisted(
    splits: dict[str, str], records: list[_Record], sets_dir: Path | None, report: Report
) -> None:
    known = {r.xml.stem for r in records} | {Path(r.file_name).stem for r in records}
    for image_id in sorted(set(splits) - known):
        report.warning(
            "id in a split list has no annotation XML", f"{sets_dir}, id '{image_id}'", splits[image_id]
        )


def _report_images_without_xml(
    image_root: Path, records: list[_Record], xml_dir: Path, report: Report
) -> None:
    if not image_root.is_dir():
        return
    annotated = {r.file_name for r in records} | {r.xml.stem for r in records}
    for path in sorted(image_root.iterdir()):
        if is_image_file(path) and path.name not in annotated and path.stem not in annotated:
            report.warning(
                "image without an annotation XML (not imported)", path.name, f"no XML in {xml_dir}"
            )
