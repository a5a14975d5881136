"""COCO JSON: load (typed, validated), save (atomic), and import with an image root."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from detforge.data.formats.common import ImportResult, skip_invalid_annotations
from detforge.data.images import is_image_file
from detforge.data.records import UNSET, Annotation, Category, Dataset, Image
from detforge.data.report import Report
from detforge.data.validate import validate_dataset
from detforge.errors import DatasetError
from detforge.files import atomic_write_bytes

__all__ = ["decode_coco", "encode_coco", "import_coco", "load_coco", "read_coco", "save_coco"]

_SECTIONS: dict[str, type] = {"images": Image, "annotations": Annotation, "categories": Category}
_TOP_LEVEL = {"info", "licenses", "image_root", "images", "annotations", "categories"}
_top_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while millions of acyclic records are created (it otherwise dominates the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def decode_coco(data: bytes, *, source: str, report: Report | None = None) -> Dataset:
    """Decode COCO JSON bytes into a Dataset (no validation beyond types).

    Keys outside the COCO schema are not lost: on images and annotations they move into ``attributes``, and
    other top-level keys are reported as warnings.

    Raises:
        DatasetError: the bytes are not JSON, or a value has the wrong type (the message gives its JSON path).
    """
    report = report or Report(source)
    with _gc_paused():
        try:
            top = _top_decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise DatasetError(f"{source}: not a JSON object ({exc}).") from None
        for key in sorted(set(top) - _TOP_LEVEL):
            report.warning(
                "top-level key not kept", f"{source}, key '{key}'", "detforge keeps COCO keys only"
            )
        for key in ("images", "categories"):
            if key not in top:
                raise DatasetError(f"{source}: no '{key}' list; this is not a COCO dataset file.")
        sections = {
            name: _decode_section(top.get(name), name, cls, source, report) for name, cls in _SECTIONS.items()
        }
        extras = {k: _decode_extra(top[k], k, t, source) for k, t in _EXTRAS.items() if k in top}
    return Dataset(
        info=extras.get("info") or UNSET,
        licenses=extras.get("licenses") or UNSET,
        image_root=extras.get("image_root") or UNSET,
        **sections,
    )


_EXTRAS: dict[str, Any] = {"info": dict[str, Any], "licenses": list[Any], "image_root": str}


def _decode_extra(raw: msgspec.Raw, key: str, kind: Any, source: str) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise DatasetError(f"{source}: top-level '{key}': {exc}. Fix or remove it.") from None


def _decode_section(
    raw: msgspec.Raw | None, name: str, cls: type[msgspec.Struct], source: str, report: Report
) -> list[Any]:
    if raw is None:
        return []
    try:
        strict = _strict(cls)
        return msgspec.json.decode(raw, type=list[strict])  # type: ignore[valid-type]
    except msgspec.ValidationError as exc:
        if "unknown field" not in str(exc):
            raise DatasetError(f"{source}: {_describe(exc, name)}") from None
    return _decode_with_extras(raw, name, cls, source, report)


def _strict(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The record type that rejects unknown keys (tried first: the fast path for standard files)."""
    cached = _STRICT.get(cls)
    if cached is None:
        cached = msgspec.defstruct(
            cls.__name__,
            [],
            bases=(cls,),
            forbid_unknown_fields=True,
            omit_defaults=cls.__struct_config__.omit_defaults,
        )
        _STRICT[cls] = cached
    return cached


_STRICT: dict[type[msgspec.Struct], type[msgspec.Struct]] = {}


