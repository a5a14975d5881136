"""Other R-CNN RoI heads on request: ``model.box_head_fc_dim``, ``box_head_num_conv``, ``box_head_conv_dim``,
``mask_head_conv_dim``, ``mask_head_num_conv``, ``mask_head_norm``.

These are Detectron2's ``ROI_BOX_HEAD.FC_DIM`` / ``NUM_CONV`` / ``CONV_DIM`` (the convs with ``NORM: BN``) and
``ROI_MASK_HEAD.CONV_DIM`` / ``NUM_CONV``. torchvision's heads
(two 1024-wide fully connected layers; four 256-channel 3x3 convs on 14x14 RoIs) cost most of a training step on a
CPU when the backbone is small: on Mask R-CNN MobileNetV3-FPN at 320 px the mask head's convs alone are about
460 MFLOP per positive RoI. Narrower heads are built from the same torchvision parts (``TwoMLPHead``,
``MaskRCNNHeads``, ``FastRCNNPredictor``, ``MaskRCNNPredictor``), keeping the head's normalisation layers, and
start from torchvision's initialisation; weights of other sizes for them are reported as reinitialised.

A box head with convs (``FastRCNNConvFCHead``: 3x3 convs with BatchNorm, then one fully connected layer, as in the
v2 models) replaces any box head, the v2 models' included. On the demo's shapes, Mask R-CNN R18-FPN after 380 steps
reached box AP50 0.61 with four 64-channel convs against 0.58 with two fully connected layers (AdamW, one run each:
within run-to-run noise; AP 0.48 against 0.42). Weights saved with another kind of box head load without its box
predictor (reported as reinitialised).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from detforge.config import ModelConfig
from detforge.errors import ConfigError

__all__ = ["apply_head_sizes"]


def apply_head_sizes(model: Any, cfg: ModelConfig) -> list[str]:
    """Replace the box and mask heads of an R-CNN ``model`` by ones of the configured sizes.

    Returns:
        The state-dict keys of the replaced layers (they start fresh).

    Raises:
        ConfigError: a size was given for a model without that head, or whose head is not torchvision's
            ``TwoMLPHead`` / ``MaskRCNNHeads`` (e.g. the v2 models' convolutional box head: size it with
            ``box_head_num_conv`` / ``box_head_conv_dim``).
    """
    replaced: list[str] = []
    if cfg.box_head_num_conv:  # build_model has refused box_head_conv_dim without it
        replaced += _conv_box_head(model, cfg)
    elif cfg.box_head_fc_dim is not None:
        replaced += _box_head(model, cfg.arch, cfg.box_head_fc_dim)
    if cfg.mask_head_conv_dim is not None or cfg.mask_head_num_conv is not None:
        replaced += _mask_head(model, cfg)
    elif cfg.mask_head_norm is not None and not _has_batchnorm(_mask_head_of(model, cfg)):
        replaced += _mask_head(model, cfg)  # the same sizes, with BatchNorm
    return replaced


def _mask_head_of(model: Any, cfg: ModelConfig) -> MaskRCNNHeads:
    mask_head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
    if not isinstance(mask_head, MaskRCNNHeads):
        raise ConfigError(
            f"model.mask_head_conv_dim/num_conv/norm: '{cfg.arch}' has no Mask R-CNN mask head; remove them."
        )
    return mask_head


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def _box_head(model: Any, arch: str, dim: int) -> list[str]:
    heads = getattr(model, "roi_heads", None)
    if heads is None or not isinstance(heads.box_head, TwoMLPHead):
        kind = type(heads.box_head).__name__ if heads is not None else "no RoI heads"
        raise ConfigError(
            f"model.box_head_fc_dim: '{arch}' has {kind}, not the two fully connected layers it sizes; remove it, "
            "or build a conv head of that width with model.box_head_num_conv."
        )
    in_features = heads.box_head.fc6.in_features
    num_classes = heads.box_predictor.cls_score.out_features
    heads.box_head = TwoMLPHead(in_features, dim)
    heads.box_predictor = FastRCNNPredictor(dim, num_classes)
    return _keys("roi_heads.box_head", heads.box_head) + _keys("roi_heads.box_predictor", heads.box_predictor)


def _conv_box_head(model: Any, cfg: ModelConfig) -> list[str]:
    heads = getattr(model, "roi_heads", None)
    pool = getattr(heads, "box_roi_pool", None)
    if heads is None or pool is None:
        raise ConfigError(f"model.box_head_num_conv: '{cfg.arch}' has no R-CNN box head; remove it.")
    channels = model.backbone.out_channels
    size = pool.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    fc_dim = cfg.box_head_fc_dim or 1024
    num_classes = heads.box_predictor.cls_score.out_features
    heads.box_head = FastRCNNConvFCHead(
        (channels, *size), [cfg.box_head_conv_dim or 256] * (cfg.box_head_num_conv or 0), [fc_dim],
        norm_layer=nn.BatchNorm2d,
    )  # fmt: skip
    heads.box_predictor = FastRCNNPredictor(fc_dim, num_classes)
    return _keys("roi_heads.box_head", heads.box_head) + _keys("roi_heads.box_predictor", heads.box_predictor)


def _mask_head(model: Any, cfg: ModelConfig) -> list[str]:
    heads = model.roi_heads
    mask_head = _mask_head_of(model, cfg)
    convs = [block[0] for block in mask_head]  # each block: Conv2dNormActivation(conv, [norm], relu)
    dim = cfg.mask_head_conv_dim or convs[0].out_channels
    count = cfg.mask_head_num_conv or len(convs)
    norm = nn.BatchNorm2d if _has_batchnorm(mask_head) or cfg.mask_head_norm == "bn" else None  # v2 heads have it
    num_classes = heads.mask_predictor.mask_fcn_logits.out_channels
    heads.mask_head = MaskRCNNHeads(convs[0].in_channels, [dim] * count, 1, norm_layer=norm)
    heads.mask_predictor = MaskRCNNPredictor(dim, dim, num_classes)
    return _keys("roi_heads.mask_head", heads.mask_head) + _keys("roi_heads.mask_predictor", heads.mask_predictor)


def _keys(prefix: str, module: nn.Module) -> list[str]:
    return [f"{prefix}.{key}" for key in module.state_dict()]
