"""The model zoo: one dict of torchvision builders, class-count handling, anchors and weight loading.

Labels: ``num_classes`` is the number of dataset categories, without background. Every model is built with
``num_classes + 1`` outputs; label 0 is background (R-CNN, SSDlite) or an unused class (RetinaNet, FCOS, whose
sigmoid classifiers have no background), and labels ``1..num_classes`` are the dataset's categories in order.
Targets and predictions use torchvision's keys: ``boxes`` (float, ``[N, 4]``, absolute xyxy pixels), ``labels``
(int64, ``[N]``), ``masks`` (uint8 ``[N, H, W]`` in targets, float ``[N, 1, H, W]`` in predictions), ``keypoints``
(float ``[N, K, 3]``: x, y, visibility) and ``scores`` (predictions).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import detection as tvd
from torchvision.models._api import WeightsEnum
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    _resnet_fpn_extractor,
    _validate_trainable_layers,
    mobilenet_backbone,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from detforge.config import ModelConfig
from detforge.errors import CheckpointError, ConfigError
from detforge.models import detectron2_compat as d2c
from detforge.models.heads import apply_head_sizes
from detforge.models.roi_align import use_fast_backward
from detforge.models.weights import WeightsReport, load_backbone_weights, load_weights

__all__ = ["MODELS", "ModelSpec", "build_model", "find_torchvision_weights", "get_spec", "is_torchvision_weight_name"]

Task = Literal["detection", "segmentation", "keypoints"]
Family = Literal["rcnn", "retinanet", "fcos", "ssd"]


def maskrcnn_mobilenet_v3_large_fpn(
    *,
    weights: None = None,
    progress: bool = True,
    num_classes: int | None = None,
    weights_backbone: tvm.MobileNet_V3_Large_Weights | None = None,
    trainable_backbone_layers: int | None = None,
    **kwargs: Any,
) -> tvd.MaskRCNN:
    """Mask R-CNN on torchvision's MobileNetV3-Large FPN, assembled as ``fasterrcnn_mobilenet_v3_large_fpn`` is.

    torchvision has no such builder and no COCO weights for it; ``weights`` must be None. The RPN anchors are
    the mobilenet Faster R-CNN's (5 sizes x 3 ratios on each of the 3 levels) and the heads are the standard
    ``MaskRCNNHeads``/``MaskRCNNPredictor`` fed by 14x14 RoIAlign on the two FPN levels.
    """
    if weights is not None:
        raise ConfigError("maskrcnn_mobilenet_v3_large_fpn has no torchvision weights; use backbone weights.")
    weights_backbone = tvm.MobileNet_V3_Large_Weights.verify(weights_backbone)
    is_trained = weights_backbone is not None
    trainable = _validate_trainable_layers(is_trained, trainable_backbone_layers, 6, 3)
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=weights_backbone,
        fpn=True,
        trainable_layers=trainable,
        norm_layer=FrozenBatchNorm2d if is_trained else nn.BatchNorm2d,
    )
    anchor_sizes = ((32, 64, 128, 256, 512),) * 3
    anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    mask_pool = MultiScaleRoIAlign(featmap_names=["0", "1"], output_size=14, sampling_ratio=2)
    box_pool = MultiScaleRoIAlign(featmap_names=["0", "1"], output_size=7, sampling_ratio=2)
    kwargs = {"rpn_score_thresh": 0.05, **kwargs}
    return tvd.MaskRCNN(
        backbone,
        num_classes=91 if num_classes is None else num_classes,
        rpn_anchor_generator=anchors,
        box_roi_pool=box_pool,
        mask_roi_pool=mask_pool,
        **kwargs,
    )


# ResNet-18 FPN: the C3-C5 maps (strides 8, 16, 32) and a pooled level, as torchvision's RetinaNet and FCOS take
# them; no stride-4 level, whose FPN and RPN work dominate a CPU step. One anchor size per level.
R18_RETURNED_LAYERS = [2, 3, 4]
R18_ANCHOR_SIZES = ((32,), (64,), (128,), (256,))


def _resnet18_fpn_rcnn(
    model_class: type[tvd.FasterRCNN],
    *,
    weights: None = None,
    progress: bool = True,
    num_classes: int | None = None,
    weights_backbone: tvm.ResNet18_Weights | None = None,
    trainable_backbone_layers: int | None = None,
    fpn_norm_layer: Callable[..., nn.Module] | None = None,
    **kwargs: Any,
) -> Any:
    """A torchvision Faster or Mask R-CNN on a ResNet-18 FPN (torchvision has the parts but no builder or COCO
    weights): BatchNorm trained from random weights, frozen with ImageNet backbone weights, as torchvision's ResNet-50
    builders do; RoIs pooled from the three FPN maps. ``fpn_norm_layer`` normalises the FPN's convs (the v2
    models' BatchNorm; none by default, as the v1 models)."""
    name = f"{model_class.__name__.lower()}_resnet18_fpn"
    if weights is not None:
        raise ConfigError(f"{name} has no torchvision weights; use backbone weights (IMAGENET1K_V1).")
    weights_backbone = tvm.ResNet18_Weights.verify(weights_backbone)
    is_trained = weights_backbone is not None
    trainable = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    body = tvm.resnet18(weights=weights_backbone, progress=progress, norm_layer=norm_layer)
    backbone = _resnet_fpn_extractor(body, trainable, returned_layers=R18_RETURNED_LAYERS, norm_layer=fpn_norm_layer)
    anchors = AnchorGenerator(R18_ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(R18_ANCHOR_SIZES))
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2))
    if model_class is tvd.MaskRCNN:
        kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(["0", "1", "2"], output_size=14, sampling_ratio=2))
    classes = 91 if num_classes is None else num_classes
    return model_class(backbone, num_classes=classes, rpn_anchor_generator=anchors, **kwargs)


