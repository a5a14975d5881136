"""The Detectron2-compatible Faster/Mask R-CNN R50/R101-FPN, assembled from torchvision parts and this package's.

What each part changes is in its module; everything else (heads, box coder weights and clamp, FPN, losses) is
torchvision's and computes as Detectron2's. The builders take torchvision's builder arguments so that
``detforge.models.build_model`` calls them like any other architecture.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from detforge.errors import ConfigError
from detforge.models.detectron2_compat.anchors import Detectron2AnchorGenerator
from detforge.models.detectron2_compat.backbone import build_detectron2_resnet_fpn
from detforge.models.detectron2_compat.poolers import Detectron2RoIPooler
from detforge.models.detectron2_compat.roi_heads import Detectron2RoIHeads
from detforge.models.detectron2_compat.rpn import Detectron2RPN
from detforge.models.detectron2_compat.transform import Detectron2Transform

__all__ = [
    "fasterrcnn_resnet101_fpn_detectron2",
    "fasterrcnn_resnet50_fpn_detectron2",
    "maskrcnn_resnet101_fpn_detectron2",
    "maskrcnn_resnet50_fpn_detectron2",
]


def fasterrcnn_resnet50_fpn_detectron2(**kwargs: Any) -> GeneralizedRCNN:
    """Faster R-CNN R50-FPN computing as Detectron2's ``faster_rcnn_R_50_FPN`` (see :func:`build_detectron2_rcnn`)."""
    return build_detectron2_rcnn(50, masks=False, **kwargs)


def maskrcnn_resnet50_fpn_detectron2(**kwargs: Any) -> GeneralizedRCNN:
    """Mask R-CNN R50-FPN computing as Detectron2's ``mask_rcnn_R_50_FPN`` (see :func:`build_detectron2_rcnn`)."""
    return build_detectron2_rcnn(50, masks=True, **kwargs)


def fasterrcnn_resnet101_fpn_detectron2(**kwargs: Any) -> GeneralizedRCNN:
    """Faster R-CNN R101-FPN computing as Detectron2's ``faster_rcnn_R_101_FPN``."""
    return build_detectron2_rcnn(101, masks=False, **kwargs)


def maskrcnn_resnet101_fpn_detectron2(**kwargs: Any) -> GeneralizedRCNN:
    """Mask R-CNN R101-FPN computing as Detectron2's ``mask_rcnn_R_101_FPN``."""
    return build_detectron2_rcnn(101, masks=True, **kwargs)


def build_detectron2_rcnn(
    depth: int,
    *,
    masks: bool,
    weights: None = None,
    weights_backbone: None = None,
    progress: bool = True,
    num_classes: int | None = None,
    trainable_backbone_layers: int | None = None,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 1000,
) -> GeneralizedRCNN:
    """A torchvision ``GeneralizedRCNN`` whose parts compute as Detectron2's R-CNN FPN (issue 7's ten differences).

    Inputs and outputs are torchvision's (list of ``[3, H, W]`` float RGB images in 0..1; per image ``boxes``
    ``[N, 4]`` xyxy in original pixels, ``labels`` ``[N]`` with 0 = background, ``scores`` ``[N]`` and, with
    ``masks``, ``masks`` ``[N, 1, H, W]`` soft masks to threshold at 0.5). ``num_classes`` counts background.
    Weights start at torchvision's initialisation: load Detectron2 weights (converted) or a Detectron2/Caffe2
    ImageNet backbone (``detectron2://ImageNetPretrained/MSRA/R-50.pkl``: stride in the 1x1 conv, like this model).

    Raises:
        ConfigError: torchvision weights were asked for (they are trained for torchvision's ResNet and input).
    """
    if weights is not None or weights_backbone is not None:
        raise ConfigError(
            f"Detectron2-compatible R{depth}-FPN: torchvision weights ({weights or weights_backbone}) do not fit "
            "(stride in the 1x1 conv, other input); give Detectron/Detectron2 weights as a path or detectron2:// URL."
        )
    num_outputs = 91 if num_classes is None else num_classes
    backbone = build_detectron2_resnet_fpn(depth, trainable_layers=3 if trainable_backbone_layers is None
                                           else trainable_backbone_layers)  # fmt: skip
    rpn = Detectron2RPN(
        Detectron2AnchorGenerator(), RPNHead(backbone.out_channels, 3),
        pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": 1000},
        post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": 1000},
    )  # fmt: skip
    roi_heads = Detectron2RoIHeads(
        Detectron2RoIPooler(7), TwoMLPHead(backbone.out_channels * 7 * 7, 1024), FastRCNNPredictor(1024, num_outputs),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image, positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
        **(_mask_parts(backbone.out_channels, num_outputs) if masks else {}),
    )  # fmt: skip
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    return GeneralizedRCNN(backbone, rpn, roi_heads, Detectron2Transform(sizes, max_size))


def _mask_parts(channels: int, num_outputs: int) -> dict[str, nn.Module]:
    return {
        "mask_roi_pool": Detectron2RoIPooler(14),
        "mask_head": MaskRCNNHeads(channels, [256, 256, 256, 256], 1),
        "mask_predictor": MaskRCNNPredictor(256, 256, num_outputs),
    }
