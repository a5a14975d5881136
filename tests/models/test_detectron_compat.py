"""The Detectron2-compatible R-CNN: each of issue 7's differences against an independent computation, then the
variant end to end (build, train a step, predict through the Predictor, load converted Detectron2 weights)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import Bottleneck
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import LevelMapper

from detforge.config import Config, ModelConfig
from detforge.errors import CheckpointError, ConfigError
from detforge.models import build_model
from detforge.models.detectron import convert_detectron_state_dict, infer_arch
from detforge.models.detectron2_compat import (
    Detectron2AnchorGenerator,
    Detectron2FrozenBatchNorm2d,
    Detectron2RoIPooler,
    Detectron2Transform,
    build_detectron2_rcnn,
    detectron2_resized_size,
    paste_masks_detectron2,
    use_detectron2_frozen_batchnorm,
    use_stride_in_1x1,
)
from detforge.models.detectron2_compat.transform import detector_postprocess
from detforge.models.weights import fit_state_dict

ARCH = "maskrcnn_resnet50_fpn_detectron2"


@pytest.fixture(scope="module")
def faster() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detectron2_rcnn(50, masks=False, num_classes=3, min_size=160, max_size=200).eval()


# ---- 1, 2: the ResNet -------------------------------------------------------------------------------------------


def test_stride_in_1x1_subsamples_before_the_first_conv() -> None:
    torch.manual_seed(0)
    downsample = torch.nn.Sequential(torch.nn.Conv2d(256, 512, 1, stride=2, bias=False), torch.nn.BatchNorm2d(512))
    block = Bottleneck(256, 128, stride=2, downsample=downsample).eval()
    x = torch.randn(1, 256, 15, 13)
    before = block(x).shape
    assert use_stride_in_1x1(block) == 1
    assert block(x).shape == before == (1, 512, 8, 7)
    # Detectron2 (STRIDE_IN_1X1): the 1x1 conv sees every other pixel, the 3x3 conv keeps the size
    torch.testing.assert_close(block.conv1(x), F.conv2d(x[:, :, ::2, ::2], block.conv1.weight))
    assert block.conv2.stride == (1, 1)


def test_detectron2_frozen_batchnorm_matches_the_formula_and_replaces_torchvision_s() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8))
    bn = model[1]
    bn.weight.uniform_(0.5, 2)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(1e-4, 2)  # small variances: where eps placement matters most
    stats = {k: getattr(bn, k).clone() for k in ("weight", "bias", "running_mean", "running_var")}
    assert use_detectron2_frozen_batchnorm(model) == 1 and isinstance(model[1], Detectron2FrozenBatchNorm2d)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w, b, mean, var = (stats[k].double().view(1, -1, 1, 1) for k in ("weight", "bias", "running_mean", "running_var"))
    expected = (x - mean) / torch.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(model[1](x.float()), expected.float())


def test_the_variant_backbone_has_both(faster: torch.nn.Module) -> None:
    body = faster.backbone.body
    for layer in ("layer2", "layer3", "layer4"):
        block = getattr(body, layer)[0]
        assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))
    norms = [m for m in body.modules() if isinstance(m, FrozenBatchNorm2d | torch.nn.BatchNorm2d)]
    assert not norms and sum(isinstance(m, Detectron2FrozenBatchNorm2d) for m in body.modules()) == 53


# ---- 3: anchors ---------------------------------------------------------------------------------------------------

# A 200x200 image padded to 224: P2..P5 are 56, 28, 14, 7 wide and P6 (stride-2 max-pool of P5) is 4.
GRIDS = [(56, 56), (28, 28), (14, 14), (7, 7), (4, 4)]


def _closed_form_anchors() -> np.ndarray:
    """Centres (x * stride, y * stride), row-major, then ratios 0.5, 1, 2: w = size / sqrt(r), h = size * sqrt(r)."""
    levels = []
    for (h, w), stride, size in zip(GRIDS, (4, 8, 16, 32, 64), (32, 64, 128, 256, 512), strict=True):
        ys, xs = np.meshgrid(np.arange(h) * stride, np.arange(w) * stride, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)[:, None, :].astype(np.float64)
        ratios = np.array([0.5, 1.0, 2.0])
        half = np.stack([size / np.sqrt(ratios), size * np.sqrt(ratios)], axis=1) / 2
        levels.append(np.concatenate([centres - half, centres + half], axis=2).reshape(-1, 4))
    return np.concatenate(levels)


def test_anchors_are_the_closed_form_grid_with_fixed_strides() -> None:
    images = ImageList(torch.zeros(1, 3, 224, 224), [(200, 200)])
    features = [torch.zeros(1, 256, h, w) for h, w in GRIDS]
    (anchors,) = Detectron2AnchorGenerator()(images, features)
    np.testing.assert_allclose(anchors.numpy(), _closed_form_anchors(), rtol=1e-7, atol=1e-5)  # float32
    # torchvision: rounded cell anchors, and P6's stride is 224 // 4 = 56 instead of 64
    sizes = ((32,), (64,), (128,), (256,), (512,))
    (tv,) = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)(images, features)
    assert tv[0].tolist() == [-23.0, -11.0, 23.0, 11.0]
    assert anchors[0].tolist() == pytest.approx([-16 * math.sqrt(2), -8 * math.sqrt(2), 16 * math.sqrt(2),
                                                 8 * math.sqrt(2)])  # fmt: skip
    p6_second_centre = len(anchors) - 16 * 3 + 3  # P6 location (row 0, column 1), ratio 0.5
    assert (tv[p6_second_centre, 0] + tv[p6_second_centre, 2]).item() / 2 == 56.0
    assert (anchors[p6_second_centre, 0] + anchors[p6_second_centre, 2]).item() / 2 == pytest.approx(64.0)


# ---- 4, 10: RoIAlign aligned and the level assignment -------------------------------------------------------------


def _level_by_hand(box: list[float]) -> int:
    """Detectron2's formula in float32: floor(4 + log2(sqrt(area) / 224 + eps)), clamped to 2..5."""
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float32)
    size = np.sqrt((x1 - x0) * (y1 - y0))
    level = np.floor(np.float32(4) + np.log2(size / np.float32(224) + np.float32(1e-8)))
    return int(np.clip(level, 2, 5))


