"""The chain spec: a validated catalogue of steps and the explicit ``order`` they run in.

``chain_spec(cfg)`` reads ``cfg.chain`` once, validates every step's settings up front (a bad
value stops the run before any training, naming ``chain.steps.<S>.settings.<key>``) and returns a
:class:`ChainSpec`; the order is always the ``order`` list, never the catalogue's dict order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from chaincomp.errors import ConfigError, check_keys
from chaincomp.pipeline import config_section
from chaincomp.stages import Stage, StageSettings, stage_class


@dataclass(frozen=True)
class Step:
    """One entry of the chain's catalogue: ``name`` (as used in ``order``), its stage class and
    its settings, validated once when the spec is read."""

    name: str
    stage: type[Stage]  # type: ignore[type-arg]
    settings: StageSettings

    def make(self) -> Stage:  # type: ignore[type-arg]
        """A fresh stage (a stage holds per-run state: the callback of one fine-tune)."""
        return self.stage(self.settings)


@dataclass(frozen=True)
class ChainSpec:
    """Validated ``chain`` config: the ordered steps, the baseline settings and the cache."""

    name: str
    steps: tuple[Step, ...]
    baseline_epochs: int | None = None
    baseline_checkpoint: str | None = None
    cache_dir: str | None = None

    @property
    def order(self) -> list[str]:
        return [s.name for s in self.steps]

    @property
    def letters(self) -> str:
        return "".join(s.stage.letter for s in self.steps)


CHAIN_KEYS = ("name", "order", "steps", "baseline", "cache_dir")


STEP_KEYS = ("_target_", "stage", "settings", "search")


def step_class(name: str, entry: Mapping[str, Any]) -> type[Stage]:  # type: ignore[type-arg]
    """The stage class of catalogue entry ``name``: its ``_target_`` (a Stage class path, as
    every ``conf/stage/*.yaml`` sets it), else its ``stage`` name or letter, else ``name``."""
    if entry.get("_target_"):
        cls = stage_class(str(entry["_target_"]), f"chain.steps.{name}._target_")
        if entry.get("stage") not in (None, cls.name, cls.letter):
            raise ConfigError(
                f"chain.steps.{name}.stage",
                f"{entry['stage']!r} disagrees with _target_ {entry['_target_']}",
                [cls.name, cls.letter],
            )
        return cls
    return stage_class(str(entry.get("stage", name)), f"chain.steps.{name}.stage")


def chain_spec(cfg: DictConfig | Mapping[str, Any]) -> ChainSpec:
    """Read and validate ``cfg.chain`` (every step's settings are checked here, up front)."""
    chain = config_section(cfg, "chain")
    check_keys(chain, CHAIN_KEYS, "chain")
    catalogue = chain.get("steps") or {}
    order = chain.get("order")
    if order is None or isinstance(order, str | bytes) or not isinstance(order, Sequence):
        raise ConfigError(
            "chain.order", f"must be a list of step names, got {order!r}", sorted(catalogue)
        )
    steps = []
    for name in order:
        if name not in catalogue:
            raise ConfigError("chain.order", f"unknown step {name!r}", sorted(catalogue))
        entry = dict(catalogue[name] or {})
        check_keys(entry, STEP_KEYS, f"chain.steps.{name}")
        cls = step_class(str(name), entry)
        prefix = f"chain.steps.{name}.settings"
        steps.append(Step(str(name), cls, cls.Settings.from_dict(entry.get("settings"), prefix)))
    base = dict(chain.get("baseline") or {})
    check_keys(base, ("epochs", "checkpoint"), "chain.baseline")
    epochs = base.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
        raise ConfigError("chain.baseline.epochs", f"invalid value {epochs!r}", "null or >= 0")
    checkpoint = base.get("checkpoint")
    if checkpoint is not None and not Path(str(checkpoint)).is_file():
        raise ConfigError(
            "chain.baseline.checkpoint",
            f"no file {checkpoint!r}",
            "null or a state dict saved by `chaincomp train` (baseline.pt)",
        )
    return ChainSpec(
        name=str(chain.get("name") or "chain"),
        steps=tuple(steps),
        baseline_epochs=epochs,
        baseline_checkpoint=checkpoint,
        cache_dir=chain.get("cache_dir"),
    )
