"""The staged-network contract shared by every built-in model."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> linear. Serves both the task head and exit heads."""

    def __init__(self, in_channels: int, num_outputs: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class StagedNet(nn.Module):
    """A CNN made of ``stem`` -> ``stages[0..S-1]`` -> ``head``.

    Contract:
    - ``forward(x)`` equals ``head(stages[S-1](...stages[0](stem(x))))``, shape (B, num_outputs).
    - ``exit_points()`` names the stage outputs (``"stages.0"``, ...) where exit heads may attach;
      ``exit_channels()`` gives their channel counts (read from the live modules, so they follow
      pruning).
    - ``forward_stages(x)`` returns the output of every stage, in order.
    - Plain ``nn.Module`` children only, so Torch-Pruning can trace it.
    """

    stem: nn.Module
    stages: nn.ModuleList
    head: ClassifierHead

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        outs = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def exit_points(self) -> list[str]:
        return [f"stages.{i}" for i in range(len(self.stages))]

    def exit_channels(self) -> list[int]:
        channels = []
        for stage in self.stages:
            convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
            bns = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
            channels.append(bns[-1].num_features if bns else convs[-1].out_channels)
        return channels

    @property
    def num_outputs(self) -> int:
        return self.head.fc.out_features


def scaled(width: int, mult: float) -> int:
    """Channel count ``width * mult`` rounded, at least 1."""
    return max(1, round(width * mult))


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
