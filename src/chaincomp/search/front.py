"""The Pareto front of a study (or, for one objective, its best feasible trials).

Contract: only COMPLETE trials whose ``constraints`` user attr is feasible (all <= 0) count;
:func:`front_rows` returns them sorted by validation BitOps; :func:`write_front` writes
``front.csv`` / ``front.md`` / ``front.png`` atomically and logs them on the sweep's parent run
(after every trial and at the end of the sweep).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from chaincomp.search.config import SearchConfig
from chaincomp.tracking import Run
from chaincomp.utils import atomic_write, markdown_table, pyplot, write_csv


def non_dominated(
    trials: list[optuna.trial.FrozenTrial], directions: list[optuna.study.StudyDirection]
) -> list[optuna.trial.FrozenTrial]:
    """The trials no other trial dominates (at least as good in every objective, better in one);
    of trials with equal values, every one is kept."""
    sign = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in directions]

    def key(t: optuna.trial.FrozenTrial) -> list[float]:
        return [s * v for s, v in zip(sign, t.values, strict=True)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    keys = [key(t) for t in trials]
    return [t for t, k in zip(trials, keys, strict=True) if not any(dominates(o, k) for o in keys)]


def front_rows(study: optuna.Study, scfg: SearchConfig) -> list[dict[str, Any]]:
    """The Pareto front (or, for one objective, the best feasible trials), best first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    feasible = [t for t in done if all(c <= 0 for c in t.user_attrs.get("constraints", [0.0]))]
    if not feasible:
        return []
    if scfg.objective == "pareto":
        front = non_dominated(feasible, study.directions)
    else:
        reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
        front = sorted(feasible, key=lambda t: t.value, reverse=reverse)[:10]  # type: ignore[arg-type, return-value]
    rows = []
    for t in front:
        a = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "order": a.get("letters"),
                "val_metric": a.get("val_metric"),
                "val_bitops": a.get("val_bitops"),
                "val_bitops_ratio": a.get("val_bitops_ratio"),
                "test_metric": a.get("test_metric"),
                "bitops_ratio": a.get("bitops_ratio"),
                "metric_delta": a.get("metric_delta"),
                "mlflow_run_id": a.get("mlflow_run_id"),
                **{k: v for k, v in t.params.items() if k != "order"},
            }
        )
    if scfg.objective == "pareto":  # along the front; one objective keeps best first
        rows.sort(key=lambda r: r["val_bitops"])
    return rows


def write_front(
    study: optuna.Study, scfg: SearchConfig, out: Path, parent: Run | None
) -> list[dict[str, Any]]:
    """front.csv / front.md / front.png in ``out`` (atomically), logged on the parent run."""
    rows = front_rows(study, scfg)
    lead = [
        "trial",
        "order",
        "val_metric",
        "val_bitops_ratio",
        "test_metric",
        "bitops_ratio",
        "metric_delta",
        "val_bitops",
    ]
    rest = sorted({k for r in rows for k in r} - {*lead, "mlflow_run_id"})
    keys = [*lead, *rest, "mlflow_run_id"]

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "front.csv", rows, keys)
    table = markdown_table(rows, keys, _cell)
    atomic_write(out / "front.md", lambda p: p.write_text(table))
    atomic_write(out / "front.png", lambda p: _plot(study, rows, p))
    if parent is not None and parent.run_id:
        for name in ("front.csv", "front.md", "front.png"):
            parent.log_artifact(out / name)
        _tag_front(study, rows, parent)
    return rows


def _tag_front(study: optuna.Study, rows: list[dict[str, Any]], parent: Run) -> None:
    """Tag every finished trial's chain run ``chaincomp.pareto`` true/false (filter the runs
    table with ``tags.chaincomp.pareto = 'true'``) and log the front on the sweep run:
    ``front_size`` and, for each front point in order of BitOps, ``front_val_metric`` at step =
    its validation BitOps reduction (the best metric at each cost budget)."""
    client = parent.client
    if client is None:
        return
    on_front = {r.get("mlflow_run_id") for r in rows}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        client.set_tag(run_id, "chaincomp.pareto", "true" if run_id in on_front else "false")
    parent.log_metrics({"front_size": len(rows)})
    for r in rows:
        ratio = r.get("val_bitops_ratio")
        if isinstance(ratio, (int, float)) and isinstance(r.get("val_metric"), (int, float)):
            parent.log_metrics({"front_val_metric": r["val_metric"]}, step=round(ratio))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _plot(study: optuna.Study, rows: list[dict[str, Any]], path: str | Path) -> None:
    plt = pyplot()
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [t.user_attrs["val_bitops"] for t in done],
        [t.user_attrs["val_metric"] for t in done],
        c="lightgray",
        label="trials",
    )
    if rows:
        ax.plot(
            [r["val_bitops"] for r in rows],
            [r["val_metric"] for r in rows],
            "o-",
            c="C3",
            label="Pareto front",
        )
        for r in rows:
            ax.annotate(str(r["order"]), (r["val_bitops"], r["val_metric"]), fontsize=7)
    if done:
        a = done[0].user_attrs
        ax.scatter(
            [a["baseline_val_bitops"]],
            [a["baseline_val_metric"]],
            marker="*",
            s=150,
            c="k",
            label="baseline",
        )
    ax.set_xscale("log")
    ax.set_xlabel("expected BitOps per sample (validation)")
    ax.set_ylabel("validation metric")
    ax.set_title(f"study {study.study_name}: {len(done)} trials")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


__all__ = ["front_rows", "non_dominated", "write_front"]
