from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from detforge.config import DataConfig
from detforge.data.formats.coco import load_coco
from detforge.data.loader import (
    DetectionDataset,
    TrainingBatchSampler,
    build_eval_loader,
    build_train_loader,
    category_index,
    label_to_category_id,
)
from detforge.data.records import Category, Dataset, make_segmentation
from detforge.data.transforms import DownscaleToFit, build_train_transforms
from detforge.errors import DatasetError


@pytest.fixture
def tiny(tiny_dataset: Path) -> Dataset:
    return load_coco(tiny_dataset)


def _with_keypoints(ds: Dataset) -> Dataset:
    """The tiny set with three keypoints per object: left_eye, right_eye, nose (the last one invisible)."""
    anns = []
    for ann in ds.annotations:
        x, y, w, h = ann.bbox
        points = [x + 1, y + 1, 2, x + w - 2, y + 1, 2, 0, 0, 0]
        anns.append(msgspec.structs.replace(ann, keypoints=points, num_keypoints=2))
    cats = [msgspec.structs.replace(c, keypoints=["left_eye", "right_eye", "nose"]) for c in ds.categories]
    return msgspec.structs.replace(ds, annotations=anns, categories=cats)


def _polygon_area(flat: list[float]) -> float:
    x, y = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_targets_match_the_coco_records(tiny: Dataset) -> None:
    dataset = DetectionDataset(tiny, with_masks=True)
    labels = category_index(tiny)
    assert labels == {1: 1, 2: 2} and label_to_category_id(tiny) == [-1, 1, 2]
    by_image = tiny.annotations_by_image()
    for i, img in enumerate(tiny.images):
        image, target = dataset[i]
        anns = by_image[img.id]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        assert target["image_id"] == img.id
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a.bbox for a in anns)]
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor(xyxy).reshape(-1, 4))
        assert target["boxes"].format.name == "XYXY" and target["boxes"].canvas_size == (64, 64)
        assert target["labels"].tolist() == [labels[a.category_id] for a in anns]
        assert target["masks"].shape == (len(anns), 64, 64) and target["masks"].dtype == torch.uint8
        for mask, ann in zip(target["masks"], anns, strict=True):
            assert int(mask.sum()) == pytest.approx(_polygon_area(ann.polygons()[0]), rel=0.05)


def test_image_without_annotations_has_empty_targets(tiny: Dataset) -> None:
    _, target = DetectionDataset(tiny, with_masks=True, with_keypoints=True)[3]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 64, 64) and target["keypoints"].shape == (0, 0, 3)


def test_empty_images_and_crowds_are_counted_when_left_out(tiny: Dataset) -> None:
    anns = [msgspec.structs.replace(a, iscrowd=1) if a.image_id == 3 else a for a in tiny.annotations]
    ds = msgspec.structs.replace(tiny, annotations=anns)
    dataset = DetectionDataset(ds, include_empty=False)
    assert len(dataset) == 2
    assert dataset.skipped == {"crowd annotations": 1, "images without annotations": 2}
    assert "2 of 4 images" in dataset.summary()
    assert len(DetectionDataset(ds, include_empty=True)) == 4


def test_flip_is_consistent_across_boxes_masks_and_keypoints(tiny: Dataset) -> None:
    ds = _with_keypoints(tiny)
    flip_map = [1, 0, 2]
    kept = DetectionDataset(ds, with_masks=True, with_keypoints=True,
                            transforms=build_train_transforms(DataConfig(train="x", hflip=0.0)))
    flipped = DetectionDataset(ds, with_masks=True, with_keypoints=True,
                               transforms=build_train_transforms(DataConfig(train="x", hflip=1.0), flip_map=flip_map))
    (image, target), (image_f, target_f) = kept[0], flipped[0]
    torch.testing.assert_close(image_f, image.flip(-1))
    boxes = target["boxes"].as_subclass(torch.Tensor)
    expected = torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], dim=1)
    torch.testing.assert_close(target_f["boxes"].as_subclass(torch.Tensor), expected)
    torch.testing.assert_close(target_f["masks"], target["masks"].flip(-1))
    # the flipped left eye is the mirror image of the right eye; the invisible nose stays (0, 0, 0)
    points, points_f = target["keypoints"], target_f["keypoints"]
    torch.testing.assert_close(points_f[:, 0, 0], 63 - points[:, 1, 0])
    torch.testing.assert_close(points_f[:, 0, 1:], points[:, 1, 1:])
    assert points_f[:, 2].abs().sum() == 0 and points_f.shape == (2, 3, 3)


def _batches(ds: Dataset, cfg: DataConfig, n: int, **kwargs: object) -> list:
    loader = build_train_loader(ds, cfg, batch_size=2, seed=7, **kwargs)  # type: ignore[arg-type]
    return list(itertools.islice(loader, n))


