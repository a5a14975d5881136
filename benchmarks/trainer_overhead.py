"""Our Trainer against a bare torchvision training loop: same model, data, batch and optimizer, one run.

    python benchmarks/trainer_overhead.py [--iters 20] [--size 512] [--arch fasterrcnn_mobilenet_v3_large_fpn]

Prints seconds per iteration of each, their ratio (goal <= 1.03) and the share of the Trainer's step time spent
waiting for data with 2 workers (goal <= 5 %). The two loops alternate in rounds so machine noise hits both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detforge.config import DataConfig, ModelConfig, TrainConfig
from detforge.data.formats.coco import load_coco
from detforge.data.loader import build_train_loader
from detforge.data.synth import synth_shapes
from detforge.engine.callbacks import Callback, MetricsLog, ProgressBar, StepOutput
from detforge.engine.checkpoint import Checkpointer
from detforge.engine.optim import build_optimizer, build_scheduler, scale_schedule
from detforge.engine.trainer import Trainer
from detforge.models.build import build_model


class StepTimes(Callback):
    """Wall-clock time at the end of every step (so what callbacks cost counts) and each step's data wait."""

    def __init__(self) -> None:
        self.steps: list[StepOutput] = []
        self.ends: list[float] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.ends.append(time.perf_counter())

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        self.steps.append(out)
        self.ends.append(time.perf_counter())


def make(args: argparse.Namespace, data_path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    ds = load_coco(data_path)
    data_cfg = DataConfig(train=str(data_path), min_size=[args.size], max_size=args.size, num_workers=2)
    model = build_model(
        ModelConfig(arch=args.arch), num_classes=len(ds.categories), min_size=[args.size], max_size=args.size
    )
    train_cfg = TrainConfig(lr=0.01, warmup_iters=0)
    optimizer = build_optimizer(model, train_cfg, lr=0.01)
    loader = build_train_loader(ds, data_cfg, batch_size=args.batch, seed=0)
    return model, optimizer, loader


def bare_loop(args: argparse.Namespace, data_path: Path, iters: int) -> float:
    """The loop of torchvision's detection reference, minus logging: seconds per iteration after warm-up."""
    model, optimizer, loader = make(args, data_path)
    model.train()
    batches = iter(loader)  # type: ignore[call-overload]
    ends = []
    for _ in range(iters + args.warmup):
        images, targets = next(batches)
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
    return (ends[-1] - ends[args.warmup - 1]) / iters


def our_trainer(args: argparse.Namespace, data_path: Path, iters: int, out: Path) -> tuple[float, float]:
    """Seconds per iteration after warm-up, and the share of step time spent waiting for data."""
    model, optimizer, loader = make(args, data_path)
    train_cfg = TrainConfig(lr=0.01, warmup_iters=0, max_iter=iters + args.warmup)
    schedule = scale_schedule(train_cfg, eval_period=0)
    times = StepTimes()
    callbacks = [Checkpointer(out, period=10_000), MetricsLog(out / "metrics.jsonl", period=20), ProgressBar(), times]
    trainer = Trainer(
        model,
        optimizer,
        loader,
        max_iter=schedule.max_iter,  # type: ignore[arg-type]
        scheduler=build_scheduler(optimizer, train_cfg, schedule),
        callbacks=callbacks,
    )
    trainer.fit()
    steps = times.steps[args.warmup :]
    per_iter = (times.ends[-1] - times.ends[args.warmup]) / len(steps)
    return per_iter, sum(s.data_time for s in steps) / sum(s.step_time for s in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=15, help="timed iterations per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--arch", default="fasterrcnn_mobilenet_v3_large_fpn")
    args = parser.parse_args()
    os.environ.setdefault("DETFORGE_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = synth_shapes(Path(tmp) / "shapes", images=64, seed=0, size=(args.size, args.size))
        bare, ours, waits = [], [], []
        for r in range(args.rounds):
            bare.append(bare_loop(args, data_path, args.iters))
            per_iter, wait = our_trainer(args, data_path, args.iters, Path(tmp) / f"run{r}")
            ours.append(per_iter)
            waits.append(wait)
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"{args.arch} at {args.size} px, batch {args.batch}, 2 workers, {args.iters} iterations x {args.rounds} rounds"
    )
    print(f"  bare torchvision loop  {b:.3f} s/iter")
    print(f"  detforge Trainer       {o:.3f} s/iter  (with checkpointing, JSONL log, progress callbacks)")
    print(f"  ratio                  {o / b:.3f}  (goal <= 1.03)")
    print(f"  waiting for data       {100 * statistics.median(waits):.1f} % of step time  (goal <= 5 %)")


if __name__ == "__main__":
    main()
