"""Validated optimizer + schedule settings (``conf/optim/*.yaml``) and their construction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from chaincomp.errors import ConfigError

OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(
        params,
        lr=c.lr,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        nesterov=c.nesterov and c.momentum > 0,
    ),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}

SCHEDULES: dict[
    str, Callable[[torch.optim.Optimizer, OptimConfig, int], torch.optim.lr_scheduler.LRScheduler]
] = {
    "cosine": lambda opt, c, steps: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(1, steps)
    ),
    "onecycle": lambda opt, c, steps: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=c.lr, total_steps=max(2, steps), pct_start=c.warmup_fraction or 0.25
    ),
    "constant": lambda opt, c, steps: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
}


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer ``name`` (sgd | adamw) and per-step ``schedule`` (cosine | onecycle | constant).

    ``warmup_fraction``: fraction of the steps with a linear warm-up before the cosine decay
    (for onecycle: its ``pct_start``, default 0.25).
    """

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    warmup_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError("optim.name", f"unknown optimizer {self.name!r}", sorted(OPTIMIZERS))
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                "optim.schedule", f"unknown schedule {self.schedule!r}", sorted(SCHEDULES)
            )
        if not self.lr > 0:
            raise ConfigError("optim.lr", f"{self.lr} is not positive", "> 0")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"{self.weight_decay} is negative", ">= 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(
                "optim.momentum", f"{self.momentum} out of range", "0 <= momentum < 1"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(
                "optim.warmup_fraction", f"{self.warmup_fraction} out of range", "[0, 1)"
            )

    def build(
        self, params: Iterable[nn.Parameter], total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Optimizer and a scheduler meant to be stepped once per optimizer step."""
        opt = OPTIMIZERS[self.name](params, self)
        warm = int(total_steps * self.warmup_fraction) if self.schedule != "onecycle" else 0
        sched = SCHEDULES[self.schedule](opt, self, total_steps - warm)
        if warm > 0:
            warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warm)
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, sched], milestones=[warm])
        return opt, sched
