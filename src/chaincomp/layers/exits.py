"""Exit heads and :class:`ExitNet`: a staged backbone with heads that let samples leave early.

:class:`ExitNet` wraps a :class:`~chaincomp.models.StagedNet` (``backbone``) and adds one head per
exit point. Its ``forward``:

- training mode: runs every head (``forward_all``), keeps the exit outputs for
  ``auxiliary_loss`` (each exit head's task loss, weighted by ``exit_weight``; with ``distill``
  set, mixed with distillation from the final output of the same forward) and returns the
  final output;
- eval mode: **dynamic inference**: at each exit the samples whose confidence (``task.confidence``
  in (0, 1]: max softmax probability, or 1 / (1 + predicted std in degrees) for rotation) is
  ``>= threshold`` leave with that head's output; the others go on. ``exit_counts`` counts where
  samples left. Threshold 0: every sample leaves at the first exit; above 1: none leaves early.

The expected cost per sample is ``sum_k rate_k * cost_k`` with ``cost_k`` = stem + stages up to
exit k + every head evaluated on the way (:meth:`ExitNet.exit_costs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from chaincomp.cost import CostReport
from chaincomp.errors import ConfigError
from chaincomp.models.base import ClassifierHead, ConvBNReLU, StagedNet
from chaincomp.module import CompressibleModule
from chaincomp.tasks import Task

HEADS = ("conv", "linear")


class ExitHead(nn.Sequential):
    """conv3x3 (stride 2 on maps of 8 pixels or more) + BN + ReLU -> pool -> linear."""

    def __init__(self, c_in: int, num_outputs: int, stride: int, width: int):
        super().__init__(ConvBNReLU(c_in, width, stride), ClassifierHead(width, num_outputs))


def make_head(
    kind: str, c_in: int, num_outputs: int, map_size: int, width_mult: float
) -> nn.Module:
    if kind == "linear":
        return ClassifierHead(c_in, num_outputs)
    return ExitHead(c_in, num_outputs, 2 if map_size >= 8 else 1, max(1, round(c_in * width_mult)))


class ExitNet(nn.Module):
    """A staged backbone with exit heads after ``points`` (stage indices, ascending)."""

    threshold: Tensor
    exit_counts: Tensor

    def __init__(
        self,
        backbone: StagedNet,
        points: Sequence[int],
        heads: Sequence[nn.Module],
        task: Task,
        threshold: float = 2.0,
        exit_weight: float = 1.0,
    ):
        super().__init__()
        if list(points) != sorted(set(points)) or len(points) != len(heads):
            raise ValueError(f"exit points {list(points)} must be ascending, one head each")
        self.backbone = backbone
        self.points = [int(p) for p in points]
        self.exits = nn.ModuleList(heads)
        self.task = task
        self.exit_weight = exit_weight
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer(
            "exit_counts", torch.zeros(len(heads) + 1, dtype=torch.long), persistent=False
        )
        self._aux: list[Tensor] = []
        self._final: Tensor | None = None
        # (alpha, temperature) while a step trains the heads by distillation (E's kd_alpha):
        # not part of the net's state, and None outside that step
        self.distill: tuple[float, float] | None = None
        self.selection: dict[str, Any] = {"mode": "fixed"}

    @property
    def num_outputs(self) -> int:
        return self.backbone.num_outputs

    def exit_points(self) -> list[str]:
        return self.backbone.exit_points()

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Outputs of every exit head and then the final head, on the whole batch."""
        outs = []
        h = self.backbone.stem(x)
        k = 0
        for i, stage in enumerate(self.backbone.stages):
            h = stage(h)
            if k < len(self.points) and self.points[k] == i:
                outs.append(self.exits[k](h))
                k += 1
        outs.append(self.backbone.head(h))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            outs = self.forward_all(x)
            self._aux = outs[:-1]
            self._final = outs[-1].detach() if self.distill is not None else None
            return outs[-1]
        return self._dynamic(x)

    def _dynamic(self, x: Tensor) -> Tensor:
        threshold = float(self.threshold)
        result: Tensor | None = None
        idx = torch.arange(len(x), device=x.device)
        h = self.backbone.stem(x)
        k = 0
        for i, stage in enumerate(self.backbone.stages):
            h = stage(h)
            if k < len(self.points) and self.points[k] == i:
                y = self.exits[k](h)
                if result is None:
                    result = y.new_zeros((len(x), *y.shape[1:]))
                leave = self.task.confidence(y) >= threshold
                result[idx[leave]] = y[leave]
                self.exit_counts[k] += leave.sum()
                keep = ~leave
                h, idx = h[keep], idx[keep]
                k += 1
                if len(idx) == 0:
                    assert result is not None
                    return result
        y = self.backbone.head(h)
        self.exit_counts[-1] += len(idx)
        if result is None:  # no exit heads (all dropped)
            return y
        result[idx] = y.to(result.dtype)
        return result

    def auxiliary_loss(self, task: Task, target: Tensor) -> Tensor | None:
        """Sum of the exit heads' losses from the last training forward, x ``exit_weight``.
        A head's loss is its task loss; with ``distill = (alpha, T)``, ``(1 - alpha) * task
        loss + alpha * task.distill_loss(head, final, T)``, the final head's output of the same
        forward (detached) as the teacher (self-distillation of a multi-exit net: Phuong &
        Lampert, ICCV 2019)."""
        if not self._aux:
            return None
        final, self._final = self._final, None
        if self.distill is not None and final is not None:
            alpha, temperature = self.distill
            loss = sum(
                (1 - alpha) * task.loss(out, target)
                + alpha * task.distill_loss(out, final, temperature)
                for out in self._aux
            )
        else:
            loss = sum(task.loss(out, target) for out in self._aux)
        self._aux = []
        return self.exit_weight * loss  # type: ignore[return-value]

    def reset_counts(self) -> None:
        self.exit_counts.zero_()

    def exit_rates(self) -> list[float]:
        total = int(self.exit_counts.sum())
        return [int(c) / total if total else 0.0 for c in self.exit_counts]

    def exit_costs(
        self, report: CostReport, what: str = "bitops", keep: set[int] | None = None
    ) -> list[float]:
        """Cost of a sample that leaves at each exit (then the final head), from a report of
        ``forward_all`` (see :func:`chaincomp.cost.count_cost`). ``keep``: the exits that would
        remain if the others were removed (default: all)."""
        keep = set(range(len(self.points))) if keep is None else keep
        heads = [
            float(report.sum([f"exits.{j}"], what)) if j in keep else 0.0
            for j in range(len(self.points))
        ]
        costs = []
        for k, p in enumerate(self.points):
            prefixes = ["backbone.stem", *(f"backbone.stages.{i}" for i in range(p + 1))]
            costs.append(float(report.sum(prefixes, what)) + sum(heads[: k + 1]))
        final = float(report.sum(["backbone"], what))
        costs.append(final + sum(heads))
        return costs

    def drop_exits(self, keep: set[int]) -> list[int]:
        """Remove the exit heads not in ``keep`` (indices); returns the dropped points."""
        dropped = [p for k, p in enumerate(self.points) if k not in keep]
        self.exits = nn.ModuleList([h for k, h in enumerate(self.exits) if k in keep])
        self.points = [p for k, p in enumerate(self.points) if k in keep]
        self.exit_counts = self.exit_counts.new_zeros(len(self.points) + 1)
        return dropped


