"""Difference 6 of issue 7: masks pasted into the image as Detectron2's ``paste_masks_in_image`` pastes them.

Each ``M x M`` mask is sampled at the centres of the image pixels by ``grid_sample`` (bilinear, zero outside the
mask, ``align_corners=False``): pixel ``(x + 0.5, y + 0.5)`` reads the mask at
``((x + 0.5 - x0) / (x1 - x0) * M - 0.5, (y + 0.5 - y0) / (y1 - y0) * M - 0.5)``. torchvision instead resizes
each mask to the integer box with one pixel of padding, which moves edges by up to a pixel.

On CPU Detectron2 samples only the pixels of ``[floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1)``
(clipped to the image) and leaves the others 0; on GPU it samples the whole image. Both are reproduced, so the
result matches Detectron2 on the same device. The soft values are returned: ``>= 0.5`` gives Detectron2's masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["paste_masks_detectron2"]

_CHUNK_BYTES = 1024**3  # Detectron2's GPU_MEM_LIMIT: masks are pasted in chunks of at most this many bytes


def paste_masks_detectron2(
    masks: torch.Tensor, boxes_xyxy: torch.Tensor, image_size_hw: tuple[int, int], *, per_box: bool | None = None
) -> torch.Tensor:
    """Paste ``masks`` (``[N, M, M]`` float in 0..1) into boxes of an image of ``image_size_hw``.

    Args:
        per_box: sample only each box's neighbourhood (Detectron2 on CPU); default: True on CPU, False elsewhere.

    Returns:
        ``[N, H, W]`` float32 soft masks (threshold them at 0.5).
    """
    height, width = int(image_size_hw[0]), int(image_size_hw[1])
    if masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"paste_masks_detectron2: masks must be square, found {tuple(masks.shape)}.")
    out = torch.zeros((len(masks), height, width), dtype=torch.float32, device=masks.device)
    if len(masks) == 0:
        return out
    if per_box if per_box is not None else masks.device.type == "cpu":
        for i in range(len(masks)):
            x_lo, y_lo, x_hi, y_hi = _paste_region(boxes_xyxy[i], height, width)
            out[i, y_lo:y_hi, x_lo:x_hi] = _sample(masks[i : i + 1], boxes_xyxy[i : i + 1], (x_lo, y_lo, x_hi, y_hi))
        return out
    per_chunk = max(1, _CHUNK_BYTES // (4 * height * width))
    for start in range(0, len(masks), per_chunk):
        stop = start + per_chunk
        out[start:stop] = _sample(masks[start:stop], boxes_xyxy[start:stop], (0, 0, width, height))
    return out


def _paste_region(box: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixels ``[x_lo, x_hi) x [y_lo, y_hi)`` around one box: one pixel beyond its floor/ceil, inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x_lo, y_lo = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
    x_hi, y_hi = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
    return int(x_lo), int(y_lo), int(x_hi), int(y_hi)


def _sample(masks: torch.Tensor, boxes: torch.Tensor, region: tuple[int, int, int, int]) -> torch.Tensor:
    """Bilinear samples of ``masks`` ``[n, M, M]`` at the pixel centres of ``region``: ``[n, h, w]``."""
    x_lo, y_lo, x_hi, y_hi = region
    device = masks.device
    x0, y0, x1, y1 = boxes.float().split(1, dim=1)  # each [n, 1]
    xs = torch.arange(x_lo, x_hi, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(y_lo, y_hi, device=device, dtype=torch.float32) + 0.5
    grid_x = (xs - x0) / (x1 - x0) * 2 - 1  # [n, w], in grid_sample's -1..1 units of the mask
    grid_y = (ys - y0) / (y1 - y0) * 2 - 1  # [n, h]
    n, h, w = len(masks), len(ys), len(xs)
    grid = torch.stack([grid_x[:, None, :].expand(n, h, w), grid_y[:, :, None].expand(n, h, w)], dim=3)
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0]
