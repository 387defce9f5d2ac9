"""P: structured channel pruning with Torch-Pruning's dependency graph (DepGraph).

Channels are physically removed: every conv / BN / linear whose input or output depends on a
removed channel shrinks (residual additions, exit heads and quantized layers included, since
they are traced through the real forward). Linear layers (the task head and exit heads) keep
their outputs. With ``macs_target`` the pruner takes small steps until the counted MACs fall by
that fraction; otherwise it removes ``ratio`` of the channels of every prunable group (uniform)
or ranks all groups together (global). ``steps`` > 1 prunes iteratively, fine-tuning ``epochs``
epochs after each step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from chaincomp.cost import count_cost
from chaincomp.errors import ConfigError
from chaincomp.layers.onednn import guarded
from chaincomp.module import CompressibleModule
from chaincomp.stages.base import (
    FineTuneSettings,
    Phase,
    ReplayInfo,
    Stage,
    StageContext,
    StageRecord,
)

IMPORTANCES = ("l1", "l2", "taylor")
SCOPES = ("uniform", "global")


def make_importance(name: str) -> tp.importance.Importance:
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    return tp.importance.GroupTaylorImportance()


@dataclass(frozen=True)
class PruneSettings(FineTuneSettings):
    """``importance`` l1 | l2 (group norm) | taylor; ``scope`` uniform | global; ``ratio``:
    fraction of channels removed (0, 1); ``macs_target``: fraction of MACs to remove (0, 1),
    overrides ``ratio`` when set; ``steps``: prune/fine-tune rounds (``epochs`` each);
    ``max_layer_ratio``: at most this fraction of any layer goes; ``round_to``: keep channel
    counts multiples of it; ``taylor_batches``: batches whose gradients rank channels."""

    epochs: int = 2
    lr: float | None = 0.01
    importance: str = "l1"
    scope: str = "uniform"
    ratio: float = 0.5
    macs_target: float | None = None
    steps: int = 1
    max_layer_ratio: float = 0.9
    round_to: int | None = None
    taylor_batches: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.importance in IMPORTANCES, "importance", self.importance, IMPORTANCES)
        self.check(self.scope in SCOPES, "scope", self.scope, SCOPES)
        self.check(0 < self.ratio < 1, "ratio", self.ratio, "0 < ratio < 1")
        self.check(
            self.macs_target is None or 0 < self.macs_target < 1,
            "macs_target",
            self.macs_target,
            "null or 0 < value < 1",
        )
        self.check(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, ">= 1")
        self.check(
            0 < self.max_layer_ratio < 1, "max_layer_ratio", self.max_layer_ratio, "0 < value < 1"
        )
        self.check(
            self.round_to is None or self.round_to >= 1, "round_to", self.round_to, "null or >= 1"
        )
        self.check(self.taylor_batches >= 1, "taylor_batches", self.taylor_batches, ">= 1")


def _forward_fn(model: nn.Module, x: Tensor) -> Any:
    forward_all = getattr(model, "forward_all", None)
    return forward_all(x) if forward_all is not None else model(x)


def make_pruner(
    net: nn.Module, example: Tensor, s: PruneSettings, ratio: float, iterative_steps: int
) -> tp.pruner.MetaPruner:
    ignored = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return tp.pruner.MetaPruner(
        net,
        example,
        importance=make_importance(s.importance),
        global_pruning=s.scope == "global",
        pruning_ratio=ratio,
        max_pruning_ratio=s.max_layer_ratio,
        iterative_steps=iterative_steps,
        ignored_layers=ignored,
        round_to=s.round_to,
        forward_fn=_forward_fn,
    )


def channel_count(net: nn.Module) -> int:
    return sum(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))


def shapes_of(net: nn.Module) -> dict[str, list[int]]:
    """Weight shapes of every conv, linear and batch norm (what replay resizes to)."""
    return {
        name: list(m.weight.shape)
        for name, m in net.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and m.weight is not None
    }


def resize_to(net: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give the layers of ``net`` the recorded weight shapes (values are loaded afterwards)."""
    for name, shape in shapes.items():
        m: Any = net.get_submodule(name)
        if list(m.weight.shape) == list(shape):
            continue
        dev = m.weight.device
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels
            m.out_channels = shape[0]
            m.in_channels = shape[1] * (shape[0] if depthwise else m.groups)
            if depthwise:
                m.groups = shape[0]
            m.weight = nn.Parameter(torch.empty(shape, device=dev))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape[0], device=dev))
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = shape
            m.weight = nn.Parameter(torch.empty(shape, device=dev))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape[0], device=dev))
        elif isinstance(m, nn.BatchNorm2d):
            n = shape[0]
            m.num_features = n
            m.weight = nn.Parameter(torch.empty(n, device=dev))
            m.bias = nn.Parameter(torch.empty(n, device=dev))
            m.running_mean = torch.zeros(n, device=dev)
            m.running_var = torch.ones(n, device=dev)
        else:  # pragma: no cover - shapes_of records only these types
            raise ConfigError("record.shapes", f"cannot resize {type(m).__name__} {name}")


