"""YOLO (Ultralytics/Darknet) text labels: import a dataset folder, export images, labels and data.yaml.

A YOLO dataset is ``images/<split>/*.jpg`` with ``labels/<split>/*.txt`` beside it (or flat ``images/`` and
``labels/``) and a ``data.yaml`` (or a ``classes.txt``) naming the classes. A label line is either
``class cx cy w h`` (a box) or ``class x1 y1 x2 y2 ...`` (a polygon, Ultralytics' "segment" format), with
coordinates normalised to ``[0, 1]`` by the image width and height and the class a 0-based index into the
names. The label of ``.../images/<rest>/x.jpg`` is ``.../labels/<rest>/x.txt``, as in Ultralytics.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from detforge.data.formats.common import DatasetBuilder, ImportResult, finish_import
from detforge.data.images import is_image_file, read_image_size
from detforge.data.records import Annotation, Dataset, Image
from detforge.data.report import Report, Severity
from detforge.errors import DatasetError, first_line
from detforge.files import atomic_write_text
from detforge.progress import track

__all__ = ["export_yolo", "import_yolo"]

_SPLIT_KEYS = ("train", "val", "test")
_NOT_SPLITS = frozenset({"path", "names", "nc", "download", "yaml_file", "kpt_shape", "flip_idx", "channels"})
_CLASS_FILES = ("classes.txt",)
# Ten significant digits keep a round trip within 1e-9 of the image size; Ultralytics' own "%g" keeps six.
_NUMBER_FORMAT = ".10g"


@dataclass
class _Entry:
    split: str | None
    image: Path
    label: Path


@dataclass
class _Layout:
    """Where everything is: the class names by index, every image with its label file, and the roots."""

    base: Path
    names: dict[int, str]
    entries: list[_Entry] = field(default_factory=list)
    label_dirs: list[Path] = field(default_factory=list)
    image_root: Path | None = None


def import_yolo(
    src: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    skip_invalid: bool = True,
) -> ImportResult:
    """Import a YOLO dataset folder (or its ``data.yaml``) into a validated COCO-style Dataset.

    Boxes become pixel ``(x, y, w, h)``; polygons become COCO polygons with the enclosing box. Every
    declared class becomes a category (ids 1..N in declared order, also classes without instances).
    ``file_name`` is relative to the ``images`` folder (``train/0001.jpg``) and ``attributes["split"]``
    holds the split (none for the flat layout). Images without a label file are kept as background images;
    label files without an image, malformed lines and out-of-range class indices are counted in the report.

    Args:
        src: the dataset folder, or its yaml file.
        images: the folder to use instead of ``<src>/images``; it must mirror ``labels/`` (same split
            subfolders and names). Class names still come from the yaml or ``classes.txt``.
        check_images: kept for the common importer signature; YOLO stores no image sizes, so every image
            header is read anyway (a missing or unreadable image is an error, or a skip with
            ``skip_invalid``).
        skip_invalid: skip and count bad lines and annotations instead of recording them as errors.

    Raises:
        DatasetError: ``src`` is not a YOLO dataset, or its yaml or class list cannot be used.
    """
    src = Path(src)
    if not src.exists():
        raise DatasetError(
            f"{src}: no such file or folder; expected a YOLO dataset folder (images/, labels/ and a "
            "data.yaml or classes.txt) or its data.yaml."
        )
    report = Report(str(src))
    layout = _find_layout(src, Path(images) if images is not None else None, report)
    builder = DatasetBuilder()
    for name in layout.names.values():
        builder.category_id(name)
    severity: Severity = "skipped" if skip_invalid else "error"
    used: set[Path] = set()
    for entry in track(layout.entries, "Reading YOLO labels", total=len(layout.entries)):
        _add_image(builder, entry, layout, report, severity)
        used.add(entry.label)
    _report_orphan_labels(layout, used, report)
    root = layout.image_root or layout.base
    info = {"description": f"imported from YOLO dataset {src}"}
    return finish_import(
        builder, report, image_root=root, check_images=False, skip_invalid=skip_invalid, info=info
    )


# --- finding the files -------------------------------------------------------------------------------


def _find_layout(src: Path, images: Path | None, report: Report) -> _Layout:
    yaml_path = _find_yaml(src)
    base = src.parent if src.is_file() else src
    if yaml_path is None:
        layout = _Layout(base, _names_from_classes_txt(base))
        _add_folder_entries(layout, images or base / "images", base / "labels")
        return layout
    config = _read_yaml(yaml_path)
    root = _yaml_root(config, yaml_path, report)
    layout = _Layout(root, _names_from_yaml(config, yaml_path, report))
    splits = _yaml_splits(config, root)
    if images is not None or not splits:
        _add_folder_entries(layout, images or root / "images", root / "labels")
    else:
        for split, value in splits.items():
            _add_yaml_split(layout, split, value, yaml_path, report)
        layout.image_root = _common_image_root(layout)
    return layout


def _yaml_splits(config: dict[str, Any], root: Path) -> dict[str, object]:
    """train/val/test, and any other key naming existing folders (detforge writes e.g. ``trainval``)."""
    splits = {k: config[k] for k in _SPLIT_KEYS if config.get(k) is not None}
    for key, value in config.items():
        if key in splits or key in _NOT_SPLITS:
            continue
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(v, str) and v.strip() and (root / v).is_dir() for v in items):
            splits[key] = value
    return _one_key_per_folder(splits)


def _one_key_per_folder(splits: dict[str, object]) -> dict[str, object]:
    """Keys naming the same folder read it once, under the key named like the folder (else the first key).

    detforge's export points Ultralytics' required ``train``/``val`` keys at e.g. ``images/trainval`` and
    also writes ``trainval: images/trainval``; reading that back keeps the split name ``trainval``.
    """
    by_value: dict[str, str] = {}
    for key, value in splits.items():
        seen = by_value.get(repr(value))
        if seen is None or (isinstance(value, str) and PurePosixPath(value).name == key):
            by_value[repr(value)] = key
    keep = set(by_value.values())
    return {k: v for k, v in splits.items() if k in keep}


def _find_yaml(src: Path) -> Path | None:
    if src.is_file():
        if src.suffix.lower() not in (".yaml", ".yml"):
            raise DatasetError(f"{src}: expected a YOLO dataset folder or its data.yaml, found another file.")
        return src
    if (src / "data.yaml").is_file():
        return src / "data.yaml"
    found = sorted(p for p in src.iterdir() if p.suffix.lower() in (".yaml", ".yml") and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(
            f"{src}: found several yaml files ({names}) and no data.yaml; pass the one to use."
        )
    return found[0] if found else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
        config = yaml.safe_load(text)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; expected a YOLO data.yaml.") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DatasetError(
            f"{path}: not valid YAML ({first_line(exc)}); fix the file or pass the folder."
        ) from None
    if not isinstance(config, dict):
        raise DatasetError(
            f"{path}: expected a mapping with 'names' (and 'path', 'train', 'val'), "
            f"found {type(config).__name__}."
        )
    return {str(k): v for k, v in config.items()}


def _yaml_root(config: dict[str, Any], yaml_path: Path, report: Report) -> Path:
    """The dataset root: the yaml's ``path`` (relative to the yaml's folder), else the yaml's folder."""
    folder = yaml_path.resolve().parent
    value = config.get("path")
    if value is None or value == "":
        return folder
    if not isinstance(value, str):
        raise DatasetError(f"{yaml_path}: 'path' must be a folder name, found {value!r}.")
    root = folder / value
    if not root.is_dir():
        report.warning("yaml 'path' not found; using the yaml's folder", str(yaml_path), f"path: {value}")
        return folder
    return root.resolve()


