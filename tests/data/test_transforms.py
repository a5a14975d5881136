from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from detforge.config import DataConfig
from detforge.data.transforms import (
    DownscaleToFit,
    RandomHorizontalFlip,
    build_eval_transforms,
    build_train_transforms,
    keypoint_flip_map,
)


def _sample(height: int, width: int) -> tuple[tv_tensors.Image, dict]:
    image = tv_tensors.Image(torch.randint(0, 255, (3, height, width), dtype=torch.uint8))
    masks = torch.zeros((1, height, width), dtype=torch.uint8)
    masks[0, 2:6, 1:5] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes([[1.0, 2.0, 5.0, 6.0]], format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([1]),
        "masks": tv_tensors.Mask(masks),
        "keypoints": tv_tensors.KeyPoints([[[1.0, 2.0], [4.0, 5.0], [2.0, 3.0]]], canvas_size=(height, width)),
        "keypoints_visibility": torch.tensor([[2.0, 1.0, 0.0]]),
    }
    return image, target


def test_downscale_to_fit_limits_both_sides_and_scales_targets() -> None:
    image, target = _sample(100, 400)
    out_image, out = DownscaleToFit(50, 100)(image, target)
    # short side allows 0.5, long side only 0.25: the stricter limit wins
    assert out_image.shape[-2:] == (25, 100)
    assert out["boxes"].canvas_size == (25, 100)
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[0.25, 0.5, 1.25, 1.5]]))
    assert out["masks"].shape == (1, 25, 100)
    torch.testing.assert_close(out["keypoints"][0, 1].as_subclass(torch.Tensor), torch.tensor([1.0, 1.25]))


def test_downscale_to_fit_never_upsamples() -> None:
    image, target = _sample(20, 30)
    out_image, out = DownscaleToFit(512, 853)(image, target)
    assert out_image is image and out["boxes"] is target["boxes"]


def test_train_transforms_shrink_large_images_only() -> None:
    cfg = DataConfig(train="x", min_size=[32, 48], max_size=80, hflip=0.0)
    large, _ = build_train_transforms(cfg)(*_sample(60, 120))
    small, _ = build_train_transforms(cfg)(*_sample(16, 24))
    assert large.shape[-2:] == (40, 80)  # long side 120 -> 80 (short side 60 -> 40 <= max(min_size))
    assert small.shape[-2:] == (16, 24)
    assert large.dtype == torch.float32 and float(large.max()) <= 1.0


def test_flip_moves_boxes_masks_and_swaps_keypoints() -> None:
    image, target = _sample(8, 10)
    out_image, out = RandomHorizontalFlip(1.0, flip_map=[1, 0, 2])(image, target)
    torch.testing.assert_close(out_image, image.flip(-1))
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[5.0, 2.0, 9.0, 6.0]]))
    torch.testing.assert_close(out["masks"], target["masks"].flip(-1))
    # keypoints are pixel indices (x -> W - 1 - x), then the two sides trade places with their visibility
    torch.testing.assert_close(
        out["keypoints"].as_subclass(torch.Tensor), torch.tensor([[[5.0, 5.0], [8.0, 2.0], [7.0, 3.0]]])
    )
    torch.testing.assert_close(out["keypoints_visibility"], torch.tensor([[1.0, 2.0, 0.0]]))


def test_sanitize_drops_degenerate_boxes_with_their_labels() -> None:
    image, target = _sample(8, 10)
    target["boxes"] = tv_tensors.BoundingBoxes([[1.0, 2.0, 5.0, 6.0], [3.0, 3.0, 3.0, 7.0]], format="XYXY",
                                               canvas_size=(8, 10))
    target["labels"] = torch.tensor([1, 2])
    target["area"] = torch.tensor([16.0, 0.0])
    del target["masks"], target["keypoints"], target["keypoints_visibility"]
    _, out = build_train_transforms(DataConfig(train="x", hflip=0.0))(image, target)
    assert out["labels"].tolist() == [1]
    assert out["area"].tolist() == [16.0]


def test_eval_transforms_keep_the_size() -> None:
    image, _ = build_eval_transforms(DataConfig(train="x", min_size=[16], max_size=20))(*_sample(60, 120))
    assert image.shape[-2:] == (60, 120) and image.dtype == torch.float32


def test_keypoint_flip_map_pairs_sides() -> None:
    names = ["nose", "left_eye", "right_eye", "L_knee", "R_knee", "hand-left", "hand-right", "Left.Ear", "right.ear"]
    assert keypoint_flip_map(names) == [0, 2, 1, 4, 3, 6, 5, 8, 7]


def test_keypoint_flip_map_warns_about_unpaired_sides() -> None:
    with pytest.warns(UserWarning, match="left_wrist"):
        assert keypoint_flip_map(["nose", "left_wrist"]) == [0, 1]
