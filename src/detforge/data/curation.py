"""Dataset curation: keep some classes, balance, take a subset, split, merge.

Every operation is a pure function: it returns a new :class:`Dataset` and leaves its input untouched (new
lists; records that change are copies made with ``msgspec.structs.replace``; unchanged records are shared)
together with an :class:`Operation` that says what it did, in a form a dataset version can store as lineage
and replay. Image and annotation ids are kept, except by :func:`merge`, which renumbers everything.

The functions are written for COCO-train scale (118k images, 860k annotations): each one walks the
annotations once or twice with set and dict look-ups, and segmentations stay the raw JSON they came in.
"""

from __future__ import annotations

import difflib
import math
import os
import posixpath
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import msgspec
from msgspec import UnsetType
from msgspec.structs import replace

from detforge.data.records import UNSET, Annotation, Category, Dataset, Image
from detforge.errors import DatasetError

__all__ = ["Operation", "balance", "filter_categories", "merge", "split", "subset"]

SPLIT_NAMES = {2: ("train", "val"), 3: ("train", "val", "test")}
_FRACTION_SUM_TOLERANCE = 1e-6
_SUBSET_END_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Operation:
    """What one curation step did.

    ``params`` holds JSON-able values, exactly the keyword arguments that replay the step (``name`` is the
    function); ``summary`` is one line for people, with the counts kept and dropped.
    """

    name: str
    params: dict[str, Any]
    summary: str

    def __str__(self) -> str:
        return f"{self.name}: {self.summary}"


# ---------------------------------------------------------------------------------------------------------
# filter_categories


def filter_categories(
    ds: Dataset, names: Sequence[str], *, keep_empty: bool = False
) -> tuple[Dataset, Operation]:
    """Keep only the named categories, renumbered 1, 2, … in the order given.

    Annotations of other categories are dropped. Images left without annotations are dropped, and so are
    images that had none to begin with; with ``keep_empty`` every image is kept (as a negative example).

    Raises:
        DatasetError: a name is not a category of ``ds`` (the message lists the names and the closest one),
            or a name is given twice.
    """
    old_ids = _category_ids(ds, names)
    new_id = {old: k for k, old in enumerate(old_ids, start=1)}
    by_id = {c.id: c for c in ds.categories}
    categories = [_with_id(by_id[old], k) for old, k in new_id.items()]
    annotations: list[Annotation] = []
    append = annotations.append
    for ann in ds.annotations:
        k = new_id.get(ann.category_id)
        if k is not None:
            append(ann if k == ann.category_id else replace(ann, category_id=k))
    if keep_empty:
        images = list(ds.images)
    else:
        kept_ids = {ann.image_id for ann in annotations}
        images = [img for img in ds.images if img.id in kept_ids]
    out = _derive(ds, images=images, annotations=annotations, categories=categories)
    summary = (
        f"kept {len(categories)} of {len(ds.categories)} categories, {_count(images, ds.images, 'images')}, "
        f"{_count(annotations, ds.annotations, 'annotations')}"
    )
    if keep_empty:
        empty = len(images) - len({ann.image_id for ann in annotations})
        summary += f" ({empty:,} images without annotations kept)"
    elif len(images) < len(ds.images):
        had_none = len(ds.images) - len({ann.image_id for ann in ds.annotations})
        summary += (
            f"; dropped {len(ds.images) - len(images) - had_none:,} images left without annotations"
            f" and {had_none:,} that had none"
        )
    return out, Operation("filter", {"names": list(names), "keep_empty": keep_empty}, summary)


def _with_id(cat: Category, new_id: int) -> Category:
    return cat if cat.id == new_id else replace(cat, id=new_id)


# ---------------------------------------------------------------------------------------------------------
# balance


