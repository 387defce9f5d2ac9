"""The stage contract: a Lightning ``Callback`` that also transforms the model.

A stage is one compression technique (distill, prune, quantize, early exit). The chain runner
calls, for every step of a chain::

    record = stage.run(module, ctx)   # = apply -> fine-tune (Trainer.fit with the stage as a
                                      #   callback) -> finalize, unless the stage overrides it
    stage.summary()                   # floats for MLflow

and :meth:`Stage.replay` rebuilds the same *structure* from the record alone (no training), so a
chain's weights can be loaded back into it with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

import pytorch_lightning as pl
from torch import nn

from chaincomp.data import ChainDataModule
from chaincomp.errors import ConfigError
from chaincomp.module import CompressibleModule


@dataclass(frozen=True)
class StageSettings:
    """Validated settings of a stage; subclasses add their own fields (all with defaults).

    Contract: construction validates every value and raises :class:`ConfigError` naming
    ``<prefix>.<key>`` and the allowed values; ``from_dict`` also rejects unknown keys.
    ``epochs`` is the fine-tune length, ``lr`` its peak learning rate (None = ``optim.lr``).
    """

    epochs: int = 1
    lr: float | None = None

    # set by from_dict so that errors name the full config key
    prefix: str = field(default="stage", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0")
        self.check(self.lr is None or self.lr > 0, "lr", self.lr, "null or > 0")

    def check(self, ok: bool, key: str, value: Any, allowed: str | Sequence[Any]) -> None:
        if not ok:
            raise ConfigError(f"{self.prefix}.{key}", f"invalid value {value!r}", allowed)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, prefix: str = "stage") -> StageSettings:
        values = dict(values or {})
        known = {f.name for f in fields(cls) if f.name != "prefix"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}", "unknown key", sorted(known))
        hints = get_type_hints(cls)
        for key, value in list(values.items()):
            hint = str(hints.get(key, ""))
            if hint in ("int", "float") and isinstance(value, bool):
                raise ConfigError(f"{prefix}.{key}", f"invalid value {value!r}", f"a {hint}")
            if hint == "float" and isinstance(value, int):
                values[key] = float(value)
            if hint == "int" and isinstance(value, float) and value.is_integer():
                values[key] = int(value)
            if "int" in hint and "float" not in hint and isinstance(value, str):
                raise ConfigError(f"{prefix}.{key}", f"invalid value {value!r}", "an integer")
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


@dataclass
class StageContext:
    """What a stage may use besides the module: the data, a way to fine-tune, and the chain so far.

    ``fit(module, epochs, callbacks, lr)`` runs one ``Trainer.fit`` and returns its wall time.
    ``records`` holds the records of the steps already applied (oldest first), so a stage can see
    e.g. which quantization is active. ``model_cfg`` is the architecture config of the current
    network (a distill step replaces it).
    """

    dm: ChainDataModule
    fit: Callable[..., float]
    records: list[dict[str, Any]] = field(default_factory=list)
    model_cfg: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def latest(self, stage_name: str) -> dict[str, Any] | None:
        """The record of the most recent step of ``stage_name`` that is still in force."""
        for rec in reversed(self.records):
            if rec["stage"] == stage_name:
                return rec
            if rec["stage"] == "distill" and stage_name not in rec.get("transferred", []):
                return None
        return None


class Stage(pl.Callback, ABC):
    """One compression technique.

    Contract (checked for every ``conf/stage/*.yaml`` by ``tests/test_stage_contract.py``):
    - ``Settings`` is a :class:`StageSettings` subclass; bad values fail at construction.
    - ``apply(module, ctx)`` changes ``module.net`` in place or replaces it and returns a
      JSON-serialisable record of what it did (always including ``"stage": name``).
    - While registered as a callback during the fine-tune, the stage may add loss terms or
      freeze parameters; ``teardown`` removes what it added.
    - ``finalize(module, ctx, record)`` runs after the fine-tune and may add to the record.
    - ``summary()`` returns finite floats describing the step (logged to MLflow).
    - ``replay(module, record, info)`` rebuilds the structure ``apply`` produced (no training,
      no data) so that the saved state dict loads into it strictly.
    """

    name: ClassVar[str]
    letter: ClassVar[str]
    Settings: ClassVar[type[StageSettings]]

    def __init__(self, settings: StageSettings):
        if not isinstance(settings, self.Settings):
            raise TypeError(f"{type(self).__name__} needs {self.Settings.__name__}")
        self.settings = settings
        self._summary: dict[str, float] = {}

    @classmethod
    def from_config(cls, values: Mapping[str, Any] | None, prefix: str | None = None) -> Stage:
        return cls(cls.Settings.from_dict(values, prefix or f"stage.{cls.name}"))

    @abstractmethod
    def apply(self, module: CompressibleModule, ctx: StageContext) -> dict[str, Any]: ...

    def finalize(
        self, module: CompressibleModule, ctx: StageContext, record: dict[str, Any]
    ) -> None:
        """Make the change permanent after the fine-tune (default: nothing to do)."""

    def run(self, module: CompressibleModule, ctx: StageContext) -> dict[str, Any]:
        """apply -> fine-tune with this stage as a callback -> finalize; returns the record."""
        record = self.apply(module, ctx)
        record["stage"] = self.name
        record["train_time_s"] = ctx.fit(
            module, self.settings.epochs, callbacks=[self], lr=self.settings.lr
        )
        self.finalize(module, ctx, record)
        return record

    def summary(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self._summary.items()}
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"stage {self.name}: non-finite summary values {bad}")
        return out

    @classmethod
    @abstractmethod
    def replay(cls, module: CompressibleModule, record: dict[str, Any], info: ReplayInfo) -> None:
        """Rebuild the structure that ``apply`` produced, from ``record`` only."""


@dataclass
class ReplayInfo:
    """What replay knows besides the record: the data shape and a model builder."""

    in_channels: int
    num_outputs: int
    image_size: tuple[int, int]
    build: Callable[[dict[str, Any]], nn.Module]
