"""D: knowledge distillation into a new student network.

The current network becomes a frozen teacher; the student is ``student`` (a ``conf/model`` name)
or, when that is null, the current architecture's config at ``width_mult`` times its width. The
student trains with ``(1 - alpha) * task loss + alpha * task.distill_loss`` (Hinton KD at
``temperature`` for classification; the teacher's predicted mean as the target for regression).

What transfers from the teacher's compression is re-applied to the student before training:
exit heads at the same points (trained jointly during KD, threshold re-chosen), and the active
quantization (same bits and layers; the student trains in float for ``quant_warmup`` of the
epochs, is then calibrated and finishes with QAT, because ranges calibrated on a random
network are meaningless). Pruned channels cannot
transfer: they are recorded under ``dropped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from chaincomp.errors import ConfigError
from chaincomp.models import build_model
from chaincomp.module import CompressibleModule
from chaincomp.stages.base import ReplayInfo, Stage, StageContext, StageSettings


def model_config(name: str) -> dict[str, Any]:
    """``conf/model/<name>.yaml`` as a dict."""
    from chaincomp.cli import config_dir

    path = Path(config_dir()) / "model" / f"{name}.yaml"
    if not path.is_file():
        allowed = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError("stage.distill.student", f"unknown model {name!r}", allowed)
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


@dataclass(frozen=True)
class DistillSettings(StageSettings):
    """``student``: a conf/model name or null (= the current architecture); ``width_mult``:
    multiplies the student's width (0, 4]; ``temperature`` > 0; ``alpha`` in [0, 1]: weight of
    the KD term (0 = plain training of the student)."""

    epochs: int = 4
    lr: float | None = None
    student: str | None = None
    width_mult: float = 0.5
    temperature: float = 4.0
    alpha: float = 0.9
    quant_warmup: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0 <= self.quant_warmup < 1, "quant_warmup", self.quant_warmup, "[0, 1)")
        self.check(0 < self.width_mult <= 4, "width_mult", self.width_mult, "(0, 4]")
        self.check(self.temperature > 0, "temperature", self.temperature, "> 0")
        self.check(0 <= self.alpha <= 1, "alpha", self.alpha, "[0, 1]")
        self.check(self.student is None or isinstance(self.student, str), "student",
                   self.student, "null or a conf/model name")  # fmt: skip


def student_config(current: dict[str, Any], s: DistillSettings) -> dict[str, Any]:
    cfg = dict(model_config(s.student)) if s.student else dict(current)
    if s.width_mult != 1.0:  # build_model rejects a model without a width_mult argument
        cfg["width_mult"] = float(cfg.get("width_mult", 1.0)) * s.width_mult
    return cfg


def teacher_forward(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's final output on the whole batch (no early exit)."""
    forward_all = getattr(teacher, "forward_all", None)
    return forward_all(x)[-1] if forward_all is not None else teacher(x)


class Distill(Stage):
    """Replace the net by a student trained from it with knowledge distillation."""

    name = "distill"
    letter = "D"
    Settings = DistillSettings

    def apply(self, module: CompressibleModule, ctx: StageContext) -> dict[str, Any]:
        from chaincomp.stages.early_exit import ExitNet, attach_exits
        from chaincomp.stages.quantize import requantize

        s = self.settings
        assert isinstance(s, DistillSettings)
        dm = ctx.dm
        teacher = module.net
        device = next(teacher.parameters()).device
        cfg = student_config(ctx.model_cfg, s)
        student = build_model(cfg, dm.in_channels, dm.num_outputs, dm.image_size).to(device)
        record: dict[str, Any] = {"model": cfg, "transferred": [], "dropped": []}
        module.net = student
        if isinstance(teacher, ExitNet):
            exit_rec = ctx.latest("early_exit")
            assert exit_rec is not None
            net = attach_exits(module, teacher.points, exit_rec["head"], exit_rec["head_width"],
                               dm.example_input(1), teacher.exit_weight)  # fmt: skip
            net.selection = dict(teacher.selection)
            net.threshold.copy_(teacher.threshold)
            record["exits"] = {
                k: exit_rec[k] for k in ("points", "head", "head_width", "exit_weight")
            }
            record["exits"]["selection"] = net.selection
            record["transferred"].append("early_exit")
        quant = ctx.latest("quantize")
        if quant is not None:
            record["quantized"] = requantize(module, dm, quant, calibrated=False)
            record["transferred"].append("quantize")
        if ctx.latest("prune") is not None:
            record["dropped"].append("prune")
        ctx.model_cfg = cfg
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher: nn.Module | None = teacher
        module.task_weight = 1.0 - s.alpha
        if s.alpha > 0:
            module.loss_terms["kd"] = self.kd_term
        params_t = sum(p.numel() for p in teacher.parameters())
        params_s = sum(p.numel() for p in module.net.parameters())
        self._summary = {"teacher_params": params_t, "student_params": params_s,
                         "alpha": s.alpha, "temperature": s.temperature}  # fmt: skip
        return record

    def run(self, module: CompressibleModule, ctx: StageContext) -> dict[str, Any]:
        """apply -> KD training (float warm-up, calibration, QAT when quantization transfers)
        -> finalize."""
        from chaincomp.stages.quantize import calibrate_with, settings_of

        s = self.settings
        assert isinstance(s, DistillSettings)
        record = self.apply(module, ctx)
        record["stage"] = self.name
        quant = ctx.latest("quantize") if "quantized" in record else None
        warm = round(s.epochs * s.quant_warmup) if quant is not None else s.epochs
        record["train_time_s"] = ctx.fit(module, warm, callbacks=[self], lr=s.lr)
        if quant is not None:
            calibrate_with(module, ctx.dm, settings_of(quant))
            record["train_time_s"] += ctx.fit(module, s.epochs - warm, callbacks=[self], lr=s.lr)
        self.finalize(module, ctx, record)
        return record

    def kd_term(self, module: CompressibleModule, x: Tensor, out: Tensor, target: Tensor) -> Tensor:
        s = self.settings
        assert isinstance(s, DistillSettings) and self._teacher is not None
        with torch.no_grad():
            t_out = teacher_forward(self._teacher, x)
        return s.alpha * module.task.distill_loss(out, t_out, s.temperature)

    def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if self._teacher is not None:
            self._teacher.to(pl_module.device).eval()

    def finalize(self, module: CompressibleModule, ctx: StageContext,
                 record: dict[str, Any]) -> None:  # fmt: skip
        from chaincomp.stages.early_exit import retune

        module.loss_terms.pop("kd", None)
        module.task_weight = 1.0
        self._teacher = None
        chosen = retune(module, ctx.dm)
        if chosen is not None:
            record["threshold"] = chosen["threshold"]

    @classmethod
    def replay(cls, module: CompressibleModule, record: dict[str, Any], info: ReplayInfo) -> None:
        from chaincomp.stages.early_exit import attach_exits
        from chaincomp.stages.quantize import quantize_net

        module.net = info.build(record["model"])
        if "exits" in record:
            e = record["exits"]
            example = torch.zeros(1, info.in_channels, *info.image_size)
            net = attach_exits(module, e["points"], e["head"], e["head_width"], example,
                               e["exit_weight"])  # fmt: skip
            net.selection = dict(e["selection"])
        if "quantized" in record:
            quantize_net(module.net, record["quantized"]["layers"],
                         bool(record["quantized"].get("learn_scale", False)))  # fmt: skip