def _taylor_grads(module: CompressibleModule, dm: Any, batches: int) -> None:
    """Gradients of the training loss on ``batches`` batches (what Taylor importance ranks by).
    The forward runs in train mode (every exit head, as in training); the batch-norm running
    statistics it would move are put back, so ranking changes nothing but ``.grad``."""
    module.zero_grad()
    device = next(module.parameters()).device
    was = module.training
    stats = {
        k: v.clone()
        for k, v in module.net.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    module.train()
    with guarded(module.net):  # oneDNN's small strided 1x1 weight gradients (layers/onednn.py)
        for i, (x, target) in enumerate(dm.loader("train", device, train=False)):
            if i >= batches:
                break
            out = module(x)
            loss = module.task.loss(out, target)
            aux = getattr(module.net, "auxiliary_loss", None)
            extra = aux(module.task, target) if aux is not None else None
            (loss if extra is None else loss + extra).backward()
    module.train(was)
    module.net.load_state_dict(stats, strict=False)


@dataclass
class PruneRecord(StageRecord):
    """``shapes``: the weight shape of every conv / linear / batch norm after pruning (what
    replay resizes to); ``channels`` and ``macs``: before and after."""

    VERSION = 1

    settings: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    channels: list[int] = field(default_factory=list)
    macs: list[float] = field(default_factory=list)


class Prune(Stage[PruneSettings, PruneRecord]):
    """Dependency-aware structured pruning (Torch-Pruning) with fine-tuning after each step.

    ``steps`` rounds of prune -> fine-tune (:meth:`phases`); a later distillation drops the
    pruning (the student has its own channels; the default of :meth:`Stage.on_replace`)."""

    name = "prune"
    letter = "P"
    Settings = PruneSettings
    Record = PruneRecord

    def apply(self, module: CompressibleModule, ctx: StageContext) -> PruneRecord:
        device = next(module.parameters()).device
        before = count_cost(module.net, ctx.dm.example_input(1).to(device))
        self._macs0 = before.macs
        channels0 = channel_count(module.net)
        return PruneRecord(
            settings=self.settings.as_dict(), channels=[channels0], macs=[before.macs]
        )

    def phases(
        self, module: CompressibleModule, ctx: StageContext, record: PruneRecord
    ) -> list[Phase]:
        def step(k: int) -> Callable[[], None]:
            return lambda: self.prune_once(module, ctx, k)

        return [Phase(self.settings.epochs, step(k)) for k in range(1, self.settings.steps + 1)]

    def prune_once(self, module: CompressibleModule, ctx: StageContext, step: int) -> None:
        s = self.settings
        device = next(module.parameters()).device
        example = ctx.dm.example_input(2).to(device)
        net = module.net
        if s.macs_target is None:
            # one pruner over the net as it was before step 1, ``steps`` steps of it: each step
            # removes its share of the *original* channels (rounding does not compound)
            if step == 1:
                self._pruner = make_pruner(net, example, s, s.ratio, s.steps)
            if s.importance == "taylor":
                _taylor_grads(module, ctx.dm, s.taylor_batches)
            self._pruner.step()
        else:
            goal = self._macs0 * (1 - s.macs_target * step / s.steps)
            pruner = make_pruner(net, example, s, s.max_layer_ratio, 40)
            for _ in range(40):
                if count_cost(net, example[:1]).macs <= goal:
                    break
                if s.importance == "taylor":
                    _taylor_grads(module, ctx.dm, s.taylor_batches)
                pruner.step()
        module.zero_grad(set_to_none=True)

    def finalize(self, module: CompressibleModule, ctx: StageContext, record: PruneRecord) -> None:
        device = next(module.parameters()).device
        after = count_cost(module.net, ctx.dm.example_input(1).to(device))
        channels1 = channel_count(module.net)
        channels0, macs0 = record.channels[0], record.macs[0]
        record.channels.append(channels1)
        record.macs.append(after.macs)
        record.shapes = shapes_of(module.net)
        self._summary = {
            "channels_before": channels0,
            "channels_after": channels1,
            "channels_removed_frac": 1 - channels1 / max(1, channels0),
            "macs_before": macs0,
            "macs_after": after.macs,
            "macs_reduction": 1 - after.macs / max(1, macs0),
        }

    @classmethod
    def replay(cls, module: CompressibleModule, record: PruneRecord, info: ReplayInfo) -> None:
        resize_to(module.net, record.shapes)
