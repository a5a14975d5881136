"""RoIAlign with a faster backward pass on the CPU, for training R-CNNs there.

torchvision's CPU ``roi_align`` backward runs on one thread and recomputes the bilinear weights of every sample
for every channel: on Mask R-CNN MobileNetV3-FPN at 320 px (batch 4) it took about a third of each training step
(``benchmarks/roi_align_backward.py`` measures it against this one). RoIAlign is linear in its input, so its
backward is a product with the transposed interpolation matrix: that matrix depends only on the boxes (not on
the channels), is built once per call from the same sample points and bilinear weights torchvision's kernel uses
(``torchvision/csrc/ops/cpu/roi_align_common.h``), and multiplied as a sparse matrix with all channels at once.

The forward pass is torchvision's own. :class:`FastBackwardMultiScaleRoIAlign` is torchvision's
``MultiScaleRoIAlign`` using it when training on a CPU with a fixed sampling ratio; anything else (GPUs, inference,
tracing for export, an adaptive sampling ratio) goes through torchvision unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align

try:  # private helpers of MultiScaleRoIAlign; without them the pooler is plain torchvision
    from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales
except ImportError:  # pragma: no cover - a torchvision that renamed them
    _convert_to_roi_format = _filter_input = _setup_scales = None

__all__ = [
    "FastBackwardMultiScaleRoIAlign",
    "interpolation_matrix",
    "pool_by_gather",
    "pool_helpers_available",
    "roi_align_fast_backward",
    "use_fast_backward",
]


def roi_align_fast_backward(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align(features, rois, ...)`` (``rois``: (K, 5) batch index, x1, y1, x2, y2) whose
    gradient with respect to ``features`` comes from :func:`interpolation_matrix`; ``sampling_ratio`` > 0."""
    if sampling_ratio <= 0:
        raise ValueError(
            f"sampling_ratio must be positive here (adaptive sampling: use roi_align), got {sampling_ratio}"
        )
    return _RoIAlign.apply(features, rois, tuple(output_size), float(spatial_scale), int(sampling_ratio), aligned)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        features: Tensor,
        rois: Tensor,
        output_size: tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.settings = (features.shape, features.dtype, output_size, spatial_scale, sampling_ratio, aligned)
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        shape, features_dtype, output_size, spatial_scale, sampling_ratio, aligned = ctx.settings
        batch, channels, height, width = shape
        if not ctx.needs_input_grad[0] or rois.numel() == 0:
            return (grad.new_zeros(shape, dtype=features_dtype) if ctx.needs_input_grad[0] else None,) + (None,) * 5
        size = (batch, height, width)
        dtype = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
        matrix = interpolation_matrix(rois, size, output_size, spatial_scale, sampling_ratio, aligned, dtype=dtype)
        per_bin = grad.permute(0, 2, 3, 1).reshape(-1, channels).to(dtype)  # (K*PH*PW, C)
        per_pixel = torch.sparse.mm(matrix, per_bin)  # (B*H*W, C)
        features_grad = per_pixel.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # channels-last
        return (features_grad.to(features_dtype),) + (None,) * 5