def balance(
    ds: Dataset,
    *,
    require_all: bool = False,
    categories: Sequence[str] | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[Dataset, Operation]:
    """Keep whole images so that the listed classes occur together, or at most ``max_per_class`` times each.

    ``categories`` names the classes both rules look at (None: every category of ``ds``); annotations of
    other classes ride along with their images. Categories are never removed or renumbered.

    - ``require_all``: keep only images holding at least one instance of every listed class (for example
      ``categories=["person", "sports ball"]``). Images without annotations are dropped.
    - ``max_per_class``: visit the (remaining) images in an order shuffled with ``seed`` and keep an image
      only if adding its instances keeps every listed class at or below the cap; otherwise drop it whole.
      Images holding no listed class are always kept. The greedy is deterministic for a seed, and every
      dropped image would push some class over the cap even given the final counts.

    Both rules may be combined; ``require_all`` is applied first. The kept images stay in file order.

    Raises:
        DatasetError: neither rule is asked for, ``max_per_class`` is below 1, or a name is unknown.
    """
    if not require_all and max_per_class is None:
        raise DatasetError("balance needs require_all=True, max_per_class=N, or both; neither was given.")
    if max_per_class is not None and (isinstance(max_per_class, bool) or max_per_class < 1):
        raise DatasetError(f"max_per_class must be a whole number of at least 1, got {max_per_class!r}.")
    listed = _category_ids(ds, categories) if categories is not None else [c.id for c in ds.categories]
    if not listed:
        raise DatasetError("balance: the dataset has no categories to balance.")
    candidates = {img.id for img in ds.images}
    notes = []
    if require_all:
        with_all = _images_with_all(ds.annotations, set(listed))
        notes.append(f"{len(candidates) - len(with_all):,} images lacked one of the {len(listed)} classes")
        candidates = with_all
    if max_per_class is not None:
        capped, totals = _cap_instances(ds, candidates, set(listed), max_per_class, seed)
        notes.append(f"{len(candidates) - len(capped):,} images would exceed {max_per_class:,} per class")
        candidates = capped
        at_cap = sum(1 for n in totals.values() if n == max_per_class)
        notes.append(f"{at_cap} of {len(listed)} classes at the cap")
    images = [img for img in ds.images if img.id in candidates]
    annotations = [ann for ann in ds.annotations if ann.image_id in candidates]
    out = _derive(ds, images=images, annotations=annotations)
    summary = (
        f"kept {_count(images, ds.images, 'images')}, {_count(annotations, ds.annotations, 'annotations')}; "
        + "; ".join(notes)
    )
    params = {
        "require_all": require_all,
        "categories": list(categories) if categories is not None else None,
        "max_per_class": max_per_class,
        "seed": seed,
    }
    return out, Operation("balance", params, summary)


def _images_with_all(annotations: Iterable[Annotation], listed: set[int]) -> set[int]:
    """Ids of the images holding at least one instance of every class in ``listed``."""
    present: dict[int, set[int]] = {}
    for ann in annotations:
        cat = ann.category_id
        if cat in listed:
            seen = present.get(ann.image_id)
            if seen is None:
                present[ann.image_id] = {cat}
            else:
                seen.add(cat)
    return {image_id for image_id, seen in present.items() if len(seen) == len(listed)}


def _cap_instances(
    ds: Dataset, candidates: set[int], listed: set[int], cap: int, seed: int
) -> tuple[set[int], dict[int, int]]:
    """The greedy of :func:`balance`: kept image ids and the final instance count of each listed class."""
    per_image: dict[int, dict[int, int]] = {}
    for ann in ds.annotations:
        cat = ann.category_id
        if cat in listed and ann.image_id in candidates:
            counts = per_image.get(ann.image_id)
            if counts is None:
                per_image[ann.image_id] = {cat: 1}
            else:
                counts[cat] = counts.get(cat, 0) + 1
    order = [img.id for img in ds.images if img.id in candidates]
    random.Random(seed).shuffle(order)
    totals = dict.fromkeys(listed, 0)
    kept = set()
    for image_id in order:
        counts = per_image.get(image_id, {})
        if all(totals[cat] + n <= cap for cat, n in counts.items()):
            for cat, n in counts.items():
                totals[cat] += n
            kept.add(image_id)
    return kept, totals


# ---------------------------------------------------------------------------------------------------------
# subset


def subset(
    ds: Dataset, *, fraction: float, after: float = 0.0, seed: int | None = None
) -> tuple[Dataset, Operation]:
    """The images in ``[after, after + fraction)`` of the image list, with their annotations.

    Positions are in file order, or in an order shuffled with ``seed`` when one is given; the bounds are
    rounded to the nearest image, so consecutive slices (``after=0, 0.25, 0.5, …``) with the same seed
    partition the dataset. The kept images stay in file order.

    Raises:
        DatasetError: ``fraction`` is not in (0, 1], ``after`` not in [0, 1), ``after + fraction`` exceeds 1,
            or the slice holds no image.
    """
    if not 0 < fraction <= 1:
        raise DatasetError(f"subset: fraction must be in (0, 1], got {fraction!r}.")
    if not 0 <= after < 1:
        raise DatasetError(f"subset: after must be in [0, 1), got {after!r}.")
    if after + fraction > 1 + _SUBSET_END_TOLERANCE:
        raise DatasetError(
            f"subset: after + fraction = {after + fraction:g} goes past the end (1); "
            f"use fraction <= {1 - after:g} for after={after:g}."
        )
    n = len(ds.images)
    start, stop = _position(after, n), _position(after + fraction, n)
    if start >= stop:
        raise DatasetError(
            f"subset: [{after:g}, {after + fraction:g}) of {n:,} images holds no image; "
            "use a larger fraction."
        )
    order = list(range(n))
    if seed is not None:
        random.Random(seed).shuffle(order)
    chosen = sorted(order[start:stop])
    images = [ds.images[i] for i in chosen]
    kept_ids = {img.id for img in images}
    annotations = [ann for ann in ds.annotations if ann.image_id in kept_ids]
    out = _derive(ds, images=images, annotations=annotations)
    order_text = "file order" if seed is None else f"an order shuffled with seed {seed}"
    summary = (
        f"images [{after:.4g}, {after + fraction:.4g}) in {order_text}: "
        f"{_count(images, ds.images, 'images')}, "
        f"{_count(annotations, ds.annotations, 'annotations')}"
    )
    return out, Operation("subset", {"fraction": fraction, "after": after, "seed": seed}, summary)


def _position(x: float, n: int) -> int:
    """``x * n`` rounded half up; rounding to 6 decimals first makes 0.1 + 0.2 and 0.3 land on one image."""
    return min(n, math.floor(round(x * n, 6) + 0.5))


# ---------------------------------------------------------------------------------------------------------
# split


def split(
    ds: Dataset, fractions: Sequence[float], *, seed: int = 0, names: Sequence[str] | None = None
) -> tuple[dict[str, Dataset], Operation]:
    """Split the images into 2 or 3 parts of the given fractions, stratified by class.

    Part sizes are ``len(ds.images) * fraction`` apportioned by largest remainder (each within one image of
    exact, together every image). Images are assigned by iterative stratification (after Sechidis et al.,
    2011), deterministic for a seed:

    1. Shuffle the images with ``seed``; group them by the classes they hold (an image with several classes
       is in several groups; images without annotations form one more group, so they too are spread by
       fraction).
    2. Visit the groups from the rarest (fewest images) to the most common; within a group visit the images
       not yet assigned, in shuffled order.
    3. Put each image in the part, among those not yet full, that (a) does not hold the group's class yet,
       then (b) lacks the most of the image's other classes, then (c) is furthest below its share of the
       class (``images of the class * fraction`` minus those already there), then (d) has the most room left,
       then (e) comes first.

    Rule (a) puts a class with at least as many images as parts into every part; it can only fail when a
    part is already full or when the class's images were all placed earlier with rarer classes. Such classes
    are named in the summary. Parts keep the images in file order, with their annotations; every part keeps
    all categories.

    Raises:
        DatasetError: not 2 or 3 fractions, a fraction not in (0, 1), a sum other than 1, or bad names.
    """
    fractions = _check_fractions(fractions)
    part_names = _check_part_names(names, len(fractions))
    part_of, missing = _stratify(ds, fractions, seed)
    part_images: list[list[Image]] = [[] for _ in fractions]
    for img, p in zip(ds.images, part_of, strict=True):
        part_images[p].append(img)
    image_part = {img.id: p for img, p in zip(ds.images, part_of, strict=True)}
    part_annotations: list[list[Annotation]] = [[] for _ in fractions]
    for ann in ds.annotations:
        part = image_part.get(ann.image_id)
        if part is not None:
            part_annotations[part].append(ann)
    parts = {
        name: _derive(ds, images=images, annotations=anns)
        for name, images, anns in zip(part_names, part_images, part_annotations, strict=True)
    }
    sizes = ", ".join(
        f"{name} {len(images):,} ({len(images) / max(len(ds.images), 1):.1%})"
        for name, images in zip(part_names, part_images, strict=True)
    )
    summary = f"{sizes} of {len(ds.images):,} images; " + _missing_text(ds, missing, part_names)
    params = {"fractions": list(fractions), "seed": seed, "names": list(part_names)}
    return parts, Operation("split", params, summary)


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fractions = [float(f) for f in fractions]
    if len(fractions) not in SPLIT_NAMES:
        raise DatasetError(f"split: give 2 or 3 fractions (train, val[, test]), got {len(fractions)}.")
    if not all(0 < f < 1 for f in fractions):
        raise DatasetError(f"split: every fraction must be in (0, 1), got {fractions}.")
    if abs(sum(fractions) - 1) > _FRACTION_SUM_TOLERANCE:
        raise DatasetError(f"split: fractions must sum to 1, got {fractions} (sum {sum(fractions):g}).")
    return fractions


def _check_part_names(names: Sequence[str] | None, parts: int) -> tuple[str, ...]:
    if names is None:
        return SPLIT_NAMES[parts]
    if isinstance(names, str) or len(names) != parts:
        raise DatasetError(f"split: give one name per fraction ({parts}), got {names!r}.")
    if len(set(names)) != parts or not all(isinstance(n, str) and n.strip() for n in names):
        raise DatasetError(f"split: part names must be distinct, non-empty strings, got {list(names)}.")
    return tuple(names)


def _apportion(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer sizes summing to ``total``, each within one of ``total * fraction`` (largest remainder)."""
    exact = [total * f for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda p: (-(exact[p] - sizes[p]), p))
    for p in by_remainder[: total - sum(sizes)]:
        sizes[p] += 1
    return sizes


_NO_ANNOTATIONS = None  # the group key of images without annotations


def _stratify(
    ds: Dataset, fractions: Sequence[float], seed: int
) -> tuple[list[int], dict[int | None, list[int]]]:
    """Each image's part (by position) and, per class, the parts it is missing from; see :func:`split`."""
    n, k = len(ds.images), len(fractions)
    position = {img.id: i for i, img in enumerate(ds.images)}
    classes_of: list[set[int | None]] = [set() for _ in range(n)]
    for ann in ds.annotations:
        i = position.get(ann.image_id)
        if i is not None:
            classes_of[i].add(ann.category_id)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    members: dict[int | None, list[int]] = {}
    for i in order:
        if not classes_of[i]:
            classes_of[i].add(_NO_ANNOTATIONS)
        for cat in classes_of[i]:
            members.setdefault(cat, []).append(i)
    rank = {c.id: r for r, c in enumerate(ds.categories)}
    groups = sorted(
        members, key=lambda c: (len(members[c]), c is None, rank.get(c, len(rank)) if c is not None else 0)
    )
    room = _apportion(n, fractions)
    have = {cat: [0] * k for cat in members}
    part_of = [-1] * n
    for cat in groups:
        share = [len(members[cat]) * f for f in fractions]
        for i in members[cat]:
            if part_of[i] >= 0:
                continue
            p = _best_part(cat, classes_of[i], share, have, room)
            part_of[i] = p
            room[p] -= 1
            for other in classes_of[i]:
                have[other][p] += 1
    missing = {
        cat: [p for p in range(k) if counts[p] == 0]
        for cat, counts in have.items()
        if len(members[cat]) >= k and 0 in counts
    }
    return part_of, missing


def _best_part(
    cat: int | None,
    classes: set[int | None],
    share: list[float],
    have: dict[int | None, list[int]],
    room: list[int],
) -> int:
    counts = have[cat]
    best, best_key = -1, (False, 0, 0.0, 0)
    for p, left in enumerate(room):
        if left <= 0:
            continue
        lacks = counts[p] == 0
        others = sum(1 for c in classes if have[c][p] == 0) if lacks else 0
        key = (lacks, others, share[p] - counts[p], left)
        if best < 0 or key > best_key:
            best, best_key = p, key
    return best


def _missing_text(ds: Dataset, missing: dict[int | None, list[int]], part_names: Sequence[str]) -> str:
    parts = len(part_names)
    if not missing:
        return f"every class with at least {parts} images is in every part"
    label: dict[int | None, str] = {c.id: f"'{c.name}'" for c in ds.categories}
    label[_NO_ANNOTATIONS] = "images without annotations"
    listed = "; ".join(
        f"{label[cat]} not in {', '.join(part_names[p] for p in ps)}" for cat, ps in missing.items()
    )
    return f"{len(missing)} classes with at least {parts} images are missing from a part: {listed}"


# ---------------------------------------------------------------------------------------------------------
# merge


def merge(datasets: Sequence[Dataset], *, names: Sequence[str] | None = None) -> tuple[Dataset, Operation]:
    """One dataset from several, with images, annotations and categories renumbered from 1.

    Categories are joined by name, in order of first appearance (supercategory and skeleton from the first
    dataset that has the name); keypoint categories join only when their keypoint names agree. The merged
    ``image_root`` is the deepest folder holding every input's root, and each ``file_name`` is rewritten
    relative to it, so equal names in different folders stay apart. Two images with the same path (the same
    root and ``file_name`` in two inputs) are the same picture: it is kept once with the annotations of both,
    an annotation identical to one already there (category, box, segmentation) is dropped, and both counts
    are in the summary. ``info`` comes from the first dataset. Licenses are joined by content (a license with
    the same fields but its ``id`` in two inputs is one license) and renumbered from 1, and each image's
    ``license`` follows its license; an image naming a license its input does not list has it cleared, counted
    in the summary (when no input lists licenses, images keep their ``license`` as it is).

    Args:
        datasets: the inputs, in order.
        names: one label per input for messages and lineage (default ``dataset 1``, ``dataset 2``, …).

    Raises:
        DatasetError: no input, bad names, keypoint names that disagree, some inputs without an
            ``image_root``, roots without a common folder, or an annotation pointing at no image/category.
    """
    if not datasets:
        raise DatasetError("merge: give at least one dataset.")
    labels = _check_input_names(names, len(datasets))
    categories, category_maps = _merge_categories(datasets, labels)
    licenses, license_maps = _merge_licenses(datasets)
    unknown_licenses = 0
    root, prefixes = _common_root(datasets, labels)
    images: list[Image] = []
    annotations: list[Annotation] = []
    paths: dict[str, Image] = {}
    earlier: set[tuple[int, int, tuple[float, ...], bytes]] = set()  # annotations of earlier inputs
    duplicates = repeated = 0
    per_input = zip(datasets, labels, prefixes, category_maps, license_maps, strict=True)
    for ds, label, prefix, category_map, license_map in per_input:
        image_map: dict[int, int] = {}
        shared: set[int] = set()
        added: set[tuple[int, int, tuple[float, ...], bytes]] = set()
        for img in ds.images:
            file_name = posixpath.normpath(prefix + img.file_name) if prefix else img.file_name
            known = paths.get(file_name) if isinstance(root, str) else None  # unknown roots: never the same file
            if known is not None:
                _check_same_size(known, img, label)
                duplicates += 1
                image_map[img.id] = known.id
                shared.add(known.id)
                continue
            image_map[img.id] = len(images) + 1
            license_id = img.license
            if img.license is not None and isinstance(licenses, list):  # no input lists any: the ids stay
                license_id = license_map.get(img.license)
                unknown_licenses += license_id is None
            images.append(replace(img, id=len(images) + 1, file_name=file_name, license=license_id))
            paths[file_name] = images[-1]
        for ann in ds.annotations:
            image_id = image_map.get(ann.image_id)
            category_id = category_map.get(ann.category_id)
            if image_id is None or category_id is None:
                what = "image_id" if image_id is None else "category_id"
                raise DatasetError(
                    f"merge: {label}, annotation {ann.id}: {what} {getattr(ann, what)} is not in the "
                    "dataset; "
                    "load it with load_coco to see every such error."
                )
            key = (image_id, category_id, tuple(ann.bbox), bytes(ann.segmentation) if ann.segmentation else b"")
            if image_id in shared and key in earlier:
                repeated += 1
                continue
            added.add(key)
            annotations.append(
                replace(ann, id=len(annotations) + 1, image_id=image_id, category_id=category_id)
            )
        earlier |= added
    first = datasets[0]
    out = Dataset(
        info=first.info,
        licenses=licenses,
        image_root=root,
        images=images,
        annotations=annotations,
        categories=categories,
    )
    inputs = ", ".join(
        f"{label}: {len(ds.images):,} images" for label, ds in zip(labels, datasets, strict=True)
    )
    inputs_per_name = Counter(c.name for ds in datasets for c in ds.categories)
    in_several = sum(1 for n in inputs_per_name.values() if n > 1)
    summary = (
        f"merged {len(datasets)} datasets ({inputs}) into {len(images):,} images, {len(annotations):,} "
        f"annotations, {len(categories)} categories ({in_several} in more than one input)"
        + (f" under {root}" if isinstance(root, str) else "")
    )
    if duplicates:
        summary += (
            f"; {duplicates:,} images were in more than one input (kept once with the annotations of both; "
            f"{repeated:,} identical annotations dropped)"
        )
    if unknown_licenses:
        summary += f"; {unknown_licenses:,} images named a license their input does not list (cleared)"
    return out, Operation("merge", {"names": list(labels)}, summary)


def _merge_licenses(datasets: Sequence[Dataset]) -> tuple[list[Any] | UnsetType, list[dict[int, int]]]:
    """The joined license list (UNSET when no input has one) and, per input, its old license id -> new id.

    Licenses with an integer ``id`` are joined by their other fields; entries without one cannot be referred to
    by an image and are kept once each, as they are.
    """
    merged: list[Any] = []
    by_content: dict[bytes, int] = {}
    maps: list[dict[int, int]] = []
    for ds in datasets:
        mapping: dict[int, int] = {}
        for entry in ds.licenses if isinstance(ds.licenses, list) else []:
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), int)):
                if entry not in merged:
                    merged.append(entry)
                continue
            key = msgspec.json.encode({k: v for k, v in entry.items() if k != "id"}, order="sorted")
            if key not in by_content:
                by_content[key] = len(by_content) + 1
                merged.append({**entry, "id": by_content[key]})
            mapping[entry["id"]] = by_content[key]
        maps.append(mapping)
    has_licenses = any(isinstance(ds.licenses, list) for ds in datasets)
    return (merged if has_licenses else UNSET), maps


