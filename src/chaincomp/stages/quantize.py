"""Q: quantization-aware training with fake quantization and a straight-through estimator.

Every ``nn.Conv2d`` / ``nn.Linear`` of the net is swapped for its fake-quantized twin
(:mod:`chaincomp.layers.quant`: per-channel symmetric weights, per-tensor activations with
calibrated, optionally learned step sizes). The first layer (the first conv in forward order)
and the heads (the final linear and any exit head) use ``first_bits`` / ``last_bits``. The stage
calibrates, then runs QAT (or only calibrates with ``ptq``).

Interactions (declared here, applied by the runner): quantization stays active in every later
step. Modules a later step adds (exit heads, factor layers) are quantized at once
(:meth:`Quantize.on_extend`) and recorded in an amendment record after that step
(:meth:`Quantize.after_step`). When distillation replaces the net, the student is quantized
with the same settings, uncalibrated; it is calibrated once it has trained in float for a while
(a deferred action; :meth:`Quantize.on_replace`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from chaincomp.layers.quant import (
    QUANT_LAYERS,
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    calibrate,
    quantize_net,
    quantize_weight,
    weight_levels,
)
from chaincomp.module import CompressibleModule
from chaincomp.stages.base import (
    FineTuneSettings,
    Phase,
    ReplayInfo,
    Stage,
    StageContext,
    StageRecord,
)

CALIB_MODES = ("max", "percentile")

__all__ = [
    "QUANT_LAYERS",
    "ActQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "Quantize",
    "QuantizeRecord",
    "QuantizeSettings",
    "quantize_weight",
    "weight_levels",
]


@dataclass(frozen=True)
class QuantizeSettings(FineTuneSettings):
    """``w_bits`` 1..8, ``a_bits`` 2..8 for the inner layers; ``first_bits`` / ``last_bits``
    (2..8, default 8) for the first conv and the heads; ``learn_scale`` = LSQ step sizes
    for activations; ``calibration`` max | percentile (``percentile`` value) over
    ``calib_batches`` training batches; ``ptq`` = calibrate only (``epochs`` is then ignored)."""

    epochs: int = 2
    lr: float | None = 0.01
    w_bits: int = 4
    a_bits: int = 4
    first_bits: int = 8
    last_bits: int = 8
    learn_scale: bool = True
    calibration: str = "percentile"
    percentile: float = 99.99
    calib_batches: int = 8
    ptq: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(
            isinstance(self.w_bits, int) and 1 <= self.w_bits <= 8,
            "w_bits",
            self.w_bits,
            "an integer 1..8",
        )
        # first_bits also sets the first conv's (signed) input bits: 1 would leave no positive level
        for key in ("a_bits", "first_bits", "last_bits"):
            value = getattr(self, key)
            self.check(isinstance(value, int) and 2 <= value <= 8, key, value, "an integer 2..8")
        self.check(self.calibration in CALIB_MODES, "calibration", self.calibration, CALIB_MODES)
        self.check(90 < self.percentile <= 100, "percentile", self.percentile, "(90, 100]")
        self.check(self.calib_batches >= 1, "calib_batches", self.calib_batches, ">= 1")


def layer_plan(net: nn.Module, example: Tensor, s: QuantizeSettings) -> dict[str, list[int]]:
    """``{layer name: [weight bits, act bits]}`` for every conv/linear of ``net``.

    The first conv called in forward order gets ``first_bits``; linear layers (the task head and
    exit heads) get ``last_bits``; the rest ``w_bits`` / ``a_bits``.
    """
    from chaincomp.cost import count_cost

    # the cost report lists the layers in first-call order (every path, exits included)
    calls = count_cost(net, example[:1]).layers
    first = next((layer.name for layer in calls if layer.kind == "conv"), None)
    plan: dict[str, list[int]] = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            plan[name] = [s.last_bits, s.last_bits]
        elif isinstance(m, nn.Conv2d):
            plan[name] = [s.first_bits, s.first_bits] if name == first else [s.w_bits, s.a_bits]
    return plan


def quantize_module(
    module: CompressibleModule, dm: Any, s: QuantizeSettings, calibrated: bool = True
) -> dict[str, list[int]]:
    """Plan, wrap and (unless ``calibrated`` is False) calibrate ``module.net`` with settings
    ``s``; returns the layer plan. Uncalibrated layers stay float until :func:`calibrate`."""
    device = next(module.parameters()).device
    plan = layer_plan(module.net, dm.example_input(2).to(device), s)
    quantize_net(module.net, plan, s.learn_scale)
    module.net.to(device)
    if calibrated:
        calibrate_with(module, dm, s)
    return plan


def calibrate_with(module: CompressibleModule, dm: Any, s: QuantizeSettings) -> None:
    device = next(module.parameters()).device
    calibrate(
        module,
        dm.loader("train", device, train=False),
        s.calib_batches,
        s.percentile if s.calibration == "percentile" else None,
    )


def current_plan(net: nn.Module) -> dict[str, list[int]]:
    """``{layer name: [weight bits, act bits]}`` of the quantized layers ``net`` has now."""
    return {
        name: [m.weight_bits, m.act_bits]
        for name, m in net.named_modules()
        if isinstance(m, QUANT_LAYERS)
    }


@dataclass
class QuantizeRecord(StageRecord):
    """``layers``: ``{name: [weight bits, act bits]}`` of every quantized layer; ``settings``
    the stage settings (what a transfer or an extension re-applies)."""

    VERSION = 1

    layers: dict[str, list[int]] = field(default_factory=dict)
    learn_scale: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def quantize_settings(self) -> QuantizeSettings:
        s = QuantizeSettings.from_dict(self.settings, "stage.quantize")
        assert isinstance(s, QuantizeSettings)
        return s


class Quantize(Stage[QuantizeSettings, QuantizeRecord]):
    """Quantization-aware training (or PTQ with ``ptq: true``). See the module docstring."""

    name = "quantize"
    letter = "Q"
    Settings = QuantizeSettings
    Record = QuantizeRecord
    replace_order = 90  # wrap the student after every structural transfer (exit heads)

    def apply(self, module: CompressibleModule, ctx: StageContext) -> QuantizeRecord:
        s = self.settings
        plan = quantize_module(module, ctx.dm, s)
        bits = list(plan.values())
        self._summary = {
            "layers_quantized": len(bits),
            "mean_w_bits": sum(b[0] for b in bits) / max(1, len(bits)),
            "mean_a_bits": sum(b[1] for b in bits) / max(1, len(bits)),
        }
        return QuantizeRecord(layers=plan, learn_scale=s.learn_scale, settings=s.as_dict())

    def phases(
        self, module: CompressibleModule, ctx: StageContext, record: QuantizeRecord
    ) -> list[Phase]:
        return [] if self.settings.ptq else [Phase(self.settings.epochs)]

    @classmethod
    def replay(cls, module: CompressibleModule, record: QuantizeRecord, info: ReplayInfo) -> None:
        quantize_net(module.net, record.layers, record.learn_scale)
        # the state dict loaded next sets the step sizes, signs and calibrated flags

    @classmethod
    def on_replace(
        cls,
        record: QuantizeRecord,
        module: CompressibleModule,
        ctx: StageContext,
        old_net: nn.Module,
    ) -> QuantizeRecord:
        s = record.quantize_settings()
        plan = quantize_module(module, ctx.dm, s, calibrated=False)
        # ranges calibrated on an untrained student are meaningless: calibrate after warm-up
        ctx.deferred.append(lambda: calibrate_with(module, ctx.dm, s))
        return QuantizeRecord(layers=plan, learn_scale=s.learn_scale, settings=record.settings)

    @classmethod
    def on_extend(
        cls, record: QuantizeRecord, module: CompressibleModule, ctx: StageContext, names: list[str]
    ) -> None:
        quantize_module(module, ctx.dm, record.quantize_settings())

    @classmethod
    def after_step(
        cls, record: QuantizeRecord, module: CompressibleModule, ctx: StageContext
    ) -> QuantizeRecord | None:
        plan = current_plan(module.net)
        if plan == record.layers:
            return None
        return QuantizeRecord(layers=plan, learn_scale=record.learn_scale, settings=record.settings)