def _decode_with_extras(
    raw: msgspec.Raw, name: str, cls: type[msgspec.Struct], source: str, report: Report
) -> list[Any]:
    """Slow path for files with non-standard keys: move them into ``attributes`` (categories: report them)."""
    fields = set(cls.__struct_fields__)
    items = msgspec.json.decode(raw)
    moved: set[str] = set()
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        extra = {k: item.pop(k) for k in list(item) if k not in fields}
        moved.update(extra)
        if extra and "attributes" in fields:
            attrs = item.get("attributes")
            item["attributes"] = {**(attrs if isinstance(attrs, dict) else {}), **extra}
    for key in sorted(moved):
        verb = "kept under 'attributes'" if "attributes" in fields else "not kept"
        report.warning(f"non-COCO {name} key {verb}", f"{source}, key '{key}'")
    try:
        return msgspec.json.decode(_encoder.encode(items), type=list[cls])  # type: ignore[valid-type]
    except msgspec.ValidationError as exc:
        raise DatasetError(f"{source}: {_describe(exc, name)}") from None


def _describe(exc: msgspec.ValidationError, section: str) -> str:
    text = str(exc).replace("`$", f"`{section}", 1)
    return f"{text}. Fix that value (see the COCO format: https://cocodataset.org/#format-data)."


def encode_coco(ds: Dataset) -> bytes:
    """COCO JSON bytes of ``ds`` exactly as held (image_root as is)."""
    return _encoder.encode(ds)


def read_coco(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_images: bool = False,
) -> tuple[Dataset, Report]:
    """Load and validate a COCO file; return the dataset and the report (errors are not raised).

    The image root is, in order: ``image_root``; the file's own ``image_root`` (relative to the file); the
    file's folder, or its ``images/`` subfolder when the first image is found there.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror}).") from None
    report = Report(str(path))
    ds = decode_coco(data, source=str(path), report=report)
    ds.image_root = str(_resolve_image_root(ds, path, image_root))
    validate_dataset(ds, source=str(path), check_images=check_images, report=report)
    return ds, report


def load_coco(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_images: bool = False,
) -> Dataset:
    """Load and validate a COCO file; raise :class:`DatasetError` listing every error found."""
    ds, report = read_coco(path, image_root=image_root, check_images=check_images)
    report.raise_for_errors(what_to_do="Run `detforge data validate` for the full report.")
    return ds


def _resolve_image_root(ds: Dataset, path: Path, given: str | os.PathLike[str] | None) -> Path:
    if given is not None:
        return Path(given).resolve()
    folder = path.resolve().parent
    if isinstance(ds.image_root, str):
        return (folder / ds.image_root).resolve()
    # Guess among the usual places, by how many of a sample of images each one holds.
    sample = [img.file_name for img in ds.images[:: max(1, len(ds.images) // 16)][:16]]
    candidates = [folder, folder / "images", folder.parent / "images"]
    found = [sum((c / name).exists() for name in sample) for c in candidates]
    return candidates[found.index(max(found))]


def save_coco(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` atomically; ``image_root`` is stored relative to the file's folder when possible."""
    path = Path(path)
    out = ds
    if isinstance(ds.image_root, str):
        out = msgspec.structs.replace(
            ds, image_root=_relative_root(Path(ds.image_root), path.resolve().parent)
        )
    return atomic_write_bytes(path, encode_coco(out))


def _relative_root(root: Path, folder: Path) -> str:
    try:
        return Path(os.path.relpath(root, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return str(root)


def import_coco(
    src: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    skip_invalid: bool = True,
) -> ImportResult:
    """Import a COCO file (``src`` is the JSON, or a folder holding exactly one JSON).

    Annotations that fail validation are skipped and counted when ``skip_invalid``; other errors remain.
    """
    src = Path(src)
    if src.is_dir():
        src = _single_json(src)
    ds, found = read_coco(src, image_root=images, check_images=check_images)
    if skip_invalid:
        found = skip_invalid_annotations(ds, found)
    return ImportResult(ds, found)


def _single_json(folder: Path) -> Path:
    candidates = sorted(p for p in folder.glob("*.json") if not is_image_file(p))
    if len(candidates) != 1:
        names = ", ".join(p.name for p in candidates) or "none"
        raise DatasetError(
            f"{folder}: expected one COCO .json in the folder, found {names}; pass the file itself."
        )
    return candidates[0]
