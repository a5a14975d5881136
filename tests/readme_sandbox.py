"""What tests/test_readme.py needs besides its tables: the README's commands, and a folder holding what they name.

`readme_steps` reads every fenced ``bash`` command and ``python`` block of README.md in order. `build_sandbox`
writes the files and dataset versions the commands refer to (`instances.json`, `VOC2007/`, `street.mp4`,
`dataset:hard-cases` ...) from the synthetic shapes, the tiny test set and the real datasets in ../shared/data.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from PIL import Image, ImageDraw

from detforge.data.formats.coco import load_coco, save_coco
from detforge.data.formats.yolo import export_yolo
from detforge.data.records import Dataset
from detforge.data.synth import synth_image, synth_shapes
from detforge.engine.checkpoint import load_checkpoint
from detforge.inference.video import VideoWriter
from detforge.tracking.datasets import DatasetVersion, get_dataset_version, log_dataset
from detforge.tracking.registry import ModelVersion, get_model_version

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHARED_DATA = REPO.parent / "shared" / "data"
SHAPES_IMAGES = 16  # `detforge data synth` is run with this many images of SHAPES_SIZE px (see the rewrites)
SHAPES_SIZE = 64
COCO_NAMES = {"circle": "person", "square": "sports ball"}  # the README filters a COCO file by these names


@dataclass(frozen=True)
class ReadmeStep:
    """One README command (``bash``: continuation lines joined, comment removed) or ``python`` block."""

    kind: str
    text: str
    line: int

    @property
    def key(self) -> str:
        """How the tests' tables name the step: the command, or ``python: <first non-import line>``."""
        if self.kind == "bash":
            return self.text
        body = [s for s in self.text.splitlines() if s.strip() and not s.startswith(("import ", "from "))]
        return "python: " + strip_comment(body[0])


def strip_comment(line: str) -> str:
    """``line`` without a ``# comment`` that starts outside quotes, whitespace collapsed."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            line = line[:i]
            break
    return " ".join(line.split())


def readme_steps(path: Path = README) -> list[ReadmeStep]:
    """Every command of the ``bash`` blocks and every ``python`` block, in README order."""
    steps: list[ReadmeStep] = []
    kind, start, block = "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.startswith("```"):
            block.append(line)
        elif not kind:
            kind, start, block = line[3:].strip() or "text", number, []
        else:
            if kind == "bash":
                steps += _bash_commands(block, start)
            elif kind == "python":
                steps.append(ReadmeStep("python", "\n".join(block), start + 1))
            kind = ""
    return steps


def _bash_commands(block: list[str], start: int) -> list[ReadmeStep]:
    commands: list[ReadmeStep] = []
    parts: list[str] = []
    for number, raw in enumerate(block, start=start + 1):
        line = raw.rstrip()
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        text = strip_comment(" ".join([*parts, line]))
        if text:
            commands.append(ReadmeStep("bash", text, number - len(parts)))
        parts = []
    return commands


def argv(command: str) -> list[str]:
    """The command's arguments as the shell passes them (quotes removed)."""
    return shlex.split(command)


# ---- the sandbox -------------------------------------------------------------------------------------------------


def build_sandbox(root: Path, tiny: Path) -> None:
    """Write into ``root`` every file the README's commands read; log the dataset versions its recipes name.

    Needs ``$DETFORGE_WORKDIR`` to point at ``root`` already (the versions go into ``root/.detforge``).
    """
    shutil.copytree(REPO / "configs", root / "configs")
    shapes = synth_shapes(root / "shapes", images=SHAPES_IMAGES, seed=0, size=(SHAPES_SIZE, SHAPES_SIZE))
    _split_shapes(shapes)
    _write_coco_like(shapes, root)
    export_yolo(load_coco(root / "coco.json"), root / "my_yolo_dataset")
    shutil.copy(tiny, root / "a.json")
    save_coco(load_coco(root / "coco.json"), root / "b.json")
    _write_cvat(root / "annotations.xml", root / "images", seed=1)
    _write_cvat(root / "cvat_export" / "annotations.xml", root / "cvat_export" / "images", seed=2)
    _write_media(root)
    _write_stage_configs(root)
    if SHARED_DATA.is_dir():
        _link_shared_data(root)
    hard = _crowded_images(load_coco(root / "shapes" / "splits" / "train.json"), at_least=3)
    log_dataset("shapes-hard", hard)
    log_dataset("hard-cases", hard)


def _keep_images(ds: Dataset, ids: set[int]) -> Dataset:
    return msgspec.structs.replace(
        ds, images=[i for i in ds.images if i.id in ids], annotations=[a for a in ds.annotations if a.image_id in ids]
    )


def _crowded_images(ds: Dataset, *, at_least: int) -> Dataset:
    """The "hard cases" of a dataset: its images holding at least ``at_least`` objects."""
    counts = Counter(a.image_id for a in ds.annotations)
    return _keep_images(ds, {image_id for image_id, n in counts.items() if n >= at_least})