def test_same_index_and_seed_give_the_same_sample_in_any_worker(tiny: Dataset) -> None:
    cfg = DataConfig(train="x", num_workers=0, hflip=0.5, color_jitter=0.4, min_size=[48], max_size=48)
    in_main = _batches(tiny, cfg, 6, with_masks=True)
    in_workers = _batches(tiny, cfg.model_copy(update={"num_workers": 2}), 6, with_masks=True)
    for (images, targets), (images_w, targets_w) in zip(in_main, in_workers, strict=True):
        for a, b in zip(images + targets, images_w + targets_w, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the transforms are random: another seed for the same image gives another sample
    dataset = DetectionDataset(tiny, transforms=build_train_transforms(cfg))
    state = torch.get_rng_state()
    assert not torch.equal(dataset[(0, 1)][0], dataset[(0, 2)][0])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    torch.testing.assert_close(dataset[(0, 1)][0], dataset[(0, 1)][0], rtol=0, atol=0)


def test_sampler_is_deterministic_and_shards_disjointly() -> None:
    def take(rank: int, n: int, seed: int = 3) -> list[list[tuple[int, int]]]:
        sampler = TrainingBatchSampler(10, batch_size=1, seed=seed, rank=rank, world_size=2)
        return list(itertools.islice(sampler, n))

    assert take(0, 12) == take(0, 12)
    assert take(0, 12) != take(0, 12, seed=4)
    first_epoch = [[i for (i, _), in take(rank, 5)] for rank in (0, 1)]
    assert set(first_epoch[0]).isdisjoint(first_epoch[1])
    assert sorted(first_epoch[0] + first_epoch[1]) == list(range(10))
    seeds = [s for batch in take(0, 10) + take(1, 10) for _, s in batch]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("group_ids", [None, [0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0]])
def test_skip_replays_the_same_stream(group_ids: list[int] | None) -> None:
    def sampler() -> TrainingBatchSampler:
        return TrainingBatchSampler(11, batch_size=3, seed=1, group_ids=group_ids)

    full = list(itertools.islice(sampler(), 20))
    assert list(itertools.islice(sampler().skip(13), 7)) == full[13:]
    resumed = TrainingBatchSampler(11, batch_size=3, seed=1, group_ids=group_ids, start_batch=5)
    assert list(itertools.islice(resumed, 15)) == full[5:]


def test_aspect_grouping_batches_one_orientation() -> None:
    group_ids = [i % 3 == 0 for i in range(30)]
    sampler = TrainingBatchSampler(30, batch_size=4, seed=0, group_ids=group_ids)
    batches = list(itertools.islice(sampler, 40))
    assert all(len({group_ids[i] for i, _ in batch}) == 1 for batch in batches)
    assert {group_ids[batch[0][0]] for batch in batches} == {True, False}


def test_portrait_images_form_their_own_group(tiny: Dataset) -> None:
    images = [msgspec.structs.replace(img, width=32) if img.id in (1, 3) else img for img in tiny.images]
    dataset = DetectionDataset(msgspec.structs.replace(tiny, images=images))
    assert dataset.group_ids.tolist() == [1, 0, 1, 0]


def test_eval_loader_shards_without_dropping(tiny: Dataset) -> None:
    cfg = DataConfig(train="x", num_workers=0)
    seen = []
    for rank in (0, 1):
        loader = build_eval_loader(tiny, cfg, batch_size=3, rank=rank, world_size=2)
        assert len(loader) == 1
        seen += [t["image_id"] for _, targets in loader for t in targets]
    assert sorted(seen) == [1, 2, 3, 4] and seen[:2] == [1, 3]


def test_unreadable_image_names_the_file(tiny: Dataset) -> None:
    root = Path(str(tiny.image_root))
    (root / "img_02.png").write_bytes(b"not a png")
    (root / "img_03.png").unlink()
    dataset = DetectionDataset(tiny)
    with pytest.raises(DatasetError, match="img_02.png"):
        dataset[1]
    with pytest.raises(DatasetError, match="img_03.png.*not found"):
        dataset[2]
    loader = build_eval_loader(tiny, DataConfig(train="x", num_workers=1), batch_size=1)
    with pytest.raises(DatasetError, match=r"^\S*img_02.png: cannot decode image") as raised:
        list(loader)
    assert "Traceback" not in str(raised.value)


def test_recorded_size_must_match_the_file(tiny: Dataset) -> None:
    images = [msgspec.structs.replace(img, height=60) for img in tiny.images]
    with pytest.raises(DatasetError, match="img_01.png.*64x64.*64x60"):
        DetectionDataset(msgspec.structs.replace(tiny, images=images))[0]


def test_unknown_category_fails_at_construction(tiny: Dataset) -> None:
    ds = msgspec.structs.replace(tiny, categories=[Category(id=1, name="circle")])
    with pytest.raises(DatasetError, match="category_id 2 is not in 'categories'"):
        DetectionDataset(ds)


def test_fit_within_matches_downscaling_after_loading(tiny: Dataset) -> None:
    # one annotation as RLE, which cannot be rasterised at the small size: it is decoded and shrunk instead
    first = tiny.annotations[0]
    full = DetectionDataset(tiny, with_masks=True)[0][1]["masks"][0].numpy()
    rle = mask_utils.encode(np.asfortranarray(full))
    rle["counts"] = rle["counts"].decode()
    anns = [msgspec.structs.replace(first, segmentation=make_segmentation(rle))] + tiny.annotations[1:]
    ds = msgspec.structs.replace(tiny, annotations=anns)
    fitted = DetectionDataset(ds, with_masks=True, with_keypoints=True, fit_within=(32, 32))
    shrunk = DetectionDataset(ds, with_masks=True, with_keypoints=True, transforms=DownscaleToFit(32, 32))
    for i in range(len(fitted)):
        (image, target), (image_s, target_s) = fitted[i], shrunk[i]
        torch.testing.assert_close(image, image_s, rtol=0, atol=0)
        assert image.shape == (3, 32, 32)
        for key in ("boxes", "labels", "area", "keypoints"):
            torch.testing.assert_close(target[key], target_s[key])
        masks, masks_s = target["masks"].bool(), target_s["masks"].bool()
        assert masks.shape == masks_s.shape
        for a, b in zip(masks, masks_s, strict=True):
            assert (a & b).sum() / (a | b).sum() > 0.8
