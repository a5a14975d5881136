"""An exponential moving average of a model's weights (as in YOLOX / Ultralytics ModelEMA)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEma:
    """Keeps ``ema = d * ema + (1 - d) * weights`` after every step, with a warm-up of the decay.

    The effective decay is ``decay * (1 - exp(-updates / 2000))`` so early averages follow the weights closely.
    Buffers (BatchNorm statistics) are copied as they are.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9998) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 2000))
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(source[name].detach(), 1 - d)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates, self.decay = int(state["updates"]), float(state["decay"])
