from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from rich.console import Console

from detforge.data.formats.coco import load_coco
from detforge.data.records import Annotation, Category, Dataset, Image
from detforge.data.stats import dataset_stats, plot_stats, stats_table, write_stats_json


def _ann(ann_id: int, image: int, cat: int, w: float, h: float, area: float, crowd: int = 0) -> Annotation:
    return Annotation(id=ann_id, image_id=image, category_id=cat, bbox=(0, 0, w, h), area=area, iscrowd=crowd)


@pytest.fixture
def handmade() -> Dataset:
    """Category ids not contiguous; areas on both sides of 32² and 96²; a crowd; an empty image."""
    return Dataset(
        images=[
            Image(id=10, file_name="a.jpg", width=640, height=480),
            Image(id=20, file_name="b.jpg", width=640, height=480),
            Image(id=30, file_name="c.jpg", width=100, height=200),
        ],
        categories=[Category(id=7, name="cat"), Category(id=3, name="dog")],
        annotations=[
            _ann(1, 10, 7, 10, 20, 1023.0),  # small
            _ann(2, 10, 7, 40, 40, 1024.0),  # medium: COCO's small bucket is area < 32²
            _ann(3, 10, 3, 100, 50, 9216.0),  # large: ≥ 96²
            _ann(4, 20, 7, 50, 100, 5000.0, crowd=1),  # medium, crowd
            _ann(5, 20, 99, 5, 5, 25.0),  # category not in the file
        ],
    )


def test_per_class_counts_and_size_buckets(handmade: Dataset) -> None:
    stats = dataset_stats(handmade)
    cat, dog = stats.classes
    assert (cat.name, cat.category_id, dog.name, dog.category_id) == ("cat", 7, "dog", 3)
    assert (cat.instances, cat.images, cat.small, cat.medium, cat.large, cat.crowd) == (3, 2, 1, 2, 0, 1)
    assert (dog.instances, dog.images, dog.small, dog.medium, dog.large, dog.crowd) == (1, 1, 0, 0, 1, 0)
    assert stats.num_images == 3 and stats.num_annotations == 5
    assert stats.images_without_annotations == 1
    assert stats.annotations_without_known_category == 1
    assert stats.annotations_without_known_image == 0
    assert stats.image_sizes == {(640, 480): 2, (100, 200): 1}
    assert stats.instances_per_image == [1, 0, 1, 1]  # one empty image, one with 2, one with 3
    assert stats.totals() == {"instances": 4, "small": 1, "medium": 2, "large": 1, "crowd": 1, "images": 2}
    assert stats.box_aspect.tolist() == [0.5, 1.0, 2.0, 0.5, 1.0]


def test_to_dict_is_json_and_summarises_boxes(handmade: Dataset, tmp_path: Path) -> None:
    stats = dataset_stats(handmade)
    path = write_stats_json(stats, tmp_path / "out" / "stats.json")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(stats.to_dict()))
    cat = {"category_id": 7, "name": "cat", "instances": 3, "images": 2}
    assert data["classes"][0] == {**cat, "small": 1, "medium": 2, "large": 0, "crowd": 1}
    assert data["image_sizes"][0] == {"width": 640, "height": 480, "images": 2}
    width = data["box_width"]
    assert width["count"] == 5 and width["percentiles"]["p0"] == 5 and width["percentiles"]["p100"] == 100
    assert sum(width["histogram"]["counts"]) == 5
    assert len(width["histogram"]["edges"]) == len(width["histogram"]["counts"]) + 1


def test_orphan_annotations_are_counted_not_dropped(handmade: Dataset) -> None:
    handmade.annotations.append(_ann(6, 999, 7, 10, 10, 100.0))
    stats = dataset_stats(handmade)
    assert stats.annotations_without_known_image == 1
    assert stats.classes[0].instances == 3  # the orphan is in no class row
    assert stats.num_annotations == 6


def test_empty_dataset() -> None:
    stats = dataset_stats(Dataset())
    assert stats.classes == [] and stats.num_images == 0 and stats.instances_per_image == [0]
    assert stats.to_dict()["box_width"] == {"count": 0}


def test_table_has_a_row_per_class_and_totals(handmade: Dataset) -> None:
    table = stats_table(dataset_stats(handmade))
    assert table.row_count == 2
    console = Console(width=140, record=True)
    console.print(table)
    text = " ".join(console.export_text().split())
    assert "cat" in text and "dog" in text and "total" in text
    assert "1 without annotations" in text and "1 annotation with an unknown image or category" in text


def test_plots_are_written_as_png(tiny_dataset: Path, tmp_path: Path) -> None:
    paths = plot_stats(dataset_stats(load_coco(tiny_dataset)), tmp_path / "plots")
    assert [p.name for p in paths] == [
        "class_instances.png",
        "box_sizes.png",
        "image_sizes.png",
        "instances_per_image.png",
    ]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
    for p in paths:
        with PILImage.open(p) as img:
            assert img.format == "PNG" and img.width >= 400


def test_plots_of_an_empty_dataset(tmp_path: Path) -> None:
    assert len(plot_stats(dataset_stats(Dataset()), tmp_path)) == 4


def test_large_dataset_is_fast() -> None:
    rng = np.random.default_rng(0)
    n_images, n_anns = 20_000, 150_000
    images = [Image(id=i + 1, file_name=f"{i}.jpg", width=640, height=480) for i in range(n_images)]
    image_ids = rng.integers(1, n_images + 1, n_anns).tolist()
    category_ids = rng.integers(1, 81, n_anns).tolist()
    anns = [
        Annotation(id=k, image_id=i, category_id=c, bbox=(1.0, 2.0, 30.0, 40.0), area=900.0)
        for k, (i, c) in enumerate(zip(image_ids, category_ids, strict=True))
    ]
    categories = [Category(id=i, name=f"c{i}") for i in range(1, 81)]
    ds = Dataset(images=images, annotations=anns, categories=categories)
    start = time.perf_counter()
    stats = dataset_stats(ds)
    elapsed = time.perf_counter() - start
    assert sum(c.instances for c in stats.classes) == n_anns
    assert sum(c.small for c in stats.classes) == n_anns
    assert sum(k * n for k, n in enumerate(stats.instances_per_image)) == n_anns
    # ~0.2 s here; 860k annotations take ~1 s. The bound only catches an accidental per-class loop.
    assert elapsed < 2.0
