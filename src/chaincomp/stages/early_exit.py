"""E: early exit. Exit heads at stage boundaries, a confidence threshold, real dynamic inference.

:class:`ExitNet` wraps a :class:`~chaincomp.models.StagedNet` (``backbone``) and adds one head per
exit point. Its ``forward``:

- training mode: runs every head (``forward_all``), keeps the exit outputs for
  ``auxiliary_loss`` (each exit head's task loss, weighted by ``exit_weight``) and returns the
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from chaincomp.cost import CostReport
from chaincomp.models.base import ClassifierHead, ConvBNReLU, StagedNet
from chaincomp.module import CompressibleModule
from chaincomp.stages.base import ReplayInfo, Stage, StageContext, StageSettings
from chaincomp.tasks import Task

HEADS = ("conv", "linear")
THRESHOLD_MODES = ("validation", "fixed")
TRAIN_MODES = ("frozen", "joint")


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

    def __init__(self, backbone: StagedNet, points: Sequence[int], heads: Sequence[nn.Module],
                 task: Task, threshold: float = 2.0, exit_weight: float = 1.0):  # fmt: skip
        super().__init__()
        if list(points) != sorted(set(points)) or len(points) != len(heads):
            raise ValueError(f"exit points {list(points)} must be ascending, one head each")
        self.backbone = backbone
        self.points = [int(p) for p in points]
        self.exits = nn.ModuleList(heads)
        self.task = task
        self.exit_weight = exit_weight
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("exit_counts", torch.zeros(len(heads) + 1, dtype=torch.long),
                             persistent=False)  # fmt: skip
        self._aux: list[Tensor] = []
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
        """Sum of the exit heads' task losses from the last training forward, x exit_weight."""
        if not self._aux:
            return None
        loss = sum(task.loss(out, target) for out in self._aux)
        self._aux = []
        return self.exit_weight * loss  # type: ignore[return-value]

    def reset_counts(self) -> None:
        self.exit_counts.zero_()

    def exit_rates(self) -> list[float]:
        total = int(self.exit_counts.sum())
        return [int(c) / total if total else 0.0 for c in self.exit_counts]

    def exit_costs(self, report: CostReport, what: str = "bitops",
                   keep: set[int] | None = None) -> list[float]:  # fmt: skip
        """Cost of a sample that leaves at each exit (then the final head), from a report of
        ``forward_all`` (see :func:`chaincomp.cost.count_cost`). ``keep``: the exits that would
        remain if the others were removed (default: all)."""
        keep = set(range(len(self.points))) if keep is None else keep
        heads = [float(report.sum([f"exits.{j}"], what)) if j in keep else 0.0
                 for j in range(len(self.points))]  # fmt: skip
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


@dataclass(frozen=True)
class EarlyExitSettings(StageSettings):
    """``points``: stage indices for exits (null = after every stage but the last); ``head``:
    conv | linear; ``head_width``: conv head width / stage width; ``train``: frozen (backbone
    fixed, heads only) | joint; ``threshold_mode``: validation (smallest expected BitOps whose
    validation metric is within ``max_loss`` of the full net's) | fixed (``threshold``);
    ``exit_weight``: weight of the exit losses."""

    epochs: int = 1
    lr: float | None = 0.02
    points: tuple[int, ...] | None = None
    head: str = "conv"
    head_width: float = 1.0
    train: str = "frozen"
    threshold_mode: str = "validation"
    threshold: float = 0.9
    max_loss: float = 0.5
    exit_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = self.points is None or (
            len(self.points) > 0
            and all(isinstance(p, int) and p >= 0 for p in self.points)
            and list(self.points) == sorted(set(self.points))
        )
        self.check(ok, "points", self.points, "null or ascending stage indices >= 0")
        self.check(self.head in HEADS, "head", self.head, HEADS)
        self.check(0 < self.head_width <= 4, "head_width", self.head_width, "(0, 4]")
        self.check(self.train in TRAIN_MODES, "train", self.train, TRAIN_MODES)
        self.check(self.threshold_mode in THRESHOLD_MODES, "threshold_mode",
                   self.threshold_mode, THRESHOLD_MODES)  # fmt: skip
        self.check(self.threshold >= 0, "threshold", self.threshold, ">= 0")
        self.check(self.max_loss >= 0, "max_loss", self.max_loss, ">= 0")
        self.check(self.exit_weight > 0, "exit_weight", self.exit_weight, "> 0")


