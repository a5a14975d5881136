"""Difference 7 of issue 7: the box head's detections as Detectron2's ``fast_rcnn_inference_single_image``.

torchvision's ``RoIHeads.postprocess_detections`` drops boxes with a side under 1e-2 px before NMS. Detectron2
keeps them: it clips to the (resized) image, thresholds the scores, runs per-class NMS and keeps the top k; boxes
left empty are dropped only after they are scaled back to the original image (see ``transform.py``). Rows with
non-finite boxes or scores are dropped first, as Detectron2 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

__all__ = ["Detectron2RoIHeads"]


class Detectron2RoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (same heads, sampling and losses) with Detectron2's test-time box selection."""

    def postprocess_detections(
        self,
        class_logits: torch.Tensor,
        box_regression: torch.Tensor,
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per image: boxes ``[D, 4]`` xyxy (resized-image pixels), scores ``[D]``, labels ``[D]`` (1..K)."""
        counts = [len(p) for p in proposals]
        num_outputs = class_logits.shape[-1]  # explicit: decode leaves zero proposals as [0, K * 4]
        pred_boxes = self.box_coder.decode(box_regression, proposals).reshape(-1, num_outputs, 4).split(counts)
        pred_scores = F.softmax(class_logits, -1).split(counts)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(pred_boxes, pred_scores, image_shapes, strict=True):
            boxes, scores, labels = self._select(boxes, scores, shape)
            out_boxes.append(boxes)
            out_scores.append(scores)
            out_labels.append(labels)
        return out_boxes, out_scores, out_labels

    def _select(
        self, boxes: torch.Tensor, scores: torch.Tensor, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        finite = torch.isfinite(boxes).all(dim=2).all(dim=1) & torch.isfinite(scores).all(dim=1)
        if not finite.all():
            boxes, scores = boxes[finite], scores[finite]
        boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:]  # [R, K, 4]: background (label 0) dropped
        scores = scores[:, 1:]
        labels = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(scores)
        keep = scores > self.score_thresh  # proposal-major, class-minor: Detectron2's order
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]