# 112 * (1 - 8e-7) high: sqrt(area) / 224 sits ~6e-7 below 0.5 in log2, inside torchvision's 1e-6
BOUNDARY_BOX = [0.0, 0.0, 112.0, 112.0 * (1 - 8e-7)]


def test_level_assignment_puts_the_epsilon_where_detectron2_does() -> None:
    boxes = torch.tensor([BOUNDARY_BOX, [10.0, 10.0, 122.0, 122.0]])  # just below and exactly at 112 px
    assert [_level_by_hand(b) for b in boxes.tolist()] == [2, 3]
    tv_levels = LevelMapper(k_min=2, k_max=5)([boxes]) + 2
    assert tv_levels.tolist() == [3, 3]  # torchvision lifts the first box to level 3


def test_pooler_is_roi_align_aligned_on_the_level_of_the_formula() -> None:
    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    features = {str(i): torch.randn(2, 4, 640 // s, 640 // s) for i, s in enumerate(strides)}
    boxes = [
        torch.tensor([BOUNDARY_BOX, [5.0, 5.0, 20.0, 30.0], [30.5, 40.25, 250.0, 200.0]]),
        torch.tensor(
            [
                [0.0, 0.0, 600.0, 500.0],
                [10.0, 10.0, 122.0, 122.0],
                [3.3, 4.4, 60.6, 300.1],
                [100.0, 120.0, 400.0, 390.0],
            ]
        ),  # fmt: skip
    ]
    pooled = Detectron2RoIPooler(7)(features, boxes, [(640, 640)] * 2)
    row = 0
    for image, image_boxes in enumerate(boxes):
        for box in image_boxes.tolist():
            level = _level_by_hand(box)
            rois = torch.tensor([[float(image), *box]])
            expected = roi_align(features[str(level - 2)], rois, 7, spatial_scale=1 / strides[level - 2],
                                 sampling_ratio=0, aligned=True)  # fmt: skip
            torch.testing.assert_close(pooled[row : row + 1], expected, rtol=0, atol=0)
            row += 1
    assert sorted({_level_by_hand(b) for bs in boxes for b in bs.tolist()}) == [2, 3, 4, 5]
    tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0)(features, boxes, [(640, 640)] * 2)
    assert not torch.allclose(tv, pooled)  # torchvision: aligned=False, and the boundary box on level 3


# ---- 6: mask pasting ----------------------------------------------------------------------------------------------


def _paste_by_hand(mask: np.ndarray, box: list[float], size_hw: tuple[int, int], region: bool) -> np.ndarray:
    """Bilinear sample of ``mask`` at each pixel centre (zero outside the mask); with ``region``, only pixels in
    [floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1), the rest 0 (Detectron2 on CPU)."""
    m = mask.shape[0]
    x0, y0, x1, y1 = box
    out = np.zeros(size_hw)
    for py in range(size_hw[0]):
        for px in range(size_hw[1]):
            inside = math.floor(x0) - 1 <= px < math.ceil(x1) + 1 and math.floor(y0) - 1 <= py < math.ceil(y1) + 1
            if region and not inside:
                continue
            u = (px + 0.5 - x0) / (x1 - x0) * m - 0.5
            v = (py + 0.5 - y0) / (y1 - y0) * m - 0.5
            i, j = math.floor(u), math.floor(v)
            for jj, wy in ((j, 1 - (v - j)), (j + 1, v - j)):
                for ii, wx in ((i, 1 - (u - i)), (i + 1, u - i)):
                    if 0 <= ii < m and 0 <= jj < m:
                        out[py, px] += wy * wx * mask[jj, ii]
    return out


def test_masks_are_sampled_at_pixel_centres() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((2, 28, 28)).astype(np.float32)
    # the second box is wider than 84 px: a pixel just outside its paste region still reads the mask's border
    boxes = [[5.3, 7.8, 20.6, 30.1], [20.05, 10.0, 118.0, 60.0]]
    size = (64, 120)
    pasted = paste_masks_detectron2(torch.from_numpy(masks), torch.tensor(boxes), size)
    whole = paste_masks_detectron2(torch.from_numpy(masks), torch.tensor(boxes), size, per_box=False)
    for k in range(2):
        np.testing.assert_allclose(pasted[k].numpy(), _paste_by_hand(masks[k], boxes[k], size, True), atol=1e-5)
        np.testing.assert_allclose(whole[k].numpy(), _paste_by_hand(masks[k], boxes[k], size, False), atol=1e-5)
    assert pasted[1, 20, 18] == 0 < whole[1, 20, 18]  # column 18 lies outside [floor(20.05) - 1, ...)
    tv = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.tensor(boxes), size)[:, 0]
    assert ((tv >= 0.5) != (pasted >= 0.5)).sum() > 0  # torchvision resizes to the integer box instead


