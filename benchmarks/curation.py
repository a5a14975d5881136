"""Curation at COCO-train scale: detforge's load → filter → balance → save against plain orjson.

Usage::

    python benchmarks/curation.py                      # 118k images, 860k polygon annotations (~450 MB)
    python benchmarks/curation.py --quick              # 5k images: a smoke run
    python benchmarks/curation.py --images 20000 --annotations 146000 --out /tmp/bench

The synthetic file is written once (with orjson) and cached in ``--out``. Every measurement runs in its own
subprocess so that its peak memory (VmHWM, the high-water mark of the resident set) is its own; interpreter
start-up and imports are not timed. Measurements:

- ``orjson, gc on``: ``orjson.loads(path.read_bytes())``, ``orjson.dumps`` of the same object, write the file:
  what people usually write.
- ``orjson, gc off``: the same inside ``gc.disable()``: the well-written plain alternative.
- ``detforge``: ``load_coco`` (decode into typed records and validate, polygons
  included), ``filter_categories`` to person + sports ball, ``balance(require_all=True)``, ``save_coco``
  (an atomic write with fsync).
- ``detforge phases``: the same steps timed one by one through the public functions, with the time spent in
  the garbage collector, to show where the time goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

COCO_NAMES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
# COCO's own (non-contiguous) category ids.
COCO_IDS = [
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
]
KEEP = ["person", "sports ball"]
IMAGE_SIZES_WH = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 360))


# ---------------------------------------------------------------------------------------------------------
# The synthetic file


def write_synthetic(path: Path, *, images: int, annotations: int, seed: int = 0) -> None:
    """A COCO-instances-like file: COCO's 80 classes (person ~30 % of instances), 6–50-point polygons."""
    rng = np.random.default_rng(seed)
    names = list(COCO_NAMES)
    weights = _class_weights(rng, names)
    image_ids = rng.choice(np.arange(1, 6 * images + 1), size=images, replace=False)
    sizes = rng.integers(0, len(IMAGE_SIZES_WH), size=images)
    shares = rng.gamma(3.0, size=images)
    per_image = rng.multinomial(annotations, shares / shares.sum())
    palettes = _palettes(rng, weights, images)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        info = {"description": "detforge synthetic COCO-train-scale", "year": 2017}
        licenses = [{"id": i, "name": f"License {i}", "url": ""} for i in range(1, 9)]
        records = [_image(int(i), IMAGE_SIZES_WH[s], rng) for i, s in zip(image_ids, sizes, strict=True)]
        f.write(b'{"info":' + orjson.dumps(info) + b',"licenses":' + orjson.dumps(licenses))
        f.write(b',"images":' + orjson.dumps(records))
        f.write(b',"annotations":[')
        first, next_id, chunk = True, 1, 4000
        for start in range(0, images, chunk):
            stop = min(start + chunk, images)
            anns = _annotations(
                rng,
                image_ids[start:stop],
                sizes[start:stop],
                per_image[start:stop],
                palettes[start:stop],
                next_id,
            )
            next_id += len(anns)
            if anns:
                f.write((b"" if first else b",") + orjson.dumps(anns)[1:-1])
                first = False
        cats = [{"supercategory": "thing", "id": i, "name": n} for i, n in zip(COCO_IDS, names, strict=True)]
        f.write(b'],"categories":' + orjson.dumps(cats) + b"}")
    tmp.replace(path)


def _class_weights(rng: np.random.Generator, names: list[str]) -> np.ndarray:
    weights = rng.pareto(1.2, size=len(names)) + 0.05
    weights /= weights.sum()
    sports_ball = COCO_NAMES.index("sports ball")
    rest = 1.0 - weights[0] - weights[sports_ball]
    weights *= (1.0 - 0.3 - 0.0074) / rest  # COCO's shares: person 30 %, sports ball 0.74 %
    weights[0], weights[sports_ball] = 0.3, 0.0074
    return weights / weights.sum()


def _palettes(rng: np.random.Generator, weights: np.ndarray, images: int) -> list[np.ndarray]:
    """The distinct classes present in each image (1–5 of them, frequent classes more often)."""
    distinct = np.minimum(1 + rng.poisson(1.5, size=images), 5)
    return [rng.choice(len(weights), size=int(d), replace=False, p=weights) for d in distinct]


def _image(image_id: int, size_wh: tuple[int, int], rng: np.random.Generator) -> dict[str, Any]:
    name = f"{image_id:012d}.jpg"
    return {
        "license": int(rng.integers(1, 9)),
        "file_name": name,
        "coco_url": f"http://images.cocodataset.org/train2017/{name}",
        "height": size_wh[1],
        "width": size_wh[0],
        "date_captured": "2013-11-14 11:18:45",
        "flickr_url": f"http://farm4.staticflickr.com/3153/{image_id}_3a3b1f2b1e_z.jpg",
        "id": image_id,
    }


