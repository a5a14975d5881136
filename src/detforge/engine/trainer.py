"""The training loop: a plain loop over optimizer steps, with callbacks for everything else."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from detforge.engine.callbacks import Callback, StepOutput
from detforge.engine.ema import ModelEma
from detforge.errors import TrainingError

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


class Trainer:
    """Runs ``max_iter`` optimizer steps of a torchvision detection model.

    Args:
        model: returns a dict of losses in train mode given ``(images, targets)`` (torchvision's contract);
            may be wrapped in DistributedDataParallel.
        optimizer: the optimizer over the model's trainable parameters.
        loader: an endless iterable of ``(images, targets)`` batches (lists of CxHxW float tensors and target
            dicts with ``boxes`` XYXY, ``labels``, optional ``masks``/``keypoints``).
        max_iter: the optimizer step at which training ends.
        scheduler: stepped once per optimizer step.
        accumulate: batches whose gradients are summed into one optimizer step.
        clip_grad_norm: clip the global gradient norm to this value.
        amp: "off", "fp16" (CUDA only) or "bf16" autocast.
        ema: an exponential moving average of the weights, updated after each step.
        callbacks: run in list order at each event.
        is_main: whether this process writes files (rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Iterable[Batch],
        *,
        max_iter: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        accumulate: int = 1,
        clip_grad_norm: float | None = None,
        amp: str = "off",
        device: torch.device | str = "cpu",
        ema: ModelEma | None = None,
        callbacks: Sequence[Callback] = (),
        is_main: bool = True,
    ) -> None:
        self.model, self.optimizer, self.loader, self.scheduler = model, optimizer, loader, scheduler
        self.max_iter, self.accumulate, self.clip_grad_norm = max_iter, accumulate, clip_grad_norm
        self.device = torch.device(device)
        self.amp_dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.ema, self.callbacks, self.is_main = ema, list(callbacks), is_main
        self.iteration = 0
        self.stop_reason: str | None = None
        self.failure: BaseException | None = None  # what ended fit() early, for on_fit_end
        self.last_evaluation: Any = None  # the latest EvalResult, set by the evaluation callback
        self._batches: Iterator[Batch] | None = None
        self._rng_per_rank: list[dict[str, Any]] | None = None

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without a DistributedDataParallel wrapper."""
        return self.model.module if hasattr(self.model, "module") else self.model  # type: ignore[return-value]

    def fit(self) -> None:
        """Train until ``max_iter`` or until a callback calls :meth:`stop`."""
        self.model.train()
        try:
            self.dispatch("on_fit_start")  # before iter(): a callback may wrap ``trainer.loader``
            self._batches = iter(self.loader)
            while self.iteration < self.max_iter and self.stop_reason is None:
                out = self.run_step()
                self.iteration += 1
                self.dispatch("on_step_end", out)
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            self.dispatch("on_fit_end")

    def run_step(self) -> StepOutput:
        """One optimizer step over ``accumulate`` batches; raises TrainingError on a non-finite loss."""
        start = time.perf_counter()
        data_time = 0.0
        totals: dict[str, float] = {}
        for micro in range(self.accumulate):
            fetched = time.perf_counter()
            images, targets = self._to_device(next(self._batches))  # type: ignore[arg-type]
            data_time += time.perf_counter() - fetched
            sync = micro == self.accumulate - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else cast(Any, self.model).no_sync(), self._autocast():
                losses = self.model(images, targets)
            loss = sum(losses.values())
            self._check_finite(loss, losses)
            self.scaler.scale(loss / self.accumulate).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / self.accumulate
        self._optimizer_step()
        lr = self.optimizer.param_groups[0]["lr"]
        return StepOutput(self.iteration + 1, totals, sum(totals.values()), lr, data_time, time.perf_counter() - start)

    def _optimizer_step(self) -> None:
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.unwrapped_model)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        images, targets = batch
        def move(value: Any) -> Any:
            return value.to(self.device, non_blocking=True) if torch.is_tensor(value) else value

        return [move(im) for im in images], [{k: move(v) for k, v in t.items()} for t in targets]

    def _check_finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        if math.isfinite(float(loss.detach())):
            return
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        raise TrainingError(
            f"non-finite loss at iteration {self.iteration + 1} ({terms}). The checkpoints written so far are "
            "intact. Lower train.lr, raise train.warmup_iters or set train.clip_grad_norm, then resume."
        )

    def gather_rng_states(self) -> None:
        """Collect every rank's RNG state for the next :meth:`state_dict` (call on all ranks at once: the
        checkpoint written by rank 0 then resumes each rank on its own random stream)."""
        state = _rng_state()
        if dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            self._rng_per_rank = states
        else:
            self._rng_per_rank = [state]

    def stop(self, reason: str) -> None:
        """Ask the loop to end after the current step (for early stopping and the like)."""
        self.stop_reason = reason

    def dispatch(self, event: str, *args: Any) -> None:
        """Call ``event`` on every callback, in list order."""
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedule, scaler, EMA, RNGs, callbacks."""
        return {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "iteration": self.iteration,
            "rng": self._rng_per_rank[0] if self._rng_per_rank else _rng_state(),
            "rng_per_rank": self._rng_per_rank or [_rng_state()],
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the model must have the same architecture)."""
        self.unwrapped_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.iteration = int(state["iteration"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        _set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
        for callback, cb_state in zip(self.callbacks, state.get("callbacks", []), strict=False):
            callback.load_state_dict(cb_state)


def _rng_state() -> dict[str, Any]:
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
