"""Inference speed, accuracy and memory on CPU: eager fp32 vs bf16 + channels-last vs ONNX Runtime.

Usage::

    python benchmarks/inference.py                 # the full run (trains both models first: long on 2 cores)
    python benchmarks/inference.py --quick         # everything shrunk: a smoke run (~10 min on a busy 2-core CPU)
    python benchmarks/inference.py --weights fasterrcnn_mobilenet_v3_large_fpn=run/model_final.pt \\
        --weights maskrcnn_resnet50_fpn=model:shapes-r50@best-bbox-AP     # skip training a model
    python benchmarks/inference.py --frames 2000 --skip-models              # the video memory check only

For a Faster R-CNN MobileNet and a Mask R-CNN R50 it prints, in one run, the images per second of each path
(eager fp32, bf16 autocast + channels-last, ONNX Runtime when ``detforge.inference.export`` and
``detforge.inference.onnx_backend`` exist, ONNX Runtime on the export with int8 fully connected layers, and on
the static int8 export calibrated on 32 training images), each as a ratio to eager fp32, and the box AP each path
gets on the validation part of the synthetic shapes set.
Goal: the fastest path at least 2x eager fp32 with a box AP within 0.5 points of it. It also says whether
``predict --backend auto`` (``detforge.inference.auto``) picks, for that architecture, the fastest path that keeps
the AP among the paths it can take (not the static int8 export: it needs calibration images); when it does not,
``ONNX_FASTER`` or ``ONNX_INT8`` there needs updating.

Then it streams a synthetic video (``--frames``, 10,000 by default, 160x120) through
``detforge.inference.run.predict`` in a fresh process and prints how much the RSS grows after the first 1,000
frames: the current RSS (``/proc/self/statm``) at frame 1,000 against its highest afterwards, and the process's
peak RSS (``getrusage``) at both points (psutil is not a dependency). Goal: flat.

Models are trained on the shapes set first (``--train-iters``) unless ``--weights`` names a checkpoint. Speed
is measured one image at a time (the latency a server sees) on images decoded beforehand, after a warm-up.
Timings on a busy machine are noisy: trust the ratios more than the seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("fasterrcnn_mobilenet_v3_large_fpn", "maskrcnn_resnet50_fpn")
SCORE_THRESHOLD = 0.05  # COCO evaluation's usual floor; the same for every path
AP_TOLERANCE = 0.005  # 0.5 AP points
MIN_JUDGED_AP = 0.1  # below this (a barely trained model) AP differences between paths say nothing
SPEEDUP_GOAL = 2.0
CALIBRATION_IMAGES = 32  # training images the static int8 export is calibrated on
NOT_AUTO = {"onnxruntime int8-static"}  # paths predict --backend auto never takes (no calibration images there)
FLAT_MB = 10  # peak RSS growth after the first 1,000 frames that still counts as flat (allocator noise)
# The learn_shapes recipe (lr 0.02) diverges for a randomly initialised R50 within a few iterations.
TRAIN_OVERRIDES = {"maskrcnn_resnet50_fpn": {"lr": 0.01}}
# Fewer sampled RoIs and proposals: about 3x cheaper training steps on a CPU (README, configuration), same inference.
RCNN_SAMPLING = {"box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300}
FULL = {"images": 400, "size": 256, "train_iters": 600, "frames": 10_000, "warmup": 3}
QUICK = {"images": 30, "size": 160, "train_iters": 6, "frames": 200, "warmup": 1}


@dataclass
class PathResult:
    """One inference path of one model."""

    name: str
    images_per_s: float | None = None
    box_ap: float | None = None
    note: str = ""


@dataclass
class ModelReport:
    arch: str
    checkpoint: Path | str  # a path, URL or model: reference
    paths: list[PathResult] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# models


def train_model(arch: str, train_json: Path, out: Path, *, iters: int, size: int, seed: int) -> Path:
    """Train ``arch`` on the shapes training split with the learn_shapes recipe; return the final checkpoint."""
    import detforge
    from detforge.models.build import get_spec
    from learn_shapes import recipe

    raw = recipe(arch)
    raw["data"].update(train=str(train_json), val=None, min_size=[size], max_size=size)
    raw["train"].update(seed=seed, max_iter=iters, warmup_iters=min(50, max(1, iters // 4)), clip_grad_norm=10.0)
    raw["train"].update(TRAIN_OVERRIDES.get(arch, {}))
    if get_spec(arch).family == "rcnn":
        raw["model"].update(RCNN_SAMPLING)
    raw["output"]["dir"] = str(out)
    raw["tracking"] = {"backend": "none"}  # never the user's store: this is a benchmark
    started = time.perf_counter()
    result = detforge.train(raw)
    print(f"  trained {arch}: {iters} iterations in {time.perf_counter() - started:.0f} s", flush=True)
    assert result.final_checkpoint is not None
    return result.final_checkpoint


def inference_paths(
    checkpoint: Path | str, folder: Path, calibration: Sequence[Path]
) -> dict[str, Callable[[], tuple[Any, str]]]:
    """Loaders of each path's model (anything with ``predict(images) -> list[Detections]``) and a note;
    ``calibration``: training images for the static int8 export."""
    from detforge.inference.predictor import Predictor

    def eager() -> tuple[Any, str]:
        model = Predictor.load(checkpoint, score_threshold=SCORE_THRESHOLD, precision="fp32", channels_last=False)
        return model, ""

    def bf16() -> tuple[Any, str]:
        model = Predictor.load(checkpoint, score_threshold=SCORE_THRESHOLD, precision="bf16", channels_last=True)
        return model, ""

    return {
        "eager fp32": eager,
        "bf16 + channels-last": bf16,
        "onnxruntime": lambda: onnx_model(checkpoint, folder),
        "onnxruntime int8": lambda: onnx_model(checkpoint, folder, quantize="int8"),
        "onnxruntime int8-static": lambda: onnx_model(
            checkpoint, folder, quantize="int8-static", calibration=calibration
        ),
    }


def onnx_model(
    checkpoint: Path | str, folder: Path, *, quantize: str | None = None, calibration: Sequence[Path] = ()
) -> tuple[Any, str]:
    """The ONNX Runtime predictor of ``checkpoint`` (quantized as ``quantize``, calibrated on ``calibration``) and
    the export time; Unavailable (with the reason) if none."""
    from detforge.errors import DetforgeError

    try:
        from detforge.inference.export import export_model
        from detforge.inference.onnx_backend import OnnxPredictor
    except ImportError as exc:
        raise Unavailable(f"not available ({exc})") from None
    started = time.perf_counter()
    try:
        exported = export_model(
            checkpoint, folder / f"model{'.' + quantize if quantize else ''}.onnx", format="onnx",
            score_threshold=SCORE_THRESHOLD, quantize=quantize, calibration=calibration,
        )  # fmt: skip
    except DetforgeError as exc:  # report the failing path and measure the others
        raise Unavailable(f"export failed: {exc}") from None
    seconds = time.perf_counter() - started
    return OnnxPredictor.load(exported, score_threshold=SCORE_THRESHOLD), f"export {seconds:.0f} s"


class Unavailable(Exception):
    """A path that cannot run here (its reason is the message)."""


# ---------------------------------------------------------------------------------------------------------
# speed and AP


def measure(models: dict[str, Any], images: Sequence[Any], *, warmup: int) -> dict[str, tuple[float, list[Any]]]:
    """Images per second and detections of each model over ``images``, one image at a time.

    The paths take turns on every image, so a load change on a shared machine slows them all alike and the
    ratios stay fair.
    """
    for model in models.values():
        for image in images[:warmup]:
            model.predict([image])
    seconds = dict.fromkeys(models, 0.0)
    found: dict[str, list[Any]] = {name: [] for name in models}
    for image in images:
        for name, model in models.items():
            started = time.perf_counter()
            found[name].append(model.predict([image])[0])
            seconds[name] += time.perf_counter() - started
    return {name: (len(images) / seconds[name], found[name]) for name in models}


def box_ap(detections: Sequence[Any], class_names: Sequence[str], gt: Any) -> float:
    """COCO box AP of ``detections`` (one per image of ``gt``, in order)."""
    from detforge.evaluation.coco import evaluate_coco
    from detforge.inference.results import coco_results

    category_ids = _category_ids(class_names, gt)
    results: list[dict[str, Any]] = []
    for record, found in zip(gt.images, detections, strict=True):
        results += coco_results(found, image_id=record.id, category_ids=category_ids)
    return evaluate_coco(gt, results, iou_types=("bbox",)).metrics["bbox/AP"]


def _category_ids(class_names: Sequence[str], gt: Any) -> list[int]:
    by_name = {c.name: c.id for c in gt.categories}
    return [by_name[name] for name in class_names]


def benchmark_model(
    arch: str,
    checkpoint: Path | str,
    gt: Any,
    images: Sequence[Any],
    folder: Path,
    warmup: int,
    calibration: Sequence[Path],
) -> ModelReport:
    paths = inference_paths(checkpoint, folder, calibration)
    models, notes = {}, {}
    for name, load in paths.items():
        try:
            models[name], notes[name] = load()
        except Unavailable as exc:
            notes[name] = str(exc)
    measured = measure(models, images, warmup=warmup)
    report = ModelReport(arch, checkpoint)
    for name in paths:
        if name not in models:
            report.paths.append(PathResult(name, note=notes[name]))
            continue
        speed, found = measured[name]
        report.paths.append(PathResult(name, speed, box_ap(found, models[name].class_names, gt), notes[name]))
    return report


def print_reports(reports: Sequence[ModelReport], *, quick: bool) -> None:
    print(f"\n{'model':<36}{'path':<23}{'img/s':>8}{'x fp32':>8}{'box AP':>8}{'dAP pts':>9}  note")
    for report in reports:
        base = report.paths[0]
        for k, path in enumerate(report.paths):
            label = report.arch if k == 0 else ""
            if path.images_per_s is None or base.images_per_s is None or base.box_ap is None:
                print(f"{label:<36}{path.name:<23}{'-':>8}{'-':>8}{'-':>8}{'-':>9}  {path.note}")
                continue
            ratio = path.images_per_s / base.images_per_s
            delta = 100 * (path.box_ap - base.box_ap)  # type: ignore[operator]
            print(f"{label:<36}{path.name:<23}{path.images_per_s:>8.2f}{ratio:>8.2f}{path.box_ap:>8.4f}"
                  f"{delta:>+9.2f}  {path.note}")  # fmt: skip
    print()
    for report in reports:
        print(goal_line(report))
        print(auto_line(report))
    if quick:
        print("(a --quick run: the models trained for a few iterations only, so their AP means nothing)")


def goal_line(report: ModelReport) -> str:
    """Whether the fastest non-eager path that keeps the box AP within 0.5 points of eager fp32 is >= 2x eager fp32;
    a faster path outside that tolerance is named, not counted."""
    base, others = report.paths[0], [p for p in report.paths[1:] if p.images_per_s is not None]
    if not others or base.images_per_s is None or base.box_ap is None:
        return f"goal ({report.arch}): no path to compare"
    eager_ips, eager_ap = base.images_per_s, base.box_ap
    head = f"goal ({report.arch}, >= {SPEEDUP_GOAL:.0f}x eager fp32 within {100 * AP_TOLERANCE:.1f} box AP points)"
    if eager_ap < MIN_JUDGED_AP:
        fastest = max(others, key=lambda p: p.images_per_s or 0.0)
        speed = f"fastest {fastest.name} at {(fastest.images_per_s or 0.0) / eager_ips:.2f}x"
        return f"{head}: {speed}; eager box AP {eager_ap:.3f} is too low to judge accuracy (train longer): NOT JUDGED"

    def describe(path: PathResult) -> str:
        delta = 100 * ((path.box_ap or 0.0) - eager_ap)
        return f"{path.name} at {(path.images_per_s or 0.0) / eager_ips:.2f}x, box AP {delta:+.2f} points"

    keeping = [p for p in others if abs((p.box_ap or 0.0) - eager_ap) <= AP_TOLERANCE]
    best = max(keeping, key=lambda p: p.images_per_s or 0.0) if keeping else None
    faster = [p for p in others if p not in keeping and (p.images_per_s or 0.0) > (best.images_per_s if best else 0.0)]
    outside = f"; faster but outside the AP tolerance: {', '.join(describe(p) for p in faster)}" if faster else ""
    if best is None:
        return f"{head}: no path keeps the AP{outside}: NOT MET"
    met = (best.images_per_s or 0.0) / eager_ips >= SPEEDUP_GOAL
    return f"{head}: fastest that keeps the AP: {describe(best)}{outside}: {'MET' if met else 'NOT MET'}"


def auto_line(report: ModelReport) -> str:
    """Whether ``predict --backend auto`` (detforge.inference.auto) picks the fastest path that keeps the AP."""
    from detforge.inference.auto import ONNX_FASTER, ONNX_INT8
    from detforge.inference.predictor import cpu_supports_bf16

    base = report.paths[0]
    if base.box_ap is None:
        return f"auto ({report.arch}): no eager measurement to compare"
    keeping = [
        p
        for p in report.paths
        if p.images_per_s is not None and abs((p.box_ap or 0) - base.box_ap) <= AP_TOLERANCE and p.name not in NOT_AUTO
    ]
    best = max(keeping, key=lambda p: p.images_per_s or 0.0).name
    eager = "bf16 + channels-last" if cpu_supports_bf16() else "eager fp32"
    onnx = "onnxruntime int8" if report.arch in ONNX_INT8 else "onnxruntime"
    picked = onnx if report.arch in ONNX_FASTER else eager
    verdict = "agrees" if picked == best else "DISAGREES: update ONNX_FASTER or ONNX_INT8 in detforge/inference/auto.py"
    kept = f"fastest within {100 * AP_TOLERANCE:.1f} AP points of eager fp32"
    return f"auto ({report.arch}): picks {picked} for big jobs; {kept}: {best}: {verdict}"


# ---------------------------------------------------------------------------------------------------------
# memory over a long video


def write_video(path: Path, *, frames: int, size: tuple[int, int], seed: int) -> Path:
    """A synthetic ``frames``-frame video of shapes (``size`` = width, height), cycling 50 drawn images."""
    from detforge.data.synth import synth_image
    from detforge.inference.video import VideoWriter

    pictures = [synth_image(i, seed=seed, size=size)[0] for i in range(50)]
    with VideoWriter(path, fps=25) as writer:
        for index in range(frames):
            writer.write(pictures[index % len(pictures)])
    return path


class MemoryProbe:
    """Wraps a model for ``run.predict``: counts frames and reads the RSS after every call.

    Growth is the highest RSS after frame ``mark`` minus the RSS at ``mark`` (a leak persists, so sampling
    between calls catches it); the process's peak RSS (``getrusage``) is recorded too.
    """

    def __init__(self, model: Any, *, mark: int, frames: int, samples: int = 10) -> None:
        self.model, self.class_names = model, model.class_names
        self.mark, self.every = mark, max(1, frames // samples)
        self.frames = 0
        self.rss_at_mark_mb: float | None = None
        self.peak_at_mark_mb: float | None = None
        self.max_rss_after_mark_mb = 0.0
        self.rss_mb: list[tuple[int, float]] = []

    def predict(self, images: Sequence[Any]) -> list[Any]:
        found = self.model.predict(images)
        before, self.frames = self.frames, self.frames + len(images)
        rss = current_rss_mb()
        if before < self.mark <= self.frames:
            self.rss_at_mark_mb, self.peak_at_mark_mb = rss, peak_rss_mb()
        elif self.frames > self.mark:
            self.max_rss_after_mark_mb = max(self.max_rss_after_mark_mb, rss)
        if before // self.every != self.frames // self.every:
            self.rss_mb.append((self.frames, rss))
        return list(found)

    def describe(self) -> str:
        return str(self.model.describe())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def video_memory(
    checkpoint: Path | str, video: Path, out: Path, frames: int, mark: int, precision: str
) -> dict[str, Any]:
    """Run in a fresh process (so training and the other models do not set the peak): stream ``video``."""
    os.environ.setdefault("DETFORGE_PROGRESS", "0")
    from detforge.inference.predictor import Predictor
    from detforge.inference.run import predict

    probe = MemoryProbe(Predictor.load(checkpoint, precision=precision), mark=mark, frames=frames)  # type: ignore[arg-type]
    started = time.perf_counter()
    summary = predict(probe, [video], out, batch_size=2)
    return {
        "frames": summary.frames,
        "seconds": time.perf_counter() - started,
        "describe": probe.describe(),
        "rss_at_mark_mb": probe.rss_at_mark_mb,
        "max_rss_after_mark_mb": probe.max_rss_after_mark_mb,
        "peak_at_mark_mb": probe.peak_at_mark_mb,
        "peak_end_mb": peak_rss_mb(),
        "rss_mb": probe.rss_mb,
        "skipped": summary.skipped,
    }


def print_memory(result: dict[str, Any], *, mark: int, size: tuple[int, int]) -> None:
    rate = result["frames"] / result["seconds"]
    print(f"\nvideo: {result['frames']} frames of {size[0]}x{size[1]} through detforge.inference.run.predict "
          f"({result['describe']}) in {result['seconds']:.0f} s, {rate:.1f} frames/s")  # fmt: skip
    at_mark = result["rss_at_mark_mb"]
    if at_mark is None or result["frames"] <= mark:
        print(f"memory: not more than {mark} frames, no growth measured (peak RSS {result['peak_end_mb']:.0f} MB)")
        return
    growth = result["max_rss_after_mark_mb"] - at_mark
    peak_growth = result["peak_end_mb"] - result["peak_at_mark_mb"]
    verdict = "flat" if max(growth, peak_growth) < FLAT_MB else "GROWING"
    peaks = f"{result['peak_at_mark_mb']:.0f} -> {result['peak_end_mb']:.0f} MB"
    print(f"memory: RSS {at_mark:.0f} MB at frame {mark}, at most {result['max_rss_after_mark_mb']:.0f} MB after: "
          f"growth {growth:+.1f} MB; process peak RSS {peaks} ({peak_growth:+.1f} MB). "
          f"{verdict} (goal: flat, growth under {FLAT_MB} MB)")  # fmt: skip
    print("  RSS along the video: " + ", ".join(f"{n}: {mb:.0f} MB" for n, mb in result["rss_mb"]))
    for skipped in result["skipped"]:
        print(f"  skipped: {skipped}")


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shrink everything: a smoke run of a few minutes")
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help=f"architectures (default: {' '.join(MODELS)})"
    )
    parser.add_argument("--weights", action="append", default=[], metavar="ARCH=CHECKPOINT",
                        help="use this checkpoint (path, URL or model: ref) instead of training ARCH")  # fmt: skip
    parser.add_argument("--images", type=int, help="synthetic images, 80%% train / 20%% val")
    parser.add_argument("--size", type=int, help="side of the synthetic images and the models' input size (px)")
    parser.add_argument("--train-iters", type=int, help="training iterations of each model")
    parser.add_argument("--frames", type=int, help="frames of the synthetic video (default 10,000)")
    parser.add_argument("--video-precision", default="auto", help="precision of the video run (default: auto)")
    parser.add_argument("--skip-models", action="store_true", help="only the video memory check")
    parser.add_argument("--skip-video", action="store_true", help="no video memory check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key.replace("-", "_"), None) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DETFORGE_PROGRESS", "0")
    import torch

    from detforge.inference.predictor import cpu_supports_bf16

    weights = dict(item.split("=", 1) for item in args.weights)
    bf16 = "yes" if cpu_supports_bf16() else "no (bf16 is emulated: slow)"
    print(f"CPU, torch {torch.__version__} with {torch.get_num_threads()} threads, native bf16: {bf16}"
          f"{', quick run' if args.quick else ''}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        work = args.out or Path(tmp)
        checkpoints = run_models(args, work, weights) if not args.skip_models else {}
        if not args.skip_video:
            run_video(args, work, checkpoints.get(MODELS[0]) or weights.get(MODELS[0]))
    return 0


def run_models(args: argparse.Namespace, work: Path, weights: dict[str, str]) -> dict[str, Path | str]:
    from detforge.data.formats.coco import load_coco
    from detforge.data.images import load_image_rgb
    from learn_shapes import make_shapes

    train_json, val_json = make_shapes(work / "shapes", images=args.images, size=args.size, seed=args.seed)
    gt = load_coco(val_json)
    train = load_coco(train_json)
    calibration = [train.image_path(record) for record in train.images[:CALIBRATION_IMAGES]]
    images = [load_image_rgb(gt.image_path(record)) for record in gt.images]
    print(f"data: {args.images} synthetic shapes images of {args.size} px, {len(images)} for validation", flush=True)
    checkpoints: dict[str, Path | str] = {}
    reports = []
    for arch in args.models:
        given = weights.get(arch)
        checkpoints[arch] = given or train_model(
            arch, train_json, work / f"run_{arch}", iters=args.train_iters, size=args.size, seed=args.seed
        )
        folder = work / f"export_{arch}"
        folder.mkdir(parents=True, exist_ok=True)
        reports.append(benchmark_model(arch, checkpoints[arch], gt, images, folder, args.warmup, calibration))
    print_reports(reports, quick=args.quick)
    return checkpoints


def run_video(args: argparse.Namespace, work: Path, checkpoint: Path | str | None) -> None:
    if checkpoint is None:
        print(f"\nvideo: skipped (no {MODELS[0]} model: train it or give --weights {MODELS[0]}=...)")
        return
    size = (160, 120)
    mark = min(1000, max(1, args.frames // 10))
    started = time.perf_counter()
    video = write_video(work / "video" / "synthetic.mp4", frames=args.frames, size=size, seed=args.seed)
    print(f"\nvideo: wrote {args.frames} frames in {time.perf_counter() - started:.0f} s", flush=True)
    # spawn: a fresh interpreter whose peak RSS owes nothing to training or the models measured above
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(video_memory, checkpoint, video, work / "video_out", args.frames, mark, args.video_precision)
        result = job.result()
    print_memory(result, mark=mark, size=size)


if __name__ == "__main__":
    sys.exit(main())
