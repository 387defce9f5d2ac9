"""The objective of a sweep: one trial = one chain.

Every trial calls the same :func:`~chaincomp.chain.run_chain` as ``chaincomp run`` (so it shares
the prefix cache) and is scored on the *validation* split: metric vs expected BitOps (a Pareto
front), or one objective under a cost budget / metric-loss constraint.

Contract: the trial's chain is an MLflow child run of the sweep's parent run, cross-referenced
(trial user attr ``mlflow_run_id``; run tags ``optuna.trial`` / ``optuna.study``); a finished
trial carries its results as user attrs (``letters``, ``val_metric``, ``val_bitops``,
``constraints``, ...) that the front and the samplers read; a failed one carries
``fail_reason``, and a non-finite result fails it with :class:`TrialDiverged`. Every trial
records what it cost (``stage_runs``, ``cached_steps``, ``epochs_trained``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from chaincomp.chain import CacheStats, run_chain
from chaincomp.errors import ChaincompError
from chaincomp.search.config import SearchConfig
from chaincomp.search.front import front_rows
from chaincomp.search.space import SearchSpace
from chaincomp.search.storage import BOOT, HOST
from chaincomp.tracking import NullTracker, Run, Tracker


class TrialDiverged(ChaincompError):
    """The chain finished with a non-finite metric or cost."""


class ChainPruned(optuna.TrialPruned):
    """A trial stopped after a step because its prefix is hopeless (the reason is the message);
    its MLflow chain run closes as KILLED with the reason as its ``error`` tag."""

    mlflow_status = "KILLED"


class Objective:
    """One trial = one chain: suggest order and settings, run_chain, score on validation."""

    def __init__(
        self,
        cfg: DictConfig,
        scfg: SearchConfig,
        space: SearchSpace,
        out: Path,
        tracker: Tracker | NullTracker,
        parent: Run | None,
    ):
        self.cfg, self.scfg, self.space, self.out = cfg, scfg, space, out
        self.tracker, self.parent = tracker, parent

    def trial_config(self, order: str, overrides: Mapping[str, Mapping[str, Any]]) -> DictConfig:
        cfg = copy.deepcopy(self.cfg)
        OmegaConf.set_readonly(cfg, False)
        OmegaConf.set_struct(cfg, False)
        cfg.chain.order = list(order)
        for step, values in overrides.items():
            for key, value in values.items():
                cfg.chain.steps[step].settings[key] = value
        return cfg

    def hopeless(
        self, trial: optuna.Trial, order: str, rows: list[dict[str, Any]], k: int
    ) -> str | None:
        """Why the trial should stop after step ``k`` (``rows``: baseline and steps so far),
        or None (see :class:`~chaincomp.search.config.SearchConfig`, multi-fidelity)."""
        return _hopeless(self, trial, order, rows, k)

    def __call__(self, trial: optuna.Trial) -> Any:
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("boot", BOOT)
        trial.set_user_attr("started", time.time())  # search.trial_timeout counts from here
        plan = getattr(trial.study.sampler, "plans", {}).get(trial.number)
        if plan is not None:  # stagewise: which step this trial searches (see StagewiseSampler)
            trial.set_user_attr("stagewise", plan.describe())
        order, overrides = self.space.suggest(trial, with_params=self.scfg.sampler != "grid")
        cfg = self.trial_config(order, overrides)
        run_ids: list[str | None] = []

        def started(run_id: str | None) -> None:
            run_ids.append(run_id)
            trial.set_user_attr("mlflow_run_id", run_id)
            if run_id and isinstance(self.tracker, Tracker):  # the trial's own choices, by name
                run = Run(self.tracker.client, run_id)
                run.log_params({f"optuna.{k}": v for k, v in trial.params.items()})

        stats = CacheStats()
        seen: list[dict[str, Any]] = []

        # a stagewise trial shares the incumbent's prefix up to its searched step: judge only
        # what it changed (the incumbent's own prefix may trail the front until a later step)
        first = order.index(plan.step) + 1 if plan is not None and plan.step in order else 1

        def stepped(row: dict[str, Any]) -> None:
            seen.append(row)
            k = len(seen) - 1  # 0 = the baseline
            if max(self.scfg.prune_after, first) <= k < len(order):
                reason = self.hopeless(trial, order, seen, k)
                if reason:
                    raise ChainPruned(reason)

        try:
            result = run_chain(
                cfg,
                self.out / "trials" / f"{trial.number:04d}",
                self.tracker,
                parent=self.parent,
                stats=stats,
                run_name=f"trial {trial.number} {order}",
                tags={
                    "optuna.study": self.scfg.name,
                    "optuna.trial": trial.number,
                    "optuna.order": order,
                },
                on_start=started,
                on_step=stepped,
            )
            val, bitops = result.last.val_metric, result.last.val_bitops
            if not (math.isfinite(val) and math.isfinite(bitops)):
                raise TrialDiverged(f"non-finite result: val_metric={val}, val_bitops={bitops}")
        except optuna.TrialPruned as exc:
            trial.set_user_attr("letters", order)
            trial.set_user_attr("pruned_reason", str(exc)[:500])
            # the steps it never ran: what stopping it early saved (seen[0] is the baseline)
            trial.set_user_attr("steps_skipped", len(order) - max(len(seen) - 1, 0))
            _record_cost(trial, stats)
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            trial.set_user_attr("fail_reason", reason)
            _record_cost(trial, stats)
            if (
                isinstance(exc, TrialDiverged)
                and run_ids
                and run_ids[0]
                and isinstance(self.tracker, Tracker)
            ):
                self.tracker.client.set_tag(run_ids[0], "error", reason)
                self.tracker.client.set_terminated(run_ids[0], "FAILED")
            _free_accelerator_memory()
            raise
        base = result.baseline
        loss = -result.val_metric_delta if result.higher_is_better else result.val_metric_delta
        constraints = []
        if self.scfg.max_metric_loss is not None:
            constraints.append(loss - self.scfg.max_metric_loss)
        if self.scfg.bitops_budget is not None:
            constraints.append(bitops - self.scfg.bitops_budget)
        for key, value in {
            "letters": order,
            "test_metric": result.last.test_metric,
            "val_metric": val,
            "val_bitops": bitops,
            "bitops": result.last.bitops,
            "bitops_ratio": result.bitops_ratio,
            "val_bitops_ratio": result.val_bitops_ratio,
            "metric_delta": result.metric_delta,
            "val_metric_loss": loss,
            "baseline_val_metric": base.val_metric,
            "baseline_val_bitops": base.val_bitops,
            "constraints": constraints or [0.0],
            "run_dir": str(self.out / "trials" / f"{trial.number:04d}"),
        }.items():
            trial.set_user_attr(key, value)
        _record_cost(trial, stats)
        if self.scfg.objective == "pareto":
            return val, bitops
        return val if self.scfg.objective == "metric" else bitops


def _hopeless(
    objective: Objective,
    trial: optuna.Trial,
    order: str,
    rows: list[dict[str, Any]],
    k: int,
) -> str | None:
    scfg = objective.scfg
    row, base = rows[k], rows[0]
    prefix = f"after step {k} ({order[:k]} of {order})"
    ratio = base["val_bitops"] / max(row["val_bitops"], 1e-12)
    if scfg.objective == "pareto":
        if scfg.prune_margin is None:
            return None
        higher = trial.study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        sign = 1.0 if higher else -1.0
        for r in front_rows(trial.study, scfg):
            better = sign * (r["val_metric"] - row["val_metric"])
            if better >= scfg.prune_margin and r["val_bitops"] <= row["val_bitops"]:
                return (
                    f"{prefix}: val {row['val_metric']:.2f} at {ratio:.1f}x fewer BitOps is "
                    f"dominated by trial {r['trial']} ({r['order']}: {r['val_metric']:.2f} at "
                    f"{r['val_bitops_ratio']:.1f}x) by {better:.2f} >= {scfg.prune_margin}"
                )
        return None
    if scfg.pruner == "none":
        return None
    value = row["val_metric"] if scfg.objective == "metric" else row["val_bitops"]
    trial.report(float(value), step=k)
    if trial.should_prune():
        what = "val metric" if scfg.objective == "metric" else "val BitOps"
        return f"{prefix}: {what} {value:.4g} is pruned by the {scfg.pruner} pruner"
    return None


def _record_cost(trial: optuna.Trial, stats: CacheStats) -> None:
    """What the trial spent: ``stage_runs`` executed (the baseline not counted),
    ``cached_steps`` taken from the prefix cache, ``epochs_trained`` (the sweep's budget),
    ``waited_s``: seconds it waited for a prefix another worker was computing."""
    trial.set_user_attr("stage_runs", stats.executed)
    trial.set_user_attr("cached_steps", stats.reused)
    trial.set_user_attr("epochs_trained", stats.epochs)
    trial.set_user_attr("waited_s", round(stats.waited_s, 1))


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


__all__ = ["ChainPruned", "Objective", "TrialDiverged"]
