"""The Optuna sampler of a sweep (``search.sampler``: tpe | nsga2 | random | grid).

Contract: tpe and nsga2 are constrained when ``max_metric_loss`` or ``bitops_budget`` is set,
reading the trial user attr ``constraints`` (feasible when every value is <= 0) that
:class:`~chaincomp.search.objective.Objective` writes; grid runs every order at the chain's fixed
settings; each worker gets its own ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from chaincomp.search.config import SearchConfig
from chaincomp.search.space import SearchSpace


def _constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get("constraints", [0.0])


def make_sampler(scfg: SearchConfig, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    constrained = scfg.max_metric_loss is not None or scfg.bitops_budget is not None
    cfunc = _constraints if constrained else None
    if scfg.sampler == "grid":
        return optuna.samplers.GridSampler({"order": list(space.orders)}, seed=seed)
    if scfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if scfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cfunc)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=scfg.n_startup_trials,
        multivariate=True,
        group=True,  # conditional stage parameters
        constant_liar=True,  # parallel workers do not all try the same point
        constraints_func=cfunc,
    )


def make_pruner(scfg: SearchConfig) -> optuna.pruners.BasePruner:
    """The Optuna pruner of ``search.pruner`` (steps = chain steps; ``prune_after`` warm-up)."""
    if scfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=scfg.prune_after - 1)
    if scfg.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            25.0, n_startup_trials=4, n_warmup_steps=scfg.prune_after - 1
        )
    return optuna.pruners.NopPruner()


__all__ = ["make_pruner", "make_sampler"]
