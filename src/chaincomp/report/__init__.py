"""``chaincomp report``: the tables and plots of a study, read back from MLflow.

A study is the set of chains of one Optuna sweep (``report.source`` = the study name, read from
the trial runs tagged ``optuna.study``) or one ``chaincomp run`` (``report.source`` = its run
name; the latest finished one). Everything comes from the tracking store: the chain runs and
their per-step child runs (``baseline``, ``1:D``, ``2:P`` ...) with their metrics, so a report can
be regenerated anywhere the store is reachable.

Selection is on the validation split only: every winner, order, rank, Pareto front and
order-effect cell is decided by the validation metric (``val_metric``) and the validation BitOps
(``val_bitops``); the test split's numbers are reported beside them and never decide anything.

Every chain read is kept: several chains of one order (e.g. two trials of a sweep that drew the
same order) are folded into that order's best by validation, and the tables say how many were
folded (``runs``; the long ``steps.csv`` lists every chain read, ``kept`` marking the best).

Every state after k steps of a chain is itself a chain (the prefix cache makes it the same
weights), so one grid over the 24 orders of D, P, Q, E holds the pairs (2-step prefixes) and the
insertions (3-step prefixes) of the paper's study as well:

* ``pairwise``: each pair of stages in both orders; the winner has the better validation metric
  (ties within ``tie_tol`` go to the larger validation BitOps reduction).
* ``precedence``: the graph of the pairwise winners and its topological sort (or its cycle).
* ``insertion``: for a pair won by A->B and each third stage C: A->C->B against B->C->A.
* ``all_orders``: every full order ranked by validation, the Pareto front (validation metric vs
  validation BitOps ratio), the per-step waterfall of D->P->Q->E and the order-effect matrix.
* ``headline``: the per-step table of one chain against the paper's reported ratios.

Outputs go to ``<out_dir>/<study>/results/<label>/`` as ``.md``, ``.csv`` and ``.png`` files,
each written atomically.

The package: :mod:`.config` (:class:`ReportConfig` and the constants), :mod:`.load` (MLflow into
chains, :class:`Chain`), :mod:`.analysis` (states, pairs, precedence, insertion, ranking, front,
order effect), :mod:`.render` (tables and files), :mod:`.plots` (figures) and :mod:`.studies`
(one writer per study, :data:`~chaincomp.report.studies.WRITERS`, run by :func:`write_report`).
Everything public is re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chaincomp.report.analysis import (
    INSERTION_KEYS,
    ORDER_KEYS,
    PAIR_KEYS,
    State,
    all_orders,
    best_per_order,
    better,
    consistent,
    insertion,
    order_effect,
    pairwise,
    pareto,
    precedence,
    prefix_states,
    ratio,
    same,
    stages_of,
    state_of,
)
from chaincomp.report.config import (
    PAPER_ORDER,
    REFERENCES,
    SELECTION,
    STUDIES,
    ReportConfig,
)
from chaincomp.report.load import Chain, load_chains, read_result
from chaincomp.report.plots import plot_matrix, plot_pareto, plot_waterfall
from chaincomp.report.render import (
    STEP_KEYS,
    markdown,
    markdown_table,
    matrix_rows,
    save_figure,
    step_rows,
    write_text,
)
from chaincomp.report.studies import WRITERS, Context, context, write_report

__all__ = [
    "INSERTION_KEYS",
    "ORDER_KEYS",
    "PAIR_KEYS",
    "PAPER_ORDER",
    "REFERENCES",
    "SELECTION",
    "STEP_KEYS",
    "STUDIES",
    "WRITERS",
    "Chain",
    "Context",
    "ReportConfig",
    "State",
    "all_orders",
    "best_per_order",
    "better",
    "consistent",
    "context",
    "insertion",
    "load_chains",
    "markdown",
    "markdown_table",
    "matrix_rows",
    "order_effect",
    "pairwise",
    "pareto",
    "plot_matrix",
    "plot_pareto",
    "plot_waterfall",
    "precedence",
    "prefix_states",
    "ratio",
    "read_result",
    "report",
    "same",
    "save_figure",
    "stages_of",
    "state_of",
    "step_rows",
    "write_report",
    "write_text",
]


def summary_paths(patterns: tuple[str, ...]) -> list[str]:
    """The files of ``report.summaries``: each entry a ``summary.json`` path or a glob (``*``
    and ``?`` are wildcards, ``[`` is literal; e.g. a sweep's ``<run dir>/trials/*/summary.json``
    when it ran with tracking off), expanded in sorted order, each file once however many
    entries match it. Raises ConfigError naming the entries that match no file."""
    import glob

    from chaincomp.errors import ConfigError

    paths: dict[Path, str] = {}
    missing = []
    for pattern in patterns:
        if any(c in pattern for c in "*?"):
            found = sorted(glob.glob(pattern.replace("[", "[[]")))
        else:
            found = [pattern]
        found = [p for p in found if Path(p).is_file()]
        if not found:
            missing.append(pattern)
        for p in found:
            paths.setdefault(Path(p).resolve(), p)
    if missing:
        raise ConfigError(
            "report.summaries",
            f"no such file: {', '.join(missing)}",
            "summary.json paths or globs (*, ?) that match files",
        )
    return list(paths.values())


def report(cfg: Any) -> dict[str, Path]:
    """``chaincomp report``: read ``report.source`` from ``tracking.*`` (or the chains of
    ``report.summaries``) and write the files."""
    from omegaconf import OmegaConf

    from chaincomp.chain.result import ChainResult
    from chaincomp.tracking.mlflow_tracker import Tracker, TrackingConfig

    section = OmegaConf.to_container(cfg.report, resolve=True) if "report" in cfg else {}
    rcfg = ReportConfig.from_dict(section)  # type: ignore[arg-type]
    if rcfg.summaries:
        paths = summary_paths(rcfg.summaries)
        chains = [Chain(ChainResult.load(p)) for p in paths]
        store = "files " + ", ".join(rcfg.summaries)
        if tuple(paths) != rcfg.summaries:  # globs or repeats: say how many files were read
            store += f" ({len(paths)} files)"
        return write_report(rcfg, chains, store=store)
    tsec: Any = OmegaConf.to_container(cfg.tracking, resolve=True)
    tcfg = TrackingConfig(**{**tsec, "enabled": True})
    tracker = Tracker(tcfg)
    chains = load_chains(tracker.client, tracker.experiment_id, rcfg.source)
    return write_report(rcfg, chains, store=tcfg.uri)