def interpolation_matrix(
    rois: Tensor,
    feature_size: tuple[int, int, int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The transposed RoIAlign matrix as a sparse COO tensor of shape (B*H*W, K*PH*PW): column ``(k, ph, pw)``
    holds the weights output bin ``(ph, pw)`` of RoI ``k`` gives each feature pixel ``(b, y, x)``.

    RoIAlign averages ``sampling_ratio``^2 bilinear samples a bin, and a sample's weights are a product of a row
    part and a column part, so the matrix is built from per-axis weights: :func:`_axis_weights`. It is left
    uncoalesced (entries for the same pixel and bin add up in the product): sorting its entries would cost more
    than the product itself. Sample positions and weights are worked out in float64, stored as ``dtype``.
    """
    batch, height, width = feature_size
    out_h, out_w = output_size
    rois = rois.detach().to(torch.float64)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    rows_y, weights_y = _axis_weights(y1, y2, out_h, height, sampling_ratio, aligned)  # (K, PH, 2S) each
    cols_x, weights_x = _axis_weights(x1, x2, out_w, width, sampling_ratio, aligned)  # (K, PW, 2S) each
    count = rois.shape[0]
    image = rois[:, 0].long().clamp(0, batch - 1)
    # every (k, ph, pw, sample row, sample column) pair
    pixel = (image[:, None, None, None, None] * height + rows_y[:, :, None, :, None]) * width
    pixel = pixel + cols_x[:, None, :, None, :]
    weight = weights_y[:, :, None, :, None] * weights_x[:, None, :, None, :] / (sampling_ratio * sampling_ratio)
    out_bin = torch.arange(count * out_h * out_w).view(count, out_h, out_w, 1, 1).expand_as(pixel)
    indices = torch.stack([pixel.reshape(-1), out_bin.reshape(-1)])
    shape = (batch * height * width, count * out_h * out_w)
    return torch.sparse_coo_tensor(indices, weight.reshape(-1).to(dtype), shape, check_invariants=False)


def _axis_weights(
    start: Tensor, end: Tensor, bins: int, size: int, sampling_ratio: int, aligned: bool
) -> tuple[Tensor, Tensor]:
    """Feature indices and bilinear weights along one axis: for each RoI, bin and sample, its two neighbours
    (shape (K, bins, 2 * sampling_ratio)), zero where torchvision skips the sample (outside [-1, size])."""
    extent = end - start
    if not aligned:
        extent = extent.clamp(min=1.0)  # torchvision forces malformed RoIs to 1x1
    bin_size = extent / bins
    steps = (torch.arange(sampling_ratio, dtype=torch.float64) + 0.5) / sampling_ratio
    position = torch.arange(bins, dtype=torch.float64)[None, :, None] + steps[None, None, :]
    coord = start[:, None, None] + position * bin_size[:, None, None]  # (K, bins, S)
    inside = (coord >= -1.0) & (coord <= size)  # False for NaN too
    coord = torch.where(inside, coord, torch.zeros_like(coord)).clamp(min=0.0)  # skipped samples: any valid index
    low = coord.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(coord.dtype))
    indices = torch.cat([low, high], dim=-1)
    weights = torch.cat([1.0 - frac, frac], dim=-1)
    weights = torch.where(inside.repeat(1, 1, 2), weights, torch.zeros_like(weights))
    return indices, weights


class FastBackwardMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign``, with :func:`roi_align_fast_backward` when training on a CPU.

    The same parameters, state and outputs; only the CPU backward pass differs (to float rounding). Under
    ``torch.compile``, FX or JIT tracing and ONNX export it is torchvision's pooler; ``torch.jit.script`` compiles
    torchvision's pooler instead (``__prepare_scriptable__``), and PyTorch also puts that pooler back into the
    scripted model object itself: script a copy of a model you will go on training.
    """

    scales: list[float] | None  # set by torchvision's MultiScaleRoIAlign (None until the first call)
    map_levels: Any

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if not self._fast_path(x):
            return super().forward(x, boxes, image_shapes)
        features, scales = _features_and_scales(self, x, image_shapes)
        rois = _convert_to_roi_format(boxes)
        output_size = tuple(self.output_size)
        if len(features) == 1:
            return roi_align_fast_backward(features[0], rois, output_size, scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output_size))
        for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            index = torch.where(levels == level)[0]
            pooled = roi_align_fast_backward(feature, rois[index], output_size, scale, self.sampling_ratio)
            result[index] = pooled.to(result.dtype)
        return result

    def __prepare_scriptable__(self) -> MultiScaleRoIAlign:
        """What ``torch.jit.script`` compiles instead: torchvision's own pooler (inference needs no backward)."""
        return _plain_pooler(self)

    def _fast_path(self, x: dict[str, Tensor]) -> bool:
        if _setup_scales is None or self.sampling_ratio <= 0 or not torch.is_grad_enabled():
            return False
        if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return False
        if torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return False
        feature = x[self.featmap_names[0]]
        return feature.device.type == "cpu" and feature.requires_grad


def pool_by_gather(
    pooler: MultiScaleRoIAlign, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
) -> Tensor:
    """``pooler(x, boxes, image_shapes)``, the same values, in operations that export to a lighter ONNX graph.

    Traced, torchvision's pooler merges its levels by scattering each level's results into a zero tensor along an
    index expanded to every value (``(RoIs, C, 7, 7)`` int64: 12.5 M indices for 1,000 RoIs of 256 channels).
    Here each level's results are concatenated and put back in RoI order by one gather (``argsort`` of the RoI
    indices); when all maps share one scale (MobileNetV3-FPN: both at stride 32, so torchvision sends every RoI to
    the first), it is a single ``roi_align`` on the first map. Needs torchvision's pooler helpers.
    """
    features, scales = _features_and_scales(pooler, x, image_shapes)
    rois = _convert_to_roi_format(boxes)

    def pool(level: int, selected: Tensor) -> Tensor:
        return roi_align(features[level], selected, pooler.output_size, scales[level], pooler.sampling_ratio)

    if len(set(scales)) == 1:
        return pool(0, rois)
    if len(scales) != round(math.log2(scales[0] / scales[-1])) + 1:  # levels torchvision would leave zero-filled
        return MultiScaleRoIAlign.forward(pooler, x, boxes, image_shapes)
    levels = pooler.map_levels(boxes)
    pooled, order = [], []
    for level in range(len(features)):
        index = torch.where(levels == level)[0]
        pooled.append(pool(level, rois[index]))
        order.append(index)
    return torch.cat(pooled)[torch.argsort(torch.cat(order))]


def _features_and_scales(
    pooler: MultiScaleRoIAlign, x: dict[str, Tensor], image_shapes: list[tuple[int, int]]
) -> tuple[list[Tensor], list[float]]:
    """The maps ``pooler`` pools from and their scales, which torchvision's helpers infer on the first call and the
    pooler keeps (with its level mapper) as torchvision's own forward does."""
    features = _filter_input(x, pooler.featmap_names)
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            features, image_shapes, pooler.canonical_scale, pooler.canonical_level
        )
    return features, pooler.scales