# ---- 7: no 1e-2 box filter, empty boxes dropped after rescaling ---------------------------------------------------


def _three_detections(faster: torch.nn.Module) -> tuple[list[torch.Tensor], ...]:
    proposals = [torch.tensor([[10.0, 10.0, 10.005, 30.0], [50.0, 50.0, 80.0, 80.0], [250.0, 10.0, 260.0, 30.0]])]
    logits = torch.tensor([[0.0, 5.0, 0.0]]).repeat(3, 1)  # class 1 (p = 0.987); class 2 below the 0.05 threshold
    args = (logits, torch.zeros(3, 12), proposals, [(100, 200)])
    return faster.roi_heads.postprocess_detections(*args), RoIHeads.postprocess_detections(faster.roi_heads, *args)


def test_roi_heads_keep_tiny_and_empty_boxes_until_the_end(faster: torch.nn.Module) -> None:
    (boxes, scores, labels), (tv_boxes, _, _) = _three_detections(faster)
    order = boxes[0][:, 0].argsort()
    expected = [[10.0, 10.0, 10.005, 30.0], [50.0, 50.0, 80.0, 80.0], [200.0, 10.0, 200.0, 30.0]]  # 3rd: clipped
    torch.testing.assert_close(boxes[0][order], torch.tensor(expected), atol=1e-4, rtol=0)
    assert labels[0].tolist() == [1, 1, 1]
    torch.testing.assert_close(scores[0], torch.full((3,), math.exp(5) / (math.exp(5) + 2)))
    assert len(tv_boxes[0]) == 1  # torchvision drops both boxes narrower than 1e-2 px
    (none, _, _) = faster.roi_heads.postprocess_detections(torch.zeros(0, 3), torch.zeros(0, 12), [torch.zeros(0, 4)],
                                                           [(100, 200)])  # fmt: skip
    assert none[0].shape == (0, 4)  # no proposals at all: no detections, no error

    masks = torch.rand(3, 1, 28, 28)
    result = {"boxes": boxes[0][order], "scores": scores[0], "labels": labels[0], "masks": masks}
    out = detector_postprocess(result, (100, 200), (50, 100))  # the original image was half the size
    torch.testing.assert_close(out["boxes"], torch.tensor(expected[:2]) / 2, atol=1e-4, rtol=0)  # empty one dropped
    assert out["masks"].shape == (2, 1, 50, 100) and len(out["labels"]) == 2


