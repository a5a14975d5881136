"""Evaluation during and after training: run the model over a validation loader and score it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detforge.data.records import Dataset
from detforge.engine.callbacks import Callback, StepOutput
from detforge.engine.distributed import DistInfo, broadcast_object, gather_objects
from detforge.engine.trainer import Trainer
from detforge.evaluation.coco import CocoEvaluator, EvalResult, evaluate_coco, merge_results
from detforge.progress import track


@torch.no_grad()
def predict_batches(
    model: nn.Module, loader: Iterable[Any], *, device: torch.device, description: str = "Evaluating"
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Run ``model`` in eval mode over ``(images, targets)`` batches; predictions move to the CPU."""
    was_training = model.training
    model.eval()
    predictions: list[dict[str, torch.Tensor]] = []
    image_ids: list[int] = []
    try:
        for images, targets in track(loader, description, total=len(loader) if isinstance(loader, Sized) else None):
            outputs = model([im.to(device, non_blocking=True) for im in images])
            predictions += [{k: v.cpu() for k, v in out.items()} for out in outputs]
            image_ids += [int(t["image_id"]) for t in targets]
    finally:
        model.train(was_training)
    return predictions, image_ids


def evaluate_model(
    model: nn.Module,
    gt: Dataset,
    loader: Iterable[Any],
    *,
    iou_types: tuple[str, ...],
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    out_dir: Path | None = None,
) -> EvalResult | None:
    """COCO metrics of ``model`` on ``gt``; each rank predicts its shard, rank 0 scores (others get None)."""
    evaluator = CocoEvaluator(gt, iou_types=iou_types)
    predictions, image_ids = predict_batches(model, loader, device=device)
    evaluator.update(predictions, image_ids)
    shards = gather_objects(evaluator.results(), dist_info)
    if not dist_info.is_main:
        return None
    result = evaluate_coco(gt, merge_results(shards), iou_types=iou_types)
    if out_dir is not None:
        result.save(out_dir)
    return result


class EvalCallback(Callback):
    """Evaluates every ``period`` steps (0: only at the end) and at the last step, then dispatches
    ``on_eval_end`` with the metrics to every callback (all ranks get rank 0's numbers).

    The EMA weights are evaluated when the trainer keeps an EMA.
    """

    def __init__(
        self,
        run_eval: Callable[[nn.Module, int], EvalResult | None],
        *,
        period: int,
        dist_info: DistInfo = DistInfo(),
    ) -> None:
        self.run_eval, self.period, self.dist_info = run_eval, period, dist_info
        self.last: EvalResult | None = None

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        due = self.period and out.iteration % self.period == 0
        if not (due or out.iteration >= trainer.max_iter):
            return
        model = trainer.ema.module if trainer.ema is not None else trainer.unwrapped_model
        result = self.run_eval(model, out.iteration)
        metrics = broadcast_object(result.metrics if result is not None else None, self.dist_info)
        self.last = trainer.last_evaluation = result
        trainer.dispatch("on_eval_end", metrics)
