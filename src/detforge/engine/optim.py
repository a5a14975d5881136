"""Optimizers, the warm-up + decay schedule, and linear scaling to the real batch size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from detforge.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    """The schedule in optimizer steps after scaling to the real batch (see :func:`scale_schedule`)."""

    lr: float
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    checkpoint_period: int
    eval_period: int
    factor: float

    def describe(self) -> str:
        return (
            f"lr {self.lr:g}, max_iter {self.max_iter}, steps {list(self.steps)}, warmup {self.warmup_iters}, "
            f"checkpoint every {self.checkpoint_period}, eval every {self.eval_period or 'end'}"
        )


def scale_schedule(train: TrainConfig, *, eval_period: int, world_size: int = 1) -> Schedule:
    """Scale lr and step counts linearly with the real batch (Detectron.pytorch's rule).

    With ``train.reference_batch_size`` set, the effective batch ``batch_size * accumulate * world_size`` gives
    ``factor = effective / reference``; the lr is multiplied by it and iteration counts divided by it, so a
    schedule written for 16 images per step means the same number of epochs on 2. Without it, nothing changes.
    """
    effective = train.batch_size * train.accumulate * world_size
    factor = effective / train.reference_batch_size if train.reference_batch_size else 1.0

    def steps(n: int) -> int:
        return max(1, round(n / factor)) if n else 0

    return Schedule(
        lr=train.lr * factor,
        max_iter=steps(train.max_iter),
        steps=tuple(steps(s) for s in train.steps),
        warmup_iters=steps(train.warmup_iters),
        checkpoint_period=steps(train.checkpoint_period),
        eval_period=steps(eval_period),
        factor=factor,
    )


def build_optimizer(model: nn.Module, train: TrainConfig, *, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over trainable parameters; no weight decay on norms and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=train.momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, schedule: Schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``warmup_factor`` to 1, then multistep, cosine or constant."""

    def factor(it: int) -> float:
        warm = 1.0
        if it < schedule.warmup_iters:
            alpha = it / schedule.warmup_iters
            warm = train.warmup_factor * (1 - alpha) + alpha
        if train.scheduler == "multistep":
            return warm * train.gamma ** sum(it >= s for s in schedule.steps)
        if train.scheduler == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(it, schedule.max_iter) / schedule.max_iter))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
