"""Differences 1 and 2 of issue 7: Detectron2's ResNet (stride in the 1x1 conv, frozen BN as ``F.batch_norm``).

Both are model surgery on torchvision modules; :func:`build_detectron2_resnet_fpn` applies them to a
torchvision ResNet-FPN backbone, which is otherwise the same computation as Detectron2's ``build_resnet_fpn_backbone``
(stem, bottlenecks, lateral/output convs, nearest top-down upsampling, P6 = max-pool(kernel 1, stride 2) of P5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from detforge.errors import ConfigError

__all__ = [
    "Detectron2FrozenBatchNorm2d",
    "build_detectron2_resnet_fpn",
    "use_detectron2_frozen_batchnorm",
    "use_stride_in_1x1",
]

_RESNETS = {50: tvm.resnet50, 101: tvm.resnet101}


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
    the two differ by about 1e-6, which is enough to reorder near-tied proposals. All four tensors are buffers:
    nothing here trains, in training mode too (Detectron2's ``FrozenBN``).
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


def build_detectron2_resnet_fpn(depth: int, *, trainable_layers: int = 3) -> BackboneWithFPN:
    """A ResNet-``depth`` FPN backbone (outputs "0".."3" = P2..P5, "pool" = P6, 256 channels) as Detectron2's.

    ``trainable_layers`` counts stages from the top (3: res3..res5 train, as Detectron2's ``FREEZE_AT: 2``).
    Weights start at torchvision's initialisation; BatchNorm statistics at identity.
    """
    if depth not in _RESNETS:
        raise ConfigError(f"Detectron2-compatible ResNet: depth {depth} is not supported (expected 50 or 101).")
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"model.trainable_backbone_layers: expected 0..5 for a ResNet, found {trainable_layers}.")
    resnet = _RESNETS[depth](weights=None, norm_layer=FrozenBatchNorm2d)
    use_stride_in_1x1(resnet)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers)
    use_detectron2_frozen_batchnorm(backbone)
    return backbone