# ---- 8: RPN -------------------------------------------------------------------------------------------------------


def test_rpn_runs_nms_on_logits_and_keeps_boxes_of_any_positive_size(faster: torch.nn.Module) -> None:
    rpn = faster.rpn
    assert rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}  # per level
    assert rpn._post_nms_top_n == {"training": 1000, "testing": 1000}  # per image
    proposals = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [11.0, 11.0, 51.0, 51.0], [12.0, 10.0, 52.0, 50.0],
                               [60.0, 60.0, 60.0005, 90.0], [300.0, 10.0, 320.0, 30.0]]])  # fmt: skip
    logits = torch.tensor([[20.0], [25.0], [30.0], [1.0], [2.0]])  # sigmoid of the first three: all 1.0 in float32
    assert torch.sigmoid(logits[:3]).eq(1.0).all()
    (boxes,), (scores,) = rpn.filter_proposals(proposals, logits, [(100, 200)], [5])
    # greedy NMS by logit: 30 wins the overlapping three; the 0.0005 px wide box stays; the one past x=200 is empty
    assert torch.equal(boxes, proposals[0, [2, 3]]) and scores.tolist() == [30.0, 1.0]
    torchvision_rpn = copy.copy(rpn)
    torchvision_rpn.min_size = 1e-3  # torchvision's RegionProposalNetwork default
    (tv_boxes,), (tv_scores,) = RegionProposalNetwork.filter_proposals(torchvision_rpn, proposals, logits,
                                                                       [(100, 200)], [5])  # fmt: skip
    assert len(tv_boxes) == 1 and tv_scores.tolist() == [1.0]  # thin box dropped; NMS saw three scores of 1.0


def test_rpn_takes_the_top_k_of_each_level_before_nms(faster: torch.nn.Module) -> None:
    rpn = faster.rpn
    rpn._pre_nms_top_n, rpn._post_nms_top_n = {"training": 2, "testing": 2}, {"training": 3, "testing": 3}
    try:
        proposals = torch.tensor([[[10.0 * i, 0.0, 10.0 * i + 5, 5.0] for i in range(6)]])  # disjoint boxes
        logits = torch.tensor([[3.0], [1.0], [2.0], [0.5], [4.0], [0.1]])  # level 0: 3, 1, 2; level 1: 0.5, 4, 0.1
        (boxes,), (scores,) = rpn.filter_proposals(proposals, logits, [(100, 200)], [3, 3])
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n = (
            {"training": 2000, "testing": 1000},
            {"training": 1000, "testing": 1000},
        )
    # top 2 per level: {3, 2} and {4, 0.5}; sorted by logit, the first 3 kept
    assert scores.tolist() == [4.0, 3.0, 2.0] and torch.equal(boxes, proposals[0, [4, 0, 2]])


