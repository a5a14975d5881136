"""The loop itself, on a toy model whose maths is exact: events, accumulation, resume, stops, schedules."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from detforge.config import TrainConfig
from detforge.engine.callbacks import Callback, EarlyStopping, MetricsLog, StepOutput
from detforge.engine.checkpoint import Checkpointer, find_resume_checkpoint, load_checkpoint
from detforge.engine.ema import ModelEma
from detforge.engine.optim import build_optimizer, build_scheduler, scale_schedule
from detforge.engine.trainer import Trainer
from detforge.errors import CheckpointError, TrainingError


class ToyDetector(nn.Module):
    """Follows torchvision's contract (losses dict in train mode); the loss is a mean over images, with dropout
    so that the RNG state matters for resume."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats = torch.stack([im.mean(dim=(1, 2)) for im in images])
        pred = self.net(feats).squeeze(1)
        goal = torch.stack([t["goal"] for t in targets])
        return {"loss_a": ((pred - goal) ** 2).mean(), "loss_b": 0.1 * pred.abs().mean()}


def batches(batch_size: int, *, start: int = 0) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """An endless, index-determined stream of images: batch k of size b holds samples k*b .. k*b+b-1."""
    for k in itertools.count(start):
        gen = [torch.Generator().manual_seed(k * batch_size + i) for i in range(batch_size)]
        images = [torch.rand(3, 4, 4, generator=g) for g in gen]
        targets = [{"goal": im.sum() / 10} for im in images]
        yield images, targets


def make_trainer(
    tmp: Path | None = None,
    *,
    batch: int = 2,
    accumulate: int = 1,
    max_iter: int = 6,
    start_batch: int = 0,
    callbacks: list[Callback] | None = None,
) -> Trainer:
    torch.manual_seed(0)
    model = ToyDetector()
    cfg = TrainConfig(lr=0.05, warmup_iters=2, steps=[4])
    schedule = scale_schedule(cfg, eval_period=0)
    opt = build_optimizer(model, cfg, lr=schedule.lr)
    cbs = list(callbacks or [])
    if tmp is not None:
        cbs.append(Checkpointer(tmp, period=3, keep_last=1))
    return Trainer(
        model,
        opt,
        batches(batch, start=start_batch),
        max_iter=max_iter,
        accumulate=accumulate,
        scheduler=build_scheduler(opt, cfg, schedule),
        callbacks=cbs,
    )


class Recorder(Callback):
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def on_fit_start(self, trainer: Trainer) -> None:
        self.log.append(f"{self.name}:fit_start")

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        self.log.append(f"{self.name}:step{out.iteration}")
        if self.name == "eval" and out.iteration == 2:
            trainer.dispatch("on_eval_end", {"bbox/AP": 0.5})

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.log.append(f"{self.name}:eval{trainer.iteration}")

    def on_fit_end(self, trainer: Trainer) -> None:
        self.log.append(f"{self.name}:fit_end")


def test_every_callback_event_fires_in_list_order() -> None:
    log: list[str] = []
    make_trainer(max_iter=2, callbacks=[Recorder(log, "eval"), Recorder(log, "b")]).fit()
    assert log == [
        "eval:fit_start",
        "b:fit_start",
        "eval:step1",
        "b:step1",
        "eval:step2",
        "eval:eval2",
        "b:eval2",
        "b:step2",
        "eval:fit_end",
        "b:fit_end",
    ]


def test_accumulating_two_batches_of_one_equals_one_batch_of_two() -> None:
    a = make_trainer(batch=2, accumulate=1, max_iter=4)
    b = make_trainer(batch=1, accumulate=2, max_iter=4)
    b.model.eval()  # dropout off in both: the only difference left is how the batch is cut
    a.model.net[1].p = b.model.net[1].p = 0.0
    a.fit()
    b.fit()
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_resume_continues_from_the_saved_step_with_identical_weights(tmp_path: Path) -> None:
    straight = make_trainer(tmp_path / "a", max_iter=6)
    straight.fit()
    first = make_trainer(tmp_path / "b", max_iter=3)
    first.fit()
    torch.manual_seed(123)  # whatever happened in between must not matter
    ckpt = find_resume_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "model_0000003.pt"
    state = load_checkpoint(ckpt)
    resumed = make_trainer(tmp_path / "b", max_iter=6, start_batch=state["iteration"])
    resumed.load_state_dict(state)
    assert resumed.iteration == 3
    resumed.fit()
    for pa, pb in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert sorted(p.name for p in (tmp_path / "b").glob("model_*.pt")) == ["model_0000006.pt", "model_final.pt"]