def _annotations(
    rng: np.random.Generator,
    image_ids: np.ndarray,
    sizes: np.ndarray,
    counts: np.ndarray,
    palettes: list[np.ndarray],
    first_id: int,
) -> list[dict[str, Any]]:
    n = int(counts.sum())
    if n == 0:
        return []
    owner = np.repeat(np.arange(len(image_ids)), counts)
    wh = np.asarray(IMAGE_SIZES_WH, dtype=np.float64)[sizes[owner]]
    rx = rng.uniform(4, 0.3 * wh[:, 0])
    ry = rng.uniform(4, 0.3 * wh[:, 1])
    cx = rng.uniform(rx, wh[:, 0] - rx)
    cy = rng.uniform(ry, wh[:, 1] - ry)
    points = rng.integers(6, 47, size=n)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=(n, 50)), axis=1)
    jitter = rng.uniform(0.6, 1.0, size=(n, 50))
    xs = np.round(cx[:, None] + rx[:, None] * jitter * np.cos(angles), 2)
    ys = np.round(cy[:, None] + ry[:, None] * jitter * np.sin(angles), 2)
    valid = np.arange(50)[None, :] < points[:, None]
    x0, x1 = np.where(valid, xs, np.inf).min(1), np.where(valid, xs, -np.inf).max(1)
    y0, y1 = np.where(valid, ys, np.inf).min(1), np.where(valid, ys, -np.inf).max(1)
    flat = np.stack([xs, ys], axis=2).reshape(n, 100)
    area = np.round(np.pi * rx * ry * 0.64, 2)
    pick = (rng.uniform(size=n) * np.asarray([len(p) for p in palettes])[owner]).astype(np.int64)
    cats = [COCO_IDS[int(palettes[o][k])] for o, k in zip(owner.tolist(), pick.tolist(), strict=True)]
    out = []
    for i in range(n):
        k = int(points[i])
        out.append(
            {
                "segmentation": [flat[i, : 2 * k].tolist()],
                "area": float(area[i]),
                "iscrowd": 0,
                "image_id": int(image_ids[owner[i]]),
                "bbox": [
                    float(x0[i]),
                    float(y0[i]),
                    float(round(x1[i] - x0[i], 2)),
                    float(round(y1[i] - y0[i], 2)),
                ],
                "category_id": cats[i],
                "id": first_id + i,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Measurements (each one runs in a child process)


def peak_rss_mb() -> float:
    """The resident-set high-water mark of this process in MB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_orjson(path: Path, out: Path, *, gc_on: bool) -> dict[str, float]:
    start = time.perf_counter()
    if not gc_on:
        gc.disable()
    try:
        obj = orjson.loads(path.read_bytes())
        data = orjson.dumps(obj)
        out.write_bytes(data)
    finally:
        gc.enable()
    return {"seconds": time.perf_counter() - start}


def measure_detforge(path: Path, out: Path) -> dict[str, Any]:
    from detforge.data.curation import balance, filter_categories
    from detforge.data.formats.coco import load_coco, save_coco

    start = time.perf_counter()
    ds = load_coco(path)
    ds, filtered = filter_categories(ds, KEEP)
    ds, balanced = balance(ds, require_all=True)
    save_coco(ds, out)
    return {"seconds": time.perf_counter() - start, "ops": [filtered.summary, balanced.summary]}


def measure_phases(path: Path, out: Path) -> dict[str, Any]:
    """The detforge pipeline step by step, with the time the cyclic garbage collector took."""
    from detforge.data.curation import balance, filter_categories
    from detforge.data.formats.coco import decode_coco, encode_coco
    from detforge.data.validate import validate_dataset
    from detforge.files import atomic_write_bytes

    gc_seconds = [0.0]
    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_start[0]

    gc.callbacks.append(on_gc)
    phases: dict[str, float] = {}
    gc_by_phase: dict[str, float] = {}
    state: dict[str, Any] = {}

    steps = [
        ("read bytes", lambda: state.update(data=path.read_bytes())),
        ("decode", lambda: state.update(ds=decode_coco(state.pop("data"), source=str(path)))),
        ("validate", lambda: validate_dataset(state["ds"], source=str(path))),
        ("filter", lambda: state.update(ds=filter_categories(state["ds"], KEEP)[0])),
        ("balance", lambda: state.update(ds=balance(state["ds"], require_all=True)[0])),
        ("encode", lambda: state.update(data=encode_coco(state["ds"]))),
        ("write", lambda: atomic_write_bytes(out, state.pop("data"))),
    ]
    for name, step in steps:
        before, t0 = gc_seconds[0], time.perf_counter()
        step()
        phases[name] = time.perf_counter() - t0
        gc_by_phase[name] = gc_seconds[0] - before
    gc.callbacks.remove(on_gc)
    return {"seconds": sum(phases.values()), "phases": phases, "gc": gc_by_phase}


def child_main(kind: str, path: Path, out_dir: Path) -> None:
    out = out_dir / f"out-{kind}.json"
    if kind in ("detforge", "phases"):  # imports are not measured: the baseline is taken after them
        import detforge.data.curation  # noqa: F401
        import detforge.data.formats.coco  # noqa: F401
    baseline_mb = peak_rss_mb()
    if kind == "orjson-gc":
        result: dict[str, Any] = measure_orjson(path, out, gc_on=True)
    elif kind == "orjson-nogc":
        result = measure_orjson(path, out, gc_on=False)
    elif kind == "detforge":
        result = measure_detforge(path, out)
    elif kind == "phases":
        result = measure_phases(path, out)
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    result["baseline_mb"] = baseline_mb
    result["peak_mb"] = peak_rss_mb()
    result["out_mb"] = out.stat().st_size / 2**20
    out.unlink()
    print(json.dumps(result))


def run_child(kind: str, path: Path, out_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path), "--out", str(out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------
# The table


def print_table(results: dict[str, dict[str, Any]], file_mb: float) -> None:
    base_off, base_on = results["orjson, gc off"], results["orjson, gc on"]
    print(
        f"\n{'measurement':<18}{'seconds':>9}{'peak MB':>10}{'base MB':>9}{'× gc-off':>10}{'× gc-on':>9}"
        f"{'mem × gc-off':>14}{'peak ÷ file':>13}"
    )
    for name, r in results.items():
        if name == "detforge phases":
            continue
        seconds, peak = r["seconds"], r["peak_mb"]
        print(
            f"{name:<18}{seconds:>9.2f}{peak:>10.0f}{r['baseline_mb']:>9.0f}"
            f"{seconds / base_off['seconds']:>10.2f}"
            f"{seconds / base_on['seconds']:>9.2f}{peak / base_off['peak_mb']:>14.2f}{peak / file_mb:>13.2f}"
        )
    phases = results.get("detforge phases")
    if phases:
        print("\ndetforge phases (seconds, of which cyclic GC):")
        for name, seconds in phases["phases"].items():
            print(f"  {name:<12}{seconds:>7.2f}   gc {phases['gc'][name]:.2f}")
        print(f"  {'total':<12}{phases['seconds']:>7.2f}   peak {phases['peak_mb']:.0f} MB")
    if "ops" in results["detforge"]:
        print("\n" + "\n".join(results["detforge"]["ops"]))
    detforge = results["detforge"]
    ratio = detforge["seconds"] / base_off["seconds"]
    memory = detforge["peak_mb"] / file_mb
    print(
        f"\ntargets: time ≤ 1.3× gc-off orjson: {ratio:.2f} {'ok' if ratio <= 1.3 else 'MISSED'}; "
        f"peak ≤ 3× file: {memory:.2f} {'ok' if memory <= 3 else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=118_000)
    parser.add_argument("--annotations", type=int, default=860_000)
    parser.add_argument("--quick", action="store_true", help="5,000 images and 36,400 annotations")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "detforge-bench")
    parser.add_argument("--skip-phases", action="store_true", help="do not run the step-by-step measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.path, args.out)
        return
    if args.quick:
        args.images, args.annotations = 5_000, 36_400
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"synthetic-{args.images}-{args.annotations}.json"
    if not path.exists():
        print(f"writing {path} …", flush=True)
        t0 = time.perf_counter()
        write_synthetic(path, images=args.images, annotations=args.annotations)
        print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    file_mb = path.stat().st_size / 2**20
    print(f"{path}: {file_mb:.0f} MB, {args.images:,} images, {args.annotations:,} annotations", flush=True)
    kinds = {"orjson, gc on": "orjson-gc", "orjson, gc off": "orjson-nogc", "detforge": "detforge"}
    if not args.skip_phases:
        kinds["detforge phases"] = "phases"
    results = {}
    for name, kind in kinds.items():
        print(f"measuring {name} …", flush=True)
        results[name] = run_child(kind, path, args.out)
    print_table(results, file_mb)


if __name__ == "__main__":
    os.environ.setdefault("DETFORGE_PROGRESS", "0")
    main()