def _names_from_yaml(config: dict[str, Any], yaml_path: Path, report: Report) -> dict[int, str]:
    names, nc = config.get("names"), config.get("nc")
    if names is None:
        if isinstance(nc, int) and not isinstance(nc, bool) and 0 < nc <= 100_000:
            report.warning("no 'names' in the yaml; classes named class_0, class_1, ...", str(yaml_path))
            return {i: f"class_{i}" for i in range(nc)}
        raise DatasetError(f"{yaml_path}: no 'names'; add the class names as a list, in class-index order.")
    if isinstance(names, list):
        table = dict(enumerate(names))
    elif isinstance(names, dict):
        table = {_class_key(k, yaml_path): v for k, v in names.items()}
    else:
        raise DatasetError(
            f"{yaml_path}: 'names' must be a list or a mapping index: name, found {type(names).__name__}."
        )
    result = _checked_names({k: table[k] for k in sorted(table)}, str(yaml_path))
    if nc is not None and nc != len(result):
        report.warning(
            "'nc' disagrees with 'names'; using 'names'", str(yaml_path), f"nc {nc}, {len(result)} names"
        )
    return result


def _class_key(key: object, yaml_path: Path) -> int:
    try:
        index = int(key)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        index = -1
    if isinstance(key, bool) or index < 0 or str(index) != str(key).strip():
        raise DatasetError(f"{yaml_path}: 'names' key {key!r} is not a class index (0, 1, 2, ...).")
    return index


