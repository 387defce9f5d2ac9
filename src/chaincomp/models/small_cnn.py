"""A small CNN for 8x8 (digits) to 32x32 inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from chaincomp.models.base import ClassifierHead, ConvBNReLU, StagedNet, scaled


class SmallCNN(StagedNet):
    """stem conv -> one stage per width (two 3x3 conv-BN-ReLU, the first strided from the second
    stage on, as long as the feature map is at least 4 pixels wide) -> pool + linear."""

    def __init__(
        self,
        in_channels: int = 1,
        num_outputs: int = 10,
        input_size: int | Sequence[int] = 28,
        widths: Sequence[int] = (16, 32, 64),
        width_mult: float = 1.0,
    ):
        super().__init__()
        widths = [scaled(w, width_mult) for w in widths]
        size = min(input_size) if isinstance(input_size, Sequence) else int(input_size)
        self.stem = ConvBNReLU(in_channels, widths[0])
        stages = []
        c_in = widths[0]
        for i, w in enumerate(widths):
            stride = 2 if i > 0 and size >= 4 else 1
            size = -(-size // stride)
            stages.append(nn.Sequential(ConvBNReLU(c_in, w, stride), ConvBNReLU(w, w)))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(c_in, num_outputs)
