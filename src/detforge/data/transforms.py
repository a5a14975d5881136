"""Training and evaluation transforms (torchvision ``transforms.v2``) of ``(image, target)`` samples.

A sample is ``(tv_tensors.Image uint8 (3, H, W), target)`` where ``target`` holds torchvision's keys: ``boxes``
(``tv_tensors.BoundingBoxes`` XYXY), ``labels``, optional ``masks`` (``tv_tensors.Mask`` (N, H, W)) and
``keypoints`` (``tv_tensors.KeyPoints`` (N, K, 2) with their visibility in ``keypoints_visibility`` (N, K)
while transforms run), plus ``image_id``, ``iscrowd`` and ``area``.

The workers only ever shrink images (:class:`DownscaleToFit`): the final, multi-scale resize is the model's
(torchvision's ``GeneralizedRCNNTransform`` draws one ``min_size`` per batch), so decoding a 12 MP photo does
not ship 12 MP tensors between processes, and small images are never blown up twice.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detforge.config import DataConfig

__all__ = [
    "PER_INSTANCE_KEYS",
    "DownscaleToFit",
    "RandomHorizontalFlip",
    "build_eval_transforms",
    "build_train_transforms",
    "keypoint_flip_map",
]

# Target entries with one row per instance: filtered together with the boxes by SanitizeBoundingBoxes
# (masks are found by torchvision itself).
PER_INSTANCE_KEYS = ("labels", "iscrowd", "area", "keypoints", "keypoints_visibility")


class DownscaleToFit(v2.Transform):
    """Shrink a sample so its short side is at most ``min_size`` and its long side at most ``max_size``.

    Never enlarges. Boxes, masks and keypoints are resized with the image (antialiased for the image,
    nearest for masks).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"size": fit_size(height, width, min_size=self.min_size, max_size=self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        size = params["size"]
        if size is None:
            return inpt
        return self._call_kernel(F.resize, inpt, size=list(size), antialias=True)


def fit_size(height: int, width: int, *, min_size: int, max_size: int) -> tuple[int, int] | None:
    """``(height, width)`` after :class:`DownscaleToFit`, or None when the image already fits."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    if scale >= 1.0:
        return None
    return max(1, round(height * scale)), max(1, round(width * scale))


class RandomHorizontalFlip(nn.Module):
    """Mirror ``(image, target)`` left-right with probability ``p``; keypoints also swap sides.

    Boxes, masks and keypoints are flipped with torchvision's kernels (keypoints as pixel indices, ``x -> W - 1 - x``,
    COCO's convention). After a flip, keypoint ``k`` and its visibility take the values of ``flip_map[k]``, so that a
    left eye stays a left eye (see :func:`keypoint_flip_map`).
    """

    def __init__(self, p: float = 0.5, *, flip_map: list[int] | None = None) -> None:
        super().__init__()
        self.p = p
        self.flip_map = flip_map

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self.p <= 0 or torch.rand(1).item() >= self.p:
            return image, target
        flipped = {k: F.horizontal_flip(v) if isinstance(v, tv_tensors.TVTensor) else v for k, v in target.items()}
        if self.flip_map is not None and "keypoints" in flipped:
            points = flipped["keypoints"]
            flipped["keypoints"] = tv_tensors.wrap(points[:, self.flip_map], like=points)
            if "keypoints_visibility" in flipped:
                flipped["keypoints_visibility"] = flipped["keypoints_visibility"][:, self.flip_map]
        return F.horizontal_flip(image), flipped

    def extra_repr(self) -> str:
        return f"p={self.p}, flip_map={self.flip_map}"


def per_instance_tensors(sample: Any) -> tuple[torch.Tensor, ...]:
    """``labels_getter`` of SanitizeBoundingBoxes: every per-instance tensor of an ``(image, target)`` sample."""
    target = sample[1]
    return tuple(target[k] for k in PER_INSTANCE_KEYS if k in target)


def build_train_transforms(cfg: DataConfig, *, flip_map: list[int] | None = None) -> v2.Compose:
    """Training augmentation: downscale-to-fit, random flip, optional colour jitter, float conversion.

    Call the result as ``transforms(image, target)``. The image comes out float32 in [0, 1]; boxes made
    degenerate by the transforms are removed with their labels, masks and keypoints.

    Args:
        cfg: ``min_size`` (the largest is the fit limit), ``max_size``, ``hflip`` and ``color_jitter``.
        flip_map: keypoint index each keypoint becomes after a horizontal flip (:func:`keypoint_flip_map`).
    """
    steps: list[Any] = [DownscaleToFit(max(cfg.min_size), cfg.max_size)]
    if cfg.hflip > 0:
        steps.append(RandomHorizontalFlip(cfg.hflip, flip_map=flip_map))
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(labels_getter=per_instance_tensors),
    ]
    return v2.Compose(steps)


def build_eval_transforms(cfg: DataConfig) -> v2.Compose:
    """Evaluation: float conversion only.

    Images keep their size so that predictions, which the model maps back to its input size, are in the
    coordinates of the annotations. The model resizes to ``cfg.min_size[-1]`` / ``cfg.max_size`` itself.
    """
    del cfg  # the same signature as build_train_transforms; nothing in it applies at evaluation
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


_SIDE_SWAP = {"left": "right", "right": "left", "l": "r", "r": "l"}
_TOKEN = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9]+")


def keypoint_flip_map(names: list[str]) -> list[int]:
    """For each keypoint, the index of its mirror image: ``left_eye`` <-> ``right_eye``, ``l_knee`` <-> ``r_knee``,
    ``hand_left`` <-> ``hand_right`` (case-insensitive; separators ``_``, ``-``, ``.`` or space).

    Keypoints without a side (``nose``) map to themselves. A sided name whose mirror is missing also maps to
    itself, with a warning, since flipped images will then teach the model the wrong side.
    """
    index = {name.lower(): i for i, name in enumerate(names)}
    flip_map, unpaired = [], []
    for i, name in enumerate(names):
        mirror = _mirror_name(name.lower())
        if mirror is None:
            flip_map.append(i)
        elif mirror in index:
            flip_map.append(index[mirror])
        else:
            flip_map.append(i)
            unpaired.append(name)
    if unpaired:
        warnings.warn(
            f"keypoints {unpaired} name a side but have no mirror keypoint; a horizontal flip leaves them in place. "
            "Rename them (left_x/right_x) or set data.hflip=0.",
            stacklevel=2,
        )
    return flip_map


def _mirror_name(name: str) -> str | None:
    """``name`` with its side word swapped (only a first or last word ``l``/``r`` counts), or None if it has none."""
    tokens = _TOKEN.findall(name)
    words = [i for i, t in enumerate(tokens) if t[0].isalnum()]
    for i in words:
        side = _SIDE_SWAP.get(tokens[i])
        if side is None or (len(tokens[i]) == 1 and i not in (words[0], words[-1])):
            continue
        return "".join(tokens[:i] + [side] + tokens[i + 1 :])
    return None
