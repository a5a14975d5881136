"""The dataset, sampler and DataLoaders that feed torchvision detection models.

Training batches are a pure function of ``(seed, rank, world_size, batch number)``: the sampler emits
``(index, sample_seed)`` pairs and the dataset seeds torch's RNG from ``sample_seed`` before its random
transforms, so the same batch comes out whatever the number of workers, and a resumed run replays the
batch sequence from any batch without reading a single image (:meth:`TrainingBatchSampler.skip`).
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from pycocotools import mask as mask_utils
from rich.console import Console
from torch.utils.data import DataLoader, Sampler
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from detforge.config import DataConfig
from detforge.data.images import load_image_rgb
from detforge.data.records import Annotation, Dataset, Image
from detforge.data.transforms import build_eval_transforms, build_train_transforms, fit_size
from detforge.errors import DatasetError

__all__ = [
    "DetectionDataset",
    "TrainingBatchSampler",
    "build_eval_loader",
    "build_train_loader",
    "category_index",
    "collate_detection",
    "label_to_category_id",
    "sample_seed",
]

Target = dict[str, Any]
Transforms = Callable[[Any, Target], tuple[Any, Target]]
_Entry = tuple[Image, list[Annotation]]
_entry_encoder = msgspec.json.Encoder()
_entry_decoder = msgspec.json.Decoder(_Entry)
# torchvision's decoders apply EXIF orientation for these only (checked against PIL, pixel-identical) and are
# ~30 % faster than PIL here; everything else goes through PIL.
_TORCHVISION_DECODED = frozenset({".jpg", ".jpeg", ".png"})


def category_index(ds: Dataset) -> dict[int, int]:
    """``{category_id: label}``: labels are 1-based positions in ``ds.categories`` (0 is the background)."""
    return {c.id: i for i, c in enumerate(ds.categories, start=1)}


def label_to_category_id(ds: Dataset) -> list[int]:
    """The inverse of :func:`category_index`: ``result[label]`` is the category id (``result[0]`` is -1)."""
    return [-1] + [c.id for c in ds.categories]


class DetectionDataset(torch.utils.data.Dataset[tuple[torch.Tensor, Target]]):
    """Images and torchvision-style targets of a :class:`~detforge.data.records.Dataset`.

    ``dataset[i]`` or ``dataset[(i, sample_seed)]`` gives ``(image, target)``: ``image`` float32 (3, H, W) in
    [0, 1] after the transforms (uint8 without them) and ``target`` with

    - ``boxes``: ``tv_tensors.BoundingBoxes`` XYXY float32 (N, 4) in pixels of ``image``;
    - ``labels``: int64 (N,), contiguous (:func:`category_index`);
    - ``masks``: ``tv_tensors.Mask`` uint8 (N, H, W), when ``with_masks``;
    - ``keypoints``: float32 (N, K, 3) as ``(x, y, visibility)``, when ``with_keypoints``;
    - ``image_id`` (int), ``iscrowd`` int64 (N,) and ``area`` float32 (N,) in pixels of ``image``.

    Crowd annotations (``iscrowd=1``) and boxes without area are left out of the targets; images with no
    annotation left are kept as negatives when ``include_empty``, else left out. Both are counted in
    :attr:`skipped`. With a ``sample_seed`` the transforms draw their random numbers from a torch RNG seeded
    with it (the global RNG state is restored afterwards), so the output depends on ``(i, sample_seed)`` only.

    With ``fit_within=(min_size, max_size)`` an image larger than that is shrunk as
    :class:`~detforge.data.transforms.DownscaleToFit` does, before the targets are built: polygons are then
    rasterised at the small size, which is much cheaper than decoding full-size masks and shrinking them.

    The records are kept serialised in one numpy buffer (as detectron2's ``DatasetFromList`` does): forked
    workers then share it instead of copying every Python object they touch.
    """

    def __init__(
        self,
        ds: Dataset,
        *,
        transforms: Transforms | None = None,
        include_empty: bool = True,
        with_masks: bool = False,
        with_keypoints: bool = False,
        fit_within: tuple[int, int] | None = None,
    ) -> None:
        self.fit_within = fit_within
        self.image_root = Path(ds.image_root) if isinstance(ds.image_root, str) else Path(".")
        self.transforms, self.with_masks, self.with_keypoints = transforms, with_masks, with_keypoints
        self.labels = category_index(ds)
        self.num_keypoints = _num_keypoints(ds) if with_keypoints else 0
        self.skipped: Counter[str] = Counter()
        entries = self._select(ds, include_empty)
        blobs = [_entry_encoder.encode(e) for e in entries]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.group_ids = np.array([int(img.height > img.width) for img, _ in entries], dtype=np.int64)
        self.num_images = len(ds.images)

    def _select(self, ds: Dataset, include_empty: bool) -> list[_Entry]:
        groups = ds.annotations_by_image()
        entries: list[_Entry] = []
        for img in ds.images:
            kept = []
            for ann in groups.get(img.id, []):
                if ann.category_id not in self.labels:
                    known = ", ".join(str(k) for k in self.labels)
                    raise DatasetError(
                        f"annotation {ann.id} (image '{img.file_name}'): category_id {ann.category_id} is not in "
                        f"'categories' (known: {known}). Fix the file or run `detforge data validate`."
                    )
                if ann.iscrowd:
                    self.skipped["crowd annotations"] += 1
                elif ann.bbox[2] <= 0 or ann.bbox[3] <= 0:
                    self.skipped["annotations with an empty box"] += 1
                else:
                    kept.append(ann)
            if not kept and not include_empty:
                self.skipped["images without annotations"] += 1
                continue
            entries.append((img, kept))
        return entries

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def entry(self, index: int) -> _Entry:
        """The image record and the annotations used as its targets."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        start, end = self._offsets[index], self._offsets[index + 1]
        return _entry_decoder.decode(self._buffer[start:end].tobytes())

    def summary(self) -> str:
        """One line: how many images are used and what was left out, e.g. for the training log."""
        line = f"{len(self)} of {self.num_images} images"
        if self.skipped:
            line += "; left out: " + ", ".join(f"{n} {what}" for what, n in sorted(self.skipped.items()))
        return line

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        img, anns = self.entry(index)
        path = self.image_root / img.file_name
        image = read_image(path)
        if tuple(image.shape[-2:]) != (img.height, img.width):
            raise DatasetError(
                f"{path}: the image is {image.shape[-1]}x{image.shape[-2]} pixels (after EXIF orientation) but the "
                f"dataset records {img.width}x{img.height}. Re-import the dataset so its sizes match the files."
            )
        size_hw = (img.height, img.width)
        fitted = None
        if self.fit_within is not None:
            fitted = fit_size(*size_hw, min_size=self.fit_within[0], max_size=self.fit_within[1])
        if fitted is not None:
            image, size_hw = F.resize(image, list(fitted), antialias=True), fitted
        target = self._target(img, anns, size_hw)
        if self.transforms is not None:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                image, target = self.transforms(image, target)
        return image.as_subclass(torch.Tensor), _finish(target, size_hw)

    def _target(self, img: Image, anns: list[Annotation], size_hw: tuple[int, int]) -> Target:
        """The target of ``img`` in the pixels of its ``size_hw`` version (polygons rasterised at that size)."""
        scale_x, scale_y = size_hw[1] / img.width, size_hw[0] / img.height
        xywh = torch.tensor([a.bbox for a in anns], dtype=torch.float32).reshape(-1, 4)
        xywh *= torch.tensor([scale_x, scale_y, scale_x, scale_y])
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1), format="XYXY", canvas_size=size_hw
            ),
            "labels": torch.tensor([self.labels[a.category_id] for a in anns], dtype=torch.int64),
            "image_id": img.id,
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
            "area": torch.tensor([a.area or a.bbox[2] * a.bbox[3] for a in anns], dtype=torch.float32)
            * (scale_x * scale_y),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(_decode_masks(anns, img, size_hw))
        if self.with_keypoints:
            points = _keypoints_array(anns, self.num_keypoints)
            points[..., 0] *= scale_x
            points[..., 1] *= scale_y
            target["keypoints"] = tv_tensors.KeyPoints(points[..., :2], canvas_size=size_hw)
            target["keypoints_visibility"] = points[..., 2]
        return target