# Builders with torchvision's keyword arguments (weights, progress, num_classes, weights_backbone, ...).
fasterrcnn_resnet18_fpn = functools.partial(_resnet18_fpn_rcnn, tvd.FasterRCNN)
maskrcnn_resnet18_fpn = functools.partial(_resnet18_fpn_rcnn, tvd.MaskRCNN)


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: its builder, its task and the torchvision weight enums it accepts by name."""

    builder: Callable[..., nn.Module]
    task: Task
    torchvision_weights: type[WeightsEnum] | None
    backbone_weights: type[WeightsEnum] | None
    description: str
    family: Family = "rcnn"
    frozen_bn: bool = True  # torchvision freezes the backbone's BatchNorm when it starts from trained weights


_R50 = tvm.ResNet50_Weights
_MBV3 = tvm.MobileNet_V3_Large_Weights

MODELS: dict[str, ModelSpec] = {
    "fasterrcnn_resnet50_fpn": ModelSpec(
        tvd.fasterrcnn_resnet50_fpn, "detection", tvd.FasterRCNN_ResNet50_FPN_Weights, _R50,
        "Faster R-CNN, ResNet-50 FPN (COCO box AP 37.0).",
    ),
    "fasterrcnn_resnet50_fpn_v2": ModelSpec(
        tvd.fasterrcnn_resnet50_fpn_v2, "detection", tvd.FasterRCNN_ResNet50_FPN_V2_Weights, _R50,
        "Faster R-CNN v2, ResNet-50 FPN with BatchNorm heads (COCO box AP 46.7).", frozen_bn=False,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": ModelSpec(
        tvd.fasterrcnn_mobilenet_v3_large_fpn, "detection", tvd.FasterRCNN_MobileNet_V3_Large_FPN_Weights, _MBV3,
        "Faster R-CNN, MobileNetV3-Large FPN (COCO box AP 32.8); fast on CPU.",
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ModelSpec(
        tvd.fasterrcnn_mobilenet_v3_large_320_fpn, "detection", tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
        _MBV3, "Faster R-CNN, MobileNetV3-Large FPN tuned for 320 px input (COCO box AP 22.8).",
    ),
    "maskrcnn_resnet50_fpn": ModelSpec(
        tvd.maskrcnn_resnet50_fpn, "segmentation", tvd.MaskRCNN_ResNet50_FPN_Weights, _R50,
        "Mask R-CNN, ResNet-50 FPN (COCO box AP 37.9, mask AP 34.6).",
    ),
    "maskrcnn_resnet50_fpn_v2": ModelSpec(
        tvd.maskrcnn_resnet50_fpn_v2, "segmentation", tvd.MaskRCNN_ResNet50_FPN_V2_Weights, _R50,
        "Mask R-CNN v2, ResNet-50 FPN (COCO box AP 47.4, mask AP 41.8).", frozen_bn=False,
    ),
    "maskrcnn_mobilenet_v3_large_fpn": ModelSpec(
        maskrcnn_mobilenet_v3_large_fpn, "segmentation", None, _MBV3,
        "Mask R-CNN, MobileNetV3-Large FPN (no COCO weights: start from ImageNet backbone weights).",
    ),
    "fasterrcnn_resnet18_fpn": ModelSpec(
        fasterrcnn_resnet18_fpn, "detection", None, tvm.ResNet18_Weights,
        "Faster R-CNN, ResNet-18 FPN (no COCO weights); learns faster than MobileNetV3 from random weights on a CPU.",
    ),
    "maskrcnn_resnet18_fpn": ModelSpec(
        maskrcnn_resnet18_fpn, "segmentation", None, tvm.ResNet18_Weights,
        "Mask R-CNN, ResNet-18 FPN (no COCO weights); learns faster than MobileNetV3 from random weights on a CPU.",
    ),
    "keypointrcnn_resnet50_fpn": ModelSpec(
        tvd.keypointrcnn_resnet50_fpn, "keypoints", tvd.KeypointRCNN_ResNet50_FPN_Weights, _R50,
        "Keypoint R-CNN, ResNet-50 FPN (COCO person keypoint AP 65.0).",
    ),
    "retinanet_resnet50_fpn": ModelSpec(
        tvd.retinanet_resnet50_fpn, "detection", tvd.RetinaNet_ResNet50_FPN_Weights, _R50,
        "RetinaNet, ResNet-50 FPN (COCO box AP 36.4).", family="retinanet",
    ),
    "retinanet_resnet50_fpn_v2": ModelSpec(
        tvd.retinanet_resnet50_fpn_v2, "detection", tvd.RetinaNet_ResNet50_FPN_V2_Weights, _R50,
        "RetinaNet v2, ResNet-50 FPN with GroupNorm heads (COCO box AP 41.5).", family="retinanet",
        frozen_bn=False,
    ),
    "fcos_resnet50_fpn": ModelSpec(
        tvd.fcos_resnet50_fpn, "detection", tvd.FCOS_ResNet50_FPN_Weights, _R50,
        "FCOS, anchor-free, ResNet-50 FPN (COCO box AP 39.2).", family="fcos",
    ),
    "ssdlite320_mobilenet_v3_large": ModelSpec(
        tvd.ssdlite320_mobilenet_v3_large, "detection", tvd.SSDLite320_MobileNet_V3_Large_Weights, _MBV3,
        "SSDlite, MobileNetV3-Large, fixed 320x320 input (COCO box AP 21.3); the fastest.", family="ssd",
        frozen_bn=False,
    ),
    # Detectron2-compatible variants (docs/detectron.md): for Detectron/Detectron2 weights, no torchvision weights
    "fasterrcnn_resnet50_fpn_detectron2": ModelSpec(
        d2c.fasterrcnn_resnet50_fpn_detectron2, "detection", None, None,
        "Faster R-CNN R50-FPN computing as Detectron2's (for converted Detectron2 weights).",
    ),
    "maskrcnn_resnet50_fpn_detectron2": ModelSpec(
        d2c.maskrcnn_resnet50_fpn_detectron2, "segmentation", None, None,
        "Mask R-CNN R50-FPN computing as Detectron2's (for converted Detectron2 weights).",
    ),
    "fasterrcnn_resnet101_fpn_detectron2": ModelSpec(
        d2c.fasterrcnn_resnet101_fpn_detectron2, "detection", None, None,
        "Faster R-CNN R101-FPN computing as Detectron2's (for converted Detectron2 weights).",
    ),
    "maskrcnn_resnet101_fpn_detectron2": ModelSpec(
        d2c.maskrcnn_resnet101_fpn_detectron2, "segmentation", None, None,
        "Mask R-CNN R101-FPN computing as Detectron2's (for converted Detectron2 weights).",
    ),
}  # fmt: skip


def get_spec(arch: str) -> ModelSpec:
    """The spec of ``arch``, or a ConfigError that lists the valid names and the closest ones."""
    spec = MODELS.get(arch)
    if spec is None:
        close = difflib.get_close_matches(arch, MODELS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"model.arch: unknown architecture '{arch}'.{hint} Valid names: {', '.join(MODELS)}.")
    return spec


def is_torchvision_weight_name(ref: str) -> bool:
    """True for names like "DEFAULT", "COCO_V1", "IMAGENET1K_V2" (anything else is a path, URL or reference)."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*", ref) is not None