# ---- 9: input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "short", "expected"),
    [
        ((300, 403), 200, (200, 269)),  # 403 * 2/3 = 268.67: rounds up (torchvision floors to 268)
        ((403, 300), 200, (269, 200)),
        ((480, 1000), 800, (640, 1333)),  # capped: 800 * 1333 / 1666.67 = 639.84 -> 640
        ((100, 1000), 800, (133, 1333)),  # capped: 133.3 -> 133
    ],
)
def test_resize_rounds(size: tuple[int, int], short: int, expected: tuple[int, int]) -> None:
    assert detectron2_resized_size(*size, short, 1333) == expected


def test_torchvision_floors_where_detectron2_rounds() -> None:
    image = torch.rand(3, 480, 1000)
    tv = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3).eval()
    ours = Detectron2Transform(800, 1333).eval()
    assert tv([image])[0].image_sizes == [(639, 1333)] and ours([image])[0].image_sizes == [(640, 1333)]


def test_input_is_resized_as_uint8_by_pil_then_normalised() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    expected_rgb = np.asarray(Image.fromarray(pixels).resize((34, 24), Image.Resampling.BILINEAR), np.float32)
    bgr = Detectron2Transform(24, 1000, pixel_mean=(103.53, 116.28, 123.675), pixel_std=(1.0, 1.0, 1.0),
                              channel_order=(2, 1, 0)).eval()  # fmt: skip
    batch = bgr([image])[0]
    assert batch.image_sizes == [(24, 34)] and batch.tensors.shape == (1, 3, 32, 64)  # padded to 32
    expected = expected_rgb[:, :, ::-1] - np.array([103.53, 116.28, 123.675], np.float32)
    np.testing.assert_allclose(batch.tensors[0, :, :24, :34].permute(1, 2, 0).numpy(), expected, atol=1e-4)
    assert batch.tensors[0, :, 24:, :].abs().sum() == 0 and batch.tensors[0, :, :, 34:].abs().sum() == 0
    folded = Detectron2Transform(24, 1000).eval()([image])[0].tensors[0, :, :24, :34].permute(1, 2, 0).numpy()
    imagenet = (expected_rgb / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(folded, imagenet, atol=1e-4)


# ---- the variant end to end ---------------------------------------------------------------------------------------


def _target() -> dict[str, torch.Tensor]:
    masks = torch.zeros(1, 120, 150, dtype=torch.uint8)
    masks[0, 20:90, 30:100] = 1
    return {"boxes": torch.tensor([[30.0, 20.0, 100.0, 90.0]]), "labels": torch.tensor([1]), "masks": masks}


def test_the_variant_builds_by_name_trains_and_refuses_torchvision_weights() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=ARCH, detections_per_image=5)
    model = build_model(cfg, num_classes=2, min_size=(160,), max_size=200)
    assert isinstance(model.transform, Detectron2Transform) and model.transform.min_size == (160,)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    model.rpn._pre_nms_top_n = {"training": 200, "testing": 100}  # only to keep the test fast
    model.rpn._post_nms_top_n = {"training": 100, "testing": 50}
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
    model.train()
    losses = model([torch.rand(3, 120, 150)], [_target()])
    assert set(losses) >= {"loss_classifier", "loss_mask", "loss_objectness"}
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.backbone.body.layer4[0].conv1.weight.grad is not None
    assert model.backbone.body.layer1[0].conv1.weight.grad is None  # frozen, as Detectron2's FREEZE_AT 2
    anchors = build_model(ModelConfig(arch=ARCH, aspect_ratios=[1.0]), num_classes=2, min_size=(160,), max_size=200)
    generator = anchors.rpn.anchor_generator  # configured anchors stay Detectron2's (exact, fixed strides)
    assert isinstance(generator, Detectron2AnchorGenerator) and generator.strides == (4, 8, 16, 32, 64)
    assert generator.num_anchors_per_location() == [1] * 5 and anchors.rpn.head.cls_logits.out_channels == 1
    with pytest.raises(ConfigError, match="has no torchvision weights"):
        build_model(ModelConfig(arch=ARCH, weights="COCO_V1"), num_classes=2, min_size=(160,), max_size=200)


