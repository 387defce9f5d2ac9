"""CIFAR-style ResNets: 3x3 stem, no max-pool, BasicBlocks, widths 64..512 x width_mult."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from chaincomp.models.base import ClassifierHead, ConvBNReLU, StagedNet, scaled


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(StagedNet):
    """ResNet for small images. ``blocks`` per stage ([2,2,2,2] = ResNet-18, [3,4,6,3] =
    ResNet-34); stage widths ``widths`` x ``width_mult``; stride 2 at the start of every stage
    but the first."""

    def __init__(
        self,
        in_channels: int = 3,
        num_outputs: int = 10,
        blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        width_mult: float = 1.0,
        input_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(
                f"model.blocks ({len(blocks)}) and model.widths ({len(widths)}) differ in length"
            )
        widths = [scaled(w, width_mult) for w in widths]
        self.stem = ConvBNReLU(in_channels, widths[0])
        stages = []
        c_in = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            layers = [
                BasicBlock(c_in if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*layers))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(c_in, num_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each residual branch
            if isinstance(m, BasicBlock):
                torch.nn.init.zeros_(m.bn2.weight)