def _checked_names(table: dict[int, Any], source: str) -> dict[int, str]:
    seen: dict[str, int] = {}
    for index, value in table.items():
        name = "" if value is None or isinstance(value, dict | list) else str(value).strip()
        if not name:
            raise DatasetError(
                f"{source}: class {index} has no usable name ({value!r}); give every class a name."
            )
        if name in seen:
            raise DatasetError(
                f"{source}: class name '{name}' is used by classes {seen[name]} and {index}; "
                "names must be unique."
            )
        seen[name] = index
    return {index: name for name, index in seen.items()}


def _names_from_classes_txt(base: Path) -> dict[int, str]:
    candidates = [base / n for n in _CLASS_FILES] + [base / "labels" / n for n in _CLASS_FILES]
    if (base / "labels").is_dir():
        candidates += sorted((base / "labels").glob(f"*/{_CLASS_FILES[0]}"))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetError(
            f"{base}: no data.yaml or classes.txt; YOLO labels hold class indices only, so the class names "
            "must come from one of them. Write a classes.txt with one name per line, in index order."
        )
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; expected one class name per line.") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DatasetError(f"{path}: no class names; expected one class name per line.")
    return _checked_names(dict(enumerate(lines)), str(path))


def _add_folder_entries(layout: _Layout, images: Path, labels: Path) -> None:
    """``images/<split>/**`` (or flat ``images/``), each label at the same relative path under ``labels``."""
    if not images.is_dir():
        raise DatasetError(
            f"{images}: image folder not found; expected a YOLO dataset with images/<split>/ and "
            "labels/<split>/ folders (or a data.yaml naming them). Pass --images if the images are elsewhere."
        )
    layout.image_root = images
    layout.label_dirs.append(labels)
    for path in sorted(p for p in images.iterdir() if p.is_file() and is_image_file(p)):
        layout.entries.append(_Entry(None, path, labels / path.relative_to(images).with_suffix(".txt")))
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        for path in _image_files(folder):
            label = labels / path.relative_to(images).with_suffix(".txt")
            layout.entries.append(_Entry(folder.name, path, label))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p) and p.is_file())


def _add_yaml_split(layout: _Layout, split: str, value: object, yaml_path: Path, report: Report) -> None:
    """A split is a folder, a .txt list of images, or a list of those (paths relative to the root)."""
    seen = {e.image.resolve() for e in layout.entries}
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, str) or not item.strip():
            raise DatasetError(f"{yaml_path}: '{split}' must be a folder or .txt file name, found {item!r}.")
        path = layout.base / item
        if path.is_dir():
            files = _image_files(path)
            layout.label_dirs.append(_label_path(path))
        elif path.is_file():
            files = _listed_images(path, where=f"{yaml_path}: '{split}'")
        else:
            report.error(f"'{split}' folder not found", str(yaml_path), f"{item} -> {path}")
            continue
        for image in files:
            key = image.resolve()
            if key in seen:
                report.warning("image listed in more than one split; kept in the first", str(image), split)
                continue
            seen.add(key)
            layout.entries.append(_Entry(split, image, _label_path(image)))


def _listed_images(path: Path, *, where: str) -> list[Path]:
    """The images a split .txt lists, one per line, relative to the list's folder (as in Ultralytics)."""
    try:
        lines = path.read_bytes().decode("utf-8-sig", errors="replace").splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    if any("\x00" in ln for ln in lines):  # e.g. an image named where a list of images belongs
        raise DatasetError(
            f"{where} names {path}, which is not a text list of images (it holds NUL bytes). Give a folder of images "
            "or a .txt file with one image path a line."
        )
    return [path.parent / ln.strip() for ln in lines if ln.strip()]