def read_image(path: Path) -> tv_tensors.Image:
    """Decode an image file to uint8 RGB (3, H, W) with its EXIF orientation applied.

    Raises:
        DatasetError: the file is missing or cannot be decoded (the message names it).
    """
    if path.suffix.lower() in _TORCHVISION_DECODED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
                data = decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
            if data.dtype == torch.uint8:
                return tv_tensors.Image(data)
        except RuntimeError:
            pass  # PIL below either reads it or raises a DatasetError that names the file
    pil = load_image_rgb(path)
    return tv_tensors.Image(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))


def _decode_masks(anns: list[Annotation], img: Image, size_hw: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) uint8 masks at ``size_hw`` from polygons or RLE; an annotation without a segmentation gets its box.

    Polygons are rasterised at ``size_hw`` directly (cheaper than decoding at full size and shrinking); RLE
    masks can only be decoded at the recorded size and are then resized (nearest).
    """
    scale = (size_hw[1] / img.width, size_hw[0] / img.height)
    scaled: list[tuple[int, dict[str, Any]]] = []
    recorded: list[tuple[int, dict[str, Any]]] = []
    for i, ann in enumerate(anns):
        try:
            rle = _rle(ann, img, size_hw, scale)
        except (ValueError, TypeError, KeyError, IndexError, msgspec.DecodeError) as exc:
            raise DatasetError(
                f"annotation {ann.id} (image '{img.file_name}'): cannot decode its segmentation ({exc})."
            ) from None
        (scaled if rle["size"] == list(size_hw) else recorded).append((i, rle))
    # pycocotools decodes column-major: these views are (N, H, W) with transposed strides, and a copy to make
    # them contiguous would cost more than the decode (resize and flip read them as they are).
    if not recorded:
        return _decode(scaled, size_hw)
    out = torch.empty((len(anns), *size_hw), dtype=torch.uint8)
    out[[i for i, _ in recorded]] = F.resize_mask(_decode(recorded, (img.height, img.width)), list(size_hw))
    if scaled:
        out[[i for i, _ in scaled]] = _decode(scaled, size_hw)
    return out


def _decode(rles: list[tuple[int, dict[str, Any]]], size_hw: tuple[int, int]) -> torch.Tensor:
    if not rles:
        return torch.zeros((0, *size_hw), dtype=torch.uint8)
    return torch.from_numpy(mask_utils.decode([rle for _, rle in rles])).permute(2, 0, 1)


def _rle(ann: Annotation, img: Image, size_hw: tuple[int, int], scale: tuple[float, float]) -> dict[str, Any]:
    seg = ann.segmentation_value()
    if isinstance(seg, dict):
        return mask_utils.frPyObjects(seg, img.height, img.width) if isinstance(seg["counts"], list) else seg
    # Fewer than 3 points is no polygon (and pycocotools would read 4 numbers as a box).
    polygons = [p for p in seg or [] if len(p) >= 6]
    if not polygons:
        x, y, w, h = ann.bbox
        polygons = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    if scale != (1.0, 1.0):
        polygons = [(np.asarray(p, dtype=np.float64) * np.resize(scale, len(p))).tolist() for p in polygons]
    return mask_utils.merge(mask_utils.frPyObjects(polygons, *size_hw))


def _num_keypoints(ds: Dataset) -> int:
    declared = max((len(c.keypoints) for c in ds.categories), default=0)
    found = max((len(a.keypoints) // 3 for a in ds.annotations if isinstance(a.keypoints, list)), default=0)
    return max(declared, found)


def _keypoints_array(anns: list[Annotation], num_keypoints: int) -> torch.Tensor:
    """(N, K, 3) float32; annotations without keypoints get K invisible points."""
    out = torch.zeros((len(anns), num_keypoints, 3), dtype=torch.float32)
    for i, ann in enumerate(anns):
        if isinstance(ann.keypoints, list) and ann.keypoints:
            values = torch.tensor(ann.keypoints, dtype=torch.float32).reshape(-1, 3)[:num_keypoints]
            out[i, : len(values)] = values
    return out


def _finish(target: Target, original_hw: tuple[int, int]) -> Target:
    """Merge keypoints back to (N, K, 3) and rescale areas to the transformed image."""
    height, width = target["boxes"].canvas_size
    out = dict(target)
    out["area"] = target["area"] * (height * width / (original_hw[0] * original_hw[1]))
    if "keypoints" in target:
        visibility = out.pop("keypoints_visibility").to(torch.float32)
        points = target["keypoints"].as_subclass(torch.Tensor) * (visibility > 0).unsqueeze(-1)
        out["keypoints"] = torch.cat([points, visibility.unsqueeze(-1)], dim=-1)
    return out


def collate_detection(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """``[(image, target), ...]`` -> ``([images], [targets])``, what torchvision detection models take."""
    return [image for image, _ in batch], [target for _, target in batch]


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of ``epoch``'s permutation (splitmix64 hashing)."""
    return _splitmix(_splitmix(_splitmix(seed) ^ epoch) ^ position) >> 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class TrainingBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless stream of batches of ``(index, sample_seed)``, like detectron2's TrainingSampler.

    Each epoch is a permutation of ``range(size)`` seeded by ``(seed, epoch)``; rank ``r`` of ``world_size``
    takes its positions ``r, r + world_size, ...``, so ranks see disjoint images within an epoch. With
    ``group_ids`` (e.g. 0 for landscape, 1 for portrait images) a batch only holds images of one group: each
    group fills its own bucket and a full bucket is emitted (detectron2's AspectRatioGroupedDataset).

    The stream depends on the arguments only. ``start_batch`` (or :meth:`skip`) drops that many batches
    from the start by replaying the index stream, without touching images: resume with the number of
    batches the trainer consumed (the sampler itself runs ahead of the trainer by the loader's prefetch, so
    it cannot count them).
    """

    def __init__(
        self,
        size: int,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        group_ids: Sequence[int] | None = None,
        start_batch: int = 0,
    ) -> None:
        if size < world_size:
            raise DatasetError(
                f"cannot train on {size} image(s) with {world_size} process(es): every process needs one. "
                "Check data.include_empty and the dataset's annotations."
            )
        if not 0 <= rank < world_size or batch_size <= 0:
            raise ValueError(f"need 0 <= rank < world_size and batch_size > 0, got {rank}, {world_size}, {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.group_ids = None if group_ids is None else [int(g) for g in group_ids]
        self.start_batch = start_batch

    def skip(self, n_batches: int) -> TrainingBatchSampler:
        """Start ``n_batches`` further on (returns self)."""
        self.start_batch += n_batches
        return self

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = itertools.islice(self._batch_positions(), self.start_batch, None)
        for batch in batches:
            yield [(index, sample_seed(self.seed, epoch, position)) for index, epoch, position in batch]

    def _batch_positions(self) -> Iterator[list[tuple[int, int, int]]]:
        buckets: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for item in self._positions():
            group = self.group_ids[item[0]] if self.group_ids is not None else 0
            bucket = buckets[group]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield bucket
                buckets[group] = []

    def _positions(self) -> Iterator[tuple[int, int, int]]:
        """``(index, epoch, position)`` of this rank's samples, forever."""
        generator = torch.Generator()
        for epoch in itertools.count():
            generator.manual_seed(sample_seed(self.seed, epoch, -1))
            permutation = torch.randperm(self.size, generator=generator).tolist()
            for position in range(self.rank, self.size, self.world_size):
                yield permutation[position], epoch, position


class _Loader(DataLoader[Any]):
    """A DataLoader whose DatasetErrors from worker processes keep their own message, not the worker traceback."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DatasetError as exc:
                text = str(exc)
                if "Original Traceback" not in text:
                    raise
                raise DatasetError(text.rpartition("DatasetError: ")[2].strip()) from None
            yield batch


def _init_worker(worker_id: int) -> None:
    del worker_id
    torch.set_num_threads(1)  # workers decode and resize; several threads each would oversubscribe the cores


def build_train_loader(
    ds: Dataset,
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    with_masks: bool = False,
    with_keypoints: bool = False,
    flip_map: list[int] | None = None,
    start_batch: int = 0,
) -> DataLoader[Any]:
    """An endless loader of ``(images, targets)`` training batches for this rank (see :class:`DetectionDataset`).

    ``start_batch`` skips that many batches of the deterministic stream (resume after ``start_batch`` batches).
    What the dataset leaves out (crowd annotations, empty images) is printed once, on rank 0.
    """
    dataset = DetectionDataset(
        ds, transforms=build_train_transforms(cfg, flip_map=flip_map), include_empty=cfg.include_empty,
        with_masks=with_masks, with_keypoints=with_keypoints, fit_within=(max(cfg.min_size), cfg.max_size),
    )
    if rank == 0 and dataset.skipped:
        Console(stderr=True).print(f"training data: {dataset.summary()}", highlight=False)
    sampler = TrainingBatchSampler(
        len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
        group_ids=dataset.group_ids.tolist() if cfg.aspect_ratio_grouping else None, start_batch=start_batch,
    )
    return _Loader(
        dataset, batch_sampler=sampler, collate_fn=collate_detection, num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available(), worker_init_fn=_init_worker,
        generator=_own_generator(seed),
    )


def _own_generator(seed: int) -> torch.Generator:
    """A DataLoader draws its workers' base seed when iterated; from its own generator, not the global RNG, so
    creating a loader (at the start, at resume, at each evaluation) never shifts the training RNG stream."""
    return torch.Generator().manual_seed(seed)


def build_eval_loader(
    ds: Dataset,
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    with_masks: bool = False,
) -> DataLoader[Any]:
    """Every image once, in order, at its own size; rank ``r`` of ``world_size`` gets images ``r::world_size``."""
    dataset = DetectionDataset(ds, transforms=build_eval_transforms(cfg), include_empty=True, with_masks=with_masks)
    return _Loader(
        dataset, batch_size=batch_size, sampler=list(range(rank, len(dataset), world_size)),
        collate_fn=collate_detection, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(), worker_init_fn=_init_worker, generator=_own_generator(0),
    )
