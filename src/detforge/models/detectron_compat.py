"""Pieces of the "Detectron2-compatible" R-CNN variant: where Detectron2 computes differently from torchvision.

Only two of the issue's ten differences are here so far, as model surgery on a torchvision R-CNN:
:func:`use_stride_in_1x1` (difference 1, MSRA weights) and :func:`use_detectron2_frozen_batchnorm`
(difference 2). The class layout (difference 5) is handled when converting weights (``detectron.py``). The
other seven (anchors, aligned RoIAlign, mask pasting, box filters, RPN NMS on logits, input resizing, FPN level
assignment) are not implemented; see docs/detectron.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["Detectron2FrozenBatchNorm2d", "use_detectron2_frozen_batchnorm", "use_stride_in_1x1"]


def use_stride_in_1x1(model: nn.Module) -> int:
    """Move the stride of each downsampling bottleneck from its 3x3 conv (torchvision) to its first 1x1 conv, as
    Detectron2 does with ``RESNETS.STRIDE_IN_1X1`` (all MSRA/Caffe2 weights). Output sizes do not change.

    Returns:
        The number of blocks changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, Bottleneck) and module.conv2.stride != (1, 1):
            module.conv1.stride, module.conv2.stride = module.conv2.stride, (1, 1)
            changed += 1
    return changed


class Detectron2FrozenBatchNorm2d(nn.Module):
    """Frozen BatchNorm computed as Detectron2 does: ``F.batch_norm`` in eval mode with ``eps`` 1e-5.

    torchvision's ``FrozenBatchNorm2d`` computes ``x * scale + shift`` with ``scale = w * rsqrt(var + eps)``;
    the two differ by about 1e-6, which is enough to reorder near-tied proposals.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )


def use_detectron2_frozen_batchnorm(model: nn.Module) -> int:
    """Replace every ``FrozenBatchNorm2d`` and ``BatchNorm2d`` by :class:`Detectron2FrozenBatchNorm2d` with the
    same statistics (copied as they are), so the backbone computes as Detectron2's. Returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d | nn.BatchNorm2d):
                frozen = Detectron2FrozenBatchNorm2d(child.weight.shape[0], eps=1e-5)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(parent, name, frozen)
                replaced += 1
    return replaced
