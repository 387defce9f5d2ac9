"""D: knowledge distillation into a new student network.

The current network becomes a frozen teacher; the student is ``student`` (a ``conf/model`` config
that Hydra composes into the setting: ``+model@chain.steps.D.settings.student=resnet18``) or, when
that is null, the current architecture's config, at ``width_mult`` times its width. A model whose
constructor takes no ``width_mult`` (a user's own) is thinned generically: the same graph with
every channel group of Torch-Pruning's dependency graph cut to ``width_mult`` and re-initialized
(:mod:`chaincomp.models.thin`). The
student trains with ``(1 - alpha) * task loss + alpha * task.distill_loss`` (Hinton KD at
``temperature`` for classification; the teacher's predicted mean as the target for regression).

Replacing the net is announced with ``ctx.replaced``: each technique in force decides itself
what transfers to the student (exit heads at the same points, the same quantization) and what
is dropped (pruned channels); the record lists both, and holds the transferred records, which
replay re-applies. Work a transfer defers (calibrating the student's quantizers) runs after
``quant_warmup`` of the epochs, so the KD training is then two fits: warm-up and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from chaincomp.errors import ConfigError
from chaincomp.models import build_model, model_names, takes_argument
from chaincomp.models.thin import TARGET as THIN_TARGET
from chaincomp.module import CompressibleModule
from chaincomp.stages.base import (
    Phase,
    ReplayInfo,
    Stage,
    StageContext,
    StageRecord,
    StageSettings,
    record_from_json,
    stage_class,
    teacher_forward,
)


@dataclass(frozen=True)
class DistillSettings(StageSettings):
    """``student``: null (= the current architecture) or a model config with a ``_target_``,
    composed by Hydra from ``conf/model`` (``+model@chain.steps.D.settings.student=<name>``);
    ``width_mult``: multiplies the student's width (0, 4]; ``temperature`` > 0; ``alpha`` in
    [0, 1]: weight of the KD term (0 = plain training of the student)."""

    epochs: int = 4
    lr: float | None = None
    student: dict[str, Any] | None = None
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
        self.check(
            self.student is None
            or (isinstance(self.student, dict) and bool(self.student.get("_target_"))),
            "student",
            self.student,
            f"null or a model config composed by Hydra: +model@{self.prefix}.student=<name>, "
            f"<name> one of {model_names()}",
        )


def student_config(current: dict[str, Any], s: DistillSettings) -> dict[str, Any]:
    """The student's model config: ``student`` (or the current architecture's config) with its
    ``width_mult`` multiplied; a model that takes no ``width_mult`` is wrapped in
    :func:`~chaincomp.models.thin.thinned` (the same graph, every channel group thinned)."""
    cfg = dict(s.student) if s.student is not None else dict(current)
    if s.width_mult == 1.0:
        return cfg
    if takes_argument(cfg, "width_mult") is False:
        if s.width_mult > 1:
            raise ConfigError(
                f"{s.prefix}.width_mult",
                f"{s.width_mult} would widen {cfg.get('_target_')}, which takes no width_mult "
                "argument; such a model can only be thinned",
                f"(0, 1], or a student that takes width_mult (+model@{s.prefix}.student=<name>, "
                f"<name> one of {model_names()})",
            )
        return {"_target_": THIN_TARGET, "base": cfg, "width_mult": s.width_mult}
    cfg["width_mult"] = float(cfg.get("width_mult", 1.0)) * s.width_mult
    return cfg


def build_student(
    current: dict[str, Any],
    s: DistillSettings,
    in_channels: int,
    num_outputs: int,
    image_size: tuple[int, int],
) -> tuple[nn.Module, dict[str, Any]]:
    """The (untrained) student and its config; a student that cannot be built is a
    :class:`ConfigError` naming the D key the user typed (``<prefix>.width_mult`` when a
    model that takes no ``width_mult`` would be widened, else ``<prefix>.student``)."""
    cfg = student_config(current, s)
    if cfg.get("_target_") == THIN_TARGET and not 0 < cfg["width_mult"] <= 1:
        raise ConfigError(
            f"{s.prefix}.width_mult",
            f"{s.width_mult} would widen {cfg['base'].get('_target_')} (thinned to "
            f"{cfg['width_mult'] / s.width_mult:g} by an earlier D) past its own width",
            f"a product with the earlier D steps' width_mult in (0, 1], or a student that takes "
            f"width_mult (+model@{s.prefix}.student=<name>, <name> one of {model_names()})",
        )
    try:
        return build_model(cfg, in_channels, num_outputs, image_size), cfg
    except ConfigError as exc:
        target = cfg.get("_target_")
        what = "the student" if s.student is not None else "the current architecture"
        raise ConfigError(
            f"{s.prefix}.student",
            f"{what} ({target}) cannot be built: {exc}",
            f"null or +model@{s.prefix}.student=<name>, <name> one of {model_names()}",
        ) from None


@dataclass
class DistillRecord(StageRecord):
    """``model``: the student's architecture config; ``transfers``: the records (JSON) of the
    techniques re-applied to the student, in the order they were re-applied; ``transferred`` /
    ``dropped``: the names of the techniques in force that moved to the student / were lost."""

    VERSION = 1

    model: dict[str, Any] = field(default_factory=dict)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    transferred: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def net_config(self) -> dict[str, Any] | None:
        return self.model

    def moved_records(self) -> list[StageRecord]:
        return [record_from_json(t) for t in self.transfers]


class Distill(Stage[DistillSettings, DistillRecord]):
    """Replace the net by a student trained from it with knowledge distillation."""

    name = "distill"
    letter = "D"
    Settings = DistillSettings
    Record = DistillRecord

    def apply(self, module: CompressibleModule, ctx: StageContext) -> DistillRecord:
        s = self.settings
        dm = ctx.dm
        teacher = module.net
        device = next(teacher.parameters()).device
        student, cfg = build_student(
            ctx.model_cfg, s, dm.in_channels, dm.num_outputs, dm.image_size
        )
        student.to(device)
        before = [r.stage for r in ctx.in_force()]
        module.net = student
        moved = ctx.replaced(module, teacher)
        self._deferred = ctx.take_deferred()
        names = [r.stage for r in moved]
        record = DistillRecord(
            model=cfg,
            transfers=[r.to_json() for r in moved],
            transferred=names,
            dropped=[n for n in before if n not in names and n != self.name],
        )
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
        self._summary = {
            "teacher_params": params_t,
            "student_params": params_s,
            "alpha": s.alpha,
            "temperature": s.temperature,
        }
        return record

    def phases(
        self, module: CompressibleModule, ctx: StageContext, record: DistillRecord
    ) -> list[Phase]:
        """One fit; two when a transfer deferred work (warm-up in float, the work, the rest)."""
        s = self.settings
        if not self._deferred:
            return [Phase(s.epochs)]
        warm = round(s.epochs * s.quant_warmup)
        deferred = self._deferred

        def run_deferred() -> None:
            for action in deferred:
                action()

        return [Phase(warm), Phase(s.epochs - warm, run_deferred)]

    def kd_term(self, module: CompressibleModule, x: Tensor, out: Tensor, target: Tensor) -> Tensor:
        s = self.settings
        assert self._teacher is not None
        with torch.no_grad():
            t_out = teacher_forward(self._teacher, x)
        return s.alpha * module.task.distill_loss(out, t_out, s.temperature)

    def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        if self._teacher is not None:
            self._teacher.to(pl_module.device).eval()

    def finalize(
        self, module: CompressibleModule, ctx: StageContext, record: DistillRecord
    ) -> None:
        module.loss_terms.pop("kd", None)
        module.task_weight = 1.0
        self._teacher = None
        self._deferred = []

    def preflight(
        self, net: nn.Module, model_cfg: dict[str, Any], info: ReplayInfo
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Build the student (untrained): a bad ``student`` or ``width_mult`` fails here."""
        return build_student(
            model_cfg, self.settings, info.in_channels, info.num_outputs, info.image_size
        )

    @classmethod
    def replay(cls, module: CompressibleModule, record: DistillRecord, info: ReplayInfo) -> None:
        module.net = info.build(record.model)
        for moved in record.moved_records():
            stage_class(moved.stage).replay(module, moved, info)
