"""Reading a study's chains back from MLflow: one :class:`Chain` (a :class:`ChainResult`, the
schema of ``summary.json``) per finished chain run. :func:`load_chains` is the only entry point;
the rest of the package sees chains, never the store."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from chaincomp.chain.result import ChainResult, StepResult, from_rows
from chaincomp.errors import ConfigError
from chaincomp.tasks import TASKS

log = logging.getLogger("chaincomp.report")


@dataclass(frozen=True)
class Chain:
    """One finished chain as the report sees it: its :class:`ChainResult` and ``runs``, how many
    chains of this order were read and folded into this one (its order's best by validation,
    :func:`best_per_order`); 1 for a chain as read. ``order`` is the step names joined."""

    result: ChainResult
    runs: int = 1

    @property
    def order(self) -> str:
        return "".join(self.result.order)

    @property
    def run_id(self) -> str:
        return self.result.mlflow_run_id or ""

    @property
    def higher_is_better(self) -> bool:
        return self.result.higher_is_better

    @property
    def rows(self) -> tuple[StepResult, ...]:
        return self.result.steps

    @property
    def base(self) -> StepResult:
        return self.result.baseline

    @property
    def last(self) -> StepResult:
        return self.result.last


def load_chains(client: Any, experiment_id: str, source: str) -> list[Chain]:
    """Every finished chain of study ``source`` (trial runs), else the latest finished run
    named ``source``, sorted by order then start time: several chains of one order are all
    returned (:func:`best_per_order` folds them). Raises ConfigError when none."""
    runs = _search(
        client,
        experiment_id,
        f"tags.`optuna.study` = '{source}' and tags.`chaincomp.command` = 'run' "
        "and attributes.status = 'FINISHED'",
    )
    if not runs:
        runs = _search(
            client,
            experiment_id,
            f"attributes.run_name = '{source}' and tags.`chaincomp.command` = 'run' "
            "and attributes.status = 'FINISHED'",
        )
        runs = sorted(runs, key=lambda r: -r.info.start_time)[:1]
    if not runs:
        raise ConfigError(
            "report.source",
            f"no finished chain of {source!r} in the store",
            "the search.name of a sweep or the tracking.run_name of a run",
        )
    chains: list[Chain] = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        result = read_result(client, experiment_id, run)
        if result is None:
            log.warning(
                "run %s has neither a summary.json nor complete per-step metrics; "
                "not a chain of the report",
                run.info.run_id,
            )
        else:
            chains.append(Chain(result))
    return sorted(chains, key=lambda c: c.order)  # stable: start time within an order


def _search(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def read_result(client: Any, experiment_id: str, run: Any) -> ChainResult | None:
    """The chain's ``summary.json`` (logged as an artifact of its run) read as a
    :class:`ChainResult`. Only where that file cannot be read (a store copied without its
    artifacts, or written before the schema was versioned) is the result rebuilt from the
    per-step child runs' metrics; None when those are incomplete too."""
    from mlflow.exceptions import MlflowException  # here: reading summary files needs no MLflow

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, "summary.json", tmp)
            return ChainResult.load(path)
    except (MlflowException, OSError, ValueError) as exc:
        log.debug("run %s: summary.json not read (%s); from the step runs", run.info.run_id, exc)
    return _from_step_runs(client, experiment_id, run)


def _from_step_runs(client: Any, experiment_id: str, run: Any) -> ChainResult | None:
    steps = _search(client, experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    rows: dict[int, dict[str, Any]] = {}
    for s in steps:
        label = s.info.run_name or ""
        k, name = (0, "baseline") if label == "baseline" else _split(label)
        m = s.data.metrics
        if k < 0 or "test_metric" not in m or "val_metric" not in m:
            continue
        stage = "baseline" if k == 0 else s.data.tags.get("chaincomp.stage", name)
        rows[k] = {"name": name, "stage": stage, "cached": False, **m}
    n = len(rows)
    if n == 0 or sorted(rows) != list(range(n)):
        return None
    ordered = [rows[k] for k in range(n)]
    task = TASKS[run.data.params.get("data.task", "classify")]
    names = [r["name"] for r in ordered[1:]]
    return from_rows(
        ordered,
        task=task.name,
        metric_name=task.metric_name,
        higher_is_better=task.higher_is_better,
        chain=run.data.params.get("chain.name", ""),
        order=names,
        letters=run.data.tags.get("chaincomp.order", "".join(names)),
        mlflow_run_id=run.info.run_id,
    )


def _split(label: str) -> tuple[int, str]:
    head, _, name = label.partition(":")
    return (int(head), name) if head.isdigit() and name else (-1, "")
