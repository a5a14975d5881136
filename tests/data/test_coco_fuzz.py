"""Property-based: malformed COCO files raise DatasetError naming the file, never anything else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detforge.data.formats.coco import import_coco, read_coco
from detforge.errors import DatasetError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "id",
        "image_id",
        "category_id",
        "bbox",
        "area",
        "iscrowd",
        "segmentation",
        "file_name",
        "width",
        "height",
        "name",
        "keypoints",
        "skeleton",
        "attributes",
        "counts",
        "size",
    ]
)
records = st.dictionaries(field_names, json_values, max_size=8)
coco_like = st.fixed_dictionaries(
    {
        "images": st.lists(records, max_size=3),
        "annotations": st.lists(records, max_size=3),
        "categories": st.lists(records, max_size=3),
    },
    optional={"info": json_values, "licenses": json_values, "image_root": json_values},
)


def _check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weird.json"
        path.write_bytes(data)
        for load in (lambda: read_coco(path), lambda: import_coco(path, check_images=True)):
            try:
                load()
            except DatasetError as exc:
                assert "weird.json" in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coco_like)
def test_structurally_wrong_coco_gives_only_dataset_errors(data: dict[str, object]) -> None:
    _check(json.dumps(data).encode())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_give_only_dataset_errors(data: bytes) -> None:
    _check(data)