def find_torchvision_weights(spec: ModelSpec, arch: str, name: str, *, backbone: bool = False) -> WeightsEnum:
    """The member ``name`` of the model's (or backbone's) torchvision weights enum.

    Raises:
        ConfigError: the architecture has no such weights; the message lists the names it has.
    """
    enum = spec.backbone_weights if backbone else spec.torchvision_weights
    key = "model.backbone_weights" if backbone else "model.weights"
    if enum is None:
        raise ConfigError(f"{key}: '{arch}' has no torchvision weights. Give a file path or URL instead.")
    if name not in enum.__members__:
        valid = ", ".join(enum.__members__)
        raise ConfigError(f"{key}: '{arch}' has no torchvision weights '{name}' ({enum.__name__}: {valid}).")
    return enum[name]


def build_model(
    cfg: ModelConfig,
    *,
    num_classes: int,
    min_size: Sequence[int],
    max_size: int,
    num_keypoints: int | None = None,
) -> nn.Module:
    """Build ``cfg.arch`` for a dataset of ``num_classes`` categories (background not counted), with its weights.

    The model has ``num_classes + 1`` outputs (label 0 = background / unused, see the module docstring). Images
    are resized so the short side is one of ``min_size`` (drawn per image in training, the last one in eval)
    and the long side at most ``max_size``; SSDlite always resizes to 320x320 and ignores both.

    ``cfg.weights`` / ``cfg.backbone_weights`` are torchvision names ("DEFAULT", "COCO_V1", "IMAGENET1K_V1"),
    paths or http(s) URLs. Trained whole-model weights for another number of classes keep everything but the
    class-dependent output layers, which start fresh. What was loaded is in ``model.weights_report``
    (a :class:`WeightsReport`, or None when there were no weights).

    Raises:
        ConfigError: unknown arch, bad anchors, weights names the arch lacks, keypoints missing.
        CheckpointError: weights that cannot be downloaded, read or fitted.
    """
    spec = get_spec(cfg.arch)
    _check_model_config(spec, cfg, num_classes=num_classes, num_keypoints=num_keypoints)
    kwargs = _size_kwargs(spec, min_size, max_size) | _postprocess_kwargs(spec, cfg)
    if cfg.fpn_norm == "bn":  # _check_model_config: a ResNet-18 FPN model
        kwargs["fpn_norm_layer"] = nn.BatchNorm2d
    if spec.task == "keypoints":
        kwargs["num_keypoints"] = num_keypoints
    if cfg.weights and is_torchvision_weight_name(cfg.weights):
        enum = find_torchvision_weights(spec, cfg.arch, cfg.weights)
        model = _build_from_torchvision(spec, enum, cfg, kwargs)
        reinitialised = _swap_class_heads(model, num_classes=num_classes + 1, num_keypoints=num_keypoints)
        reinitialised += _apply_anchors(model, spec, cfg) + apply_head_sizes(model, cfg)
        model.weights_report = _torchvision_report(model, enum, reinitialised)
        return _roi_poolers(model, cfg)
    backbone_enum = None
    if cfg.backbone_weights and is_torchvision_weight_name(cfg.backbone_weights):
        backbone_enum = find_torchvision_weights(spec, cfg.arch, cfg.backbone_weights, backbone=True)
    from_file = bool(cfg.weights or (cfg.backbone_weights and backbone_enum is None))
    trainable = None if from_file else cfg.trainable_backbone_layers  # torchvision warns if no weights use it
    model = _call_builder(
        spec, weights=None, weights_backbone=backbone_enum, num_classes=num_classes + 1,
        trainable_backbone_layers=trainable, **kwargs,
    )  # fmt: skip
    _apply_anchors(model, spec, cfg)
    apply_head_sizes(model, cfg)
    model.weights_report = None
    if from_file:
        _freeze_like_pretrained(model, spec, cfg.trainable_backbone_layers)
    if cfg.weights:
        model.weights_report = load_weights(model, cfg.weights, sha256=cfg.weights_sha256)
    elif cfg.backbone_weights and backbone_enum is None:
        model.weights_report = load_backbone_weights(model, cfg.backbone_weights, sha256=cfg.weights_sha256)
    return _roi_poolers(model, cfg)


