"""Difference 8 of issue 7: RPN proposals selected as Detectron2's ``find_top_rpn_proposals`` selects them.

torchvision turns the objectness logits into sigmoid probabilities before NMS; above a logit of about 17 these
are all exactly 1.0 in float32, so NMS breaks their ties in an arbitrary order. Detectron2 runs NMS on the raw
logits (and returns them as the proposal scores), drops only boxes with no area (``MIN_SIZE`` 0, where torchvision
drops sides under 1e-3 px), and keeps the top 1000 per level before NMS and 1000 per image after it at test time
(2000 / 1000 in training).
"""

from __future__ import annotations

import torch
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops

from detforge.models.detectron2_compat.anchors import Detectron2AnchorGenerator

__all__ = ["Detectron2RPN", "nonempty_boxes"]


def nonempty_boxes(boxes_xyxy: torch.Tensor, *, threshold: float = 0.0) -> torch.Tensor:
    """``[N]`` bool: width and height both strictly above ``threshold`` (Detectron2's ``Boxes.nonempty``)."""
    widths = boxes_xyxy[:, 2] - boxes_xyxy[:, 0]
    heights = boxes_xyxy[:, 3] - boxes_xyxy[:, 1]
    return (widths > threshold) & (heights > threshold)


class Detectron2RPN(RegionProposalNetwork):
    """torchvision's RPN (same head, anchor matching and losses) with Detectron2's proposal selection."""

    def __init__(
        self,
        anchor_generator: Detectron2AnchorGenerator,
        head: RPNHead,
        *,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
    ) -> None:
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n=pre_nms_top_n or {"training": 2000, "testing": 1000},
            post_nms_top_n=post_nms_top_n or {"training": 1000, "testing": 1000},
            nms_thresh=nms_thresh,
        )
        self.min_size = min_size

    def filter_proposals(
        self,
        proposals: torch.Tensor,
        objectness: torch.Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Top-k per level on the logits, then per image: clip, drop empty boxes, NMS per level on the logits,
        top-k. Returns the proposals (``[K_i, 4]`` xyxy) and their objectness logits (``[K_i]``) per image."""
        num_images = proposals.shape[0]
        logits = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=logits.device) for i, n in enumerate(num_anchors_per_level)]
        )
        top_idx = self._get_top_n_idx(logits, num_anchors_per_level)
        batch = torch.arange(num_images, device=logits.device)[:, None]
        logits, proposals, levels = logits[batch, top_idx], proposals[batch, top_idx], levels[top_idx]
        boxes_out, scores_out = [], []
        for boxes, scores, lvl, shape in zip(proposals, logits, levels, image_shapes, strict=True):
            boxes, scores = self._select(boxes, scores, lvl, shape)
            boxes_out.append(boxes)
            scores_out.append(scores)
        return boxes_out, scores_out

    def _select(
        self, boxes: torch.Tensor, scores: torch.Tensor, levels: torch.Tensor, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not finite.all():
            if self.training:
                raise FloatingPointError("RPN: predicted boxes or scores contain Inf/NaN; training has diverged.")
            boxes, scores, levels = boxes[finite], scores[finite], levels[finite]
        boxes = box_ops.clip_boxes_to_image(boxes, shape)
        keep = nonempty_boxes(boxes, threshold=self.min_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = box_ops.batched_nms(boxes.float(), scores, levels, self.nms_thresh)[: self.post_nms_top_n()]
        return boxes[keep], scores[keep]
