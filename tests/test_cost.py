"""Cost accounting: hand-computed nets, the independent FLOP counter, the reference ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from chaincomp.cost import bits_of, count_cost, expected_cost
from chaincomp.models import VGG, VGG_STAGES, ResNet, SmallCNN


class QuantConv(nn.Conv2d):
    """A conv subclass carrying bit widths, like the quantize stage's modules."""

    weight_bits = 4
    act_bits = 8


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)  # 8x8 out
        self.c2 = QuantConv(4, 8, 3, stride=2, padding=1)  # 4x4 out, with bias
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)  # 4x4 out, grouped
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c3(self.c2(self.c1(x)))
        x = self.c3(x)  # called twice: counted twice
        return self.fc(self.bn(x).mean((2, 3)))


def test_hand_computed_costs() -> None:
    report = count_cost(Tiny(), (1, 1, 8, 8))
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["c1"].macs == 9 * 1 * 4 * 64
    assert by_name["c2"].macs == 9 * 4 * 8 * 16
    assert by_name["c3"].macs == 2 * (9 * 4 * 8 * 16)
    assert by_name["c3"].calls == 2
    assert by_name["fc"].macs == 80
    assert report.macs == 2304 + 4608 + 9216 + 80
    assert (by_name["c2"].weight_bits, by_name["c2"].act_bits) == (4, 8)
    assert by_name["c2"].bitops == 4608 * 4 * 8
    assert report.bitops == (2304 + 9216 + 80) * 32 * 32 + 4608 * 32
    # params: c1 36, c2 288+8, c3 8*4*9=288, bn 16, fc 80+10
    assert report.params == 36 + 296 + 288 + 16 + 90
    # size: c2's weight at 4 bits, its bias and every other parameter at 32 bits
    assert report.size_bits == 288 * 4 + (36 + 8 + 288 + 16 + 90) * 32
    assert report.sum(["c1", "c2"], "macs") == 2304 + 4608
    assert report.sum(["c"], "macs") == 0  # prefixes match whole name components only


def test_batch_size_does_not_change_per_sample_cost() -> None:
    net = SmallCNN(1, 10, 28)
    assert count_cost(net, (1, 1, 28, 28)).macs == count_cost(net, (5, 1, 28, 28)).macs


def test_bits_default_to_float() -> None:
    assert bits_of(nn.Conv2d(1, 1, 1)) == (32, 32)
    assert bits_of(QuantConv(1, 1, 1)) == (4, 8)


@pytest.mark.parametrize(
    "net,shape",
    [
        (ResNet(3, 10, (2, 2, 2, 2)), (1, 3, 32, 32)),
        (ResNet(3, 10, (3, 4, 6, 3)), (1, 3, 32, 32)),
        (VGG(3, 10, VGG_STAGES["vgg16"]), (1, 3, 32, 32)),
        (SmallCNN(1, 10, 28), (1, 1, 28, 28)),
        (ResNet(1, 2, (1, 1, 1, 1), width_mult=0.25), (1, 1, 28, 28)),
    ],
    ids=["resnet18", "resnet34", "vgg16", "small_cnn", "resnet10-regression"],
)
def test_float_macs_match_torch_flop_counter(net: nn.Module, shape: tuple[int, ...]) -> None:
    ours = count_cost(net, shape).macs
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(shape))
    theirs = counter.get_total_flops() / 2
    assert ours == pytest.approx(theirs, rel=0.01)


def test_reference_resnets() -> None:
    r18 = count_cost(ResNet(3, 10, (2, 2, 2, 2)), (1, 3, 32, 32))
    assert r18.macs == pytest.approx(0.556e9, rel=0.02)
    assert r18.params == pytest.approx(11.17e6, rel=0.02)
    assert r18.bitops == r18.macs * 32 * 32
    r34 = count_cost(ResNet(3, 10, (3, 4, 6, 3)), (1, 3, 32, 32))
    assert r34.macs == pytest.approx(1.16e9, rel=0.02)
    assert r34.params == pytest.approx(21.3e6, rel=0.02)


def test_expected_cost_of_exits() -> None:
    assert expected_cost([1.0, 0.0, 0.0], [10.0, 20.0, 30.0]) == 10.0
    assert expected_cost([0.0, 0.0, 1.0], [10.0, 20.0, 30.0]) == 30.0
    assert expected_cost([0.5, 0.25, 0.25], [10.0, 20.0, 40.0]) == pytest.approx(5 + 5 + 10)
    with pytest.raises(ValueError, match="sum to 1"):
        expected_cost([0.5, 0.4], [1.0, 2.0])
    with pytest.raises(ValueError, match="must match"):
        expected_cost([1.0], [1.0, 2.0])


def test_counting_restores_training_mode() -> None:
    net = SmallCNN(1, 10, 8)
    net.train()
    count_cost(net, (1, 1, 8, 8))
    assert net.training
