"""A user's own model for the tests: MobileNetV2-style, no ``width_mult`` argument.

Depthwise convolutions and inverted residual blocks (expand 1x1 -> depthwise 3x3 -> project
1x1, with an identity addition where the shapes allow it) in the :class:`StagedNet` layout
(stem, stages, head), so early exits can attach to it; nothing else of chaincomp is used.
"""

from __future__ import annotations

from torch import Tensor, nn

from chaincomp.models import ClassifierHead, StagedNet


def conv_bn(
    c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.body = nn.Sequential(
            conv_bn(c_in, hidden),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class TinyMobileNet(StagedNet):
    """Three stages of two inverted residual blocks each (the second block of a stage adds its
    input back), widths 16 / 24 / 32, expansion 4, and a 1x1 conv to 64 before the head."""

    def __init__(self, in_channels: int = 3, num_outputs: int = 10, expand: int = 4):
        super().__init__()
        self.stem = conv_bn(in_channels, 16, 3)
        widths, strides = (16, 24, 32), (1, 2, 2)
        stages, c = [], 16
        for w, s in zip(widths, strides, strict=True):
            stages.append(
                nn.Sequential(InvertedResidual(c, w, s, expand), InvertedResidual(w, w, 1, expand))
            )
            c = w
        stages[-1].append(conv_bn(c, 64))
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(64, num_outputs)


class PlainNet(nn.Module):
    """A user's own model: no stages (so no exit points) and no ``width_mult`` argument."""

    def __init__(self, in_channels: int = 1, num_outputs: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, num_outputs),
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.body(x)


class AbortOnceNet(PlainNet):
    """:class:`PlainNet` whose first training forward kills its process (``os.abort``, like a
    crash in native code) while the file named by ``$CHAINCOMP_TEST_ABORT_FILE`` exists; it
    deletes the file first, so exactly one process dies."""

    def forward(self, x: Tensor) -> Tensor:
        import os

        marker = os.environ.get("CHAINCOMP_TEST_ABORT_FILE")
        if self.training and marker and os.path.exists(marker):
            os.remove(marker)
            os.abort()
        return super().forward(x)


class HangOnceNet(PlainNet):
    """:class:`PlainNet` whose first training forward never returns (as a kernel spinning in
    native code does) while the file named by ``$CHAINCOMP_TEST_HANG_FILE`` exists; it deletes
    the file first, so exactly one trial hangs."""

    def forward(self, x: Tensor) -> Tensor:
        import os
        import time

        marker = os.environ.get("CHAINCOMP_TEST_HANG_FILE")
        if self.training and marker and os.path.exists(marker):
            os.remove(marker)
            while True:
                time.sleep(1.0)
        return super().forward(x)
