"""`detforge demo`: the whole lifecycle on the embedded default (synthetic shapes, local MLflow store).

1. synthesise shapes and log them as a dataset version;
2. curate with lineage: filter to two classes, balance, split (each a version recording its parent);
3. train stage 1 (Mask R-CNN, ResNet-18 FPN) with evaluation, prediction images and model versions;
4. evaluate the best version with the HTML report, recorded and linked;
5. a newer dataset version (more images, merged) and stage 2 fine-tuned from ``model:…@best-…``;
6. predict on held-out images and on a synthesised video;
7. print the AP table, the lineage tree, where every output is, and the ``detforge ui`` command.

Everything goes into ``workdir``: the store (``workdir/.detforge``), the data, the runs and the predictions.
``quick`` runs the same path at toy sizes in about a minute (for the tests); its numbers mean nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from detforge.data.curation import Operation, balance, filter_categories, merge, split
from detforge.data.formats.coco import load_coco, save_coco
from detforge.data.images import load_image_rgb
from detforge.data.synth import synth_shapes

__all__ = ["DemoResult", "run_demo"]

CLASSES = ["circle", "square"]


@dataclass(frozen=True)
class Recipe:
    """Sizes and schedule of one demo flavour."""

    images: int
    extra_images: int
    image_size: int  # of the synthetic images
    train_size: int  # the model's input size (R-CNN features are coarse: small images train better upscaled)
    stage1_iters: int
    stage2_iters: int
    eval_period: int
    batch_size: int
    lr: float
    video_frames: int


FULL = Recipe(images=900, extra_images=240, image_size=192, train_size=320, stage1_iters=500, stage2_iters=100,
              eval_period=500, batch_size=4, lr=0.001, video_frames=48)  # fmt: skip
QUICK = Recipe(images=24, extra_images=8, image_size=96, train_size=96, stage1_iters=4, stage2_iters=2, eval_period=2,
               batch_size=2, lr=0.001, video_frames=6)  # fmt: skip
ARCH = "maskrcnn_resnet18_fpn"
# Cheaper R-CNN steps on a CPU (README, "Cheaper R-CNN training on a CPU"): fewer sampled RoIs and proposals,
# narrower heads; BatchNorm in the box head's convs, the FPN and the mask head, which learn faster from random weights.
CPU_RCNN = {"box_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
            "box_head_num_conv": 4, "box_head_conv_dim": 64, "box_head_fc_dim": 256, "mask_head_conv_dim": 128,
            "mask_head_num_conv": 2, "fpn_norm": "bn", "mask_head_norm": "bn"}  # fmt: skip


@dataclass
class DemoResult:
    """Where the demo put things, by name, and what it measured."""

    workdir: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def run_demo(workdir: str | Path, *, quick: bool = False, console: Console | None = None) -> DemoResult:
    """Run the demo in ``workdir`` (created if needed) and return where every output is."""
    console = console or Console()
    recipe = QUICK if quick else FULL
    result = DemoResult(Path(workdir).resolve())
    result.workdir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("DETFORGE_WORKDIR")
    os.environ["DETFORGE_WORKDIR"] = str(result.workdir)  # the embedded store lives in workdir/.detforge
    try:
        _datasets(result, recipe, console)
        _stage1(result, recipe, console)
        _evaluate(result, recipe, console)
        _stage2(result, recipe, console)
        _predict(result, recipe, console)
        _summary(result, console)
    finally:
        if previous is None:
            os.environ.pop("DETFORGE_WORKDIR", None)
        else:
            os.environ["DETFORGE_WORKDIR"] = previous
    return result


def _log(name: str, path: Path, *, parents: list[str] = (), op: Operation | None = None) -> str:  # type: ignore[assignment]
    from detforge.tracking.datasets import log_dataset

    operation = {"name": op.name, "params": op.params, "summary": op.summary} if op else None
    return log_dataset(name, path, parents=parents, operation=operation).ref


def _datasets(result: DemoResult, recipe: Recipe, console: Console) -> None:
    work, out, refs = result.workdir, result.outputs, result.refs
    console.rule("1. Synthetic shapes, logged as a dataset version")
    size = (recipe.image_size, recipe.image_size)
    out["synthetic"] = synth_shapes(work / "data" / "shapes", images=recipe.images, seed=0, size=size)
    refs["shapes"] = _log("shapes", out["synthetic"])
    console.print(f"{refs['shapes']}: {load_coco(out['synthetic']).summary()}", highlight=False)

    console.rule("2. Curation with lineage: filter, balance, split")
    shapes = load_coco(out["synthetic"])
    filtered, op = filter_categories(shapes, CLASSES)
    out["filtered"] = save_coco(filtered, work / "data" / "filtered.json")
    refs["filtered"] = _log("shapes", out["filtered"], parents=[refs["shapes"]], op=op)
    console.print(f"{refs['filtered']}: {op.summary}", highlight=False)
    balanced, op = balance(filtered, require_all=True)
    out["balanced"] = save_coco(balanced, work / "data" / "balanced.json")
    refs["balanced"] = _log("shapes", out["balanced"], parents=[refs["filtered"]], op=op)
    console.print(f"{refs['balanced']}: {op.summary}", highlight=False)
    parts, op = split(balanced, [0.8, 0.2], seed=0)
    for part, ds in parts.items():
        out[part] = save_coco(ds, work / "data" / f"{part}.json")
        part_op = Operation(op.name, {**op.params, "part": part}, op.summary)
        refs[part] = _log(f"shapes-{part}", out[part], parents=[refs["balanced"]], op=part_op)
        console.print(f"{refs[part]}: {len(ds.images)} images", highlight=False)


def _train_config(result: DemoResult, recipe: Recipe, *, stage: int) -> dict[str, Any]:
    size = recipe.train_size
    iters = recipe.stage1_iters if stage == 1 else recipe.stage2_iters
    return {
        "data": {"train": result.refs["train" if stage == 1 else "train2"], "val": result.refs["val"],
                 "min_size": [size], "max_size": size, "num_workers": 0 if recipe is QUICK else 2},
        "model": {"arch": ARCH, "score_threshold": 0.05, **CPU_RCNN,
                  **({"weights": "model:shapes-stage1@best-segm/AP"} if stage == 2 else {})},
        "train": {"max_iter": iters, "batch_size": recipe.batch_size, "lr": recipe.lr if stage == 1 else recipe.lr / 4,
                  # a constant lr, divided by 10 for the last eighth: from random weights, a cosine decays too early
                  "optimizer": "adamw", "scheduler": "multistep", "steps": [iters * 7 // 8],
                  "warmup_iters": min(50, iters // 4), "clip_grad_norm": 10.0, "checkpoint_period": iters,
                  "log_period": 10, "amp": "auto", "channels_last": True},  # bf16 where the CPU computes it natively
        "eval": {"period": recipe.eval_period if stage == 1 else iters, "best_metric": "bbox/AP50",
                 "best_metrics": ["segm/AP"]},
        "tracking": {"experiment": "demo", "model_name": f"shapes-stage{stage}", "num_eval_images": 4},
        "output": {"dir": str(result.workdir / "runs" / f"stage{stage}")},
    }  # fmt: skip


def _stage1(result: DemoResult, recipe: Recipe, console: Console) -> None:
    from detforge.api import train

    console.rule("3. Stage 1: Mask R-CNN (ResNet-18 FPN) from scratch, tracked")
    trained = train(_train_config(result, recipe, stage=1))
    result.outputs["stage1"] = trained.output_dir
    result.metrics.update({f"stage1/{k}": v for k, v in trained.metrics.items() if k.count("/") == 1})


def _evaluate(result: DemoResult, recipe: Recipe, console: Console) -> None:
    from detforge.api import evaluate

    console.rule("4. Evaluation of the best stage-1 version, with the HTML report")
    cfg = _train_config(result, recipe, stage=1)
    cfg["model"]["weights"] = "model:shapes-stage1@best-bbox-AP50"
    cfg["output"]["dir"] = str(result.workdir / "evaluation")
    evaluated = evaluate(cfg)
    console.print(evaluated.table())
    result.outputs["report"] = result.workdir / "evaluation" / "eval" / "report.html"
    result.metrics.update({f"eval/{k}": v for k, v in evaluated.metrics.items()})


def _stage2(result: DemoResult, recipe: Recipe, console: Console) -> None:
    from detforge.api import train

    console.rule("5. A newer dataset version, and stage 2 fine-tuned from model:shapes-stage1@best-segm-AP")
    work, out, refs = result.workdir, result.outputs, result.refs
    extra_path = synth_shapes(work / "data" / "extra", images=recipe.extra_images, seed=1,
                              size=(recipe.image_size, recipe.image_size))  # fmt: skip
    extra, _ = filter_categories(load_coco(extra_path), CLASSES)
    merged, op = merge([load_coco(out["train"]), extra])
    out["train2"] = save_coco(merged, work / "data" / "train2.json")
    refs["train2"] = _log("shapes-train", out["train2"], parents=[refs["train"]], op=op)
    console.print(f"{refs['train2']}: {op.summary}", highlight=False)
    trained = train(_train_config(result, recipe, stage=2))
    result.outputs["stage2"] = trained.output_dir
    result.metrics.update({f"stage2/{k}": v for k, v in trained.metrics.items() if k.count("/") == 1})


def _predict(result: DemoResult, recipe: Recipe, console: Console) -> None:
    from detforge.inference.run import predict
    from detforge.inference.video import VideoWriter

    console.rule("6. Predictions on held-out images and a synthesised video")
    work = result.workdir
    size = (recipe.image_size, recipe.image_size)
    held_out = synth_shapes(work / "data" / "held-out", images=4, seed=2, size=size)
    images = sorted((held_out.parent / "images").glob("*.png"))
    video = work / "data" / "shapes.mp4"
    with VideoWriter(video, fps=12) as writer:
        for k in range(recipe.video_frames):  # the held-out images panning left to right
            strip = np.concatenate([np.asarray(load_image_rgb(p)) for p in images], axis=1)
            offset = k * (strip.shape[1] - size[0]) // max(1, recipe.video_frames - 1)
            writer.write(strip[:, offset : offset + size[0]])
    summary = predict("model:shapes-stage2@latest", [*images, video], work / "predictions", score_threshold=0.5)
    for line in summary.lines():
        console.print(line, highlight=False)
    result.outputs["predictions"] = work / "predictions"


def _summary(result: DemoResult, console: Console) -> None:
    from detforge.tracking.lineage import build_lineage, lineage_tree

    console.rule("7. Lineage of the final model")
    console.print(lineage_tree(build_lineage("model:shapes-stage2@latest")))
    console.rule("Outputs")
    for name, path in result.outputs.items():
        console.print(f"  {name:12s} {path}", highlight=False)
    shown = {k: v for k, v in result.metrics.items() if k.endswith(("bbox/AP50", "segm/AP50", "bbox/AP"))}
    console.print("  " + ", ".join(f"{k}={v:.3f}" for k, v in shown.items()), highlight=False)
    console.print(f"\nBrowse everything: cd {result.workdir} && detforge ui", highlight=False, soft_wrap=True)
