"""RoIAlign's sparse-matrix backward pass gives torchvision's gradients, and R-CNNs train the same with it."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from detforge.config import ModelConfig
from detforge.models.build import build_model
from detforge.models.roi_align import FastBackwardMultiScaleRoIAlign, roi_align_fast_backward, use_fast_backward


def random_rois(count: int, images: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Boxes in image pixels: most inside, some sticking out of every side, some tiny or degenerate."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    span = torch.tensor([width + 40.0, height + 40.0], dtype=torch.float64)
    corner = torch.rand(count, 2, generator=gen, dtype=torch.float64) * span - 20
    extent = torch.rand(count, 2, generator=gen, dtype=torch.float64) * 60
    extent[:4] = torch.tensor([0.3, 0.0, 1e-3, 0.7], dtype=torch.float64)[:, None]  # tiny and empty boxes
    index = torch.randint(0, images, (count, 1), generator=gen).double()
    return torch.cat([index, corner, corner + extent], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_gradients_are_torchvisions(aligned: bool, sampling_ratio: int) -> None:
    torch.manual_seed(0)
    features = torch.randn(3, 4, 11, 17, dtype=torch.float64)  # 88x136 px images at stride 8
    rois = random_rois(60, images=3, size=(88, 136))
    upstream = torch.randn(60, 4, 5, 6, dtype=torch.float64)
    ours, theirs = features.clone().requires_grad_(), features.clone().requires_grad_()
    out = roi_align_fast_backward(ours, rois, (5, 6), 1 / 8, sampling_ratio, aligned)
    ref = roi_align(theirs, rois, (5, 6), 1 / 8, sampling_ratio, aligned)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert torch.equal(out, ref)  # the forward pass is torchvision's own
    assert theirs.grad is not None and ours.grad is not None and theirs.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-12)


def test_float32_gradients_match_and_repeat_bit_for_bit() -> None:
    torch.manual_seed(1)
    features = torch.randn(2, 8, 20, 20)
    rois = random_rois(100, images=2, size=(320, 320)).float()
    upstream = torch.randn(100, 8, 7, 7)
    grads = []
    for fn in (roi_align_fast_backward, roi_align_fast_backward, roi_align):
        x = features.clone().requires_grad_()
        (fn(x, rois, (7, 7), 1 / 16, 2) * upstream).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])  # deterministic: a resumed run repeats the same steps
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-5)


def test_no_rois_give_a_zero_gradient() -> None:
    features = torch.randn(1, 2, 5, 5, requires_grad=True)
    roi_align_fast_backward(features, torch.zeros(0, 5), (2, 2), 1.0, 2).sum().backward()
    assert features.grad is not None and torch.equal(features.grad, torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="sampling_ratio must be positive"):
        roi_align_fast_backward(features, torch.zeros(0, 5), (2, 2), 1.0, 0)


def test_pooler_matches_multiscale_roi_align_on_every_level() -> None:
    torch.manual_seed(2)
    names = ["0", "1", "2"]  # strides 4, 8 and 16 of 512x384 images
    features = OrderedDict((n, torch.randn(2, 3, 128 >> k, 96 >> k, dtype=torch.float64)) for k, n in enumerate(names))
    boxes = []
    for _ in range(2):  # 10 boxes of each size, for the three levels
        side = torch.tensor([60.0, 150.0, 300.0]).repeat_interleave(10)[:, None] * (0.8 + 0.4 * torch.rand(30, 2))
        corner = torch.rand(30, 2) * (torch.tensor([384.0, 512.0]) - side)
        boxes.append(torch.cat([corner, corner + side], dim=1).double())
    shapes = [(512, 384), (512, 384)]
    upstream = torch.randn(60, 3, 7, 7, dtype=torch.float64)
    ours, theirs = FastBackwardMultiScaleRoIAlign(names, 7, 2), MultiScaleRoIAlign(names, 7, 2)
    grads = []
    for pooler in (ours, theirs):
        inputs = OrderedDict((n, f.clone().requires_grad_()) for n, f in features.items())
        out = pooler(inputs, boxes, shapes)
        (out * upstream).sum().backward()
        grads.append(([inputs[n].grad for n in names], out))
    assert torch.equal(grads[0][1], grads[1][1])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1][0])  # every level got RoIs
    for a, b in zip(grads[0][0], grads[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _mask_rcnn(fast: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="maskrcnn_mobilenet_v3_large_fpn", fast_roi_align_backward=fast)
    return build_model(cfg, num_classes=2, min_size=[96], max_size=96)


def test_r_cnn_models_train_the_same_with_either_backward_pass() -> None:
    fast, plain = _mask_rcnn(True), _mask_rcnn(False)
    assert type(fast.roi_heads.box_roi_pool) is FastBackwardMultiScaleRoIAlign
    assert type(fast.roi_heads.mask_roi_pool) is FastBackwardMultiScaleRoIAlign
    assert type(plain.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert fast.state_dict().keys() == plain.state_dict().keys()
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    masks = torch.zeros(2, 96, 96, dtype=torch.uint8)
    masks[0, 10:50, 20:60], masks[1, 50:90, 5:40] = 1, 1
    target = {
        "boxes": torch.tensor([[20.0, 10, 60, 50], [5, 50, 40, 90]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }
    grads = []
    for model in (fast, plain):
        model.train()
        torch.manual_seed(1)  # the same proposals and RoI sampling in both
        losses = model(images, [target, target])
        sum(losses.values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "backbone.body.0.0.weight" in grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_inference_and_torchscript_use_torchvisions_pooler() -> None:
    model = _mask_rcnn(True).eval()
    with torch.no_grad():
        fast = model([torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(5))])
    scripted = torch.jit.script(model)
    assert "FastBackward" not in str(scripted.roi_heads.box_roi_pool.original_name)
    _, out = scripted([torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(5))])
    torch.testing.assert_close(out[0]["boxes"], fast[0]["boxes"])


def test_bfloat16_features_under_autocast_get_a_bfloat16_gradient() -> None:
    features = torch.randn(1, 4, 12, 12).to(torch.bfloat16).requires_grad_()
    rois = torch.tensor([[0.0, 10, 10, 60, 70]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align_fast_backward(features, rois, (7, 7), 1 / 8, 2)
    out.float().sum().backward()
    reference = features.detach().float().requires_grad_()
    roi_align(reference, rois, (7, 7), 1 / 8, 2).sum().backward()
    assert features.grad is not None and features.grad.dtype == torch.bfloat16
    torch.testing.assert_close(features.grad.float(), reference.grad, rtol=1e-2, atol=1e-2)


def test_single_level_pooler_and_which_poolers_are_swapped() -> None:
    features = OrderedDict(p=torch.randn(1, 2, 16, 16, dtype=torch.float64))
    boxes = [torch.tensor([[4.0, 4, 40, 50], [30, 10, 60, 30]], dtype=torch.float64)]
    grads = []
    for pooler in (FastBackwardMultiScaleRoIAlign(["p"], 5, 2), MultiScaleRoIAlign(["p"], 5, 2)):
        inputs = OrderedDict(p=features["p"].clone().requires_grad_())
        pooler(inputs, boxes, [(64, 64)]).sum().backward()
        grads.append(inputs["p"].grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)

    heads = torch.nn.Module()
    heads.box_roi_pool = MultiScaleRoIAlign(["0"], 7, 0)  # adaptive sampling (Detectron2's): left alone
    heads.keypoint_roi_pool = MultiScaleRoIAlign(["0"], 14, 2)
    model = torch.nn.Module()
    model.roi_heads = heads
    assert use_fast_backward(model) == ["roi_heads.keypoint_roi_pool"]
    assert type(heads.box_roi_pool) is MultiScaleRoIAlign
    assert type(heads.keypoint_roi_pool) is FastBackwardMultiScaleRoIAlign
