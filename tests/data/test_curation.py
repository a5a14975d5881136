"""Curation operations: filter, balance, subset, split, merge (pure functions with lineage)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from detforge.data.curation import Operation, balance, filter_categories, merge, split, subset
from detforge.data.formats.coco import encode_coco, load_coco, save_coco
from detforge.data.records import Annotation, Category, Dataset, Image, make_segmentation
from detforge.data.validate import validate_dataset
from detforge.errors import DatasetError

CLASSES = ("cat", "dog", "bird", "fish")


def make_dataset(
    labels: list[list[str]], *, classes: tuple[str, ...] = CLASSES, root: str = "/data/a"
) -> Dataset:
    """One image per entry of ``labels``, one annotation per name; ids are deliberately not contiguous."""
    cat_id = {name: 10 * (k + 1) for k, name in enumerate(classes)}
    images: list[Image] = []
    annotations: list[Annotation] = []
    for i, names in enumerate(labels):
        image_id = 100 + 7 * i
        images.append(Image(id=image_id, file_name=f"img_{i:04d}.jpg", width=64, height=48))
        for name in names:
            annotations.append(
                Annotation(
                    id=5000 + len(annotations),
                    image_id=image_id,
                    category_id=cat_id[name],
                    bbox=(1.0, 2.0, 8.0, 6.0),
                    area=48.0,
                    segmentation=make_segmentation([[1.0, 2.0, 9.0, 2.0, 9.0, 8.0]]),
                )
            )
    categories = [Category(id=i, name=n, supercategory="animal") for n, i in cat_id.items()]
    return Dataset(
        info={"description": "test"},
        image_root=root,
        images=images,
        annotations=annotations,
        categories=categories,
    )


def names_by_image(ds: Dataset) -> dict[str, list[str]]:
    """file_name -> sorted category names of its annotations (ids aside: what a human would compare)."""
    name = {c.id: c.name for c in ds.categories}
    files = {img.id: img.file_name for img in ds.images}
    out: dict[str, list[str]] = {img.file_name: [] for img in ds.images}
    for ann in ds.annotations:
        out[files[ann.image_id]].append(name[ann.category_id])
    return {k: sorted(v) for k, v in out.items()}


def check_consistent(ds: Dataset) -> None:
    """Every annotation points at a kept image and a kept category."""
    image_ids = {img.id for img in ds.images}
    cat_ids = {c.id for c in ds.categories}
    assert all(a.image_id in image_ids and a.category_id in cat_ids for a in ds.annotations)


def check_lineage(op: Operation, name: str) -> None:
    assert op.name == name
    assert json.loads(json.dumps(op.params)) == op.params
    assert op.summary and "\n" not in op.summary


labels_strategy = st.lists(st.lists(st.sampled_from(CLASSES), max_size=4), min_size=1, max_size=40)


@pytest.fixture
def tiny(tiny_dataset: Path) -> Dataset:
    return load_coco(tiny_dataset)


# --------------------------------------------------------------------------------------------------------
# filter_categories


def test_filter_keeps_named_classes_and_drops_images_left_empty(tiny: Dataset) -> None:
    before = encode_coco(tiny)
    out, op = filter_categories(tiny, ["square"])

    assert [(c.id, c.name) for c in out.categories] == [(1, "square")]
    assert [img.file_name for img in out.images] == ["img_01.png", "img_02.png"]
    assert [a.id for a in out.annotations] == [a.id for a in tiny.annotations if a.category_id == 2]
    assert {a.category_id for a in out.annotations} == {1}
    assert encode_coco(tiny) == before  # the input is untouched
    check_lineage(op, "filter")
    assert op.params == {"names": ["square"], "keep_empty": False}
    assert op.summary == (
        "kept 1 of 2 categories, 2 of 4 images, 3 of 5 annotations; "
        "dropped 1 images left without annotations and 1 that had none"
    )


def test_filter_renumbers_in_the_given_order(tiny: Dataset) -> None:
    out, _ = filter_categories(tiny, ["square", "circle"])

    assert [(c.id, c.name) for c in out.categories] == [(1, "square"), (2, "circle")]
    assert names_by_image(out) == {k: v for k, v in names_by_image(tiny).items() if v}
    original = {a.id: a for a in tiny.annotations}
    for ann in out.annotations:
        assert (
            ann.segmentation is original[ann.id].segmentation
            or ann.segmentation == original[ann.id].segmentation
        )


def test_filter_keep_empty_keeps_every_image(tiny: Dataset) -> None:
    out, op = filter_categories(tiny, ["circle"], keep_empty=True)

    assert [img.id for img in out.images] == [1, 2, 3, 4]
    assert len(out.annotations) == 2
    assert "(2 images without annotations kept)" in op.summary


def test_filter_result_saves_and_loads_again(tiny: Dataset, tmp_path: Path) -> None:
    out, _ = filter_categories(tiny, ["circle"])
    path = save_coco(out, tmp_path / "tiny" / "circle.json")

    again = load_coco(path)
    assert names_by_image(again) == names_by_image(out)
    assert again.image_path(again.images[0]).exists()


def test_filter_unknown_name_suggests_the_closest(tiny: Dataset) -> None:
    with pytest.raises(
        DatasetError,
        match=r"unknown category 'sqare'. Did you mean 'square'\? Known categories: "
        r"circle, square",
    ):
        filter_categories(tiny, ["sqare"])


@pytest.mark.parametrize("names", [[], ["circle", "circle"], "circle"])
def test_filter_rejects_bad_name_lists(tiny: Dataset, names: list[str]) -> None:
    with pytest.raises(DatasetError):
        filter_categories(tiny, names)


@given(
    labels_strategy, st.lists(st.sampled_from(CLASSES), min_size=1, max_size=4, unique=True), st.booleans()
)
@settings(max_examples=60, deadline=None)
def test_filter_property(labels: list[list[str]], keep: list[str], keep_empty: bool) -> None:
    ds = make_dataset(labels)
    out, op = filter_categories(ds, keep, keep_empty=keep_empty)

    assert out.class_names == keep and [c.id for c in out.categories] == list(range(1, len(keep) + 1))
    expected = {f"img_{i:04d}.jpg": sorted(n for n in names if n in keep) for i, names in enumerate(labels)}
    if not keep_empty:
        expected = {k: v for k, v in expected.items() if v}
    assert names_by_image(out) == expected
    check_consistent(out)
    assert filter_categories(ds, **op.params) == (out, op)  # replayable


# --------------------------------------------------------------------------------------------------------
# balance


def test_balance_require_all_keeps_images_with_every_class() -> None:
    ds = make_dataset([["cat", "dog"], ["cat"], ["dog", "dog", "cat", "bird"], [], ["bird"]])
    out, op = balance(ds, require_all=True, categories=["cat", "dog"])

    assert [img.file_name for img in out.images] == ["img_0000.jpg", "img_0002.jpg"]
    assert len(out.annotations) == 6  # whole images, the bird too
    assert out.categories == ds.categories
    check_lineage(op, "balance")
    assert op.summary.startswith(
        "kept 2 of 5 images, 6 of 8 annotations; 3 images lacked one of the 2 classes"
    )


def test_balance_require_all_defaults_to_every_category() -> None:
    ds = make_dataset([["cat", "dog"], ["cat", "dog", "bird", "fish"], ["cat"]])
    out, _ = balance(ds, require_all=True)
    assert [img.file_name for img in out.images] == ["img_0001.jpg"]


def test_balance_after_filter_is_the_person_and_ball_recipe(tiny: Dataset) -> None:
    both, _ = filter_categories(tiny, ["circle", "square"])
    out, _ = balance(both, require_all=True)
    assert [img.file_name for img in out.images] == ["img_01.png"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs require_all=True, max_per_class=N, or both"),
        ({"max_per_class": 0}, "at least 1"),
        ({"require_all": True, "categories": ["cow"]}, "unknown category 'cow'"),
    ],
)
def test_balance_rejects_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        balance(make_dataset([["cat"]]), **kwargs)  # type: ignore[arg-type]


@given(labels_strategy, st.integers(1, 6), st.integers(0, 3), st.booleans())
@settings(max_examples=80, deadline=None)
def test_balance_cap_property(labels: list[list[str]], cap: int, seed: int, only_two: bool) -> None:
    ds = make_dataset(labels)
    listed = ["cat", "dog"] if only_two else None
    out, op = balance(ds, max_per_class=cap, categories=listed, seed=seed)

    capped = set(listed or CLASSES)
    totals = Counter(n for names in names_by_image(out).values() for n in names)
    assert all(totals[name] <= cap for name in capped)
    kept = names_by_image(out)
    original = names_by_image(ds)
    assert all(original[f] == v for f, v in kept.items())  # whole images
    assert [img.file_name for img in out.images] == [f for f in original if f in kept]  # file order
    for file_name, names in original.items():
        if file_name not in kept:  # dropped only if it would push a class over the cap, even now
            counts = Counter(n for n in names if n in capped)
            assert any(totals[n] + k > cap for n, k in counts.items())
    assert balance(ds, **op.params) == (out, op)


# --------------------------------------------------------------------------------------------------------
# subset


def test_subset_takes_a_slice_in_file_order(tiny: Dataset) -> None:
    first, op = subset(tiny, fraction=0.5)
    second, _ = subset(tiny, fraction=0.5, after=0.5)

    assert [img.id for img in first.images] == [1, 2]
    assert [img.id for img in second.images] == [3, 4]
    assert len(first.annotations) + len(second.annotations) == len(tiny.annotations)
    check_lineage(op, "subset")
    assert op.params == {"fraction": 0.5, "after": 0.0, "seed": None}


def test_subset_with_a_seed_is_deterministic_and_keeps_file_order() -> None:
    ds = make_dataset([["cat"]] * 50)
    a, _ = subset(ds, fraction=0.2, seed=1)
    b, _ = subset(ds, fraction=0.2, seed=1)
    c, _ = subset(ds, fraction=0.2, seed=2)

    ids = [img.id for img in a.images]
    assert ids == [img.id for img in b.images] == sorted(ids) and len(ids) == 10
    assert ids != [img.id for img in c.images] and ids != [img.id for img in ds.images[:10]]


@given(st.integers(1, 60), st.integers(1, 7), st.one_of(st.none(), st.integers(0, 5)))
@settings(max_examples=60, deadline=None)
def test_subset_slices_partition_the_dataset(n: int, parts: int, seed: int | None) -> None:
    ds = make_dataset([["cat"]] * n)
    parts = min(parts, n)
    seen: list[int] = []
    for k in range(parts):
        out, _ = subset(ds, fraction=1 / parts, after=k / parts, seed=seed)
        seen.extend(img.id for img in out.images)
    assert sorted(seen) == [img.id for img in ds.images]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 0.5, "after": 1.0}, r"after must be in \[0, 1\)"),
        ({"fraction": 0.5, "after": 0.6}, "goes past the end"),
        ({"fraction": 0.01}, "holds no image"),
    ],
)
def test_subset_rejects_bad_bounds(tiny: Dataset, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        subset(tiny, **kwargs)


def test_subset_accepts_rounding_at_the_end(tiny: Dataset) -> None:
    out, _ = subset(tiny, fraction=0.7, after=0.1 + 0.2)  # 1.0000000000000002
    assert [img.id for img in out.images] == [2, 3, 4]


# --------------------------------------------------------------------------------------------------------
# split


def test_split_default_names_and_lineage(tiny: Dataset) -> None:
    parts, op = split(tiny, [0.5, 0.5])

    assert list(parts) == ["train", "val"]
    assert sorted(img.id for p in parts.values() for img in p.images) == [1, 2, 3, 4]
    check_lineage(op, "split")
    assert op.params == {"fractions": [0.5, 0.5], "seed": 0, "names": ["train", "val"]}
    for part in parts.values():
        assert part.categories == tiny.categories
        check_consistent(part)


@pytest.mark.parametrize(
    ("fractions", "names", "message"),
    [
        ([1.0], None, "give 2 or 3 fractions"),
        ([0.25] * 4, None, "give 2 or 3 fractions"),
        ([0.5, 0.4], None, "must sum to 1"),
        ([1.2, -0.2], None, r"every fraction must be in \(0, 1\)"),
        ([0.5, 0.5], ["a"], "one name per fraction"),
        ([0.5, 0.5], ["a", "a"], "distinct"),
    ],
)
def test_split_rejects_bad_arguments(
    tiny: Dataset, fractions: list[float], names: list[str] | None, message: str
) -> None:
    with pytest.raises(DatasetError, match=message):
        split(tiny, fractions, names=names)


def test_split_sizes_and_per_class_shares_follow_the_fractions() -> None:
    import random

    rng = random.Random(7)
    labels = [rng.choices(CLASSES, weights=[20, 5, 2, 0.5], k=rng.randint(0, 3)) for _ in range(3000)]
    ds = make_dataset(labels)
    fractions = [0.7, 0.2, 0.1]
    parts, op = split(ds, fractions, seed=3, names=["a", "b", "c"])

    for part, f in zip(parts.values(), fractions, strict=True):
        assert abs(len(part.images) - f * len(ds.images)) <= 1
        check_consistent(part)
    images_with = Counter(n for names in labels for n in set(names) or {"<none>"})
    for part, f in zip(parts.values(), fractions, strict=True):
        here = Counter(n for names in names_by_image(part).values() for n in set(names) or {"<none>"})
        for name, total in images_with.items():
            assert abs(here[name] - f * total) <= max(3, 0.03 * total), (name, here[name], f * total)
    assert "every class with at least 3 images is in every part" in op.summary


def test_split_puts_rare_classes_in_every_part() -> None:
    labels = [["cat"]] * 200 + [["dog"]] * 3 + [["bird", "cat"]] * 3 + [[]] * 3
    parts, _ = split(make_dataset(labels), [0.8, 0.1, 0.1])
    for part in parts.values():
        present = {n for names in names_by_image(part).values() for n in names}
        assert {"dog", "bird", "cat"} <= present
        assert any(not names for names in names_by_image(part).values())


def test_split_names_classes_it_cannot_place_everywhere() -> None:
    # The val part holds one image, so the second class cannot be there too.
    labels = [["cat"]] * 5 + [["dog"]] * 5
    _, op = split(make_dataset(labels), [0.9, 0.1])
    assert "1 classes with at least 2 images are missing from a part: 'dog' not in val" in op.summary


@given(
    labels_strategy,
    st.sampled_from([(0.5, 0.5), (0.8, 0.2), (0.7, 0.2, 0.1), (0.34, 0.33, 0.33)]),
    st.integers(0, 3),
)
@settings(max_examples=60, deadline=None)
def test_split_property(labels: list[list[str]], fractions: tuple[float, ...], seed: int) -> None:
    ds = make_dataset(labels)
    parts, op = split(ds, fractions, seed=seed)

    files = [img.file_name for part in parts.values() for img in part.images]
    assert sorted(files) == sorted(img.file_name for img in ds.images)  # every image exactly once
    merged_view = {k: v for part in parts.values() for k, v in names_by_image(part).items()}
    assert merged_view == names_by_image(ds)  # annotations follow their image
    for part, f in zip(parts.values(), fractions, strict=True):
        assert abs(len(part.images) - f * len(ds.images)) < 1
    assert split(ds, **op.params) == (parts, op)  # deterministic, replayable


# --------------------------------------------------------------------------------------------------------
# merge


def test_merge_rebases_file_names_on_the_common_folder(tiny_dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_dataset.parent, other)
    a, b = load_coco(tiny_dataset), load_coco(other / "instances.json")
    b, _ = filter_categories(b, ["square"])
    before = encode_coco(a), encode_coco(b)

    out, op = merge([a, b], names=["tiny", "squares"])

    assert out.image_root == str(tmp_path)
    assert [img.file_name for img in out.images] == [
        *(f"tiny/images/img_0{i}.png" for i in (1, 2, 3, 4)),
        "other/images/img_01.png",
        "other/images/img_02.png",
    ]
    assert [img.id for img in out.images] == list(range(1, 7))
    assert [a.id for a in out.annotations] == list(range(1, 9))
    assert all(out.image_path(img).exists() for img in out.images)
    assert out.class_names == ["circle", "square"]
    expected = {f"tiny/images/{k}": v for k, v in names_by_image(a).items()}
    expected |= {f"other/images/{k}": v for k, v in names_by_image(b).items()}
    assert names_by_image(out) == expected
    assert (encode_coco(a), encode_coco(b)) == before
    check_lineage(op, "merge")
    assert op.params == {"names": ["tiny", "squares"]}
    assert "duplicate" not in op.summary and "same path" not in op.summary

    again = load_coco(save_coco(out, tmp_path / "merged.json"))
    assert names_by_image(again) == expected


def test_merge_of_the_same_file_keeps_one_image_with_both_inputs_annotations(tiny: Dataset) -> None:
    extra = replace(tiny.annotations[0], id=99, bbox=(1.0, 1.0, 5.0, 5.0))
    second = replace(tiny, annotations=[*tiny.annotations, extra])
    out, op = merge([tiny, second])

    assert len(out.images) == 4 and out.image_root == tiny.image_root
    assert [img.file_name for img in out.images] == [img.file_name for img in tiny.images]
    assert len(out.annotations) == len(tiny.annotations) + 1  # the identical ones once, the new one added
    assert "4 images were in more than one input" in op.summary
    assert f"{len(tiny.annotations)} identical annotations dropped" in op.summary
    assert op.params == {"names": ["dataset 1", "dataset 2"]}
    report = validate_dataset(out, source="merged")
    assert report.ok, report.summary_lines()


def test_merge_joins_categories_by_name_in_order_of_appearance() -> None:
    a = make_dataset([["cat", "dog"]], classes=("cat", "dog"))
    b = make_dataset([["fish", "dog"], ["dog"]], classes=("fish", "dog"), root="/data/b")
    out, op = merge([a, b])

    assert [(c.id, c.name) for c in out.categories] == [(1, "cat"), (2, "dog"), (3, "fish")]
    assert op.summary == (
        "merged 2 datasets (dataset 1: 1 images, dataset 2: 2 images) into 3 images, 5 annotations, "
        "3 categories (1 in more than one input) under /data"
    )
    assert names_by_image(out) == {
        "a/img_0000.jpg": ["cat", "dog"],
        "b/img_0000.jpg": ["dog", "fish"],
        "b/img_0001.jpg": ["dog"],
    }
    assert out.image_root == "/data"


def test_merge_refuses_keypoint_categories_that_disagree() -> None:
    a, b = make_dataset([["cat"]]), make_dataset([["cat"]])
    a.categories[0].keypoints = ["nose", "tail"]
    b.categories[0].keypoints = ["nose", "ear"]
    with pytest.raises(
        DatasetError,
        match=r"category 'cat' has keypoints \[nose, tail\] in dataset 1 but "
        r"\[nose, ear\] in dataset 2",
    ):
        merge([a, b])
    b.categories[0].keypoints = ["nose", "tail"]
    out, _ = merge([a, b])
    assert out.categories[0].keypoints == ["nose", "tail"]


def test_merge_needs_every_image_root_or_none() -> None:
    a, b = make_dataset([["cat"]]), make_dataset([["cat"]])
    b.image_root = msgspec.UNSET
    with pytest.raises(DatasetError, match="dataset 2 has no image_root"):
        merge([a, b])
    a.image_root = msgspec.UNSET
    out, _ = merge([a, b])
    assert out.image_root is msgspec.UNSET and [img.file_name for img in out.images] == ["img_0000.jpg"] * 2


@pytest.mark.parametrize(
    ("count", "names", "message"),
    [(0, None, "at least one"), (2, ["x"], "one name per"), (2, ["x", "x"], "distinct")],
)
def test_merge_rejects_bad_arguments(count: int, names: list[str] | None, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        merge([make_dataset([["cat"]])] * count, names=names)


@given(st.lists(labels_strategy, min_size=1, max_size=3))
@settings(max_examples=40, deadline=None)
def test_merge_property(inputs: list[list[list[str]]]) -> None:
    datasets = [make_dataset(labels, root=f"/data/{k}") for k, labels in enumerate(inputs)]
    out, _ = merge(datasets)

    assert [img.id for img in out.images] == list(range(1, len(out.images) + 1))
    assert [a.id for a in out.annotations] == list(range(1, len(out.annotations) + 1))
    check_consistent(out)
    expected: dict[str, list[str]] = {}
    for k, ds in enumerate(datasets):
        prefix = f"{k}/" if len(datasets) > 1 else ""
        expected |= {prefix + f: v for f, v in names_by_image(ds).items()}
    assert names_by_image(out) == expected


def test_merge_joins_licenses_by_content_and_images_follow_theirs() -> None:
    cc_by = {"name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}
    a, b = make_dataset([["cat"], ["cat"]]), make_dataset([["dog"], ["dog"], ["dog"]], root="/data/b")
    a.licenses = [{"id": 1, "name": "own photos"}, {"id": 2, **cc_by}]
    b.licenses = [{"id": 7, **cc_by}, {"id": 8, "name": "bought"}, "a note without an id"]
    a.images = [replace(a.images[0], license=2), replace(a.images[1], license=1)]
    b.images = [replace(b.images[0], license=7), replace(b.images[1], license=8), replace(b.images[2], license=3)]
    out, op = merge([a, b])

    joined = [{"id": 1, "name": "own photos"}, {"id": 2, **cc_by}, {"id": 3, "name": "bought"}, "a note without an id"]
    assert out.licenses == joined
    assert [img.license for img in out.images] == [2, 1, 2, 3, None]  # b's license 3 was never listed
    assert op.summary.endswith("; 1 images named a license their input does not list (cleared)")
    a, b = make_dataset([["cat"]]), make_dataset([["cat"]], root="/data/b")
    b.images = [replace(b.images[0], license=5)]
    out, op = merge([a, b])
    assert out.licenses is msgspec.UNSET and "license" not in op.summary
    assert [img.license for img in out.images] == [None, 5]  # nothing to remap against: kept
