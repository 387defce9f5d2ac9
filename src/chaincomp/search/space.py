"""The search space of a chain study: orders x per-stage hyperparameters.

- The order is one categorical ``order`` over strings of step names (``"DPQE"``), enumerated
  once from the study config (permutations of ``stages``, optionally of their subsets, or an
  explicit ``orders`` list) and fixed for the whole study.
- A stage hyperparameter is named ``<stage>.<key>`` (``prune.ratio``, ``quantize.w_bits``) and
  suggested only when its step is in the trial's order, so the names are the same in every
  order and a parameter never appears for an absent stage.
- The distributions come from the ``search`` section of each step (``conf/stage/*.yaml``):
  ``{type: float|int|categorical, low, high, step, log, choices}``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import optuna

from chaincomp.errors import ConfigError, check_keys
from chaincomp.stages import stage_class

PARAM_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One searchable setting of one step."""

    step: str
    stage: str
    key: str
    type: str
    low: float = 0.0
    high: float = 0.0
    step_size: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.key}"

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.type == "int":
            return optuna.distributions.IntDistribution(
                int(self.low),
                int(self.high),
                log=self.log,
                step=int(self.step_size or 1),
            )
        return optuna.distributions.FloatDistribution(
            float(self.low),
            float(self.high),
            log=self.log,
            step=self.step_size,
        )

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                self.name,
                int(self.low),
                int(self.high),
                step=int(self.step_size or 1),
                log=self.log,
            )
        return trial.suggest_float(
            self.name, float(self.low), float(self.high), step=self.step_size, log=self.log
        )


def _param(step: str, stage: str, key: str, spec: Mapping[str, Any]) -> Param:
    where = f"chain.steps.{step}.search.{key}"
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}.type", f"unknown {kind!r}", PARAM_TYPES)
    check_keys(spec, ("type", "low", "high", "step", "log", "choices"), where)
    if kind == "categorical":
        choices = tuple(spec.get("choices") or ())
        if not choices:
            raise ConfigError(f"{where}.choices", "empty", "a non-empty list")
        return Param(step, stage, key, kind, choices=choices)
    low, high = spec.get("low"), spec.get("high")
    if low is None or high is None or not low <= high:
        raise ConfigError(f"{where}", f"bad range low={low!r} high={high!r}", "low <= high")
    return Param(step, stage, key, kind, low, high, spec.get("step"), bool(spec.get("log", False)))


def _check_param(p: Param, settings: Mapping[str, Any]) -> None:
    """A searched key must be a setting of its stage, and the ends of its range (or each of its
    choices) valid values of it; otherwise every trial that suggests it would fail."""
    where = f"chain.steps.{p.step}.search.{p.key}"
    cls = stage_class(p.stage).Settings
    known = sorted(f.name for f in fields(cls) if f.name != "prefix")
    if p.key not in known:
        raise ConfigError(where, f"{p.stage} has no setting {p.key!r}", known)
    values = list(p.choices) if p.type == "categorical" else [p.low, p.high]
    if p.type == "int":
        values = [int(v) for v in values]
    for value in values:
        try:
            cls.from_dict({**settings, p.key: value}, f"chain.steps.{p.step}.settings")
        except ConfigError as exc:
            if exc.key != f"chain.steps.{p.step}.settings.{p.key}":
                raise  # the step's own settings are wrong: that error names them
            raise ConfigError(
                where, f"value {value!r} is invalid ({exc.problem})", exc.allowed
            ) from None


def enumerate_orders(
    stages: Sequence[str], subsets: bool = False, min_stages: int = 1
) -> list[str]:
    """Permutations of ``stages`` (all of them, or of every subset of >= ``min_stages``)."""
    sizes = range(min_stages, len(stages) + 1) if subsets else [len(stages)]
    return ["".join(p) for r in sizes for p in itertools.permutations(stages, r)]


