"""The stage contract (v2): typed settings, typed versioned records, declared interactions.

A stage is one compression technique (distill, prune, quantize, early exit, ...): one ``.py``
with a :class:`Stage` subclass and one ``conf/stage/<name>.yaml`` whose ``_target_`` names it.
The chain runner calls, for every step::

    record = stage.run(module, ctx)   # apply -> for each phase: fit (Trainer.fit with the stage
                                      #   as a Lightning callback) -> finalize
    stage.summary()                   # floats for MLflow

No stage overrides :meth:`Stage.run`: a stage shapes its training with :meth:`Stage.phases`
(e.g. prune / fine-tune rounds) and does its training-time work in Lightning hooks (KD loss,
frozen backbone).

**Records** are dataclasses (:class:`StageRecord`) with a ``VERSION`` and a JSON round-trip
(:meth:`StageRecord.to_json` / :func:`record_from_json`); :meth:`Stage.replay` rebuilds from a
record alone the structure :meth:`Stage.apply` produced, so saved weights load strictly.

**Interactions** are declared by the stage whose earlier record is affected, never written into
the later stage. The runner (through :class:`StageContext`) calls, on every record in force:

- :meth:`Stage.on_replace` when a later step replaced the net (a distillation student): re-apply
  what transfers and return the re-applied record, or None to drop it. Records are visited in
  ascending ``replace_order`` (structure before wrappers: exit heads before quantizers).
- :meth:`Stage.on_extend` when a later step added modules (exit heads, factor layers).
- :meth:`Stage.after_step` after every later step: re-tune (an exit threshold) and optionally
  return an *amendment* record, appended after that step's record and replayed in order.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, TypeVar, get_type_hints

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from chaincomp.data import ChainDataModule
from chaincomp.errors import ConfigError, check_keys
from chaincomp.module import CompressibleModule


@dataclass(frozen=True)
class StageSettings:
    """Validated settings of a stage; subclasses add their own fields (all with defaults).

    Contract: construction validates every value and raises :class:`ConfigError` naming
    ``<prefix>.<key>`` and the allowed values; ``from_dict`` also rejects unknown keys.
    ``epochs`` is the fine-tune length, ``lr`` its peak learning rate (None = ``optim.lr``),
    ``cutout`` the Cutout side of its training batches (None = ``data.cutout``; 0 = none), so a
    step can train on harder views than the baseline did (e.g. a long D that matches the
    teacher on cut-out images) without changing the baseline or its cache key.
    """

    epochs: int = 1
    lr: float | None = None
    cutout: int | None = None

    # set by from_dict so that errors name the full config key
    prefix: str = field(default="stage", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0")
        self.check(self.lr is None or self.lr > 0, "lr", self.lr, "null or > 0")
        self.check(
            self.cutout is None
            or (
                isinstance(self.cutout, int)
                and not isinstance(self.cutout, bool)
                and self.cutout >= 0
            ),
            "cutout",
            self.cutout,
            "null (data.cutout) or an integer >= 0",
        )

    def check(self, ok: bool, key: str, value: Any, allowed: str | Sequence[Any]) -> None:
        if not ok:
            raise ConfigError(f"{self.prefix}.{key}", f"invalid value {value!r}", allowed)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, prefix: str = "stage") -> StageSettings:
        values = dict(values or {})
        check_keys(values, (f.name for f in fields(cls) if f.name != "prefix"), prefix)
        hints = get_type_hints(cls)
        for key, value in list(values.items()):
            hint = str(hints.get(key, ""))
            if hint in ("int", "float") and isinstance(value, bool):
                raise ConfigError(f"{prefix}.{key}", f"invalid value {value!r}", f"a {hint}")
            if hint == "float" and isinstance(value, int):
                values[key] = float(value)
            if (
                "int" in hint
                and "float" not in hint
                and "tuple" not in hint
                and isinstance(value, float)
                and value.is_integer()
            ):
                values[key] = int(value)
            if "int" in hint and "float" not in hint and isinstance(value, str):
                raise ConfigError(f"{prefix}.{key}", f"invalid value {value!r}", "an integer")
            if "float" in hint and isinstance(value, str):
                raise ConfigError(f"{prefix}.{key}", f"invalid value {value!r}", "a number")
            if hint in ("tuple[int, ...]", "tuple[str, ...]") and isinstance(value, list):
                values[key] = tuple(value)
        try:
            return cls(prefix=prefix, **values)
        except TypeError as exc:
            raise ConfigError(prefix, f"bad settings: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("prefix")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class FineTuneSettings(StageSettings):
    """Settings of a stage that changes the net and fine-tunes it (P, Q, low-rank).

    ``kd_alpha`` in [0, 1): the fine-tune also distils from a frozen teacher, the loss being
    ``(1 - kd_alpha) * task loss + kd_alpha * KD`` with the task's distillation loss at
    ``kd_temperature`` (> 0); 0 (the default) = the task loss alone. ``kd_teacher``: ``input``
    (the net as this step received it: the unpruned net for P, the float net for Q) or
    ``baseline`` (the chain's trained baseline, :meth:`StageContext.baseline`). The teacher costs
    one extra forward per training batch.
    """

    kd_alpha: float = 0.0
    kd_temperature: float = 4.0
    kd_teacher: str = "input"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0 <= self.kd_alpha < 1, "kd_alpha", self.kd_alpha, "[0, 1)")
        self.check(self.kd_temperature > 0, "kd_temperature", self.kd_temperature, "> 0")
        self.check(self.kd_teacher in KD_TEACHERS, "kd_teacher", self.kd_teacher, KD_TEACHERS)

    @property
    def uses_baseline(self) -> bool:
        """Whether the fine-tune distils from the chain's baseline."""
        return self.kd_alpha > 0 and self.kd_teacher == "baseline"


KD_TEACHERS = ("input", "baseline")


def teacher_forward(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's final output on the whole batch (no early exit)."""
    forward_all = getattr(teacher, "forward_all", None)
    return forward_all(x)[-1] if forward_all is not None else teacher(x)


class KDTeacher:
    """The loss term of :class:`FineTuneSettings`: KD from a frozen copy of ``net`` (its final
    output, no early exit), moved to the batch's device on first use."""

    def __init__(self, net: nn.Module, alpha: float, temperature: float):
        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature

    def __call__(
        self, module: CompressibleModule, x: Tensor, out: Tensor, target: Tensor
    ) -> Tensor:
        first = next(self.net.parameters(), None)
        if first is not None and first.device != x.device:
            self.net.to(x.device)
        self.net.eval()
        with torch.no_grad():
            t_out = teacher_forward(self.net, x)
        return self.alpha * module.task.distill_loss(out, t_out, self.temperature)


class RecordError(ValueError):
    """A record that cannot be read: unknown stage, other version, unknown or missing keys."""


@dataclass
class StageRecord:
    """What one step did (typed; one subclass per stage, bound to it as ``Stage.Record``).

    Contract: every field is JSON-serialisable (numbers, strings, lists, dicts);
    ``record_from_json(r.to_json()) == r``; ``VERSION`` is bumped when the fields change, and a
    record of another version is refused (:class:`RecordError`), never guessed at.
    """

    VERSION: ClassVar[int] = 1
    stage: ClassVar[str] = ""  # set when the stage class is defined

    train_time_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageRecord:
        if data.get("version") != cls.VERSION:
            raise RecordError(
                f"{cls.stage} record version {data.get('version')!r}; this code reads {cls.VERSION}"
            )
        values = {k: v for k, v in data.items() if k not in ("stage", "version")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecordError(f"{cls.stage} record: unknown keys {unknown}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise RecordError(f"{cls.stage} record: {exc}") from None

    def net_config(self) -> dict[str, Any] | None:
        """The architecture config of the net after this step, when the step replaced the net
        (None: the architecture config is unchanged)."""
        return None

    def moved_records(self) -> list[StageRecord] | None:
        """For a step that replaced the net: the earlier records re-applied to the new net (the
        only ones still in force before it). None for a step that did not replace the net."""
        return None


def record_from_json(data: Mapping[str, Any]) -> StageRecord:
    """The typed record of a JSON record (its ``stage`` names the stage)."""
    if "stage" not in data:
        raise RecordError("record without a 'stage'")
    return stage_class(str(data["stage"]), "record.stage").Record.from_json(data)


@dataclass
class Phase:
    """One ``Trainer.fit`` of a step: ``epochs`` epochs, after ``before()`` (if any) ran."""

    epochs: int
    before: Callable[[], None] | None = None


@dataclass
class StageContext:
    """What a stage may use besides the module: the data, a way to fine-tune, and the chain so far.

    ``fit(module, epochs, callbacks, lr)`` runs one ``Trainer.fit`` and returns its wall time.
    ``baseline()`` returns the chain's trained baseline network (None outside a chain run).
    ``records`` holds the typed records of the steps already applied (oldest first, amendments
    included). ``model_cfg`` is the architecture config of the current network.
    A stage that changes the net in a way earlier techniques must follow reports it with
    :meth:`replaced` or :meth:`extended`; the earlier records' stages decide what happens.
    """

    dm: ChainDataModule
    fit: Callable[..., float]
    records: list[StageRecord] = field(default_factory=list)
    model_cfg: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    deferred: list[Callable[[], None]] = field(default_factory=list)
    baseline: Callable[[], nn.Module] | None = None

    def baseline_net(self, key: str = "kd_teacher") -> nn.Module:
        """The chain's trained baseline network (the runner provides it: kept from this run or
        read from the prefix cache; do not modify it); a :class:`ConfigError` naming ``key``
        where this context has none."""
        if self.baseline is None:
            raise ConfigError(key, "this step runs without the chain's baseline", "input")
        return self.baseline()

    def in_force(self) -> list[StageRecord]:
        """The latest record of each technique still applied to the net, in chain order.

        A record that replaced the net (distillation) ends every earlier record except the ones
        it transferred (which stand at its place)."""
        found: dict[str, StageRecord] = {}
        for rec in reversed(self.records):
            moved = rec.moved_records()
            if moved is not None:
                for t in reversed(moved):
                    found.setdefault(t.stage, t)
                found.setdefault(rec.stage, rec)
                break
            found.setdefault(rec.stage, rec)
        return list(reversed(list(found.values())))

    def latest(self, stage_name: str) -> StageRecord | None:
        """The record of ``stage_name`` in force, or None."""
        return next((r for r in self.in_force() if r.stage == stage_name), None)

    def replaced(self, module: CompressibleModule, old_net: nn.Module) -> list[StageRecord]:
        """``module.net`` was replaced (``old_net`` is the previous one): every record in force
        re-applies what transfers (ascending ``replace_order``); returns the re-applied records.
        Work a transfer defers until the new net is trained a little (calibration) is queued
        in ``deferred``."""
        records = sorted(self.in_force(), key=lambda r: stage_class(r.stage).replace_order)
        moved = []
        for rec in records:
            new = stage_class(rec.stage).on_replace(rec, module, self, old_net)
            if new is not None:
                moved.append(new)
        return moved

    def extended(self, module: CompressibleModule, names: Sequence[str]) -> None:
        """Modules ``names`` were added to ``module.net``: records in force take them in."""
        for rec in self.in_force():
            stage_class(rec.stage).on_extend(rec, module, self, list(names))

    def take_deferred(self) -> list[Callable[[], None]]:
        out, self.deferred = self.deferred, []
        return out


S = TypeVar("S", bound=StageSettings)
R = TypeVar("R", bound=StageRecord)

# name / letter -> stage class; filled as stage classes are defined (see Stage.__init_subclass__)
REGISTRY: dict[str, type[Stage[Any, Any]]] = {}
LETTER_OF: dict[str, str] = {}


class Stage(pl.Callback, ABC, Generic[S, R]):
    """One compression technique.

    Contract (checked for every ``conf/stage/*.yaml`` by ``tests/test_stage_contract.py``):
    - ``Settings`` is a :class:`StageSettings` subclass; bad values fail at construction.
      ``Record`` is a :class:`StageRecord` subclass.
    - ``apply(module, ctx)`` changes ``module.net`` in place or replaces it and returns the
      record of what it did; :meth:`phases` says how to fine-tune after it (default: one fit of
      ``settings.epochs``); ``finalize(module, ctx, record)`` runs after the fine-tune.
    - While registered as a callback during the fine-tune, the stage may add loss terms or
      freeze parameters; ``finalize`` removes what it added.
    - ``summary()`` returns finite floats describing the step (logged to MLflow).
    - ``replay(module, record, info)`` rebuilds the structure ``apply`` produced (no training,
      no data) so that the saved state dict loads into it strictly.
    - The interaction hooks (``on_replace``, ``on_extend``, ``after_step``) say what this
      stage's record does when later steps change the net (module docstring).
    """

    name: ClassVar[str]
    letter: ClassVar[str]
    Settings: ClassVar[type[StageSettings]]
    Record: ClassVar[type[StageRecord]]
    #: when a later step replaces the net, records are re-applied in ascending order
    replace_order: ClassVar[int] = 50

    settings: S

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        concrete = not any(
            getattr(getattr(cls, m), "__isabstractmethod__", False) for m in ("apply", "replay")
        )  # (ABCMeta fills __abstractmethods__ only after this hook)
        if getattr(cls, "name", None) and concrete:
            cls.Record.stage = cls.name
            REGISTRY[cls.name] = cls
            LETTER_OF[cls.letter] = cls.name

    def __init__(self, settings: S):
        if not isinstance(settings, self.Settings):
            raise TypeError(f"{type(self).__name__} needs {self.Settings.__name__}")
        self.settings = settings
        self._summary: dict[str, float] = {}

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None, prefix: str | None = None) -> Stage:  # type: ignore[type-arg]
        settings: Any = cls.Settings.from_dict(values, prefix or f"stage.{cls.name}")
        return cls(settings)

    # ------------------------------------------------------------------------------ the step
    @abstractmethod
    def apply(self, module: CompressibleModule, ctx: StageContext) -> R: ...

    def phases(self, module: CompressibleModule, ctx: StageContext, record: R) -> list[Phase]:
        """The fine-tune after ``apply``: one fit of ``settings.epochs`` unless overridden."""
        return [Phase(self.settings.epochs)]

    def finalize(self, module: CompressibleModule, ctx: StageContext, record: R) -> None:
        """Make the change permanent after the fine-tune (default: nothing to do)."""

    def run(self, module: CompressibleModule, ctx: StageContext) -> R:
        """apply -> each phase (``before`` then one fit with this stage as a callback, on
        training batches cut out at ``settings.cutout`` where set) -> finalize; returns the
        record. With :class:`FineTuneSettings` ``kd_alpha`` > 0 the fits
        also distil from a frozen copy of the net as this step received it (taken before
        ``apply``) or of the chain's baseline; the term is removed before ``finalize``. Stages
        do not override this."""
        s = self.settings
        teacher = None
        if isinstance(s, FineTuneSettings) and s.kd_alpha > 0:
            source = ctx.baseline_net(f"{s.prefix}.kd_teacher") if s.uses_baseline else module.net
            teacher = KDTeacher(source, s.kd_alpha, s.kd_temperature)
        alpha = teacher.alpha if teacher is not None else 0.0
        record = self.apply(module, ctx)
        if teacher is not None:
            module.loss_terms["kd_input"] = teacher
            module.task_weight = 1.0 - alpha
        try:
            with ctx.dm.training_augment(cutout=s.cutout):
                for phase in self.phases(module, ctx, record):
                    if phase.before is not None:
                        phase.before()
                    record.train_time_s += ctx.fit(module, phase.epochs, callbacks=[self], lr=s.lr)
        finally:
            if teacher is not None:
                module.loss_terms.pop("kd_input", None)
                module.task_weight = 1.0
        self.finalize(module, ctx, record)
        return record

    def preflight(
        self, net: nn.Module, model_cfg: dict[str, Any], info: ReplayInfo
    ) -> tuple[nn.Module, dict[str, Any]] | None:
        """The dry check before anything trains (the runner calls it for every step on the
        untrained nets the chain would hand that step, see :func:`chaincomp.chain.preflight`):
        raise :class:`ConfigError` naming ``<settings.prefix>.<key>``, the key the user typed,
        when this step cannot run on ``net`` (``model_cfg`` is its architecture config). A step
        that replaces the net returns the new untrained net and its config; the others return
        None. Contract: no data, no training, ``net`` is left unchanged. Default: nothing to
        check."""
        return None

    def summary(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self._summary.items()}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"stage {self.name}: non-finite summary values {bad}")
        return out

    @classmethod
    @abstractmethod
    def replay(cls, module: CompressibleModule, record: R, info: ReplayInfo) -> None:
        """Rebuild the structure that ``apply`` produced, from ``record`` only."""

    # ------------------------------------------------------------------ interactions (v2)
    @classmethod
    def on_replace(
        cls, record: R, module: CompressibleModule, ctx: StageContext, old_net: nn.Module
    ) -> StageRecord | None:
        """A later step replaced the net by ``module.net``: re-apply what transfers and return
        the record of what was re-applied, or None (the default) to drop this technique."""
        return None

    @classmethod
    def on_extend(
        cls, record: R, module: CompressibleModule, ctx: StageContext, names: list[str]
    ) -> None:
        """A later step added the modules ``names`` to the net (default: nothing to do)."""

    @classmethod
    def after_step(
        cls, record: R, module: CompressibleModule, ctx: StageContext
    ) -> StageRecord | None:
        """A later step finished: re-tune what depends on the net; return an amendment record
        (replayed right after that step) or None (the default)."""
        return None


@dataclass
class ReplayInfo:
    """What replay knows besides the record: the data shape and a model builder."""

    in_channels: int
    num_outputs: int
    image_size: tuple[int, int]
    build: Callable[[dict[str, Any]], nn.Module]


def _discover() -> None:
    """Import the stage class named by every ``conf/stage/*.yaml`` ``_target_``."""
    from omegaconf import DictConfig, OmegaConf

    from chaincomp.utils import config_dir

    for path in sorted((config_dir() / "stage").glob("*.yaml")):
        node = OmegaConf.load(path)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if target:
            importlib.import_module(str(target).rpartition(".")[0])


def stage_class(name: str, key: str = "stage") -> type[Stage[Any, Any]]:
    """The stage class for a name (``prune``), a letter (``P``) or a ``_target_`` path."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            raise ConfigError(key, f"cannot import {name!r}", "a Stage class path") from None
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ConfigError(key, f"{name!r} is not a Stage", "a Stage class path")
        return cls
    if LETTER_OF.get(name, name) not in REGISTRY:
        _discover()
    name = LETTER_OF.get(name, name)
    if name not in REGISTRY:
        raise ConfigError(key, f"unknown stage {name!r}", [*REGISTRY, *LETTER_OF])
    return REGISTRY[name]


def stages() -> dict[str, type[Stage[Any, Any]]]:
    """Every stage class: the built-in ones and those named by ``conf/stage/*.yaml``."""
    _discover()
    return dict(REGISTRY)
