"""E: early exit. Exit heads at stage boundaries, a confidence threshold, real dynamic inference.

The heads and :class:`~chaincomp.layers.exits.ExitNet` live in :mod:`chaincomp.layers.exits`;
this stage attaches them, trains them (backbone frozen by default), and picks the threshold on
the validation split: the cheapest one whose validation metric stays within ``max_loss`` of the
full network's; heads that no validation sample leaves at are removed. With ``select_heads``
the heads to keep are chosen together with the threshold (every subset of them is tried, so a
head whose exits save less than it costs every sample that passes it is removed).

Interactions (declared here): after every later step the threshold is re-chosen on validation
(:meth:`EarlyExit.after_step`); when distillation replaces the net, the student gets heads at
the same points (:meth:`EarlyExit.on_replace`). The heads this stage adds are announced with
``ctx.extended`` so that techniques in force (quantization) take them in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from chaincomp.cost import CostReport
from chaincomp.layers.exits import (
    HEADS,
    ExitHead,
    ExitNet,
    attach_exits,
    backbone_of,
    check_points,
)
from chaincomp.module import CompressibleModule
from chaincomp.stages.base import ReplayInfo, Stage, StageContext, StageRecord, StageSettings
from chaincomp.tasks import Task

THRESHOLD_MODES = ("validation", "fixed")
TRAIN_MODES = ("frozen", "joint")

__all__ = [
    "EarlyExit",
    "EarlyExitRecord",
    "EarlyExitSettings",
    "ExitHead",
    "ExitNet",
    "attach_exits",
    "collect",
    "retune",
    "select_threshold",
    "simulate",
]


@dataclass(frozen=True)
class EarlyExitSettings(StageSettings):
    """``points``: stage indices for exits (null = after every stage but the last); ``head``:
    conv | linear; ``head_width``: conv head width / stage width; ``train``: frozen (backbone
    fixed, heads only) | joint; ``threshold_mode``: validation (smallest expected BitOps whose
    validation metric is within ``max_loss`` of the full net's) | fixed (``threshold``);
    ``select_heads``: with ``validation``, choose the heads to keep together with the threshold
    (every subset of them; false: all of them, less those no sample leaves at);
    ``exit_weight``: weight of the exit losses; ``kd_alpha`` in [0, 1): during this step's fit
    each exit head's loss is ``(1 - kd_alpha) * task loss + kd_alpha * distillation`` from the
    net's final output in the same forward (at ``kd_temperature`` > 0; 0 = the task loss
    alone; later steps that train the heads use the task loss)."""

    epochs: int = 1
    lr: float | None = 0.02
    points: tuple[int, ...] | None = None
    head: str = "conv"
    head_width: float = 1.0
    train: str = "frozen"
    threshold_mode: str = "validation"
    threshold: float = 0.9
    max_loss: float = 0.5
    select_heads: bool = False
    exit_weight: float = 1.0
    kd_alpha: float = 0.0
    kd_temperature: float = 4.0

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
        self.check(
            self.threshold_mode in THRESHOLD_MODES,
            "threshold_mode",
            self.threshold_mode,
            THRESHOLD_MODES,
        )
        self.check(self.threshold >= 0, "threshold", self.threshold, ">= 0")
        self.check(self.max_loss >= 0, "max_loss", self.max_loss, ">= 0")
        self.check(
            isinstance(self.select_heads, bool), "select_heads", self.select_heads, (True, False)
        )
        self.check(self.exit_weight > 0, "exit_weight", self.exit_weight, "> 0")
        self.check(0 <= self.kd_alpha < 1, "kd_alpha", self.kd_alpha, "[0, 1)")
        self.check(self.kd_temperature > 0, "kd_temperature", self.kd_temperature, "> 0")


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


def simulate(
    task: Task,
    outs: list[Tensor],
    target: Tensor,
    threshold: float,
    confidences: list[Tensor] | None = None,
) -> tuple[float, list[float], Tensor]:
    """Metric, exit rates and exit index per sample of dynamic inference at ``threshold``,
    computed from static outputs (what :meth:`ExitNet._dynamic` does, without the savings).
    ``confidences``: each exit head's ``task.confidence`` of its outputs, when the caller has
    them already (a threshold search calls this once per candidate)."""
    n, k_final = len(target), len(outs) - 1
    if confidences is None:
        confidences = [task.confidence(o) for o in outs[:-1]]
    where = torch.full((n,), k_final, dtype=torch.long)
    for k in range(k_final - 1, -1, -1):
        where[confidences[k] >= threshold] = k
    chosen = torch.stack(outs)[where, torch.arange(n)]
    metric = task.make_metric()
    task.update_metric(metric, chosen, target)
    rates = torch.bincount(where, minlength=len(outs)).float() / max(1, n)
    return float(metric.compute()), rates.tolist(), where


def select_threshold(
    module: CompressibleModule,
    batches: Any,
    report: CostReport,
    max_loss: float,
    select_heads: bool = False,
    removable: bool = True,
) -> dict[str, Any]:
    """The threshold with the smallest expected cost whose metric on ``batches`` stays within
    ``max_loss`` of the full network's (all samples at the final head). Candidates: 2.0 (no
    early exit) and quantiles of the exit heads' confidences. A head no sample leaves at is
    counted as removed (``keep`` in the result lists the heads that are used), since the caller
    drops it. With ``removable=False`` (the heads stay in the net: dynamic inference runs every
    head a sample passes, whether any sample leaves there or not) each head is paid for and
    ``keep`` lists them all. With ``select_heads`` (and ``removable``) every non-empty subset of
    the heads is tried as well, the others removed (no sample leaves there and their cost is
    not paid); ``keep`` is then the cheapest subset within ``max_loss``, which holds only if the
    heads outside it are dropped from the net. On equal cost the larger subset wins (all heads
    are tried first). ``cost`` is the expected cost per sample of the net so chosen."""
    task = module.task
    net = module.net
    assert isinstance(net, ExitNet)
    outs, target = collect(module, batches)
    confs = [task.confidence(o) for o in outs[:-1]]  # once: every candidate reads them
    full, _, _ = simulate(task, outs, target, 2.0, confs)
    n_exits = len(outs) - 1
    everyone = tuple(range(n_exits))
    best: dict[str, Any] = {
        "threshold": 2.0,
        "metric": full,
        "keep": [] if removable else list(everyone),
        "cost": net.exit_costs(report, keep=set() if removable else None)[-1],
        "rates": [0.0] * n_exits + [1.0],
    }
    subsets = [everyone]
    if select_heads and removable:
        subsets += [
            s for size in range(n_exits - 1, 0, -1) for s in itertools.combinations(everyone, size)
        ]
    qs = torch.linspace(0, 1, 201)
    for subset in subsets:
        used = [outs[k] for k in subset] + [outs[-1]]
        used_confs = [confs[k] for k in subset]
        candidates = sorted({2.0, *torch.quantile(torch.cat(used_confs), qs).tolist()})
        for t in candidates:
            metric, sub_rates, _ = simulate(task, used, target, t, used_confs)
            ok = metric >= full - max_loss if task.higher_is_better else metric <= full + max_loss
            rates = [0.0] * n_exits + [sub_rates[-1]]
            for k, r in zip(subset, sub_rates, strict=False):
                rates[k] = r
            keep = {k for k, r in enumerate(rates[:-1]) if r > 0} if removable else set(everyone)
            costs = net.exit_costs(report, keep=keep)
            cost = sum(r * c for r, c in zip(rates, costs, strict=True))
            if ok and cost < best["cost"] - 1e-9:
                best = {
                    "threshold": float(t),
                    "metric": metric,
                    "cost": cost,
                    "rates": rates,
                    "keep": sorted(keep),
                }
    best["full_metric"] = full
    return best


def retune(module: CompressibleModule, dm: Any, drop: bool = False) -> dict[str, Any] | None:
    """Re-pick the threshold of an :class:`ExitNet` with its own rule (after a later step
    changed the net). With ``drop``, the heads outside the selection's ``keep`` are removed
    (those no validation sample leaves at, and with the rule's ``select_heads`` those whose
    removal makes the net cheaper within ``max_loss``); without it the heads stay and only the
    threshold is chosen, each head paid for (it runs whether a sample leaves there or not).
    Returns the selection, or None for a fixed threshold or no exits."""
    from chaincomp.cost import count_cost

    net = module.net
    if not isinstance(net, ExitNet) or net.selection.get("mode") != "validation" or not net.points:
        return None
    device = next(module.parameters()).device
    report = count_cost(net, dm.example_input(1).to(device))
    chosen = select_threshold(
        module,
        dm.loader("val", device),
        report,
        float(net.selection["max_loss"]),
        select_heads=bool(net.selection.get("select_heads", False)),
        removable=drop,
    )
    net.threshold.fill_(chosen["threshold"])
    chosen["dropped_points"] = net.drop_exits(set(chosen["keep"])) if drop else []
    return chosen


@dataclass
class EarlyExitRecord(StageRecord):
    """Where the heads are (``points``, after unused ones were dropped), their kind, the
    threshold rule (``selection``) and, for information, the threshold and validation figures
    chosen when the step ended."""

    VERSION = 1

    points: list[int] = field(default_factory=list)
    head: str = "conv"
    head_width: float = 1.0
    exit_weight: float = 1.0
    selection: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    val_selection: dict[str, Any] | None = None
    dropped_points: list[int] = field(default_factory=list)


def _head_names(net: ExitNet) -> list[str]:
    return [f"exits.{k}" for k in range(len(net.exits))]


class EarlyExit(Stage[EarlyExitSettings, EarlyExitRecord]):
    """Attach exit heads, train them (backbone frozen by default), choose the threshold."""

    name = "early_exit"
    letter = "E"
    Settings = EarlyExitSettings
    Record = EarlyExitRecord
    replace_order = 10  # structure: heads exist before wrappers (quantization) re-apply

    def apply(self, module: CompressibleModule, ctx: StageContext) -> EarlyExitRecord:
        s = self.settings
        points = self.points_on(module.net)
        if isinstance(module.net, ExitNet):  # E after E: replace the heads
            module.net = module.net.backbone
        net = attach_exits(
            module, points, s.head, s.head_width, ctx.dm.example_input(1), s.exit_weight, s.prefix
        )
        net.selection = (
            {"mode": "validation", "max_loss": s.max_loss, "select_heads": s.select_heads}
            if s.threshold_mode == "validation"
            else {"mode": "fixed"}
        )
        net.threshold.fill_(s.threshold if s.threshold_mode == "fixed" else 2.0)
        net.distill = (s.kd_alpha, s.kd_temperature) if s.kd_alpha > 0 else None
        ctx.extended(module, _head_names(net))
        # frozen backbone: finalize gives back requires_grad to exactly these parameters
        self._frozen = [p for p in net.backbone.parameters() if p.requires_grad]
        if s.train == "frozen":
            for p in self._frozen:
                p.requires_grad_(False)
        return EarlyExitRecord(
            points=points,
            head=s.head,
            head_width=s.head_width,
            exit_weight=s.exit_weight,
            selection=net.selection,
        )

    def on_exception(self, trainer, pl_module, exception):  # type: ignore[no-untyped-def]
        """A fit that raised: ``finalize`` will not run, so what this step set on the net
        ends here (the distillation, the frozen backbone)."""
        self._end_training(pl_module.net)

    def _end_training(self, net: nn.Module) -> None:
        """Take back what :meth:`apply` set for this step's fits: the heads' distillation and
        the frozen backbone (exactly the parameters it froze)."""
        if isinstance(net, ExitNet):
            net.distill = None
        for p in getattr(self, "_frozen", []):
            p.requires_grad_(True)
        self._frozen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        net = pl_module.net
        if isinstance(net, ExitNet) and self.settings.train == "frozen":
            net.backbone.eval()  # BN statistics of the frozen backbone stay as they are

    def finalize(
        self, module: CompressibleModule, ctx: StageContext, record: EarlyExitRecord
    ) -> None:
        net = module.net
        assert isinstance(net, ExitNet)
        self._end_training(net)
        chosen = retune(module, ctx.dm, drop=True)
        record.threshold = float(net.threshold)
        if chosen is not None:
            record.val_selection = {k: chosen[k] for k in ("metric", "full_metric", "rates")}
            record.dropped_points = chosen["dropped_points"]
            record.points = list(net.points)  # replay builds the heads that remain
        self._summary = {"exits": len(net.points), "threshold": min(float(net.threshold), 2.0)}

    def points_on(self, net: nn.Module) -> list[int]:
        """The exit points on ``net`` (default: after every stage but the last), checked: a
        net without stages or a point past its last stage is a :class:`ConfigError` naming
        ``<prefix>.points``."""
        s = self.settings
        backbone = backbone_of(net, s.prefix)
        points = list(s.points) if s.points is not None else list(range(len(backbone.stages) - 1))
        check_points(net, points, s.prefix)
        return points

    def preflight(
        self, net: nn.Module, model_cfg: dict[str, Any], info: ReplayInfo
    ) -> tuple[nn.Module, dict[str, Any]] | None:
        """The net must be a StagedNet with every exit point one of its stages."""
        self.points_on(net)
        return None

    @classmethod
    def replay(cls, module: CompressibleModule, record: EarlyExitRecord, info: ReplayInfo) -> None:
        if isinstance(module.net, ExitNet):
            module.net = module.net.backbone
        example = torch.zeros(1, info.in_channels, *info.image_size)
        net = attach_exits(
            module, record.points, record.head, record.head_width, example, record.exit_weight
        )
        net.selection = dict(record.selection)

    @classmethod
    def on_replace(
        cls,
        record: EarlyExitRecord,
        module: CompressibleModule,
        ctx: StageContext,
        old_net: nn.Module,
    ) -> EarlyExitRecord | None:
        if not isinstance(old_net, ExitNet):
            return None
        net = attach_exits(
            module,
            old_net.points,
            record.head,
            record.head_width,
            ctx.dm.example_input(1),
            old_net.exit_weight,
        )
        net.selection = dict(old_net.selection)
        net.threshold.copy_(old_net.threshold)
        return EarlyExitRecord(
            points=list(old_net.points),
            head=record.head,
            head_width=record.head_width,
            exit_weight=old_net.exit_weight,
            selection=net.selection,
        )

    @classmethod
    def after_step(
        cls, record: EarlyExitRecord, module: CompressibleModule, ctx: StageContext
    ) -> None:
        retune(module, ctx.dm)  # a later step changed the net: re-choose on validation
        return None
