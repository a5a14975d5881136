"""Typed COCO-shaped dataset records.

The records are ``msgspec.Struct`` types: dataclass-like, typed, and decoded straight from JSON bytes.
A segmentation is kept as the raw JSON bytes it came in (``msgspec.Raw``) until somebody needs its points,
so that curating a COCO-train-scale file never materialises tens of millions of Python floats. Use
:meth:`Annotation.polygons`, :meth:`Annotation.rle` and :func:`make_segmentation` to read and write it.

Conventions (COCO's): ``bbox`` is ``(x, y, width, height)`` in pixels with the origin at the top-left
corner of the top-left pixel; polygons are flat ``[x1, y1, x2, y2, ...]`` lists in pixels; RLE is
``{"size": [height, width], "counts": str | list[int]}``; category ids are the file's own (need not be
contiguous); ``keypoints`` is a flat ``[x, y, v] * K`` list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

__all__ = [
    "UNSET",
    "Annotation",
    "Category",
    "Dataset",
    "Image",
    "Segmentation",
    "make_segmentation",
]

Polygons = list[list[float]]
Segmentation = Polygons | dict[str, Any]

_polygons_decoder = msgspec.json.Decoder(Polygons)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class Category(Struct, omit_defaults=True, gc=False):
    """One class. ``keypoints`` and ``skeleton`` (1-based index pairs) only for keypoint datasets."""

    id: int
    name: str
    supercategory: str = ""
    keypoints: list[str] = []
    skeleton: list[list[int]] = []


class Image(Struct, omit_defaults=True, gc=False):
    """One image; ``file_name`` is relative to the dataset's ``image_root``."""

    id: int
    file_name: str
    width: int
    height: int
    license: int | None = None
    flickr_url: str | None = None
    coco_url: str | None = None
    date_captured: str | None = None
    attributes: dict[str, Any] = {}


class Annotation(Struct, gc=False):
    """One object instance. ``bbox`` is ``(x, y, w, h)`` in pixels; ``area`` is the mask area when known.

    ``area`` and ``iscrowd`` are always written because COCO evaluation reads them; optional fields left
    ``UNSET`` are omitted from the JSON.
    """

    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float = 0.0
    iscrowd: int = 0
    segmentation: Raw | UnsetType = UNSET
    keypoints: list[float] | UnsetType = UNSET
    num_keypoints: int | UnsetType = UNSET
    attributes: dict[str, Any] | UnsetType = UNSET

    def segmentation_value(self) -> Segmentation | None:
        """The decoded segmentation (polygon list or RLE dict), or None when there is none."""
        if not isinstance(self.segmentation, Raw):
            return None
        value = _any_decoder.decode(self.segmentation)
        if value is None or value == []:
            return None
        return value  # type: ignore[no-any-return]

    def polygons(self) -> Polygons:
        """The polygons as flat ``[x1, y1, x2, y2, ...]`` lists; empty for RLE or no segmentation."""
        if not isinstance(self.segmentation, Raw):
            return []
        raw = bytes(self.segmentation)
        if raw.lstrip()[:1] != b"[":
            return []
        return _polygons_decoder.decode(raw)

    def rle(self) -> dict[str, Any] | None:
        """The RLE dict when the segmentation is run-length encoded, else None."""
        value = self.segmentation_value()
        return value if isinstance(value, dict) else None


def make_segmentation(value: Segmentation | None) -> Raw | UnsetType:
    """Encode polygons or an RLE dict for :attr:`Annotation.segmentation` (None or empty gives UNSET)."""
    if value is None or (isinstance(value, list) and not value):
        return UNSET
    return Raw(_encoder.encode(value))


class Dataset(Struct, kw_only=True):
    """A whole COCO-style dataset.

    In memory ``image_root`` is an absolute folder (or UNSET when unknown); in the JSON file it is stored
    relative to the file's own folder when possible, so a dataset folder can be moved as a whole.
    """

    info: dict[str, Any] | UnsetType = UNSET
    licenses: list[Any] | UnsetType = UNSET
    image_root: str | UnsetType = UNSET
    images: list[Image] = []
    annotations: list[Annotation] = []
    categories: list[Category] = []

    @property
    def class_names(self) -> list[str]:
        """Category names in file order."""
        return [c.name for c in self.categories]

    def image_path(self, image: Image) -> Path:
        """Where ``image`` lies on disk (``image_root / file_name``)."""
        root = Path(self.image_root) if isinstance(self.image_root, str) else Path(".")
        return root / image.file_name

    def annotations_by_image(self) -> dict[int, list[Annotation]]:
        """Annotations grouped by image id; every image has an entry, possibly empty."""
        groups: dict[int, list[Annotation]] = {img.id: [] for img in self.images}
        for ann in self.annotations:
            groups.setdefault(ann.image_id, []).append(ann)
        return groups

    def summary(self) -> str:
        """One line of counts, as importers print it."""
        return (
            f"{len(self.images)} images, {len(self.annotations)} annotations, "
            f"{len(self.categories)} categories"
        )