def _check_same_size(known: Image, img: Image, label: str) -> None:
    if (known.width, known.height) != (img.width, img.height):
        raise DatasetError(
            f"merge: {label}, image '{img.file_name}' is {img.width}x{img.height} but the same file is "
            f"{known.width}x{known.height} in an earlier input; fix the sizes (detforge data validate) first."
        )


def _check_input_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"dataset {k}" for k in range(1, count + 1)]
    if isinstance(names, str) or len(names) != count:
        raise DatasetError(f"merge: give one name per dataset ({count}), got {names!r}.")
    if len(set(names)) != count:
        raise DatasetError(f"merge: names must be distinct, got {list(names)}.")
    return list(names)


def _merge_categories(
    datasets: Sequence[Dataset], labels: Sequence[str]
) -> tuple[list[Category], list[dict[int, int]]]:
    """The joined categories and, per input, its category id -> merged id."""
    merged: dict[str, Category] = {}
    came_from: dict[str, str] = {}
    maps = []
    for ds, label in zip(datasets, labels, strict=True):
        mapping = {}
        for cat in ds.categories:
            known = merged.get(cat.name)
            if known is None:
                known = merged[cat.name] = _with_id(cat, len(merged) + 1)
                came_from[cat.name] = label
            elif known.keypoints != cat.keypoints:
                raise DatasetError(
                    f"merge: category '{cat.name}' has keypoints {_keypoint_text(known)} in "
                    f"{came_from[cat.name]} "
                    f"but {_keypoint_text(cat)} in {label}; rename one of them (or make the keypoints agree) "
                    "before merging."
                )
            mapping[cat.id] = known.id
        maps.append(mapping)
    return list(merged.values()), maps


