"""Model building: every architecture trains and predicts, heads fit the dataset, weights load as reported."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models._api import WeightsEnum
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

from detforge.config import ModelConfig
from detforge.errors import CheckpointError, ConfigError
from detforge.models import MODELS, build_model, torchvision_weight_url
from detforge.models.build import get_spec, is_torchvision_weight_name

SIZE = {"min_size": (128,), "max_size": 160}
FAST = {"fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
        "maskrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large", "fasterrcnn_resnet18_fpn",
        "maskrcnn_resnet18_fpn"}  # fmt: skip


def _build(arch: str, num_classes: int = 2, **cfg: object) -> nn.Module:
    return build_model(ModelConfig(arch=arch, **cfg), num_classes=num_classes, num_keypoints=3, **SIZE)


def _target() -> dict[str, torch.Tensor]:
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 10:60, 10:50] = 1
    return {
        "boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]),
        "labels": torch.tensor([2]),
        "masks": masks,
        "keypoints": torch.tensor([[[20.0, 20.0, 2.0], [30.0, 30.0, 2.0], [40.0, 40.0, 1.0]]]),
    }


def _shrink_for_test(model: nn.Module) -> None:
    """Fewer proposals and sampled RoIs: random weights make every proposal look alike, and CPU time is short."""
    if hasattr(model, "rpn"):
        model.rpn._pre_nms_top_n = {"training": 200, "testing": 100}
        model.rpn._post_nms_top_n = {"training": 100, "testing": 50}
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 32


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=[] if a in FAST else [pytest.mark.slow]) for a in MODELS]
)  # fmt: skip
def test_every_model_trains_and_predicts(arch: str) -> None:
    torch.manual_seed(0)
    model = _build(arch, detections_per_image=5)
    _shrink_for_test(model)
    image = torch.rand(3, 96, 128)
    # SSDlite's extra blocks end at 1x1, where BatchNorm needs more than one image per batch.
    batch = 2 if MODELS[arch].family == "ssd" else 1
    model.train()
    losses = model([image] * batch, [_target()] * batch)
    assert losses and all(math.isfinite(v.item()) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        (out,) = model([image])
    n = len(out["boxes"])
    assert out["boxes"].shape == (n, 4) and out["labels"].shape == out["scores"].shape == (n,) and n <= 5
    assert all(1 <= label <= 2 for label in out["labels"].tolist())
    if MODELS[arch].task == "segmentation":
        assert out["masks"].shape == (n, 1, 96, 128)
    if MODELS[arch].task == "keypoints":
        assert out["keypoints"].shape == (n, 3, 3)
    assert model.weights_report is None


def _num_outputs(model: nn.Module) -> int:
    if hasattr(model, "roi_heads"):
        return model.roi_heads.box_predictor.cls_score.out_features
    head = model.head.classification_head
    return head.num_columns if hasattr(head, "num_columns") else head.num_classes


@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_outputs_are_categories_plus_background(arch: str) -> None:
    assert _num_outputs(_build(arch, num_classes=4)) == 5


def test_config_reaches_the_model() -> None:
    cfg = {"score_threshold": 0.3, "nms_threshold": 0.4, "detections_per_image": 7}
    rcnn = _build("fasterrcnn_mobilenet_v3_large_320_fpn", **cfg)
    heads = rcnn.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.3, 0.4, 7)
    assert rcnn.transform.min_size == (128,) and rcnn.transform.max_size == 160
    ssd = _build("ssdlite320_mobilenet_v3_large", **cfg)
    assert (ssd.score_thresh, ssd.nms_thresh, ssd.detections_per_img) == (0.3, 0.4, 7)
    assert ssd.transform.fixed_size == (320, 320)  # SSDlite ignores min_size/max_size


def test_head_sizes_build_narrower_heads_that_train_and_predict() -> None:
    torch.manual_seed(0)
    sizes = {"box_head_fc_dim": 128, "mask_head_conv_dim": 64, "mask_head_num_conv": 2}
    model = _build("maskrcnn_mobilenet_v3_large_fpn", detections_per_image=5, **sizes)
    heads = model.roi_heads
    assert (heads.box_head.fc6.out_features, heads.box_head.fc7.out_features) == (128, 128)
    assert heads.box_predictor.cls_score.in_features == 128 and heads.box_predictor.cls_score.out_features == 3
    convs = [m for m in heads.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(256, 64), (64, 64)]
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 3
    _shrink_for_test(model)
    model.train()
    losses = model([torch.rand(3, 96, 128)], [_target()])
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert heads.mask_head[0][0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 128)])
    assert out["masks"].shape[1:] == (1, 96, 128)
    v2 = _build("maskrcnn_resnet50_fpn_v2", mask_head_conv_dim=32)  # keeps the v2 head's BatchNorm
    assert sum(isinstance(m, nn.BatchNorm2d) for m in v2.roi_heads.mask_head.modules()) == 4
    with pytest.raises(ConfigError, match="box_head_fc_dim: 'fasterrcnn_resnet50_fpn_v2' has FastRCNNConvFCHead"):
        _build("fasterrcnn_resnet50_fpn_v2", box_head_fc_dim=256)
    with pytest.raises(ConfigError, match="'fasterrcnn_mobilenet_v3_large_fpn' has no mask head"):
        _build("fasterrcnn_mobilenet_v3_large_fpn", mask_head_conv_dim=64)
    with pytest.raises(ConfigError, match="model.box_head_fc_dim: only R-CNN architectures.*'retinanet"):
        _build("retinanet_resnet50_fpn", box_head_fc_dim=64)


def test_fpn_and_mask_head_norms_add_batchnorm_that_trains_and_saves() -> None:
    torch.manual_seed(0)
    plain = _build("maskrcnn_resnet18_fpn", mask_head_num_conv=2)
    model = _build("maskrcnn_resnet18_fpn", mask_head_num_conv=2, fpn_norm="bn", mask_head_norm="bn")
    plain_parts = [*plain.backbone.fpn.modules(), *plain.roi_heads.mask_head.modules()]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain_parts)
    fpn_norms = [m for m in model.backbone.fpn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(fpn_norms) == 6  # an inner (1x1) and a layer (3x3) conv for each of C3-C5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.roi_heads.mask_head.modules()) == 2
    assert len(model.state_dict()) > len(plain.state_dict())
    _shrink_for_test(model)
    model.train()
    sum(model([torch.rand(3, 96, 128)] * 2, [_target()] * 2).values()).backward()
    assert fpn_norms[0].weight.grad is not None and fpn_norms[0].weight.grad.abs().sum() > 0
    v2 = _build("maskrcnn_resnet50_fpn_v2", mask_head_norm="bn").roi_heads.mask_head  # has BatchNorm: left alone
    assert sum(isinstance(m, nn.BatchNorm2d) for m in v2.modules()) == 4
    with pytest.raises(ConfigError, match="model.fpn_norm: only the ResNet-18 FPN models.*'maskrcnn_resnet50_fpn'"):
        _build("maskrcnn_resnet50_fpn", fpn_norm="bn")
    with pytest.raises(ConfigError, match="model.mask_head_norm: 'fasterrcnn_resnet18_fpn' has no mask head"):
        _build("fasterrcnn_resnet18_fpn", mask_head_norm="bn")


def test_conv_box_head_has_batchnorm_convs_and_one_fully_connected_layer() -> None:
    torch.manual_seed(0)
    model = _build("maskrcnn_resnet18_fpn", box_head_num_conv=2, box_head_conv_dim=32, box_head_fc_dim=64,
                   detections_per_image=5)  # fmt: skip
    heads = model.roi_heads
    convs = [m for m in heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(256, 32, (3, 3)), (32, 32, (3, 3))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in heads.box_head.modules()) == 2
    (fc,) = [m for m in heads.box_head.modules() if isinstance(m, nn.Linear)]
    assert (fc.in_features, fc.out_features) == (32 * 7 * 7, 64)
    assert (heads.box_predictor.cls_score.in_features, heads.box_predictor.cls_score.out_features) == (64, 3)
    _shrink_for_test(model)
    model.train()
    losses = model([torch.rand(3, 96, 128)] * 2, [_target()] * 2)
    sum(losses.values()).backward()
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 128)])
    assert out["boxes"].shape[1:] == (4,) and len(out["boxes"]) <= 5
    default_width = _build("fasterrcnn_resnet18_fpn", box_head_num_conv=1).roi_heads
    assert [m.out_channels for m in default_width.box_head.modules() if isinstance(m, nn.Conv2d)] == [256]
    assert default_width.box_predictor.cls_score.in_features == 1024
    with pytest.raises(ConfigError, match="box_head_conv_dim=64 sizes the box head's convs, but box_head_num_conv"):
        _build("fasterrcnn_resnet18_fpn", box_head_conv_dim=64)
    with pytest.raises(ConfigError, match="but box_head_num_conv is 0"):
        _build("fasterrcnn_resnet18_fpn", box_head_num_conv=0, box_head_conv_dim=64)
    assert isinstance(_build("fasterrcnn_resnet18_fpn", box_head_num_conv=0).roi_heads.box_head, TwoMLPHead)
    with pytest.raises(ConfigError, match="model.box_head_num_conv: only R-CNN architectures.*'ssdlite"):
        _build("ssdlite320_mobilenet_v3_large", box_head_num_conv=2)


def test_weights_of_another_box_head_kind_load_without_its_predictor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "fc_head.pt"
    torch.save(_build("fasterrcnn_resnet18_fpn").state_dict(), path)  # two fully connected layers of 1024
    model = _build("fasterrcnn_resnet18_fpn", weights=str(path), box_head_num_conv=2)  # convs, then one fc of 1024
    report = model.weights_report
    predictor = {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                 "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"}  # fmt: skip
    assert predictor <= set(report.reinitialised) and not predictor & set(report.loaded)
    assert {"roi_heads.box_head.fc6.weight", "roi_heads.box_head.fc7.weight"} <= set(report.unexpected)
    assert any(k.startswith("backbone.body.") for k in report.loaded)
    saved = torch.load(path, weights_only=True)
    fresh = model.roi_heads.box_predictor.cls_score.weight
    assert not torch.equal(fresh, saved["roi_heads.box_predictor.cls_score.weight"])
    same_kind = _build("fasterrcnn_resnet18_fpn", weights=str(path)).weights_report
    assert predictor <= set(same_kind.loaded)  # the same kind of head keeps its predictor


def test_resnet18_fpn_pools_from_strides_8_to_32_and_takes_imagenet_backbone_weights(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    model = _build("maskrcnn_resnet18_fpn")
    features = model.backbone(torch.rand(1, 3, 128, 160))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "0": (16, 20), "1": (8, 10), "2": (4, 5), "pool": (2, 3)
    }  # fmt: skip
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3, 3, 3, 3]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())  # trains from random weights
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    classifier = resnet18()
    path = tmp_path / "imagenet.pt"
    torch.save(classifier.state_dict(), path)
    trained = _build("maskrcnn_resnet18_fpn", backbone_weights=str(path))
    assert trained.weights_report.loaded and all(k.startswith("backbone.body.") for k in trained.weights_report.loaded)
    torch.testing.assert_close(trained.backbone.body.conv1.weight, classifier.conv1.weight)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trained.backbone.body.modules())  # frozen, as torchvision
    url = torchvision_weight_url("maskrcnn_resnet18_fpn", "IMAGENET1K_V1")
    assert url.startswith("https://download.pytorch.org/models/resnet18-") and url.endswith(".pth")
    with pytest.raises(ConfigError, match="has no torchvision weights"):
        _build("maskrcnn_resnet18_fpn", weights="COCO_V1")


@pytest.mark.parametrize("arch", ["maskrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn_detectron2"])
def test_rcnn_sampling_reaches_the_model_and_other_families_refuse_it(arch: str) -> None:
    sampling = {"box_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300}
    rcnn = _build(arch, **sampling)
    assert rcnn.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert (rcnn.rpn._pre_nms_top_n["training"], rcnn.rpn._post_nms_top_n["training"]) == (600, 300)
    default = _build(arch)
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512  # torchvision's and Detectron2's
    with pytest.raises(ConfigError, match="model.box_batch_size_per_image: only R-CNN architectures.*'fcos"):
        _build("fcos_resnet50_fpn", box_batch_size_per_image=64)


def test_unknown_arch_suggests_the_closest() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown architecture 'fasterrcnn_mobilenet_v3_fpn'.*Did you mean "
        r"'fasterrcnn_mobilenet_v3_large_fpn'.*Valid names: fasterrcnn_resnet50_fpn",
    ):
        get_spec("fasterrcnn_mobilenet_v3_fpn")


def test_keypoint_rcnn_needs_keypoints() -> None:
    cfg = ModelConfig(arch="keypointrcnn_resnet50_fpn")
    with pytest.raises(ConfigError, match="needs keypoints"):
        build_model(cfg, num_classes=1, min_size=(128,), max_size=160)


def test_anchors_are_configurable_and_checked() -> None:
    model = _build("fasterrcnn_mobilenet_v3_large_320_fpn", anchor_sizes=[[16, 32], [64, 128], [256, 512]],
                   aspect_ratios=[0.5, 1.0])  # fmt: skip
    assert model.rpn.anchor_generator.num_anchors_per_location() == [4, 4, 4]
    assert model.rpn.head.cls_logits.out_channels == 4 and model.rpn.head.bbox_pred.out_channels == 16
    with pytest.raises(ConfigError, match=r"has 3 feature levels"):
        _build("fasterrcnn_mobilenet_v3_large_320_fpn", anchor_sizes=[[32], [64]])
    with pytest.raises(ConfigError, match="SSDlite uses fixed default boxes"):
        _build("ssdlite320_mobilenet_v3_large", aspect_ratios=[1.0])


@pytest.mark.slow
def test_retinanet_anchors_resize_both_heads() -> None:
    model = _build("retinanet_resnet50_fpn", aspect_ratios=[1.0])
    assert model.head.classification_head.cls_logits.out_channels == 3 * 3
    assert model.head.regression_head.bbox_reg.out_channels == 3 * 4
    model.train()
    losses = model([torch.rand(3, 96, 128)], [_target()])
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_weight_names() -> None:
    assert is_torchvision_weight_name("COCO_V1") and is_torchvision_weight_name("DEFAULT")
    assert not is_torchvision_weight_name("runs/a/model_final.pt") and not is_torchvision_weight_name("https://x")
    url = torchvision_weight_url("fasterrcnn_resnet50_fpn", "COCO_V1")
    assert url.startswith("https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-") and url.endswith(".pth")
    with pytest.raises(ConfigError, match=r"no torchvision weights 'COCO_V2' .*COCO_V1, DEFAULT"):
        _build("fasterrcnn_mobilenet_v3_large_320_fpn", weights="COCO_V2")
    with pytest.raises(ConfigError, match="has no torchvision weights"):
        _build("maskrcnn_mobilenet_v3_large_fpn", weights="COCO_V1")
    with pytest.raises(ConfigError, match="remove model.backbone_weights"):
        _build("fasterrcnn_mobilenet_v3_large_320_fpn", weights="COCO_V1", backbone_weights="IMAGENET1K_V1")


# ---- trained weights for other classes -----------------------------------------------------------------------


def _coco_like(arch: str) -> dict[str, torch.Tensor]:
    """The state dict of ``arch`` with COCO's 91 outputs (as torchvision's COCO weights have), random values."""
    torch.manual_seed(1)
    return MODELS[arch].builder(weights_backbone=None, num_classes=91).state_dict()


def _assert_only_heads_fresh(model: nn.Module, source: dict[str, torch.Tensor], fresh: set[str]) -> None:
    report = model.weights_report
    assert set(report.reinitialised) == fresh
    state = model.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(state[key], source[key], rtol=0, atol=0)
    for key in fresh:
        assert state[key].shape != source[key].shape


def test_torchvision_weights_for_other_classes_swap_the_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    source = _coco_like(arch)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: source)  # no download in tests
    model = _build(arch, weights="COCO_V1", trainable_backbone_layers=2)
    fresh = {f"roi_heads.box_predictor.{p}.{t}" for p in ("cls_score", "bbox_pred") for t in ("weight", "bias")}
    _assert_only_heads_fresh(model, source, fresh)
    assert model.weights_report.source.endswith("FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1")
    assert _num_outputs(model) == 3
    assert "re-initialised for this dataset: roi_heads.box_predictor.cls_score" in model.weights_report.summary()
    model.train()
    assert all(math.isfinite(v.item()) for v in model([torch.rand(3, 96, 128)], [_target()]).values())


def test_torchvision_download_failure_says_where_to_get_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: WeightsEnum, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CheckpointError, match=r"cannot download torchvision weights .*https://download\.pytorch.*"
                                              r"checkpoints/, or give its path in model.weights"):  # fmt: skip
        _build("fasterrcnn_mobilenet_v3_large_320_fpn", weights="DEFAULT")


BOX_PREDICTOR = ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"]


@pytest.mark.parametrize(
    ("arch", "fresh_modules"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", BOX_PREDICTOR),
        ("maskrcnn_mobilenet_v3_large_fpn", [*BOX_PREDICTOR, "roi_heads.mask_predictor.mask_fcn_logits"]),
        ("ssdlite320_mobilenet_v3_large", [f"head.classification_head.module_list.{i}.1" for i in range(6)]),
        pytest.param("retinanet_resnet50_fpn", ["head.classification_head.cls_logits"], marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_weight_files_for_other_classes_reinitialise_only_class_layers(
    arch: str, fresh_modules: list[str], tmp_path: Path
) -> None:
    source = _coco_like(arch)
    path = tmp_path / "coco.pt"
    torch.save({"model": source, "iteration": 10}, path)  # a detforge checkpoint
    model = _build(arch, weights=str(path))
    _assert_only_heads_fresh(model, source, {f"{m}.{t}" for m in fresh_modules for t in ("weight", "bias")})
    assert not model.weights_report.missing and not model.weights_report.unexpected
    assert _num_outputs(model) == 3
    model.train()
    batch = 2 if MODELS[arch].family == "ssd" else 1
    assert all(math.isfinite(v.item()) for v in model([torch.rand(3, 96, 128)] * batch, [_target()] * batch).values())


def test_weight_files_set_the_backbone_up_like_torchvision(tmp_path: Path) -> None:
    arch = "fasterrcnn_mobilenet_v3_large_fpn"
    path = tmp_path / "coco.pt"
    torch.save(_coco_like(arch), path)
    model = _build(arch, weights=str(path), trainable_backbone_layers=2)
    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    trainable = [name for name, p in body.named_parameters() if p.requires_grad]
    assert trainable and all(int(name.split(".")[0]) >= 13 for name in trainable)  # the last 2 stages: 13.., 16
    assert not model.weights_report.missing


def test_backbone_weights_from_a_file(tmp_path: Path) -> None:
    from torchvision.models import mobilenet_v3_large

    classifier = mobilenet_v3_large()
    path = tmp_path / "imagenet.pt"
    torch.save(classifier.state_dict(), path)
    model = _build("maskrcnn_mobilenet_v3_large_fpn", backbone_weights=str(path))
    report = model.weights_report
    assert report.loaded and all(k.startswith("backbone.body.") for k in report.loaded)
    assert all(k.startswith("backbone.body.classifier.") for k in report.unexpected)
    torch.testing.assert_close(model.backbone.body["0"][0].weight, classifier.features[0][0].weight)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ssd.pt"
    torch.save(_coco_like("ssdlite320_mobilenet_v3_large"), path)
    with pytest.raises(CheckpointError, match=r"ssd\.pt: .*another architecture"):
        _build("fasterrcnn_mobilenet_v3_large_320_fpn", weights=str(path))