def test_predictor_runs_the_variant_from_a_checkpoint(tmp_path: Path) -> None:
    from detforge.inference.predictor import Predictor

    torch.manual_seed(0)
    config = Config.model_validate({"data": {"train": "", "min_size": [160], "max_size": 200},
                                    "model": {"arch": ARCH, "detections_per_image": 5}})  # fmt: skip
    model = build_model(config.model, num_classes=2, min_size=(160,), max_size=200)
    metadata = {"arch": ARCH, "class_names": ["a", "b"], "keypoint_names": [], "config": config.model_dump(mode="json")}
    torch.save({"model": model.state_dict(), "metadata": metadata}, tmp_path / "d2.pt")

    predictor = Predictor.load(tmp_path / "d2.pt", score_threshold=0.0)
    pixels = np.random.default_rng(1).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    (found,) = predictor.predict([pixels])

    assert isinstance(predictor.model.transform, Detectron2Transform)
    with torch.no_grad():
        (raw,) = model.eval()([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])
    assert 0 < len(found) <= 5 and found.masks is not None and found.masks.shape == (len(found), 120, 150)
    np.testing.assert_allclose(found.boxes, raw["boxes"].numpy(), atol=1e-4)
    assert np.array_equal(found.masks, (raw["masks"][:, 0] >= 0.5).numpy())
    assert (found.boxes[:, [0, 2]] <= 150).all() and (found.boxes[:, [1, 3]] <= 120).all()

    # An explicit arch wins over the checkpoint's: the same weights in torchvision's own architecture.
    plain = Predictor.load(tmp_path / "d2.pt", arch="maskrcnn_resnet50_fpn", score_threshold=0.0)
    assert not isinstance(plain.model.transform, Detectron2Transform)
    assert torch.equal(plain.model.backbone.body.conv1.weight, model.backbone.body.conv1.weight)
    # No exported graph can hold the variant's PIL resize: export says so instead of exporting something else.
    from detforge.inference.export import export_model

    with pytest.raises(ConfigError, match="d2.pt: the Detectron2-compatible variant resizes images with PIL"):
        export_model(tmp_path / "d2.pt", tmp_path / "d2.onnx")
    assert not (tmp_path / "d2.onnx").exists()


def test_converted_detectron2_weights_fill_the_variant_and_record_its_input() -> None:
    from test_detectron import _detectron2_state  # the random Detectron2-named arrays of test_detectron.py
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    arrays, _ = _detectron2_state(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81), seed=5)
    model = build_detectron2_rcnn(50, masks=True, num_classes=81)
    for fold, mean, order in [
        (False, [103.53, 116.28, 123.675], [2, 1, 0]),
        (True, [123.675, 116.28, 103.53], [0, 1, 2]),
    ]:
        state, _ = convert_detectron_state_dict(arrays, source="d2", fold_input=fold)
        report = fit_state_dict(model, state, source="d2")
        assert not (report.missing or report.unexpected or report.reinitialised)  # nothing left over either side
        assert model.transform.pixel_mean.tolist() == pytest.approx(mean)
        assert model.transform.channel_order.tolist() == order
    assert infer_arch(state) == ARCH and infer_arch(state, detectron2_compatible=False) == "maskrcnn_resnet50_fpn"
    # torchvision's own architecture normalises as torchvision does: the folded conversion fits it (the three input
    # buffers are reported as unexpected), the unfolded one would silently get the wrong input and is refused.
    plain = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    assert fit_state_dict(plain, state, source="d2").unexpected == [
        "transform.pixel_mean", "transform.pixel_std", "transform.channel_order"
    ]  # fmt: skip
    unfolded, _ = convert_detectron_state_dict(arrays, source="d2", fold_input=False)
    with pytest.raises(CheckpointError, match=r"d2: its conv1 takes Detectron2's input \(channels \[2, 1, 0\]"):
        fit_state_dict(plain, unfolded, source="d2")
