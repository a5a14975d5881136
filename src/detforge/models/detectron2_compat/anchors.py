"""Difference 3 of issue 7: anchors as Detectron2's ``DefaultAnchorGenerator`` makes them.

torchvision's ``AnchorGenerator`` rounds its cell anchors to integers and derives each level's stride from the
padded image size divided by the feature size (which is wrong for P6 when P5 has an odd size). Detectron2 keeps
the exact cell anchors ``(-w/2, -h/2, w/2, h/2)`` with ``w = sqrt(size**2 / ratio)``, ``h = ratio * w`` and uses
the backbone's fixed strides (4, 8, 16, 32, 64 for FPN) with offset 0: anchor centres at ``(x * stride, y * stride)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

__all__ = ["FPN_STRIDES", "Detectron2AnchorGenerator", "detectron2_cell_anchors"]

FPN_STRIDES = (4, 8, 16, 32, 64)
_FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
_RATIOS = (0.5, 1.0, 2.0)


def detectron2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """``[len(sizes) * len(aspect_ratios), 4]`` float32 xyxy anchors centred at 0, size-major (Detectron2's order).

    Computed in Python floats (float64) and stored as float32, as Detectron2 does; not rounded.
    """
    anchors = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size**2.0 / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class Detectron2AnchorGenerator(nn.Module):
    """A drop-in for torchvision's ``AnchorGenerator`` (same call and output) computing Detectron2's anchors.

    Args:
        sizes: anchor sizes (sqrt of the area, input pixels) per feature level.
        aspect_ratios: height / width ratios per level.
        strides: the stride of each feature level (fixed; not inferred from the image).
        offset: where the first anchor centre sits, in strides (Detectron2's ``ANCHOR_GENERATOR.OFFSET``, 0).

    Forward: ``(image_list, feature_maps)`` -> one ``[sum_l H_l * W_l * A, 4]`` float xyxy tensor per image,
    ordered level, row, column, anchor (the order of torchvision's RPN head outputs).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = _FPN_SIZES,
        aspect_ratios: Sequence[Sequence[float]] = (_RATIOS,) * 5,
        *,
        strides: Sequence[int] = FPN_STRIDES,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(sizes) == len(aspect_ratios) == len(strides):
            raise ValueError(
                f"Detectron2AnchorGenerator: {len(sizes)} size lists, {len(aspect_ratios)} ratio lists and "
                f"{len(strides)} strides; give one of each per feature level."
            )
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.cell_anchors = [detectron2_cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def grid_anchors(self, grid_sizes: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
        """The anchors of each level, ``[H * W * A, 4]``, for feature maps of ``grid_sizes`` (h, w)."""
        anchors = []
        for (height, width), stride, cell in zip(grid_sizes, self.strides, self.cell_anchors, strict=True):
            start = self.offset * stride
            shifts_x = torch.arange(start, width * stride, step=stride, dtype=torch.float32, device=device)
            shifts_y = torch.arange(start, height * stride, step=stride, dtype=torch.float32, device=device)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + cell.to(device).view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(
                f"Detectron2AnchorGenerator: {len(feature_maps)} feature maps for {len(self.strides)} levels."
            )
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        per_level = self.grid_anchors(grid_sizes, feature_maps[0].device)
        anchors = torch.cat(per_level).to(feature_maps[0].dtype)
        return [anchors for _ in range(image_list.tensors.shape[0])]
