"""RoIAlign backward on the CPU: detforge's sparse-matrix pass against torchvision's kernel, in one run.

Usage::

    python benchmarks/roi_align_backward.py            # op and training-step timings (~2 min on 2 cores)
    python benchmarks/roi_align_backward.py --quick    # fewer repeats

It prints the time of ``roi_align`` forward + backward at the sizes of a Mask R-CNN's box head (7x7 on 256 RoIs)
and mask head (14x14 on 64 RoIs), then the time of whole training steps of Mask R-CNN MobileNetV3-FPN (batch 4,
320 px, synthetic shapes, the demo's cheaper-R-CNN settings) with ``model.fast_roi_align_backward`` on and off,
each as a ratio of torchvision's time to detforge's (above 1: detforge is faster). Steps alternate between the
two models so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torchvision.ops import roi_align

from detforge.config import ModelConfig
from detforge.data.synth import synth_image
from detforge.demo import CPU_RCNN
from detforge.models.build import build_model
from detforge.models.roi_align import roi_align_fast_backward


def op_seconds(fn: Callable[..., torch.Tensor], rois: int, output: int, repeats: int) -> float:
    """Median seconds of one forward + backward of ``fn`` on 4 images of 256 channels at 20x20 (320 px, stride 16)."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(4, 256, 20, 20, generator=gen)
    corner = torch.rand(rois, 2, generator=gen) * 250
    boxes = torch.cat([torch.randint(0, 4, (rois, 1), generator=gen).float(), corner,
                       corner + 16 + torch.rand(rois, 2, generator=gen) * 100], dim=1)  # fmt: skip
    upstream = torch.randn(rois, 256, output, output, generator=gen)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        x = features.clone().requires_grad_()
        start = time.perf_counter()
        (fn(x, boxes, (output, output), 1 / 16, 2) * upstream).sum().backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def batch(size: int, seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Four synthetic shapes images at ``size`` px with their boxes and masks."""
    images, targets = [], []
    for index in range(4):
        pixels, objects = synth_image(index, seed=seed, size=(size, size))
        masks = torch.stack([torch.from_numpy(o.mask) for o in objects])
        boxes = []
        for mask in masks:
            ys, xs = torch.where(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        labels = torch.tensor([o.class_index + 1 for o in objects])
        targets.append({"boxes": torch.tensor(boxes).float(), "labels": labels, "masks": masks.to(torch.uint8)})
    return images, targets


def step_seconds(steps: int) -> tuple[float, float]:
    """Median seconds of a training step (forward, backward, SGD) with torchvision's and detforge's backward."""
    models, optimizers, times = [], [], {False: [], True: []}
    for fast in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(arch="maskrcnn_mobilenet_v3_large_fpn", fast_roi_align_backward=fast, **CPU_RCNN)
        model = build_model(cfg, num_classes=3, min_size=[320], max_size=320).train()
        models.append(model)
        optimizers.append(torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9))
    for step in range(steps + 1):  # the first is a warm-up
        images, targets = batch(320, seed=step)
        for fast, model, optimizer in zip((False, True), models, optimizers, strict=True):
            start = time.perf_counter()
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step:
                times[fast].append(time.perf_counter() - start)
    return float(np.median(times[False])), float(np.median(times[True]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats, steps = (3, 3) if args.quick else (10, 12)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'what':44s} {'torchvision':>12s} {'detforge':>10s} {'ratio':>7s}")
    for label, rois, output in (("roi_align fwd+bwd, box head (256 RoIs, 7x7)", 256, 7),
                                ("roi_align fwd+bwd, mask head (64 RoIs, 14x14)", 64, 14)):  # fmt: skip
        theirs = op_seconds(roi_align, rois, output, repeats)
        ours = op_seconds(roi_align_fast_backward, rois, output, repeats)
        print(f"{label:44s} {theirs * 1000:10.1f}ms {ours * 1000:8.1f}ms {theirs / ours:6.2f}x")
    theirs, ours = step_seconds(steps)
    label = "Mask R-CNN MBv3-FPN training step, 320 px x4"
    print(f"{label:44s} {theirs:11.2f}s {ours:9.2f}s {theirs / ours:6.2f}x")


if __name__ == "__main__":
    main()
