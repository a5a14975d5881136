"""Differences 4 and 10 of issue 7: RoI pooling as Detectron2's ``ROIPooler`` with ``ROIAlignV2``.

torchvision's ``MultiScaleRoIAlign`` calls ``roi_align`` with ``aligned=False`` (no half-pixel shift) and assigns
levels with ``floor(4 + log2(sqrt(area) / 224) + 1e-6)``. Detectron2 uses ``aligned=True`` with sampling ratio 0
(adaptive: ``ceil(roi_size / output_size)`` samples per bin) and ``floor(4 + log2(sqrt(area) / 224 + eps))``:
its epsilon is added to the ratio, inside the log, where in float32 it changes nothing for levels 3..5, so a box
a few ulps smaller than a level boundary goes to the lower level (torchvision's 1e-6 lifts it to the upper one).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align

__all__ = ["Detectron2RoIPooler", "assign_fpn_levels"]

# Detectron2's ``assign_boxes_to_levels`` epsilon (``sys.float_info.epsilon``; older releases used 1e-8, which
# gives the same float32 levels for every box that is not clamped to the lowest level).
_LEVEL_EPS = sys.float_info.epsilon


def assign_fpn_levels(
    boxes_xyxy: torch.Tensor,
    *,
    min_level: int = 2,
    max_level: int = 5,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> torch.Tensor:
    """The FPN level of each box (``[N]`` int64, ``min_level..max_level``), by Detectron2's formula.

    ``floor(canonical_level + log2(sqrt(area) / canonical_box_size + eps))``, clamped, computed in the boxes'
    dtype (float32 in the model).
    """
    widths = boxes_xyxy[:, 2] - boxes_xyxy[:, 0]
    heights = boxes_xyxy[:, 3] - boxes_xyxy[:, 1]
    sizes = torch.sqrt(widths * heights)
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + _LEVEL_EPS))
    return torch.clamp(levels, min=min_level, max=max_level).to(torch.int64)


class Detectron2RoIPooler(nn.Module):
    """A drop-in for torchvision's ``MultiScaleRoIAlign`` that pools as Detectron2's FPN ``ROIPooler``.

    Args:
        output_size: pooled size (7 for the box head, 14 for the mask head).
        featmap_names: the feature maps to pool from, finest first ("0".."3" = P2..P5).
        strides: their strides (fixed, not inferred from the image: 4, 8, 16, 32).
        sampling_ratio: ``roi_align`` samples per bin (0: adaptive, Detectron2's default).

    Forward: ``(features, boxes, image_shapes)`` with ``boxes`` a list of ``[K_i, 4]`` float xyxy tensors in input
    pixels -> ``[sum K_i, C, output_size, output_size]``, in the order of the boxes. ``image_shapes`` is unused
    (kept for torchvision's call signature).
    """

    def __init__(
        self,
        output_size: int,
        *,
        featmap_names: Sequence[str] = ("0", "1", "2", "3"),
        strides: Sequence[int] = (4, 8, 16, 32),
        sampling_ratio: int = 0,
    ) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"Detectron2RoIPooler: {len(featmap_names)} feature maps but {len(strides)} strides.")
        self.output_size = int(output_size)
        self.featmap_names = list(featmap_names)
        self.strides = tuple(int(s) for s in strides)
        self.sampling_ratio = int(sampling_ratio)
        self.min_level = int(round(math.log2(self.strides[0])))
        self.max_level = int(round(math.log2(self.strides[-1])))

    def forward(
        self,
        features: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_shapes: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        maps = [features[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = assign_fpn_levels(rois[:, 1:], min_level=self.min_level, max_level=self.max_level)
        first = maps[0]
        out = first.new_zeros((len(rois), first.shape[1], self.output_size, self.output_size))
        for index, (feature, stride) in enumerate(zip(maps, self.strides, strict=True)):
            inds = torch.nonzero(levels == self.min_level + index).squeeze(1)
            pooled = roi_align(
                feature,
                rois[inds].to(feature.dtype),
                self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
            )
            out[inds] = pooled.to(out.dtype)
        return out
