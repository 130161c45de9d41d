"""The paper's training recipe: AdamW, label smoothing, warm-up + cosine schedule, EMA.

- AdamW (Loshchilov & Hutter) with weight decay λ = 0.01 on every parameter.
- Cross-entropy with label smoothing ε = 0.1: target = (1−ε)·onehot + ε/K.
- Learning rate at optimizer step t of T, warm-up W steps (paper: 0.0002 → 0.002 over 3k
  iterations, cosine back to 0.0002):

      t < W:  lr(t) = lr₀ + (lr_max − lr₀) · t / W
      t ≥ W:  lr(t) = lr_min + ½ (lr_max − lr_min) · (1 + cos(π (t − W) / (T − W)))

  W defaults to min(3000, 5% of T), so short runs keep a proportionate warm-up.
- Optional EMA of the weights (and float buffers, i.e. BatchNorm statistics):
  θ_ema ← d_t·θ_ema + (1 − d_t)·θ, with d_t = min(d, (1 + t)/(10 + t)) so that the average
  does not lag far behind early in short runs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

PAPER_WARMUP_STEPS = 3000
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class Schedule:
    """lr(t) of the module docstring; ``factor(t)`` is lr(t)/lr_max for ``LambdaLR``."""

    total_steps: int
    warmup_steps: int
    lr_max: float
    lr_init: float
    lr_min: float

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr_init + (self.lr_max - self.lr_init) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(math.pi * progress))

    def factor(self, step: int) -> float:
        return self.lr(step) / self.lr_max


def default_warmup(total_steps: int) -> int:
    return max(1, min(PAPER_WARMUP_STEPS, round(WARMUP_FRACTION * total_steps)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; the optimizer's lr must be ``schedule.lr_max``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)


class EMA:
    """Exponential moving average of a model's floating-point state (see module doc)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for (_, ema), (_, cur) in zip(self.module.state_dict().items(),
                                      model.state_dict().items(), strict=True):
            if ema.dtype.is_floating_point:
                ema.lerp_(cur, 1.0 - d)
            else:
                ema.copy_(cur)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = state["steps"]