def pool_helpers_available() -> bool:
    """Whether torchvision's private pooler helpers (:func:`pool_by_gather` and the fast backward use them) exist."""
    return _setup_scales is not None


def use_fast_backward(model: torch.nn.Module) -> list[str]:
    """Swap the RoI heads' torchvision ``MultiScaleRoIAlign`` poolers of an R-CNN ``model`` for
    :class:`FastBackwardMultiScaleRoIAlign` ones (no parameters change); return the names of those swapped.

    Other poolers (the Detectron2-compatible variant's aligned ones, an adaptive sampling ratio) stay as they are.
    """
    heads = getattr(model, "roi_heads", None)
    swapped = []
    for name in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
        pool: Any = getattr(heads, name, None)
        if type(pool) is not MultiScaleRoIAlign or pool.sampling_ratio <= 0:
            continue
        setattr(heads, name, _plain_pooler(pool, FastBackwardMultiScaleRoIAlign))
        swapped.append(f"roi_heads.{name}")
    return swapped


def _plain_pooler(pool: MultiScaleRoIAlign, kind: type[MultiScaleRoIAlign] = MultiScaleRoIAlign) -> MultiScaleRoIAlign:
    """A ``kind`` pooler with ``pool``'s settings (and its scales, once worked out)."""
    copy = kind(
        pool.featmap_names,
        pool.output_size,
        pool.sampling_ratio,
        canonical_scale=pool.canonical_scale,
        canonical_level=pool.canonical_level,
    )
    copy.scales, copy.map_levels = pool.scales, pool.map_levels
    copy.train(pool.training)
    return copy
