"""Training step speed by precision: fp32 against channels-last and bf16 autocast (each alone and both), in one run.

Usage::

    python benchmarks/train_precision.py                      # the demo's Mask R-CNN R18-FPN, batch 4, 320 px
    python benchmarks/train_precision.py --arch fasterrcnn_mobilenet_v3_large_fpn --size 512 --batch 2

Every mode trains the same model (same initial weights) on the same synthetic shapes batches with AdamW, as
``detforge.train`` does with ``train.amp`` and ``train.channels_last``: ``torch.autocast`` around the forward pass
and the loss, the weights in float32. Modes are timed in turns (``--rounds``), so a machine that slows down
part-way penalises all of them alike; each prints the median steps per second and its ratio to fp32.

bf16 pays on CPUs that compute it natively (AVX-512 BF16 or AMX; ``train.amp=auto`` checks) and on CUDA; on
other CPUs it is emulated and slower than fp32, which is why ``auto`` leaves it off there.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODES = {
    "fp32": (None, False),
    "fp32+channels-last": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16+channels-last": (torch.bfloat16, True),
}


def batches(size: int, batch: int, count: int, *, masks: bool) -> list[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """``count`` batches of synthetic shapes images with their boxes, labels and masks (as the loader gives)."""
    from detforge.data.formats.coco import load_coco
    from detforge.data.loader import DetectionDataset, collate_detection
    from detforge.data.synth import synth_shapes

    with tempfile.TemporaryDirectory() as tmp:
        ds = load_coco(synth_shapes(Path(tmp), images=batch * count, seed=0, size=(size, size)))
        data = DetectionDataset(ds, include_empty=True, with_masks=masks)
        items = [data[i] for i in range(len(data))]
    out = []
    for k in range(count):
        images, targets = collate_detection(items[k * batch : (k + 1) * batch])
        out.append(([im.float() / 255 if im.dtype == torch.uint8 else im for im in images], list(targets)))
    return out


def build(arch: str, size: int, channels_last: bool) -> torch.nn.Module:
    from detforge.config import ModelConfig
    from detforge.demo import CPU_RCNN
    from detforge.models.build import build_model

    torch.manual_seed(0)
    extra = CPU_RCNN if arch.endswith("resnet18_fpn") else {}
    model = build_model(ModelConfig(arch=arch, **extra), num_classes=3, min_size=[size], max_size=size)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def steps_per_second(model: torch.nn.Module, data: list, dtype: torch.dtype | None, steps: int, warmup: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(k: int) -> None:
        images, targets = data[k % len(data)]
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for k in range(warmup):
        step(k)
    start = time.perf_counter()
    for k in range(steps):
        step(k)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="maskrcnn_resnet18_fpn")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from detforge.inference.predictor import cpu_supports_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_supports_bf16()}")
    data = batches(args.size, args.batch, 4, masks=args.arch.startswith("maskrcnn"))
    speeds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, (dtype, channels_last) in MODES.items():
            model = build(args.arch, args.size, channels_last)
            speeds[mode].append(steps_per_second(model, data, dtype, args.steps, args.warmup))
    base = statistics.median(speeds["fp32"])
    print(f"{args.arch}, batch {args.batch} at {args.size} px, median of {args.rounds} rounds of {args.steps} steps")
    for mode, values in speeds.items():
        median = statistics.median(values)
        print(f"  {mode:20s} {median:6.2f} steps/s  {median / base:5.2f}x fp32")


if __name__ == "__main__":
    main()