def test_non_finite_loss_stops_with_a_clear_error_and_fit_end_still_runs(tmp_path: Path) -> None:
    log: list[str] = []
    trainer = make_trainer(tmp_path, max_iter=6, callbacks=[Recorder(log, "r")])
    trainer.fit()
    saved = (tmp_path / "model_0000006.pt").read_bytes()
    trainer.max_iter = 9
    with torch.no_grad():
        trainer.model.net[2].weight.fill_(math.inf)
    with pytest.raises(TrainingError, match="non-finite loss at iteration 7"):
        trainer.fit()
    assert log[-1] == "r:fit_end"
    assert (tmp_path / "model_0000006.pt").read_bytes() == saved


def test_early_stopping_ends_the_run_and_the_last_state_is_saved(tmp_path: Path) -> None:
    class FakeEval(Callback):
        def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
            trainer.dispatch("on_eval_end", {"bbox/AP": 1.0 if out.iteration == 1 else 0.5})

    stopper = EarlyStopping("bbox/AP", patience=2)
    trainer = make_trainer(tmp_path, max_iter=50, callbacks=[FakeEval(), stopper])
    trainer.fit()
    assert trainer.iteration == 3
    assert "early stopping" in (trainer.stop_reason or "")
    assert load_checkpoint(tmp_path / "model_0000003.pt")["iteration"] == 3


def test_best_checkpoint_follows_any_metric_and_direction(tmp_path: Path) -> None:
    values = {1: 0.9, 2: 0.4, 3: 0.6}

    class FakeEval(Callback):
        def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
            trainer.dispatch("on_eval_end", {"segm/loss": values[out.iteration]})

    ckpt = Checkpointer(tmp_path, period=10, best_metric="segm/loss", best_mode="min")
    make_trainer(max_iter=3, callbacks=[FakeEval(), ckpt]).fit()
    best = load_checkpoint(tmp_path / "model_best.pt")
    assert best["iteration"] == 2 and best["metadata"]["best"] == 0.4
    with pytest.raises(CheckpointError, match="not among the metrics"):
        Checkpointer(tmp_path, period=10, best_metric="bbox/AP").on_eval_end(None, {"segm/AP": 1.0})  # type: ignore[arg-type]


def test_metrics_log_drops_lines_of_an_interrupted_run_on_resume(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    make_trainer(max_iter=6, callbacks=[MetricsLog(log, period=1)]).fit()
    trainer = make_trainer(max_iter=6, callbacks=[MetricsLog(log, period=1)])
    trainer.iteration = 3
    trainer.fit()
    iterations = [int(line.split('"iteration": ')[1].split(",")[0]) for line in log.read_text().splitlines()]
    assert iterations == [1, 2, 3, 4, 5, 6]


def test_ema_follows_the_weights() -> None:
    trainer = make_trainer(max_iter=5)
    trainer.ema = ModelEma(trainer.model, decay=0.5)
    before = trainer.ema.module.net[0].weight.clone()
    trainer.fit()
    after = trainer.ema.module.net[0].weight
    assert not torch.equal(before, after)
    assert torch.allclose(after, trainer.model.net[0].weight, atol=0.05)


def test_lr_scaling_and_schedule() -> None:
    cfg = TrainConfig(
        lr=0.02,
        max_iter=9000,
        steps=[6000, 8000],
        warmup_iters=500,
        reference_batch_size=16,
        batch_size=2,
        accumulate=2,
        checkpoint_period=1000,
    )
    s = scale_schedule(cfg, eval_period=3000, world_size=2)
    assert s.factor == 0.5 and s.lr == 0.01
    assert (s.max_iter, s.steps, s.warmup_iters, s.checkpoint_period, s.eval_period) == (
        18000,
        (12000, 16000),
        1000,
        2000,
        6000,
    )
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg, lr=1.0)
    sched = build_scheduler(opt, cfg, s)
    lrs = [sched.lr_lambdas[0](i) for i in (0, 500, 1000, 11999, 12000, 16000)]  # type: ignore[attr-defined]
    assert lrs == pytest.approx([0.001, 0.5005, 1.0, 1.0, 0.1, 0.01])


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