def _label_path(image: Path) -> Path:
    """``.../images/<rest>.jpg`` -> ``.../labels/<rest>.txt`` (the last ``images`` part); else beside it."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    label = Path(*parts)
    return label if image.is_dir() else label.with_suffix(".txt")


def _common_image_root(layout: _Layout) -> Path:
    """The folder the split folders share, or the ``images`` folder above it (names like ``train/x.jpg``)."""
    if not layout.entries:
        return layout.base
    folders = {str(e.image.parent.resolve()) for e in layout.entries}
    common = Path(os.path.commonpath(folders))
    base = layout.base.resolve()
    if base not in (common, *common.parents):
        return common
    for folder in (common, *common.parents):
        if folder.name == "images":
            return folder
        if folder == base:
            break
    return common


# --- reading the labels ------------------------------------------------------------------------------


def _add_image(
    builder: DatasetBuilder, entry: _Entry, layout: _Layout, report: Report, severity: Severity
) -> None:
    root = layout.image_root or layout.base
    file_name = _relative(entry.image, root)
    try:
        width, height = read_image_size(entry.image)
    except DatasetError as exc:
        report.add(severity, "image missing or unreadable (its labels are not imported)", file_name, str(exc))
        return
    attributes = {"split": entry.split} if entry.split else {}
    image_id = builder.add_image(file_name, width, height, attributes=attributes)
    if not entry.label.is_file():
        report.warning("background image (no label file)", file_name)
        return
    where_file = _relative(entry.label, layout.base)
    for lineno, line in _label_lines(entry.label):
        where = f"{where_file}, line {lineno}"
        parsed = _parse_line(line)
        if isinstance(parsed, str):
            report.add(severity, "malformed label line", where, parsed)
            continue
        index, values = parsed
        name = layout.names.get(index)
        if name is None:
            known = f"0..{max(layout.names)}" if layout.names else "none"
            report.add(severity, "class index out of range", where, f"class {index}, names has {known}")
            continue
        _add_object(builder, image_id, name, values, width, height)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _label_lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield lineno, line


def _parse_line(line: str) -> tuple[int, list[float]] | str:
    """``(class index, values)``, or why the line is malformed."""
    fields = line.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        return (
            f"expected 5 values (class cx cy w h) or a class and 3 or more x y pairs, found {len(fields)} "
            f"values: {_clip(line)}"
        )
    try:
        numbers = [float(f) for f in fields]
    except ValueError:
        return f"expected numbers, found {_clip(line)}"
    if not all(math.isfinite(v) for v in numbers):
        return f"non-finite number in {_clip(line)}"
    if not numbers[0].is_integer() or numbers[0] < 0:
        return f"class must be a non-negative integer, found {fields[0]!r}"
    return int(numbers[0]), numbers[1:]


def _clip(text: str, limit: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _add_object(
    builder: DatasetBuilder, image_id: int, name: str, values: list[float], width: int, height: int
) -> None:
    if len(values) == 4:
        cx, cy, w, h = values
        builder.add_box(image_id, name, ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height))
    else:
        polygon = [v * (width if i % 2 == 0 else height) for i, v in enumerate(values)]
        builder.add_polygons(image_id, name, [polygon])


def _report_orphan_labels(layout: _Layout, used: set[Path], report: Report) -> None:
    used_resolved = {p.resolve() for p in used}
    for folder in dict.fromkeys(layout.label_dirs):
        if not folder.is_dir():
            continue
        for label in sorted(folder.rglob("*.txt")):
            if label.name not in _CLASS_FILES and label.resolve() not in used_resolved:
                report.warning("label file without an image (not imported)", _relative(label, layout.base))


# --- export ------------------------------------------------------------------------------------------


def export_yolo(
    ds: Dataset,
    out: Path,
    *,
    segments: bool | None = None,
    copy_images: bool = True,
    report: Report | None = None,
) -> Path:
    """Write ``ds`` as a YOLO dataset in ``out`` and return the path of its ``data.yaml``.

    Writes ``images/<split>/...`` (copies of the image files), ``labels/<split>/<stem>.txt`` (class index =
    position in ``ds.categories``; empty files for images without objects) and ``data.yaml`` last and
    atomically, so a folder with a ``data.yaml`` is complete. The split is ``attributes["split"]``
    ("train" when absent); a leading ``<split>/`` folder of ``file_name`` is not repeated.

    Args:
        segments: write polygons instead of boxes; None writes polygons when every annotation has one.
            Annotations without polygons (RLE masks, boxes only) are then written as the box's four corners,
            and a multi-part polygon is joined into one with zero-width bridges (YOLO has one per line).
        copy_images: copy the images; False writes only labels and the yaml (the images must be put in
            ``images/<split>/`` by other means).
        report: receives what was changed or left out (crowd regions, boxes written as polygons, renamed
            files); without one, those findings are issued as a Python warning.

    Raises:
        DatasetError: an annotation's category is not in ``ds.categories``, or an image file to copy is
            missing.
    """
    out = Path(out)
    found = report if report is not None else Report(str(out))
    index = {c.id: k for k, c in enumerate(ds.categories)}
    if segments is None:
        segments = bool(ds.annotations) and all(a.polygons() for a in ds.annotations)
    by_image = ds.annotations_by_image()
    splits: list[str] = []
    for img, split, rel in track(_targets(ds, found), "Writing YOLO labels", total=len(ds.images)):
        lines = [_label_line(a, img, index, segments, found) for a in by_image.get(img.id, [])]
        label = out / "labels" / split / rel.with_suffix(".txt")
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(f"{ln}\n" for ln in lines if ln), encoding="utf-8")
        if copy_images:
            _copy_image(ds, img, out / "images" / split / rel)
        splits.append(split)
    path = atomic_write_text(out / "data.yaml", _data_yaml(out, splits, ds.class_names))
    if report is None and found.problems:
        warnings.warn(f"YOLO export to {out}: " + "; ".join(found.summary_lines()), stacklevel=2)
    return path


def _targets(ds: Dataset, report: Report) -> Iterable[tuple[Image, str, PurePosixPath]]:
    """Each image with its split and path under ``images/<split>/``; label stems must be unique per split."""
    taken: set[tuple[str, PurePosixPath]] = set()
    for img in ds.images:
        split = str(img.attributes.get("split") or "train")
        if split in (".", "..") or "/" in split or "\\" in split:
            report.warning("split name not usable as a folder; image put in 'train'", img.file_name, split)
            split = "train"
        parts = [
            p for p in PurePosixPath(img.file_name.replace("\\", "/")).parts if p not in ("/", ".", "..")
        ]
        if len(parts) > 1 and parts[0] == split:
            parts = parts[1:]
        rel = PurePosixPath(*parts) if parts else PurePosixPath(f"image_{img.id}.jpg")
        if (split, rel.with_suffix("")) in taken:
            renamed = rel.with_name(f"{rel.stem}_{img.id}{rel.suffix}")
            report.warning("image renamed (its label file name was taken)", img.file_name, f"-> {renamed}")
            rel = renamed
        taken.add((split, rel.with_suffix("")))
        yield img, split, rel


def _label_line(ann: Annotation, img: Image, index: dict[int, int], segments: bool, report: Report) -> str:
    where = f"image '{img.file_name}', annotation {ann.id}"
    if ann.category_id not in index:
        raise DatasetError(f"{where}: category_id {ann.category_id} is not in the dataset's categories.")
    if ann.iscrowd:
        report.skipped("crowd region not exported (YOLO has no crowd regions)", where)
        return ""
    x, y, w, h = ann.bbox
    if segments:
        polygons = [p for p in ann.polygons() if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            kind = "RLE mask" if ann.rle() is not None else "no polygon"
            report.warning(f"written as its box's corners ({kind})", where)
            polygons = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        points = _join_polygons(polygons)
        values = [v / (img.width if i % 2 == 0 else img.height) for i, v in enumerate(points)]
    else:
        values = [(x + w / 2) / img.width, (y + h / 2) / img.height, w / img.width, h / img.height]
    return f"{index[ann.category_id]} " + " ".join(format(v, _NUMBER_FORMAT) for v in values)


def _join_polygons(polygons: list[list[float]]) -> list[float]:
    """One polygon from several: go to each part from the first point and back (zero-width bridges).

    The bridges add no area (each is walked both ways) and every point is kept, so the box is unchanged.
    """
    joined = list(polygons[0])
    start = polygons[0][:2]
    for part in polygons[1:]:
        joined += [*start, *part, *part[:2], *start]
    return joined


def _copy_image(ds: Dataset, img: Image, target: Path) -> None:
    source = ds.image_path(img)
    if not source.is_file():
        raise DatasetError(
            f"{source}: image file of '{img.file_name}' not found; cannot copy it into the YOLO export. "
            "Fix the dataset's image root, or export labels only (copy_images=False)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != source.resolve():
        shutil.copyfile(source, target)


def _data_yaml(out: Path, splits: list[str], names: list[str]) -> str:
    present = list(dict.fromkeys(splits))
    ordered = [s for s in _SPLIT_KEYS if s in present] + sorted(s for s in present if s not in _SPLIT_KEYS)
    config: dict[str, Any] = {"path": str(out.resolve())}
    folders = {split: f"images/{split}" for split in ordered}
    # Ultralytics requires 'train' and 'val'; point them at the closest split when the data has other names.
    config["train"] = folders.get("train") or folders.get("trainval") or folders[ordered[0]]
    config["val"] = folders.get("val") or folders.get("test") or config["train"]
    config |= folders
    config |= {"nc": len(names), "names": dict(enumerate(names))}
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
