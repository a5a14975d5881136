"""Training-data throughput: detforge's train loader against a plain torchvision-style loader.

Usage::

    python benchmarks/data_loading.py                  # balloon train set when present, else synthetic shapes
    python benchmarks/data_loading.py --synthetic --images 64 --size 1600x1200
    python benchmarks/data_loading.py --workers 2 --batches 60 --no-masks

Both loaders use the same workers, batch size and augmentation (random horizontal flip; masks decoded from the
polygons) and produce float32 images with torchvision targets; the main process only iterates. Measured:

- ``detforge``: :func:`detforge.data.loader.build_train_loader` at ``min_size=[512]`` (images are downscaled to
  fit 512/853 in the workers; the model does the final resize).
- ``plain``: what torchvision's detection references do: PIL decode, a target built per annotation with
  pycocotools, ``v2.RandomHorizontalFlip`` and ``v2.ToDtype``; full-size images (the model resizes).
- ``plain + resize``: the same with ``v2.Resize(512, max_size=853)`` in the workers.

The loaders are timed in interleaved rounds and the median is reported, since other work on a shared machine
shifts the rates from minute to minute; batches prefetched by idle workers and worker start-up are not timed.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from detforge.config import DataConfig
from detforge.data.formats.coco import load_coco
from detforge.data.loader import build_train_loader, category_index, collate_detection
from detforge.data.records import Annotation, Dataset

BALLOON = Path("/work/shared/data/balloon/train")


class PlainDataset(torch.utils.data.Dataset[Any]):
    """torchvision-references style: PIL image, per-annotation target, v2 transforms."""

    def __init__(self, ds: Dataset, transforms: v2.Transform, *, with_masks: bool) -> None:
        self.ds, self.transforms, self.with_masks = ds, transforms, with_masks
        self.images = ds.images
        self.anns = ds.annotations_by_image()
        self.labels = category_index(ds)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        img = self.images[index]
        image = PILImage.open(self.ds.image_path(img)).convert("RGB")
        anns = [a for a in self.anns[img.id] if not a.iscrowd]
        boxes = torch.tensor([a.bbox for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(img.height, img.width)),
            "labels": torch.tensor([self.labels[a.category_id] for a in anns], dtype=torch.int64),
            "image_id": img.id,
        }
        if self.with_masks:
            rles = [_rle(a, img.height, img.width) for a in anns]
            masks = mask_utils.decode(rles) if rles else np.zeros((img.height, img.width, 0), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks).permute(2, 0, 1))
        return self.transforms(image, target)


def _rle(ann: Annotation, height: int, width: int) -> dict[str, Any]:
    rle = ann.rle()
    if rle is None:
        return mask_utils.merge(mask_utils.frPyObjects(ann.polygons(), height, width))
    return mask_utils.frPyObjects(rle, height, width) if isinstance(rle["counts"], list) else rle


def plain_loader(ds: Dataset, *, workers: int, batch_size: int, resize: bool, with_masks: bool) -> DataLoader[Any]:
    steps: list[Any] = [v2.ToImage()]
    if resize:
        steps.append(v2.Resize(512, max_size=853))
    steps += [v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    dataset = PlainDataset(ds, v2.Compose(steps), with_masks=with_masks)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_detection,
                      persistent_workers=workers > 0)


def endless(loader: DataLoader[Any]) -> Iterable[Any]:
    while True:
        yield from loader


def measure(loaders: dict[str, Iterable[Any]], *, rounds: int, batches: int, skip: int) -> dict[str, float]:
    """Median images/s of each loader over ``rounds`` interleaved rounds (the machine's load drifts).

    Each round first drains ``skip`` batches that idle workers prefetched while the other loaders ran.
    """
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, it in iterators.items():
            for _ in range(skip):
                next(it)
            start, count = time.perf_counter(), 0
            for images, _ in itertools.islice(it, batches):
                count += len(images)
            rates[name].append(count / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def load_data(args: argparse.Namespace, tmp: Path) -> tuple[Dataset, str]:
    if not args.synthetic and BALLOON.is_dir():
        from detforge.data.formats.registry import import_dataset

        ds = import_dataset(BALLOON, "via", class_name="balloon").dataset
        return ds, f"balloon train ({len(ds.images)} images, {len(ds.annotations)} polygons)"
    from detforge.data.synth import synth_shapes

    width, height = (int(v) for v in args.size.split("x"))
    ds = load_coco(synth_shapes(tmp / "synth", images=args.images, size=(width, height)))
    return ds, f"synthetic shapes ({len(ds.images)} images {width}x{height}, {len(ds.annotations)} objects)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=15, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--synthetic", action="store_true", help="use synthetic shapes even if balloon is present")
    parser.add_argument("--images", type=int, default=64, help="synthetic images")
    parser.add_argument("--size", default="1600x1200", help="synthetic image size WxH")
    parser.add_argument("--no-masks", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with_masks = not args.no_masks
    with tempfile.TemporaryDirectory() as tmp:
        ds, described = load_data(args, Path(tmp))
        print(f"{described}; {args.workers} workers, batch {args.batch_size}, masks: {with_masks}")
        cfg = DataConfig(train="-", num_workers=args.workers, min_size=[512], max_size=853, hflip=0.5)
        loaders = {
            "detforge": build_train_loader(ds, cfg, batch_size=args.batch_size, seed=0, with_masks=with_masks),
            "plain": endless(plain_loader(ds, workers=args.workers, batch_size=args.batch_size, resize=False,
                                          with_masks=with_masks)),
            "plain + resize": endless(plain_loader(ds, workers=args.workers, batch_size=args.batch_size, resize=True,
                                                   with_masks=with_masks)),
        }
        skip = 2 * max(1, args.workers) + 1  # DataLoader's prefetch_factor (2) per worker, plus one
        rates = measure(loaders, rounds=args.rounds, batches=args.batches, skip=skip)
        for name, rate in rates.items():
            print(f"{name:15s} {rate:7.1f} images/s (median of {args.rounds} rounds)")
        for name in ("plain", "plain + resize"):
            print(f"detforge / {name}: {rates['detforge'] / rates[name]:.2f}x")


if __name__ == "__main__":
    main()
