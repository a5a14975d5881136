"""Differences 9, 6 and the end of 7 of issue 7: Detectron2's input and output handling.

Input (``DefaultPredictor`` + ``GeneralizedRCNN.preprocess_image``): the uint8 image is resized with PIL's bilinear
filter (antialiased when shrinking) to ``ResizeShortestEdge``'s size, which rounds (``int(x + 0.5)``) where
torchvision floors, and only then converted to float and normalised ``(pixel - mean) / std`` on 0..255 values, in
the channel order the first convolution expects; torchvision normalises first and resizes floats without
antialiasing. Batching pads to a multiple of 32 with zeros, as both do.

Output (``detector_postprocess``): boxes are scaled by ``original / resized`` per axis, clipped to the original
image, boxes left with no area are dropped (with their scores, labels and masks), and masks are pasted with
:func:`paste_masks_detectron2`.

The input statistics are buffers, so a checkpoint says which input its ``conv1`` takes: ``pixel_mean`` and
``pixel_std`` (0..255 units, in ``conv1``'s channel order) and ``channel_order`` (the RGB index feeding each
``conv1`` channel: ``[2, 1, 0]`` for BGR). The defaults are torchvision's ImageNet statistics in RGB, which is what
a converted checkpoint whose input was folded into ``conv1`` (the default of ``detforge convert``) takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from detforge.errors import CheckpointError
from detforge.models.detectron2_compat.masks import paste_masks_detectron2
from detforge.models.detectron2_compat.rpn import nonempty_boxes

__all__ = [
    "TORCHVISION_INPUT",
    "Detectron2Transform",
    "check_torchvision_input",
    "detectron2_resized_size",
    "resize_like_detectron2",
]

# torchvision's ImageNet normalisation in 0..255 units, RGB: (mean, std, channel order)
TORCHVISION_INPUT = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), (0, 1, 2))


def check_torchvision_input(state: Mapping[str, torch.Tensor], *, source: str, prefix: str = "") -> None:
    """Refuse a state dict whose ``transform.*`` buffers say its ``conv1`` takes another input than torchvision's
    (a conversion with ``fold_input=False``), when it is loaded into a model that has no such buffers: that model
    normalises as torchvision does, and its outputs would be silently wrong."""
    keys = [prefix + f"transform.{name}" for name in ("pixel_mean", "pixel_std", "channel_order")]
    if not all(key in state for key in keys):
        return
    mean, std, order = (state[key].double() for key in keys)
    expected = [torch.tensor(values, dtype=torch.float64) for values in TORCHVISION_INPUT]
    if all(torch.allclose(found, want, atol=1e-3) for found, want in zip((mean, std, order), expected, strict=True)):
        return
    raise CheckpointError(
        f"{source}: its conv1 takes Detectron2's input (channels {order.long().tolist()} of RGB, mean "
        f"{[round(v, 3) for v in mean.tolist()]}, std {[round(v, 3) for v in std.tolist()]}, 0-255), which this "
        "torchvision architecture does not give it. Load it into the Detectron2-compatible arch "
        "(model.arch=..._detectron2), or convert again with the input folded (the default of `detforge convert`)."
    )


def detectron2_resized_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of ``ResizeShortestEdge``: short side ``short_edge``, long side at most ``max_size``,
    each rounded to the nearest integer (half up)."""
    scale = short_edge * 1.0 / min(height, width)
    new_h, new_w = (short_edge * 1.0, scale * width) if height < width else (scale * height, short_edge * 1.0)
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_like_detectron2(image_uint8_hwc: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """PIL bilinear resize of an ``[H, W, 3]`` uint8 image (Detectron2's ``ResizeTransform.apply_image``)."""
    resized = Image.fromarray(image_uint8_hwc).resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized)


class Detectron2Transform(GeneralizedRCNNTransform):
    """torchvision's R-CNN transform with Detectron2's resizing, normalisation and postprocessing.

    Takes what torchvision's takes: a list of ``[3, H, W]`` float RGB images in 0..1 (each is quantised back to
    uint8 first, exact for images that came from uint8) and optional targets (``boxes``, ``masks``, resized with
    the image; masks by nearest neighbour).
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    channel_order: torch.Tensor

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        *,
        pixel_mean: Sequence[float] = TORCHVISION_INPUT[0],
        pixel_std: Sequence[float] = TORCHVISION_INPUT[1],
        channel_order: Sequence[int] = TORCHVISION_INPUT[2],
    ) -> None:
        super().__init__(min_size, max_size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], size_divisible=32)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32))
        self.register_buffer("channel_order", torch.tensor(channel_order, dtype=torch.int64))

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image  # Detectron2 normalises after resizing: done in resize()

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        height, width = image.shape[-2:]
        short_edge = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = detectron2_resized_size(int(height), int(width), int(short_edge), int(self.max_size))
        pixels = image.detach().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        resized = torch.from_numpy(resize_like_detectron2(pixels, size).copy()).to(image.device)
        image = self.normalise_pixels(resized.permute(2, 0, 1).float())
        if target is not None:
            target = _resize_target(target, (int(height), int(width)), size)
        return image, target

    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[3, H, W]`` float RGB 0..255 -> ``conv1``'s input: reordered channels, ``(x - mean) / std``."""
        x = pixels[self.channel_order]
        return (x - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]

    def postprocess(
        self,
        result: list[dict[str, torch.Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        if self.training:
            return result
        return [
            detector_postprocess(r, s, o) for r, s, o in zip(result, image_shapes, original_image_sizes, strict=True)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size}, Detectron2 resizing)"


def detector_postprocess(
    result: dict[str, torch.Tensor], resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """One image's detections in original pixels: scaled, clipped, empty boxes dropped, masks pasted.

    ``result["masks"]`` (if any) goes in as ``[N, 1, M, M]`` probabilities and comes out ``[N', 1, H, W]``.
    """
    height, width = int(original_hw[0]), int(original_hw[1])
    boxes = result["boxes"].clone()
    boxes[:, 0::2] *= width / resized_hw[1]
    boxes[:, 1::2] *= height / resized_hw[0]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
    keep = nonempty_boxes(boxes)
    out: dict[str, Any] = {k: v[keep] for k, v in result.items() if k != "boxes"}
    out["boxes"] = boxes[keep]
    if "masks" in out:
        out["masks"] = paste_masks_detectron2(out["masks"][:, 0], out["boxes"], (height, width))[:, None]
    return out


def _resize_target(
    target: dict[str, torch.Tensor], old_hw: tuple[int, int], new_hw: tuple[int, int]
) -> dict[str, torch.Tensor]:
    target = dict(target)
    target["boxes"] = resize_boxes(target["boxes"], old_hw, new_hw)
    if "masks" in target:
        masks = target["masks"][:, None].float()
        target["masks"] = F.interpolate(masks, size=new_hw, mode="nearest")[:, 0].byte()
    return target
