"""VGG with BatchNorm for small images (a max-pool ends each stage while the map is >= 2 px)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from chaincomp.models.base import ClassifierHead, ConvBNReLU, StagedNet, scaled

VGG_STAGES = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


class VGG(StagedNet):
    """``stages``: conv widths per stage (see VGG_STAGES); each stage ends with a 2x2 max-pool as
    long as the feature map is at least 2 pixels wide; global-average-pool + linear head."""

    def __init__(
        self,
        in_channels: int = 3,
        num_outputs: int = 10,
        stages: Sequence[Sequence[int]] = VGG_STAGES["vgg11"],
        width_mult: float = 1.0,
        input_size: int | Sequence[int] = 32,
    ):
        super().__init__()
        size = min(input_size) if isinstance(input_size, Sequence) else int(input_size)
        self.stem = nn.Identity()
        c_in, built = in_channels, []
        for widths in stages:
            layers: list[nn.Module] = []
            for w in widths:
                layers.append(ConvBNReLU(c_in, scaled(w, width_mult)))
                c_in = scaled(w, width_mult)
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            built.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(built)
        self.head = ClassifierHead(c_in, num_outputs)