def _roi_poolers(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """R-CNN poolers with the faster CPU backward pass unless ``model.fast_roi_align_backward`` is off."""
    if cfg.fast_roi_align_backward:
        use_fast_backward(model)
    return model


def _check_model_config(spec: ModelSpec, cfg: ModelConfig, *, num_classes: int, num_keypoints: int | None) -> None:
    if num_classes < 1:
        raise ConfigError(f"model '{cfg.arch}': the dataset has {num_classes} categories; at least 1 is needed.")
    if spec.task == "keypoints" and not num_keypoints:
        raise ConfigError(f"model '{cfg.arch}' needs keypoints, but the dataset's categories declare none.")
    if cfg.weights and cfg.backbone_weights:
        raise ConfigError(
            f"model.weights ({cfg.weights}) already include the backbone; remove model.backbone_weights "
            f"({cfg.backbone_weights})."
        )
    if spec.family == "ssd" and cfg.backbone_weights and not is_torchvision_weight_name(cfg.backbone_weights):
        raise ConfigError("model.backbone_weights: SSDlite takes only torchvision backbone names (IMAGENET1K_V1).")
    given = [key for key in (*_RCNN_SAMPLING, *_BOX_HEAD) if getattr(cfg, key) is not None]
    if cfg.box_head_conv_dim is not None and not cfg.box_head_num_conv:  # before any download
        raise ConfigError(
            f"model.box_head_conv_dim={cfg.box_head_conv_dim} sizes the box head's convs, but box_head_num_conv is "
            f"{cfg.box_head_num_conv}; set box_head_num_conv (e.g. 4) or remove box_head_conv_dim."
        )
    mask_keys = [k for k in ("mask_head_conv_dim", "mask_head_num_conv", "mask_head_norm") if getattr(cfg, k)]
    if mask_keys and spec.task != "segmentation":  # before any download
        raise ConfigError(f"model.{mask_keys[0]}: '{cfg.arch}' has no mask head; remove it.")
    if cfg.fpn_norm and getattr(spec.builder, "func", None) is not _resnet18_fpn_rcnn:
        raise ConfigError(
            f"model.fpn_norm: only the ResNet-18 FPN models build their FPN here; '{cfg.arch}' has torchvision's "
            f"(the *_v2 models already have BatchNorm in it). Remove fpn_norm or use fasterrcnn_resnet18_fpn / "
            f"maskrcnn_resnet18_fpn."
        )
    if given and spec.family != "rcnn":
        raise ConfigError(
            f"model.{given[0]}: only R-CNN architectures have RoI heads and proposals; '{cfg.arch}' is a "
            f"{spec.family} model. Remove it."
        )
    max_trainable = 6 if spec.backbone_weights is _MBV3 else 5
    if cfg.trainable_backbone_layers is not None and cfg.trainable_backbone_layers > max_trainable:
        raise ConfigError(
            f"model.trainable_backbone_layers: '{cfg.arch}' has {max_trainable} backbone stages, "
            f"found {cfg.trainable_backbone_layers}."
        )


_RCNN_SAMPLING = ("box_batch_size_per_image", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train")
_BOX_HEAD = ("box_head_fc_dim", "box_head_num_conv", "box_head_conv_dim")


def _size_kwargs(spec: ModelSpec, min_size: Sequence[int], max_size: int) -> dict[str, Any]:
    if spec.family == "ssd":
        return {}  # SSDlite320 resizes every image to its fixed 320x320
    return {"min_size": tuple(int(s) for s in min_size), "max_size": int(max_size)}


def _postprocess_kwargs(spec: ModelSpec, cfg: ModelConfig) -> dict[str, Any]:
    if spec.family == "rcnn":
        sampling = {key: getattr(cfg, key) for key in _RCNN_SAMPLING if getattr(cfg, key) is not None}
        return {
            "box_score_thresh": cfg.score_threshold,
            "box_nms_thresh": cfg.nms_threshold,
            "box_detections_per_img": cfg.detections_per_image,
            **sampling,
        }
    return {
        "score_thresh": cfg.score_threshold,
        "nms_thresh": cfg.nms_threshold,
        "detections_per_img": cfg.detections_per_image,
    }


def _call_builder(spec: ModelSpec, **kwargs: Any) -> Any:  # Any: torchvision models' parts are dynamic attributes
    try:
        return spec.builder(progress=True, **kwargs)
    except urllib.error.URLError as exc:
        enum = kwargs.get("weights") or kwargs.get("weights_backbone")
        url = enum.url if isinstance(enum, WeightsEnum) else "?"
        raise CheckpointError(
            f"cannot download torchvision weights {enum} from {url} ({exc.reason}). Without network access, fetch "
            f"the file elsewhere and put it in {torch.hub.get_dir()}/checkpoints/, or give its path in model.weights."
        ) from None


def _build_from_torchvision(spec: ModelSpec, enum: WeightsEnum, cfg: ModelConfig, kwargs: dict[str, Any]) -> Any:
    """torchvision's own build with trained weights (its class count; torchvision refuses another)."""
    kwargs = dict(kwargs)
    source_keypoints = enum.meta.get("num_keypoints") or len(enum.meta.get("keypoint_names", ())) or None
    if "num_keypoints" in kwargs:
        kwargs["num_keypoints"] = source_keypoints or kwargs["num_keypoints"]
    return _call_builder(
        spec, weights=enum, weights_backbone=None, trainable_backbone_layers=cfg.trainable_backbone_layers, **kwargs
    )


def _torchvision_report(model: Any, enum: WeightsEnum, reinitialised: list[str]) -> WeightsReport:
    fresh = set(reinitialised)
    loaded = [k for k in model.state_dict() if k not in fresh]
    return WeightsReport(source=f"torchvision {type(enum).__name__}.{enum.name}", loaded=loaded,
                         reinitialised=reinitialised)  # fmt: skip


# ---- heads whose shapes depend on the dataset --------------------------------------------------------------------


def _swap_class_heads(model: Any, *, num_classes: int, num_keypoints: int | None) -> list[str]:
    """Give the class- (and keypoint-) dependent output layers the dataset's sizes; returns the fresh keys."""
    fresh: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FastRCNNPredictor) and module.cls_score.out_features != num_classes:
            fresh += _replace(model, name, FastRCNNPredictor(module.cls_score.in_features, num_classes))
        elif isinstance(module, MaskRCNNPredictor) and module.mask_fcn_logits.out_channels != num_classes:
            logits = _fresh_conv(module.mask_fcn_logits.in_channels, num_classes, 1, std=None)
            fresh += _replace(model, f"{name}.mask_fcn_logits", logits)
        elif isinstance(module, KeypointRCNNPredictor) and num_keypoints and module.out_channels != num_keypoints:
            fresh += _replace(model, name, KeypointRCNNPredictor(module.kps_score_lowres.in_channels, num_keypoints))
        elif isinstance(module, RetinaNetClassificationHead | FCOSClassificationHead):
            if module.num_classes != num_classes:
                logits = _fresh_conv(module.cls_logits.in_channels, module.num_anchors * num_classes, 3, std=0.01,
                                     bias=_FOCAL_PRIOR_BIAS)  # fmt: skip
                fresh += _replace(model, f"{name}.cls_logits", logits)
                module.num_classes = num_classes
        elif isinstance(module, SSDLiteClassificationHead) and module.num_columns != num_classes:
            for i, block in enumerate(module.module_list):
                anchors = block[1].out_channels // module.num_columns
                logits = _fresh_conv(block[1].in_channels, num_classes * anchors, 1, std=0.03)
                fresh += _replace(model, f"{name}.module_list.{i}.1", logits)
            module.num_columns = num_classes
    return fresh


def _replace(model: Any, name: str, new: nn.Module) -> list[str]:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return [f"{name}.{key}" for key in new.state_dict()]


# RetinaNet/FCOS start every class at probability 0.01 (the focal-loss prior), as torchvision does.
_FOCAL_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def _fresh_conv(
    in_channels: int, out_channels: int, kernel_size: int, *, std: float | None, bias: float = 0.0
) -> nn.Conv2d:
    """A new output conv initialised as torchvision's: normal(0, std) weights (kaiming fan-out if std is None)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    for name, param in conv.named_parameters():
        if name == "bias":
            nn.init.constant_(param, bias)
        elif std is None:
            nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.normal_(param, std=std)
    return conv


def _apply_anchors(model: Any, spec: ModelSpec, cfg: ModelConfig) -> list[str]:
    """Replace the anchor generator as configured; returns the keys of output layers that had to change size."""
    if cfg.anchor_sizes is None and cfg.aspect_ratios is None:
        return []
    if spec.family == "ssd":
        raise ConfigError("model.anchor_sizes/aspect_ratios: SSDlite uses fixed default boxes; remove them.")
    owner = model.rpn if spec.family == "rcnn" else model
    old: AnchorGenerator = owner.anchor_generator
    levels = len(old.sizes)
    sizes = tuple(tuple(s) for s in cfg.anchor_sizes) if cfg.anchor_sizes is not None else old.sizes
    if len(sizes) != levels or any(not s or min(s) <= 0 for s in sizes):
        raise ConfigError(
            f"model.anchor_sizes: '{cfg.arch}' has {levels} feature levels, so it needs {levels} lists of positive "
            f"sizes (one per level, e.g. {[list(s) for s in old.sizes]}); found {cfg.anchor_sizes}."
        )
    ratios = tuple(cfg.aspect_ratios) if cfg.aspect_ratios is not None else old.aspect_ratios[0]
    if not ratios or min(ratios) <= 0:
        raise ConfigError(f"model.aspect_ratios: expected positive ratios (height/width), found {cfg.aspect_ratios}.")
    if isinstance(old, d2c.Detectron2AnchorGenerator):  # keep Detectron2's exact anchors and fixed strides
        new: Any = d2c.Detectron2AnchorGenerator(sizes, (ratios,) * levels, strides=old.strides)
    else:
        new = AnchorGenerator(sizes, (ratios,) * levels)
    per_place = new.num_anchors_per_location()
    if len(set(per_place)) != 1:
        raise ConfigError(f"model.anchor_sizes: every level needs the same number of sizes, found {cfg.anchor_sizes}.")
    if spec.family == "fcos" and per_place[0] != 1:
        raise ConfigError("model.anchor_sizes/aspect_ratios: FCOS takes one size per level and aspect_ratios [1.0].")
    owner.anchor_generator = new
    if per_place[0] == old.num_anchors_per_location()[0]:
        return []
    return _resize_anchor_outputs(model, spec, per_place[0])


def _resize_anchor_outputs(model: Any, spec: ModelSpec, anchors: int) -> list[str]:
    if spec.family == "rcnn":
        head = model.rpn.head
        channels = head.cls_logits.in_channels
        fresh = _replace(model, "rpn.head.cls_logits", _fresh_conv(channels, anchors, 1, std=0.01))
        return fresh + _replace(model, "rpn.head.bbox_pred", _fresh_conv(channels, anchors * 4, 1, std=0.01))
    cls, reg = model.head.classification_head, model.head.regression_head
    fresh = _replace(model, "head.classification_head.cls_logits",
                     _fresh_conv(cls.cls_logits.in_channels, anchors * cls.num_classes, 3, std=0.01,
                                 bias=_FOCAL_PRIOR_BIAS))  # fmt: skip
    cls.num_anchors = anchors
    return fresh + _replace(model, "head.regression_head.bbox_reg",
                            _fresh_conv(reg.bbox_reg.in_channels, anchors * 4, 3, std=0.01))  # fmt: skip


# ---- a backbone that starts from weights in a file ---------------------------------------------------------------


def _freeze_like_pretrained(model: Any, spec: ModelSpec, trainable_layers: int | None) -> None:
    """Set the backbone up as torchvision does for trained weights: FrozenBatchNorm2d, early stages frozen.

    torchvision only does this when it loads weights itself; a file given by path gets the same treatment so
    that fine-tuning from it behaves like fine-tuning from the torchvision name.
    """
    if spec.family == "ssd":
        if trainable_layers not in (None, 6):
            raise ConfigError(
                "model.trainable_backbone_layers: with SSDlite weights from a file, all 6 backbone stages train; "
                "use the torchvision name (COCO_V1) to freeze some."
            )
        return
    body = model.backbone.body
    if spec.frozen_bn:
        _freeze_batchnorm(body)
    if hasattr(body, "layer1"):  # ResNet: conv1, layer1..layer4
        trainable = 3 if trainable_layers is None else min(trainable_layers, 5)
        keep = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
        frozen = [p for n, p in body.named_parameters() if not any(n.startswith(k) for k in keep)]
    else:  # MobileNet features: stages start at the strided ("_is_cn") blocks
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        trainable = 3 if trainable_layers is None else min(trainable_layers, len(stages))
        start = len(blocks) if trainable == 0 else stages[len(stages) - trainable]
        frozen = [p for b in blocks[:start] for p in b.parameters()]
    for parameter in frozen:
        parameter.requires_grad_(False)


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