def _split_shapes(annotations: Path) -> None:
    """`shapes/splits/{train,val}.json` (every fourth image held out), as configs/*.yaml expect."""
    ds = load_coco(annotations)
    val = {img.id for k, img in enumerate(ds.images) if k % 4 == 3}
    save_coco(_keep_images(ds, {img.id for img in ds.images} - val), annotations.parent / "splits" / "train.json")
    save_coco(_keep_images(ds, val), annotations.parent / "splits" / "val.json")


def _write_coco_like(shapes: Path, root: Path) -> None:
    """The shapes with COCO's names (`person`, `sports ball`) as every COCO file the README names."""
    ds = load_coco(shapes)
    categories = [msgspec.structs.replace(c, name=COCO_NAMES.get(c.name, c.name)) for c in ds.categories]
    coco = msgspec.structs.replace(ds, categories=categories)
    for name in ("instances.json", "coco.json", "annotations/instances_train.json"):
        save_coco(coco, root / name)


def _write_cvat(xml: Path, image_dir: Path, *, seed: int, count: int = 10) -> None:
    """A CVAT for images 1.1 export: ``count`` 64x64 images, each with a `person` square and a `sports ball`
    triangle as polygons (so Mask R-CNN can train on it)."""
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True)
    labels = "".join(f"<label><name>{n}</name><type>polygon</type><attributes/></label>" for n in COCO_NAMES.values())
    body = []
    for k in range(count):
        picture = Image.fromarray(rng.integers(0, 80, (64, 64, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(picture)
        x, y = (int(v) for v in rng.integers(4, 24, 2))
        square = [(x, y), (x + 16, y), (x + 16, y + 16), (x, y + 16)]
        triangle = [(40, 58), (60, 58), (50, int(rng.integers(30, 44)))]
        draw.polygon(square, fill=(230, 60, 60))
        draw.polygon(triangle, fill=(60, 60, 230))
        picture.save(image_dir / f"frame_{k:03d}.png")
        shapes = "".join(
            f'<polygon label="{label}" occluded="0" source="manual" z_order="0" '
            f'points="{";".join(f"{px},{py}" for px, py in points)}"></polygon>'
            for label, points in zip(COCO_NAMES.values(), (square, triangle), strict=True)
        )
        body.append(f'<image id="{k}" name="frame_{k:03d}.png" width="64" height="64">{shapes}</image>')
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>'
        f"<meta><task><name>readme</name><labels>{labels}</labels></task></meta>{''.join(body)}</annotations>",
        encoding="utf-8",
    )


def _write_media(root: Path) -> None:
    """`photos/` (3 PNGs), `shots/**/*.jpg` (3 JPEGs in nested folders), `street.mp4` and `match.mp4` (4 frames)."""
    frames = [synth_image(1000 + k, seed=0, size=(SHAPES_SIZE, SHAPES_SIZE))[0] for k in range(4)]
    for k, frame in enumerate(frames[:3]):
        (root / "photos").mkdir(exist_ok=True)
        Image.fromarray(frame).save(root / "photos" / f"photo_{k}.png")
        folder = root / "shots" / ("day" if k < 2 else "night/late")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(folder / f"shot_{k}.jpg")
    for name in ("street.mp4", "match.mp4"):
        writer = VideoWriter(root / name, fps=4)
        for frame in frames:
            writer.write(frame)
        writer.close()


def _write_stage_configs(root: Path) -> None:
    """`stage1.yaml` (Mask R-CNN on the shapes) and `stage2.yaml` (the same recipe, its own output folder)."""
    for stage in (1, 2):
        (root / f"stage{stage}.yaml").write_text(
            "data:\n  train: shapes/splits/train.json\n  val: shapes/splits/val.json\n"
            "model:\n  arch: maskrcnn_mobilenet_v3_large_fpn\n"
            "eval:\n  best_metric: segm/AP\n"
            f"output:\n  dir: runs/stage{stage}\n",
            encoding="utf-8",
        )


def _link_shared_data(root: Path) -> None:
    """`VOC2007/`, `labelme_folder/` and `via_region_data.json` with its balloon images beside it (symlinks)."""
    (root / "VOC2007").symlink_to(SHARED_DATA / "fruits_nuts_voc" / "VOC2007")
    (root / "labelme_folder").symlink_to(SHARED_DATA / "fruits_nuts_labelme" / "images")
    for path in (SHARED_DATA / "balloon" / "train").iterdir():
        (root / path.name).symlink_to(path)


# ---- what the steps left -----------------------------------------------------------------------------------------


@dataclass
class Ran:
    """What a README step left: its printed output, the names a Python block defined, and (in the current folder,
    the sandbox) its files and tracking store."""

    output: str
    namespace: dict[str, Any]

    def json(self, path: str | Path) -> dict[str, Any]:
        return json.loads(Path(path).read_text())

    def count(self, path: str, key: str = "images") -> int:
        return len(self.json(path)[key])

    def names(self, path: str) -> list[str]:
        return [c["name"] for c in self.json(path)["categories"]]

    def lines(self, path: str) -> int:
        return len(Path(path).read_text().splitlines())

    def iteration(self, checkpoint: str | Path) -> int:
        return int(load_checkpoint(checkpoint)["iteration"])

    def version(self, ref: str) -> DatasetVersion:
        return get_dataset_version(ref)

    def model(self, ref: str) -> ModelVersion:
        return get_model_version(ref)
