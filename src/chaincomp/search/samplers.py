"""The Optuna sampler of a sweep (``search.sampler``: tpe | nsga2 | random | grid).

Contract: tpe and nsga2 are constrained when ``max_metric_loss`` or ``bitops_budget`` is set,
reading the trial user attr ``constraints`` (feasible when every value is <= 0) that
:class:`~chaincomp.search.objective.Objective` writes; grid runs every order at the chain's fixed
settings (the same shuffle of the grid in every worker and resume); the other samplers get a
``seed`` per worker. With ``search.stagewise`` the sampler is wrapped in
:class:`StagewiseSampler` (one step's settings at a time, the rest at the incumbent's).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from chaincomp.search.config import SearchConfig
from chaincomp.search.space import SearchSpace


def _constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get("constraints", [0.0])


def make_sampler(scfg: SearchConfig, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    base = _base_sampler(scfg, space, seed)
    if not scfg.stagewise:
        return base
    return StagewiseSampler(base, space, scfg.stage_trials, scfg.stagewise_start)


def _base_sampler(scfg: SearchConfig, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    constrained = scfg.max_metric_loss is not None or scfg.bitops_budget is not None
    cfunc = _constraints if constrained else None
    if scfg.sampler == "grid":
        # Optuna shuffles the grid with the seed and names points by their index (trial k runs
        # point k): every process of the study, and every resume, must shuffle alike
        return optuna.samplers.GridSampler({"order": list(space.orders)}, seed=scfg.seed)
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


def _feasible(trial: FrozenTrial) -> bool:
    return all(c <= 0 for c in trial.user_attrs.get("constraints", [0.0]))


def incumbent(study: Study) -> FrozenTrial | None:
    """The finished trial the stagewise search improves on; None before the first.

    One objective (metric or cost): the best feasible trial. Pareto (validation metric, BitOps):
    the cheapest feasible trial whose metric is no worse than the reference's, the reference
    being the first seed trial that finished (the hand-set chain), else the trial of best
    metric; ties go to the better metric. So the stagewise search walks from the hand-set chain
    towards chains that dominate it."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values and _feasible(t)
    ]
    if not done:
        return None
    sign = [1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
    if len(sign) == 1:
        return max(done, key=lambda t: (sign[0] * t.values[0], -t.number))
    seeds = [t for t in done if "seed" in t.user_attrs]
    ref = (
        min(seeds, key=lambda t: t.number)
        if seeds
        else max(done, key=lambda t: sign[0] * t.values[0])
    )
    ok = [t for t in done if sign[0] * t.values[0] >= sign[0] * ref.values[0]]
    return min(ok, key=lambda t: (t.values[1], -sign[0] * t.values[0], t.number))


@dataclass(frozen=True)
class StagewisePlan:
    """What a stagewise trial searches: ``step`` (its settings are sampled) in ``order``; every
    other parameter is ``fixed`` at the value of trial ``incumbent``."""

    step: str
    order: str
    incumbent: int
    fixed: dict[str, Any]

    def describe(self) -> str:
        return f"{self.step} of {self.order} (rest of trial {self.incumbent})"


def stagewise_plan(
    study: Study, number: int, space: SearchSpace, stage_trials: int, start: str = "first"
) -> StagewisePlan | None:
    """The plan of trial ``number``: the active step moves along the incumbent's order (from
    its first step forward, or with ``start="last"`` from its last step backward; skipping steps
    without searched settings; then around again) every ``stage_trials`` non-seed trials; None
    without an incumbent (the base sampler samples everything)."""
    best = incumbent(study)
    if best is None:
        return None
    order = str(best.params["order"])
    steps = [s for s in order if space.params.get(s)]
    if start == "last":
        steps.reverse()
    if not steps:
        return None
    earlier = sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < number and "seed" not in t.user_attrs
    )
    step = steps[(earlier // stage_trials) % len(steps)]
    fixed: dict[str, Any] = {"order": order}
    for other in order:
        if other != step:
            for p in space.params.get(other, ()):
                if p.name in best.params:
                    fixed[p.name] = best.params[p.name]
    return StagewisePlan(step, order, best.number, fixed)


def _seed_running(study: Study, number: int) -> bool:
    return any(
        "seed" in t.user_attrs and t.number != number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    )


class StagewiseSampler(optuna.samplers.BaseSampler):
    """Search the settings of one step at a time (``search.stagewise``).

    Contract: a trial queued with fixed parameters (a seed) is left to Optuna and ``base``.
    Every other trial follows :func:`stagewise_plan`: the incumbent's order and the settings of
    its other steps are fixed, ``base`` samples the active step's (relative sampling sees only
    those). A trial whose active step is the k-th reuses steps 1..k-1 from the prefix cache (their
    settings, hence cache keys, are the incumbent's), so a budget of N stage runs tries more
    chains than N / len(order); ``start="last"`` searches the cheapest trials (one stage run
    each) first. The plan of each trial is in :attr:`plans` (the objective records
    it as the trial's user attr ``stagewise``). Before the first seed finishes there is no
    incumbent: a trial of another worker then waits for it (polling every ``poll_s`` seconds)
    rather than sample a whole chain at random and train the baseline a second time."""

    poll_s = 5.0

    def __init__(
        self,
        base: optuna.samplers.BaseSampler,
        space: SearchSpace,
        stage_trials: int,
        start: str = "first",
    ):
        self._base = base
        self._space = space
        self._stage_trials = stage_trials
        self._start = start
        self.plans: dict[int, StagewisePlan] = {}

    def reseed_rng(self) -> None:
        self._base.reseed_rng()

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._base.before_trial(study, trial)
        if "fixed_params" in trial.system_attrs:
            return
        plan = stagewise_plan(study, trial.number, self._space, self._stage_trials, self._start)
        while plan is None and _seed_running(study, trial.number):
            time.sleep(self.poll_s)  # another worker runs a seed: start from it, not at random
            storage = study._storage  # the heartbeat thread starts only once ask() returns
            if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
                storage.record_heartbeat(trial._trial_id)
            plan = stagewise_plan(study, trial.number, self._space, self._stage_trials, self._start)
        if plan is not None:
            self.plans[trial.number] = plan

    def _fixed(self, trial: FrozenTrial) -> dict[str, Any]:
        plan = self.plans.get(trial.number)
        return plan.fixed if plan is not None else {}

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        fixed = self._fixed(trial)
        space = self._base.infer_relative_search_space(study, trial)
        return {k: v for k, v in space.items() if k not in fixed}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._base.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        fixed = self._fixed(trial)
        if param_name in fixed:
            return fixed[param_name]
        return self._base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._base.after_trial(study, trial, state, values)


__all__ = [
    "StagewisePlan",
    "StagewiseSampler",
    "incumbent",
    "make_pruner",
    "make_sampler",
    "stagewise_plan",
]