@dataclass(frozen=True)
class SearchSpace:
    """Orders (fixed for the study) and the stage parameters, by step."""

    orders: tuple[str, ...]
    params: dict[str, tuple[Param, ...]] = field(default_factory=dict)

    def suggest(
        self, trial: optuna.Trial, with_params: bool = True
    ) -> tuple[str, dict[str, dict[str, Any]]]:
        """The trial's order and its settings overrides ``{step: {key: value}}``."""
        order = trial.suggest_categorical("order", list(self.orders))
        overrides: dict[str, dict[str, Any]] = {}
        for step in order:
            if with_params:
                overrides[step] = {p.key: p.suggest(trial) for p in self.params.get(step, ())}
        return str(order), overrides

    def seed_params(
        self,
        order: str,
        settings: Mapping[str, Mapping[str, Any]],
        values: Mapping[str, Any] | None = None,
        key: str = "search.seed_chains",
    ) -> dict[str, Any]:
        """The Optuna parameters of the chain ``order`` at the configured ``settings``
        (``{step: settings}``) with ``values`` (``{<stage>.<key>: value}``) on top: what
        :meth:`suggest` would have to return for that chain (``enqueue_trial``)."""
        if order not in self.orders:
            raise ConfigError(key, f"order {order!r} is not one of the study's orders", self.orders)
        values = dict(values or {})
        params: dict[str, Any] = {"order": order}
        for step in order:
            for p in self.params.get(step, ()):
                if p.name in values:
                    params[p.name] = values.pop(p.name)
                    continue
                cls = stage_class(p.stage).Settings
                configured = cls.from_dict(
                    settings.get(step) or {}, f"chain.steps.{step}.settings"
                ).as_dict()
                params[p.name] = configured[p.key]
        if values:
            raise ConfigError(
                f"{key}.{sorted(values)[0]}",
                f"not a searched parameter of order {order!r}",
                [n for n in self.param_names() if n != "order"],
            )
        return params

    def param_names(self) -> list[str]:
        return ["order", *(p.name for ps in self.params.values() for p in ps)]


def build_space(
    catalogue: Mapping[str, Any],
    stages: Sequence[str],
    orders: Sequence[str] | None,
    subsets: bool,
    min_stages: int,
) -> SearchSpace:
    """Validate the study's stages against the chain catalogue and collect the parameters.

    Step names must be single characters (orders are strings of them) and name distinct
    stages, so that ``<stage>.<key>`` is unambiguous.
    """
    if not stages:
        raise ConfigError("search.stages", "empty", sorted(catalogue))
    seen: dict[str, str] = {}
    params: dict[str, tuple[Param, ...]] = {}
    for step in stages:
        if step not in catalogue:
            raise ConfigError("search.stages", f"unknown step {step!r}", sorted(catalogue))
        if len(step) != 1:
            raise ConfigError(
                "search.stages", f"step name {step!r} is not one character", "D, P, Q, E, ..."
            )
        entry = catalogue[step] or {}
        stage = stage_class(str(entry.get("stage", step)), f"chain.steps.{step}.stage").name
        if stage in seen:
            raise ConfigError(
                "search.stages",
                f"steps {seen[stage]!r} and {step!r} are both {stage}",
                "one step per stage",
            )
        seen[stage] = step
        params[step] = tuple(
            _param(step, stage, k, v) for k, v in (entry.get("search") or {}).items()
        )
        for p in params[step]:
            _check_param(p, entry.get("settings") or {})
    if orders:
        bad = [
            o for o in orders if not o or any(c not in stages for c in o) or len(set(o)) != len(o)
        ]
        if bad:
            raise ConfigError(
                "search.orders",
                f"invalid order {bad[0]!r}",
                f"strings of distinct steps from {list(stages)}",
            )
        all_orders = [str(o) for o in orders]
    else:
        if not 1 <= min_stages <= len(stages):
            raise ConfigError(
                "search.min_stages", f"{min_stages} out of range", f"1..{len(stages)}"
            )
        all_orders = enumerate_orders(stages, subsets, min_stages)
    return SearchSpace(tuple(all_orders), params)
