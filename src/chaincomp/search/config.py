"""The ``search`` config section: :class:`SearchConfig` (``conf/search/*.yaml``), validated on
construction, and the optimisation :func:`directions` of each objective.

Contract: :meth:`SearchConfig.from_cfg` rejects unknown keys and invalid values with a
:class:`~chaincomp.errors.ConfigError` naming the ``search.<key>``; the config is frozen and
picklable (it is handed to spawned sweep workers).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig

from chaincomp.errors import ConfigError, check_keys
from chaincomp.pipeline import config_section

OBJECTIVES = ("pareto", "metric", "cost")
PRUNERS = ("none", "median", "percentile")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
STAGEWISE_STARTS = ("first", "last")


@dataclass(frozen=True)
class SearchConfig:
    """``conf/search/*.yaml``. ``stages``: step names from the chain catalogue; ``orders``:
    explicit orders (strings) instead of all permutations (``subsets``: also of subsets of at
    least ``min_stages`` steps); ``objective``: pareto (metric and BitOps) | metric (best
    metric with ``bitops_budget``) | cost (fewest BitOps within ``max_metric_loss`` of the
    baseline); ``max_metric_loss`` is also a constraint of pareto when set; ``sampler``: tpe |
    nsga2 | random | grid (all orders at the chain's fixed settings); ``storage``: a journal
    file path or a database URL; ``n_workers`` local processes. Resuming: a trial whose worker
    died is failed (and, ``retry_stale``, queued again); ``reap_other_hosts`` also takes the
    RUNNING trials of other hosts as dead, for a journal file carried from a machine that no
    longer runs (a GPU lease's study resumed on the next lease).

    Seeding: the first trials are the chain as configured (``seed_configured``, not with the
    grid sampler, which runs it anyway) and the ``seed_chains`` (order strings, or mappings of
    ``order`` and ``<stage>.<key>`` values; unset keys take the configured settings); a
    resumed study does not queue them again. Budget: the study stops at ``n_trials``, at
    ``timeout`` seconds per worker, or once its trials trained ``budget_epochs`` epochs (stage
    runs taken from the prefix cache cost nothing), whichever comes first.

    Multi-fidelity: a trial reports after every step; from step ``prune_after`` on (never at
    its last step) a hopeless trial stops and is recorded as PRUNED with its reason. For the
    ``metric`` / ``cost`` objectives the Optuna ``pruner`` (median | percentile: the 25 % best
    go on) judges the step's validation metric / BitOps; for ``pareto``, a prefix is hopeless
    when a finished trial on the front is at least ``prune_margin`` better on validation and
    no more expensive in BitOps already (later steps can still cut BitOps, rarely add metric).

    Stagewise (``stagewise``): each trial after the seeds keeps the order and settings of the
    incumbent (the best trial; for pareto the cheapest one at least as good on validation as the
    hand-set chain) except one step's, which the sampler searches; the searched step moves
    along the order every ``stage_trials`` trials, from its first step forward or, with
    ``stagewise_start: last``, from its last step backward (cheapest trials first). Earlier steps then come from the prefix
    cache, so trials cost fewer stage runs."""

    name: str = "chaincomp"
    stages: tuple[str, ...] = ("D", "P", "Q", "E")
    orders: tuple[str, ...] | None = None
    subsets: bool = False
    min_stages: int = 1
    objective: str = "pareto"
    max_metric_loss: float | None = None
    bitops_budget: float | None = None
    sampler: str = "tpe"
    n_startup_trials: int = 8
    n_trials: int = 20
    timeout: float | None = None
    trial_timeout: float | None = None
    n_workers: int = 1
    storage: str = ".chaincomp/optuna.journal"
    seed: int = 0
    retry_stale: bool = True
    reap_other_hosts: bool = False
    heartbeat_interval: int = 10
    grace_period: int = 30
    seed_configured: bool = True
    seed_chains: tuple[Any, ...] = ()
    budget_epochs: int | None = None
    pruner: str = "none"
    prune_margin: float | None = None
    prune_after: int = 1
    stagewise: bool = False
    stage_trials: int = 4
    stagewise_start: str = "first"

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: Any) -> ConfigError:
            return ConfigError(f"search.{key}", f"invalid value {value!r}", allowed)

        if self.objective not in OBJECTIVES:
            raise bad("objective", self.objective, OBJECTIVES)
        if self.sampler not in SAMPLERS:
            raise bad("sampler", self.sampler, SAMPLERS)
        if self.objective == "metric" and self.bitops_budget is None:
            raise ConfigError("search.bitops_budget", "required by objective=metric", "> 0")
        if self.objective == "cost" and self.max_metric_loss is None:
            raise ConfigError("search.max_metric_loss", "required by objective=cost", ">= 0")
        if self.bitops_budget is not None and not self.bitops_budget > 0:
            raise bad("bitops_budget", self.bitops_budget, "null or > 0")
        if self.max_metric_loss is not None and self.max_metric_loss < 0:
            raise bad("max_metric_loss", self.max_metric_loss, "null or >= 0")
        if self.n_trials < 1:
            raise bad("n_trials", self.n_trials, ">= 1")
        if self.n_workers < 1:
            raise bad("n_workers", self.n_workers, ">= 1")
        if self.timeout is not None and not self.timeout > 0:
            raise bad("timeout", self.timeout, "null or > 0 seconds")
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise bad("trial_timeout", self.trial_timeout, "null or > 0 seconds")
        if not self.name:
            raise bad("name", self.name, "a study name")
        if self.reap_other_hosts and self.is_database:
            raise ConfigError(
                "search.reap_other_hosts",
                "a database's workers on other hosts may be alive (its heartbeat finds the dead)",
                "false with a database storage; true only with a journal file carried from "
                "another machine",
            )
        if self.pruner not in PRUNERS:
            raise bad("pruner", self.pruner, PRUNERS)
        if self.pruner != "none" and self.objective == "pareto":
            raise ConfigError(
                "search.pruner",
                "Optuna's pruners judge one objective, not a Pareto front",
                "none with objective=pareto (use search.prune_margin), or objective=metric|cost",
            )
        if self.prune_margin is not None and (
            self.objective != "pareto" or not self.prune_margin >= 0
        ):
            raise bad("prune_margin", self.prune_margin, "null, or >= 0 with objective=pareto")
        if self.prune_after < 1:
            raise bad("prune_after", self.prune_after, "an integer >= 1 (steps)")
        if self.stagewise and self.sampler == "grid":
            raise ConfigError(
                "search.stagewise",
                "the grid sampler runs every order at fixed settings",
                "false with sampler=grid, or sampler tpe | nsga2 | random",
            )
        if self.stagewise_start not in STAGEWISE_STARTS:
            raise bad("stagewise_start", self.stagewise_start, STAGEWISE_STARTS)
        if not (isinstance(self.stage_trials, int) and self.stage_trials >= 1):
            raise bad("stage_trials", self.stage_trials, "an integer >= 1")
        if self.budget_epochs is not None and not self.budget_epochs >= 1:
            raise bad("budget_epochs", self.budget_epochs, "null or an integer >= 1")
        for i, entry in enumerate(self.seed_chains):
            ok = isinstance(entry, str) or (
                isinstance(entry, dict) and isinstance(entry.get("order"), str)
            )
            if not ok:
                raise bad(
                    f"seed_chains[{i}]",
                    entry,
                    "an order string (DPQE) or {order: DPQE, <stage>.<key>: value, ...}",
                )

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SearchConfig:
        values = config_section(cfg, "search")
        check_keys(values, (f.name for f in fields(cls)), "search")
        for key in ("stages", "orders"):
            if isinstance(values.get(key), list):
                values[key] = tuple(str(v) for v in values[key])
        if isinstance(values.get("seed_chains"), list):
            values["seed_chains"] = tuple(values["seed_chains"])
        return cls(**values)

    @property
    def is_database(self) -> bool:
        return "://" in self.storage


def directions(task_higher_is_better: bool, objective: str) -> list[Any]:
    metric = "maximize" if task_higher_is_better else "minimize"
    return {"pareto": [metric, "minimize"], "metric": [metric], "cost": ["minimize"]}[objective]


__all__ = ["OBJECTIVES", "PRUNERS", "SAMPLERS", "SearchConfig", "directions"]
