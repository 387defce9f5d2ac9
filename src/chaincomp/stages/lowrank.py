"""L: low-rank factorization of convolutions (truncated SVD into two thinner layers).

A ``k x k`` convolution ``C_in -> C_out`` with weight ``W`` (reshaped to ``C_out x (C_in k k)``)
becomes a ``k x k`` convolution ``C_in -> r`` (same stride, padding, dilation) followed by a
``1 x 1`` convolution ``r -> C_out`` (the original bias), from the truncated SVD
``W ~ (U_r S_r^1/2)(S_r^1/2 V_r^T)``. The rank ``r`` keeps ``rank_ratio`` of the full rank, or
(with ``energy``) the smallest rank whose singular values hold that share of ``sum S^2``. A layer
is factored only when the pair has fewer MACs than the original (``r < k^2 C_in C_out /
(k^2 C_in + C_out)``); the first convolution (the stem, on the raw image) is left alone unless
``include_first``. The factors are plain ``nn.Conv2d`` in an ``nn.Sequential`` at the layer's
name, so pruning removes their channels (the rank too), quantization wraps them and the cost
model counts them. The net is then fine-tuned for ``epochs``.

Interactions are only the ones every stage gets from the contract: the factor layers are
announced with ``ctx.extended`` (a quantization in force quantizes them); a later distillation
drops the factorization (the student is a new network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chaincomp.cost import count_cost
from chaincomp.module import CompressibleModule
from chaincomp.stages.base import (
    FineTuneSettings,
    ReplayInfo,
    Stage,
    StageContext,
    StageRecord,
)


@dataclass(frozen=True)
class LowRankSettings(FineTuneSettings):
    """``rank_ratio``: kept share of each layer's full rank, (0, 1]; ``energy``: when set, keep
    the smallest rank holding this share of the squared singular values, (0, 1];
    ``include_first``: factor the first convolution too; ``min_channels``: skip convolutions
    with fewer output channels than this."""

    epochs: int = 2
    lr: float | None = 0.01
    rank_ratio: float = 0.5
    energy: float | None = None
    include_first: bool = False
    min_channels: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0 < self.rank_ratio <= 1, "rank_ratio", self.rank_ratio, "0 < value <= 1")
        self.check(
            self.energy is None or 0 < self.energy <= 1,
            "energy",
            self.energy,
            "null or 0 < value <= 1",
        )
        self.check(
            isinstance(self.min_channels, int) and self.min_channels >= 1,
            "min_channels",
            self.min_channels,
            "an integer >= 1",
        )


@dataclass
class LowRankRecord(StageRecord):
    """``ranks``: ``{layer name: rank}`` of every factored convolution (replay rebuilds the
    pairs); ``macs``: of the whole net before and after."""

    VERSION = 1

    settings: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    macs: list[float] = field(default_factory=list)


def break_even_rank(conv: nn.Conv2d) -> float:
    """Ranks below this give a factored pair with fewer MACs than ``conv``."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return k * conv.in_channels * conv.out_channels / (k * conv.in_channels + conv.out_channels)


def choose_rank(singular: torch.Tensor, s: LowRankSettings) -> int:
    """The rank kept for singular values ``singular`` (descending) under settings ``s``."""
    if s.energy is not None:
        share = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum()
        return int(torch.searchsorted(share, torch.tensor(s.energy, dtype=share.dtype))) + 1
    return max(1, math.ceil(s.rank_ratio * len(singular)))


def _factor_convs(conv: nn.Conv2d, rank: int) -> tuple[nn.Conv2d, nn.Conv2d]:
    # the geometry of the original conv (typed loosely by torch: tuples of any length)
    geometry: dict[str, Any] = {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "padding_mode": conv.padding_mode,
    }
    first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, bias=False, **geometry)  # type: ignore[arg-type]
    second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
    return first.to(conv.weight.device), second.to(conv.weight.device)


def factor_pair(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """The (uninitialised) ``k x k`` ``C_in -> rank`` and ``1 x 1`` ``rank -> C_out`` pair."""
    return nn.Sequential(*_factor_convs(conv, rank))


@torch.no_grad()
def factorize(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """``conv`` as a factored pair of rank ``rank`` from its truncated SVD."""
    w = conv.weight.detach().float().reshape(conv.out_channels, -1)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = sv[:rank].sqrt()
    first, second = _factor_convs(conv, rank)
    first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape))
    second.weight.copy_((u[:, :rank] * root).reshape(second.weight.shape))
    if conv.bias is not None and second.bias is not None:
        second.bias.copy_(conv.bias)
    return nn.Sequential(first, second)


class LowRank(Stage[LowRankSettings, LowRankRecord]):
    """Factor every eligible convolution by truncated SVD, then fine-tune."""

    name = "lowrank"
    letter = "L"
    Settings = LowRankSettings
    Record = LowRankRecord

    def apply(self, module: CompressibleModule, ctx: StageContext) -> LowRankRecord:
        s = self.settings
        net = module.net
        device = next(net.parameters()).device
        example = ctx.dm.example_input(1).to(device)
        before = count_cost(net, example)
        first = next((layer.name for layer in before.layers if layer.kind == "conv"), None)
        ranks: dict[str, int] = {}
        full: list[int] = []
        for name, m in list(net.named_modules()):
            if not isinstance(m, nn.Conv2d) or m.groups != 1 or m.kernel_size == (1, 1):
                continue
            if (name == first and not s.include_first) or m.out_channels < s.min_channels:
                continue
            w = m.weight.detach().float().reshape(m.out_channels, -1)
            rank = choose_rank(torch.linalg.svdvals(w), s)
            if rank >= break_even_rank(m):
                continue  # the pair would cost more than the layer
            net.set_submodule(name, factorize(m, rank))
            ranks[name] = rank
            full.append(min(w.shape))
        ctx.extended(module, [f"{n}.{i}" for n in ranks for i in (0, 1)])
        after = count_cost(net, example)
        self._summary = {
            "layers_factored": len(ranks),
            "mean_rank_ratio": sum(r / f for r, f in zip(ranks.values(), full, strict=True))
            / max(1, len(ranks)),
            "macs_reduction": 1 - after.macs / max(1, before.macs),
        }
        return LowRankRecord(settings=s.as_dict(), ranks=ranks, macs=[before.macs, after.macs])

    @classmethod
    def replay(cls, module: CompressibleModule, record: LowRankRecord, info: ReplayInfo) -> None:
        for name, rank in record.ranks.items():
            conv = module.net.get_submodule(name)
            assert isinstance(conv, nn.Conv2d)
            module.net.set_submodule(name, factor_pair(conv, rank))