def backbone_of(net: nn.Module) -> StagedNet:
    inner = net.backbone if isinstance(net, ExitNet) else net
    if not isinstance(inner, StagedNet):
        from chaincomp.errors import ConfigError

        raise ConfigError("stage.early_exit", f"{type(inner).__name__} exposes no exit points",
                          "a StagedNet model (stem, stages, head)")  # fmt: skip
    return inner


def stage_map_sizes(backbone: StagedNet, example: Tensor) -> list[int]:
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        sizes = [int(o.shape[-1]) for o in backbone.forward_stages(example)]
        backbone.train(was)
    return sizes


def attach_exits(module: CompressibleModule, points: Sequence[int], head: str, head_width: float,
                 example: Tensor, exit_weight: float) -> ExitNet:  # fmt: skip
    """Wrap ``module.net`` in an :class:`ExitNet` with new heads at ``points`` (in place)."""
    backbone = backbone_of(module.net)
    n_stages = len(backbone.stages)
    bad = [p for p in points if p >= n_stages]
    if bad:
        from chaincomp.errors import ConfigError

        raise ConfigError("stage.early_exit.points", f"no stage {bad[0]}",
                          f"indices 0..{n_stages - 1}")  # fmt: skip
    device = next(backbone.parameters()).device
    sizes = stage_map_sizes(backbone, example.to(device))
    channels = backbone.exit_channels()
    heads = [
        make_head(head, channels[p], backbone.num_outputs, sizes[p], head_width) for p in points
    ]
    net = ExitNet(backbone, points, heads, module.task, exit_weight=exit_weight).to(device)
    module.net = net
    return net


@torch.no_grad()
def collect(module: CompressibleModule, batches: Any) -> tuple[list[Tensor], Tensor]:
    """``forward_all`` outputs (per exit, concatenated over batches) and targets, on CPU."""
    net = module.net
    assert isinstance(net, ExitNet)
    was = module.training
    module.eval()
    outs: list[list[Tensor]] = []
    targets = []
    for x, t in batches:
        for k, o in enumerate(net.forward_all(x)):
            if len(outs) <= k:
                outs.append([])
            outs[k].append(o.float().cpu())
        targets.append(t.cpu())
    module.train(was)
    return [torch.cat(o) for o in outs], torch.cat(targets)


def simulate(task: Task, outs: list[Tensor], target: Tensor, threshold: float
             ) -> tuple[float, list[float], Tensor]:  # fmt: skip
    """Metric, exit rates and exit index per sample of dynamic inference at ``threshold``,
    computed from static outputs (what :meth:`ExitNet._dynamic` does, without the savings)."""
    n, k_final = len(target), len(outs) - 1
    where = torch.full((n,), k_final, dtype=torch.long)
    for k in range(k_final - 1, -1, -1):
        where[task.confidence(outs[k]) >= threshold] = k
    chosen = torch.stack(outs)[where, torch.arange(n)]
    metric = task.make_metric()
    task.update_metric(metric, chosen, target)
    rates = torch.bincount(where, minlength=len(outs)).float() / max(1, n)
    return float(metric.compute()), rates.tolist(), where


def select_threshold(module: CompressibleModule, batches: Any, report: CostReport,
                     max_loss: float) -> dict[str, Any]:  # fmt: skip
    """The threshold with the smallest expected cost whose metric on ``batches`` stays within
    ``max_loss`` of the full network's (all samples at the final head). Candidates: 2.0 (no
    early exit) and quantiles of the exit heads' confidences. A head no sample leaves at is
    counted as removed (``keep`` in the result lists the heads that are used)."""
    task = module.task
    net = module.net
    assert isinstance(net, ExitNet)
    outs, target = collect(module, batches)
    full, _, _ = simulate(task, outs, target, 2.0)
    conf = torch.cat([task.confidence(o) for o in outs[:-1]])
    qs = torch.linspace(0, 1, 201)
    candidates = sorted({2.0, *torch.quantile(conf, qs).tolist()})
    best: dict[str, Any] = {"threshold": 2.0, "metric": full, "keep": [],
                            "cost": net.exit_costs(report, keep=set())[-1],
                            "rates": [0.0] * (len(outs) - 1) + [1.0]}  # fmt: skip
    for t in candidates:
        metric, rates, _ = simulate(task, outs, target, t)
        ok = metric >= full - max_loss if task.higher_is_better else metric <= full + max_loss
        keep = {k for k, r in enumerate(rates[:-1]) if r > 0}
        costs = net.exit_costs(report, keep=keep)
        cost = sum(r * c for r, c in zip(rates, costs, strict=True))
        if ok and cost < best["cost"] - 1e-9:
            best = {"threshold": float(t), "metric": metric, "cost": cost, "rates": rates,
                    "keep": sorted(keep)}  # fmt: skip
    best["full_metric"] = full
    return best


