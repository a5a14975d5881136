"""A "Detectron2-compatible" R-CNN: torchvision's Faster/Mask R-CNN FPN with the parts that compute differently
from Detectron2's replaced (issue 7's ten differences; docs/detectron.md has the table).

=====  ==============================================  ==============================================
  #    difference                                      where
=====  ==============================================  ==============================================
  1    stride in the first 1x1 conv (STRIDE_IN_1X1)    ``backbone.use_stride_in_1x1``
  2    frozen BN as ``F.batch_norm``, eps 1e-5         ``backbone.Detectron2FrozenBatchNorm2d``
  3    unrounded cell anchors, fixed strides, offset 0 ``anchors.Detectron2AnchorGenerator``
  4    RoIAlign aligned=True, sampling ratio 0         ``poolers.Detectron2RoIPooler``
  5    class layout (background last)                  the weight conversion (``models/detectron.py``)
  6    mask pasting by ``grid_sample``                 ``masks.paste_masks_detectron2``
  7    no 1e-2 box filter; empty boxes dropped late    ``roi_heads.Detectron2RoIHeads``, ``transform``
  8    RPN NMS on logits, min size 0, top-k 1000/1000  ``rpn.Detectron2RPN``
  9    rounding resize of uint8 (PIL), then normalise  ``transform.Detectron2Transform``
 10    FPN level assignment epsilon                    ``poolers.assign_fpn_levels``
=====  ==============================================  ==============================================
"""

from detforge.models.detectron2_compat.anchors import Detectron2AnchorGenerator, detectron2_cell_anchors
from detforge.models.detectron2_compat.backbone import (
    Detectron2FrozenBatchNorm2d,
    build_detectron2_resnet_fpn,
    use_detectron2_frozen_batchnorm,
    use_stride_in_1x1,
)
from detforge.models.detectron2_compat.builders import (
    build_detectron2_rcnn,
    fasterrcnn_resnet50_fpn_detectron2,
    fasterrcnn_resnet101_fpn_detectron2,
    maskrcnn_resnet50_fpn_detectron2,
    maskrcnn_resnet101_fpn_detectron2,
)
from detforge.models.detectron2_compat.masks import paste_masks_detectron2
from detforge.models.detectron2_compat.poolers import Detectron2RoIPooler, assign_fpn_levels
from detforge.models.detectron2_compat.roi_heads import Detectron2RoIHeads
from detforge.models.detectron2_compat.rpn import Detectron2RPN
from detforge.models.detectron2_compat.transform import (
    Detectron2Transform,
    check_torchvision_input,
    detectron2_resized_size,
)

__all__ = [
    "Detectron2AnchorGenerator",
    "Detectron2FrozenBatchNorm2d",
    "Detectron2RPN",
    "Detectron2RoIHeads",
    "Detectron2RoIPooler",
    "Detectron2Transform",
    "check_torchvision_input",
    "assign_fpn_levels",
    "build_detectron2_rcnn",
    "build_detectron2_resnet_fpn",
    "detectron2_cell_anchors",
    "detectron2_resized_size",
    "fasterrcnn_resnet101_fpn_detectron2",
    "fasterrcnn_resnet50_fpn_detectron2",
    "maskrcnn_resnet101_fpn_detectron2",
    "maskrcnn_resnet50_fpn_detectron2",
    "paste_masks_detectron2",
    "use_detectron2_frozen_batchnorm",
    "use_stride_in_1x1",
]