def _keypoint_text(cat: Category) -> str:
    return f"[{', '.join(cat.keypoints)}]" if cat.keypoints else "none"


def _common_root(datasets: Sequence[Dataset], labels: Sequence[str]) -> tuple[str | UnsetType, list[str]]:
    """The merged image_root (UNSET when no input has one) and, per input, the prefix for its file names."""
    roots = [ds.image_root for ds in datasets if isinstance(ds.image_root, str)]
    if not roots:
        return UNSET, [""] * len(datasets)
    if len(roots) < len(datasets):
        unknown = [
            label for label, ds in zip(labels, datasets, strict=True) if not isinstance(ds.image_root, str)
        ]
        raise DatasetError(
            f"merge: {', '.join(unknown)} has no image_root, so its images cannot be placed beside the "
            "others; "
            "load it with load_coco or set image_root."
        )
    absolute = [os.path.abspath(r) for r in roots]
    try:
        common = os.path.commonpath(absolute)
    except ValueError:  # different drives on Windows
        raise DatasetError(f"merge: the image roots have no common folder: {', '.join(absolute)}.") from None
    prefixes = []
    for root in absolute:
        rel = PurePath(os.path.relpath(root, common)).as_posix()
        prefixes.append("" if rel == "." else rel + "/")
    return str(Path(common)), prefixes


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _category_ids(ds: Dataset, names: Sequence[str]) -> list[int]:
    """Ids of the named categories in the order given; unknown or repeated names are errors."""
    if isinstance(names, str):
        raise DatasetError(f"give a list of category names, not one string: [{names!r}].")
    by_name = {c.name: c.id for c in ds.categories}
    ids, seen = [], set()
    for name in names:
        if name not in by_name:
            raise DatasetError(_unknown_category(name, list(by_name)))
        if name in seen:
            raise DatasetError(f"category '{name}' is listed twice.")
        seen.add(name)
        ids.append(by_name[name])
    if not ids:
        raise DatasetError(f"give at least one category name (known: {', '.join(by_name)}).")
    return ids


def _unknown_category(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown category '{name}'.{hint} Known categories: {', '.join(known) or 'none'}."


def _derive(
    ds: Dataset,
    *,
    images: list[Image],
    annotations: list[Annotation],
    categories: list[Category] | None = None,
) -> Dataset:
    """A dataset like ``ds`` with new record lists (``info`` and ``licenses`` are shared)."""
    return replace(
        ds,
        images=images,
        annotations=annotations,
        categories=categories if categories is not None else list(ds.categories),
    )


def _count(kept: Sequence[object], total: Sequence[object], what: str) -> str:
    return f"{len(kept):,} of {len(total):,} {what}"