def retune(module: CompressibleModule, dm: Any, drop: bool = False) -> dict[str, Any] | None:
    """Re-pick the threshold of an :class:`ExitNet` with its own rule (after a later step
    changed the net). With ``drop``, heads that no validation sample leaves at are removed
    (outputs unchanged, cost lower). Returns the selection, or None for a fixed threshold or
    no exits."""
    from chaincomp.cost import count_cost

    net = module.net
    if not isinstance(net, ExitNet) or net.selection.get("mode") != "validation" or not net.points:
        return None
    device = next(module.parameters()).device
    report = count_cost(net, dm.example_input(1).to(device))
    chosen = select_threshold(module, dm.loader("val", device), report,
                              float(net.selection["max_loss"]))  # fmt: skip
    net.threshold.fill_(chosen["threshold"])
    chosen["dropped_points"] = net.drop_exits(set(chosen["keep"])) if drop else []
    return chosen


class EarlyExit(Stage):
    """Attach exit heads, train them (backbone frozen by default), choose the threshold."""

    name = "early_exit"
    letter = "E"
    Settings = EarlyExitSettings

    def apply(self, module: CompressibleModule, ctx: StageContext) -> dict[str, Any]:
        s = self.settings
        assert isinstance(s, EarlyExitSettings)
        backbone = backbone_of(module.net)
        points = list(s.points) if s.points is not None else list(range(len(backbone.stages) - 1))
        if isinstance(module.net, ExitNet):  # E after E: replace the heads
            module.net = module.net.backbone
        net = attach_exits(module, points, s.head, s.head_width, ctx.dm.example_input(1),
                           s.exit_weight)  # fmt: skip
        net.selection = ({"mode": "validation", "max_loss": s.max_loss}
                         if s.threshold_mode == "validation" else {"mode": "fixed"})  # fmt: skip
        net.threshold.fill_(s.threshold if s.threshold_mode == "fixed" else 2.0)
        record: dict[str, Any] = {
            "points": points,
            "head": s.head,
            "head_width": s.head_width,
            "exit_weight": s.exit_weight,
            "selection": net.selection,
        }
        quant = ctx.latest("quantize")
        if quant is not None:  # Q stays active: the new heads are quantized too
            from chaincomp.stages.quantize import requantize

            record["quantized_heads"] = requantize(module, ctx.dm, quant)["layers"]
            record["learn_scale"] = bool(quant.get("learn_scale", False))
        # frozen backbone: finalize gives back requires_grad to exactly these parameters
        self._frozen = [p for p in net.backbone.parameters() if p.requires_grad]
        if s.train == "frozen":
            for p in self._frozen:
                p.requires_grad_(False)
        return record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        net = pl_module.net
        if isinstance(net, ExitNet) and self.settings.train == "frozen":  # type: ignore[attr-defined]
            net.backbone.eval()  # BN statistics of the frozen backbone stay as they are

    def finalize(self, module: CompressibleModule, ctx: StageContext,
                 record: dict[str, Any]) -> None:  # fmt: skip
        net = module.net
        assert isinstance(net, ExitNet)
        for p in getattr(self, "_frozen", []):
            p.requires_grad_(True)
        self._frozen = []
        chosen = retune(module, ctx.dm, drop=True)
        record["threshold"] = float(net.threshold)
        if chosen is not None:
            record["val_selection"] = {k: chosen[k] for k in ("metric", "full_metric", "rates")}
            record["dropped_points"] = chosen["dropped_points"]
            record["points"] = list(net.points)  # replay builds the heads that remain
            if "quantized_heads" in record:
                record["quantized_heads"] = {
                    name: [m.weight_bits, m.act_bits]
                    for name, m in net.named_modules()
                    if hasattr(m, "weight_bits")
                }
        self._summary = {"exits": len(net.points), "threshold": min(float(net.threshold), 2.0)}

    @classmethod
    def replay(cls, module: CompressibleModule, record: dict[str, Any], info: ReplayInfo) -> None:
        if isinstance(module.net, ExitNet):
            module.net = module.net.backbone
        example = torch.zeros(1, info.in_channels, *info.image_size)
        net = attach_exits(module, record["points"], record["head"], record["head_width"],
                           example, record["exit_weight"])  # fmt: skip
        net.selection = dict(record["selection"])
        if "quantized_heads" in record:
            from chaincomp.stages.quantize import quantize_net

            quantize_net(net, record["quantized_heads"], bool(record.get("learn_scale", False)))