def backbone_of(net: nn.Module, key: str = "stage.early_exit") -> StagedNet:
    """The :class:`StagedNet` of ``net`` (itself or an ExitNet's backbone); else a
    :class:`ConfigError` naming ``key``."""
    inner = net.backbone if isinstance(net, ExitNet) else net
    if not isinstance(inner, StagedNet):
        raise ConfigError(
            key,
            f"{type(inner).__name__} exposes no exit points",
            "a StagedNet model (stem, stages, head)",
        )
    return inner


def check_points(net: nn.Module, points: Sequence[int], key: str) -> StagedNet:
    """The backbone of ``net`` when every exit point is one of its stages; else a
    :class:`ConfigError` naming ``<key>.points`` (or ``key`` when it has no stages)."""
    backbone = backbone_of(net, key)
    n_stages = len(backbone.stages)
    bad = [p for p in points if p >= n_stages]
    if bad:
        raise ConfigError(
            f"{key}.points",
            f"no stage {bad[0]} in {type(backbone).__name__} ({n_stages} stages)",
            f"indices 0..{n_stages - 1}",
        )
    return backbone


def stage_map_sizes(backbone: StagedNet, example: Tensor) -> list[int]:
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        sizes = [int(o.shape[-1]) for o in backbone.forward_stages(example)]
        backbone.train(was)
    return sizes


def attach_exits(
    module: CompressibleModule,
    points: Sequence[int],
    head: str,
    head_width: float,
    example: Tensor,
    exit_weight: float,
    key: str = "stage.early_exit",
) -> ExitNet:
    """Wrap ``module.net`` in an :class:`ExitNet` with new heads at ``points`` (in place);
    errors name ``key`` (the settings' prefix)."""
    backbone = check_points(module.net, points, key)
    device = next(backbone.parameters()).device
    sizes = stage_map_sizes(backbone, example.to(device))
    channels = backbone.exit_channels()
    heads = [
        make_head(head, channels[p], backbone.num_outputs, sizes[p], head_width) for p in points
    ]
    net = ExitNet(backbone, points, heads, module.task, exit_weight=exit_weight).to(device)
    module.net = net
    return net
