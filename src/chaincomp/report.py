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
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Literal

from chaincomp import utils
from chaincomp.errors import ConfigError
from chaincomp.utils import atomic_write, pyplot, write_csv

log = logging.getLogger("chaincomp.report")

STUDIES = ("pairwise", "precedence", "insertion", "all_orders", "headline")
PAPER_ORDER = "DPQE"
SELECTION = "Selection: validation metric and validation BitOps; test reported beside."
# Reported results on ResNet-34 / CIFAR-10 (BitOps reduction, accuracy change in points).
REFERENCES = (
    ("Chain of Compression v2 (arXiv 2403.17447), D->P->Q->E", 859.0, "about 0.09 (reported)"),
    ("NAC (RL search over the same methods)", 100.8, "-1.30"),
)


@dataclass(frozen=True)
class ReportConfig:
    """``studies``: which tables to write (any of :data:`STUDIES`); ``label``: the results
    subfolder; ``source``: the sweep's study name or a run's name; ``out_dir``: the experiments
    folder; ``tie_tol``: metric differences up to this count as ties (>= 0)."""

    studies: tuple[str, ...] = ("all_orders",)
    label: str = "default"
    source: str = ""
    out_dir: str = "experiments"
    tie_tol: float = 0.0

    def __post_init__(self) -> None:
        bad = [s for s in self.studies if s not in STUDIES]
        if bad or not self.studies:
            raise ConfigError("report.studies", f"unknown {bad or 'empty list'}", STUDIES)
        if not self.source:
            raise ConfigError("report.source", "empty", "an Optuna study name or a run name")
        if not self.label or "/" in self.label:
            raise ConfigError("report.label", f"invalid {self.label!r}", "a folder name")
        if not (self.tie_tol >= 0):
            raise ConfigError("report.tie_tol", f"invalid {self.tie_tol!r}", "a number >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReportConfig:
        known = {"studies", "label", "source", "out_dir", "tie_tol"}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"report.{extra[0]}", "unknown key", sorted(known))
        values = dict(d)
        if "studies" in values:
            studies = values["studies"]
            values["studies"] = (studies,) if isinstance(studies, str) else tuple(studies)
        for key in ("label", "source", "out_dir"):
            if key in values and values[key] is not None:
                values[key] = str(values[key])
        return cls(**values)


@dataclass
class StepRow:
    """The state after ``k`` steps of a chain (k = 0: the baseline). ``val_bitops`` are the
    expected BitOps per sample on the validation split, ``bitops`` on the test split."""

    k: int
    name: str
    val_metric: float
    test_metric: float
    bitops: float
    val_bitops: float
    macs: float
    params: float
    size_mb: float


@dataclass
class Chain:
    """One finished chain run: its order (step names), task direction and per-step rows.
    ``runs``: how many chains of this order were read and folded into this one (its order's
    best by validation, :func:`best_per_order`); 1 for a chain as read."""

    order: str
    run_id: str
    higher_is_better: bool
    rows: list[StepRow] = field(default_factory=list)
    runs: int = 1

    @property
    def base(self) -> StepRow:
        return self.rows[0]

    @property
    def last(self) -> StepRow:
        return self.rows[-1]


# ---------------------------------------------------------------- reading MLflow


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
        chain = _chain_of(client, experiment_id, run)
        if chain is None:
            log.warning(
                "run %s has no complete per-step metrics; not a chain of the report",
                run.info.run_id,
            )
        else:
            chains.append(chain)
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


def _chain_of(client: Any, experiment_id: str, run: Any) -> Chain | None:
    steps = _search(client, experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    rows: dict[int, StepRow] = {}
    for s in steps:
        label = s.info.run_name or ""
        k, name = (0, "baseline") if label == "baseline" else _split(label)
        m = s.data.metrics
        if k < 0 or "test_metric" not in m or "val_metric" not in m:
            continue
        bitops = m.get("bitops", math.nan)
        # Older stores did not log val_bitops for a step; only then the test split's BitOps
        # stand in for it (identical without early exits, whose rates differ per split).
        val_bitops = m.get("val_bitops", bitops)
        rows[k] = StepRow(
            k,
            name,
            m["val_metric"],
            m["test_metric"],
            bitops,
            val_bitops,
            m.get("macs", math.nan),
            m.get("params", math.nan),
            m.get("size_mb", math.nan),
        )
    n = len(rows)
    if n == 0 or sorted(rows) != list(range(n)):
        return None
    ordered = [rows[k] for k in range(n)]
    task = run.data.params.get("data.task", "classify")
    return Chain("".join(r.name for r in ordered[1:]), run.info.run_id, task != "rotation", ordered)


def _split(label: str) -> tuple[int, str]:
    head, _, name = label.partition(":")
    return (int(head), name) if head.isdigit() and name else (-1, "")


# ---------------------------------------------------------------- analysis


@dataclass(frozen=True)
class State:
    """A chain state: the order of the steps taken so far and its measurements. ``metric``,
    ``delta`` (metric minus the baseline's) and ``bitops_ratio`` (baseline BitOps / these) are
    on the validation split and decide every comparison; the ``test_*`` numbers are the same on
    the test split, only reported."""

    order: str
    metric: float
    delta: float
    bitops_ratio: float
    test_metric: float = math.nan
    test_delta: float = math.nan
    test_bitops_ratio: float = math.nan


def _ratio(base: float, x: float) -> float:
    return base / max(x, 1e-12)


def state_of(chain: Chain, k: int) -> State:
    """The state of ``chain`` after ``k`` steps (validation deciding, test beside)."""
    base, row = chain.base, chain.rows[k]
    return State(
        chain.order[:k],
        row.val_metric,
        row.val_metric - base.val_metric,
        _ratio(base.val_bitops, row.val_bitops),
        row.test_metric,
        row.test_metric - base.test_metric,
        _ratio(base.bitops, row.bitops),
    )


def best_per_order(chains: Sequence[Chain], tie_tol: float = 0.0) -> list[Chain]:
    """One chain per order: the one whose final state is best by validation (:func:`better`;
    on an exact tie the first given), its ``runs`` the number of chains of that order given.
    Sorted by order."""
    groups: dict[str, list[Chain]] = {}
    for c in chains:
        groups.setdefault(c.order, []).append(c)
    out = []
    for order in sorted(groups):
        group = groups[order]
        best = group[0]
        for c in group[1:]:
            if not better(
                state_of(best, len(best.rows) - 1),
                state_of(c, len(c.rows) - 1),
                c.higher_is_better,
                tie_tol,
            ):
                best = c
        out.append(dataclasses.replace(best, runs=sum(c.runs for c in group)))
    return out


def prefix_states(chains: Iterable[Chain]) -> dict[str, State]:
    """Every prefix of every chain (the baseline is ``''``), keyed by its order string. Where
    chains measure one prefix differently, the best by validation is kept."""
    out: dict[str, State] = {}
    for chain in chains:
        for k in range(len(chain.rows)):
            s = state_of(chain, k)
            cur = out.get(s.order)
            if cur is None or not better(cur, s, chain.higher_is_better):
                out[s.order] = s
    return out


def better(a: State, b: State, higher_is_better: bool, tie_tol: float = 0.0) -> bool:
    """Whether ``a`` beats ``b``: the better (validation) metric; within ``tie_tol`` the larger
    (validation) BitOps reduction (and ``a`` on an exact tie)."""
    diff = (a.metric - b.metric) if higher_is_better else (b.metric - a.metric)
    if abs(diff) > tie_tol:
        return diff > 0
    return a.bitops_ratio >= b.bitops_ratio


def same(a: State, b: State, tie_tol: float = 0.0) -> bool:
    """Whether neither order is better: (validation) metrics within ``tie_tol`` and the same
    (validation) BitOps."""
    close = abs(a.metric - b.metric) <= tie_tol
    return close and math.isclose(a.bitops_ratio, b.bitops_ratio, rel_tol=1e-9)


def stages_of(chains: Sequence[Chain]) -> list[str]:
    """The stage names of the study, in the order of the paper (D, P, Q, E) where present."""
    names = sorted({c for chain in chains for c in chain.order})
    rank = {c: i for i, c in enumerate(PAPER_ORDER)}
    return sorted(names, key=lambda c: (rank.get(c, len(rank)), c))


def _side(key: str, prefix: str, s: State) -> dict[str, Any]:
    """``s``'s order under ``key`` and its validation and test numbers under ``prefix_*``."""
    return {
        key: s.order,
        f"{prefix}_val_metric": s.metric,
        f"{prefix}_val_bitops_ratio": s.bitops_ratio,
        f"{prefix}_test_metric": s.test_metric,
        f"{prefix}_test_bitops_ratio": s.test_bitops_ratio,
    }


PAIR_KEYS = (
    "pair",
    "first",
    "first_val_metric",
    "first_val_bitops_ratio",
    "first_test_metric",
    "first_test_bitops_ratio",
    "second",
    "second_val_metric",
    "second_val_bitops_ratio",
    "second_test_metric",
    "second_test_bitops_ratio",
    "winner",
    "val_margin",
    "dominates",
)


def pairwise(
    states: Mapping[str, State], stages: Sequence[str], hib: bool, tie_tol: float
) -> list[dict[str, Any]]:
    """One row per unordered pair with both 2-step orders measured; ``winner`` is the better
    order by validation or ``'tie'`` (same validation metric within ``tie_tol`` and the same
    validation BitOps). Test numbers ride along (:data:`PAIR_KEYS`)."""
    rows = []
    for a, b in itertools.combinations(stages, 2):
        ab, ba = states.get(a + b), states.get(b + a)
        if ab is None or ba is None:
            continue
        if same(ab, ba, tie_tol):
            winner, dominates = "tie", False
        else:
            win, lose = (ab, ba) if better(ab, ba, hib, tie_tol) else (ba, ab)
            # whether the winner also compresses at least as much (no trade-off)
            winner, dominates = win.order, win.bitops_ratio >= lose.bitops_ratio * (1 - 1e-9)
        rows.append(
            {
                "pair": f"{a},{b}",
                **_side("first", "first", ab),
                **_side("second", "second", ba),
                "winner": winner,
                "val_margin": abs(ab.metric - ba.metric),
                "dominates": dominates,
            }
        )
    return rows


def precedence(pairs: Sequence[Mapping[str, Any]], stages: Sequence[str]) -> dict[str, Any]:
    """The precedence graph (edge X->Y: X before Y won; ties give no edge) and its topological
    sort. Where several sorts exist (``unique`` False) the one taking the ready stage with the
    most pairwise wins first (then the first in ``stages``) is given; on a cycle, the cycle and
    the ranking by wins (Copeland). :func:`consistent` tells whether an order respects every
    edge."""
    edges = [(p["winner"][0], p["winner"][1]) for p in pairs if p["winner"] != "tie"]
    graph: dict[str, set[str]] = {s: set() for s in stages}
    for x, y in edges:
        graph[y].add(x)  # y depends on x
    wins = {s: sum(1 for x, _ in edges if x == s) for s in stages}
    rank = {s: (-wins[s], i) for i, s in enumerate(stages)}
    order, unique, left = "", True, set(stages)
    while left:  # Kahn's algorithm, the ready stage with the most wins first
        ready = sorted((s for s in left if not graph[s] & left), key=lambda s: rank[s])
        if not ready:
            try:
                TopologicalSorter({s: graph[s] & left for s in left}).prepare()
            except CycleError as err:
                cycle = list(err.args[1])
            ranking = "".join(sorted(stages, key=lambda s: rank[s]))
            return {"edges": edges, "order": ranking, "cycle": cycle, "unique": False, "wins": wins}
        unique = unique and len(ready) == 1
        order += ready[0]
        left.remove(ready[0])
    return {"edges": edges, "order": order, "cycle": None, "unique": unique, "wins": wins}


def consistent(order: str, edges: Sequence[tuple[str, str]]) -> bool:
    """Whether ``order`` puts X before Y for every edge (X, Y) among its stages."""
    return all(order.index(x) < order.index(y) for x, y in edges if x in order and y in order)


INSERTION_KEYS = (
    "pair",
    "inserted",
    "kept_order",
    "kept_val_metric",
    "kept_val_bitops_ratio",
    "kept_test_metric",
    "kept_test_bitops_ratio",
    "reversed_order",
    "reversed_val_metric",
    "reversed_val_bitops_ratio",
    "reversed_test_metric",
    "reversed_test_bitops_ratio",
    "preference_kept",
)


def insertion(
    states: Mapping[str, State],
    pairs: Sequence[Mapping[str, Any]],
    stages: Sequence[str],
    hib: bool,
    tie_tol: float,
) -> list[dict[str, Any]]:
    """For each pair won by A->B and each third stage C: A->C->B vs B->C->A, the preference
    kept where A->C->B is better by validation (tied pairs have no preference to keep and are
    left out). Test numbers ride along (:data:`INSERTION_KEYS`)."""
    rows = []
    for p in pairs:
        if p["winner"] == "tie":
            continue
        a, b = p["winner"][0], p["winner"][1]
        for c in stages:
            if c in (a, b):
                continue
            acb, bca = states.get(a + c + b), states.get(b + c + a)
            if acb is None or bca is None:
                continue
            rows.append(
                {
                    "pair": f"{a}->{b}",
                    "inserted": c,
                    **_side("kept_order", "kept", acb),
                    **_side("reversed_order", "reversed", bca),
                    "preference_kept": better(acb, bca, hib, tie_tol),
                }
            )
    return rows


def order_effect(
    chains: Sequence[Chain], stages: Sequence[str], split: Literal["val", "test"] = "val"
) -> list[list[float]]:
    """M[i][j] = mean final metric on ``split`` (validation unless asked) of the full orders
    with stage i before stage j, minus the mean of those with j before i (NaN on the diagonal
    or where either side is empty). Give one chain per order (:func:`best_per_order`)."""
    full = [c for c in chains if len(c.order) == len(stages)]

    def final(c: Chain) -> float:
        return c.last.val_metric if split == "val" else c.last.test_metric

    out = []
    for x in stages:
        line = []
        for y in stages:
            before = [
                final(c)
                for c in full
                if x in c.order and y in c.order and c.order.index(x) < c.order.index(y)
            ]
            after = [
                final(c)
                for c in full
                if x in c.order and y in c.order and c.order.index(x) > c.order.index(y)
            ]
            ok = x != y and before and after
            line.append(sum(before) / len(before) - sum(after) / len(after) if ok else math.nan)
        out.append(line)
    return out


def pareto(points: Sequence[tuple[float, float]], hib: bool) -> list[int]:
    """Indices of the points (metric, bitops_ratio) no other point dominates."""
    sign = 1.0 if hib else -1.0
    keep = []
    for i, (m, r) in enumerate(points):
        dominated = any(
            sign * m2 >= sign * m and r2 >= r and (sign * m2 > sign * m or r2 > r)
            for j, (m2, r2) in enumerate(points)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: -points[i][1])


ORDER_KEYS = (
    "rank",
    "order",
    "runs",
    "val_metric",
    "val_delta",
    "val_bitops_ratio",
    "test_metric",
    "test_delta",
    "test_bitops_ratio",
    "pareto",
    "macs",
    "params",
    "size_mb",
    "run_id",
)


def all_orders(chains: Sequence[Chain], stages: Sequence[str], hib: bool) -> list[dict[str, Any]]:
    """One row per full order (give one chain per order, :func:`best_per_order`), ranked by the
    final validation metric, then the larger validation BitOps reduction (competition ranking:
    equal chains share a rank); ``pareto``: on the front of (validation metric, validation
    BitOps ratio). Test numbers ride along (:data:`ORDER_KEYS`)."""
    rows: list[dict[str, Any]] = []
    for c in chains:
        if len(c.order) != len(stages):
            continue
        s = state_of(c, len(c.rows) - 1)
        rows.append(
            {
                "order": c.order,
                "runs": c.runs,
                "val_metric": s.metric,
                "val_delta": s.delta,
                "val_bitops_ratio": s.bitops_ratio,
                "test_metric": s.test_metric,
                "test_delta": s.test_delta,
                "test_bitops_ratio": s.test_bitops_ratio,
                "macs": c.last.macs,
                "params": c.last.params,
                "size_mb": c.last.size_mb,
                "run_id": c.run_id,
            }
        )
    sign = 1.0 if hib else -1.0
    rows.sort(key=lambda r: (-sign * r["val_metric"], -r["val_bitops_ratio"], r["order"]))
    on_front = set(pareto([(r["val_metric"], r["val_bitops_ratio"]) for r in rows], hib))
    for i, r in enumerate(rows):
        r["pareto"] = i in on_front
        r["rank"] = 1 + sum(
            1
            for o in rows
            if sign * o["val_metric"] > sign * r["val_metric"]
            or (
                o["val_metric"] == r["val_metric"] and o["val_bitops_ratio"] > r["val_bitops_ratio"]
            )
        )
    return rows


# ---------------------------------------------------------------- writing


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if abs(v) >= 1e5 or (abs(v) >= 1000 and v.is_integer()):
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    return utils.markdown_table(rows, keys, _fmt)


def markdown(*blocks: str) -> str:
    """Markdown blocks (paragraphs, headings, tables, fenced code) separated by blank lines, so
    that every table and heading renders as one (a table glued to a paragraph does not)."""
    return "\n\n".join(b.strip("\n") for b in blocks if b.strip()) + "\n"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def save_figure(fig: Any, path: Path) -> None:
    plt = pyplot()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


STEP_KEYS = (
    "chain",
    "kept",
    "k",
    "step",
    "val_metric",
    "test_metric",
    "val_delta",
    "test_delta",
    "val_bitops_ratio",
    "test_bitops_ratio",
    "val_bitops",
    "bitops",
    "macs",
    "params",
    "size_mb",
    "run_id",
)


def step_rows(chains: Sequence[Chain], kept: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per step of every chain (the long table); ``kept``: whether the chain's run is
    among the run ids ``kept`` (its order's best by validation; all when not given)."""
    keep = None if kept is None else set(kept)
    out = []
    for c in chains:
        for k, row in enumerate(c.rows):
            s = state_of(c, k)
            out.append(
                {
                    "chain": c.order,
                    "kept": keep is None or c.run_id in keep,
                    "k": row.k,
                    "step": row.name,
                    "val_metric": row.val_metric,
                    "test_metric": row.test_metric,
                    "val_delta": s.delta,
                    "test_delta": s.test_delta,
                    "val_bitops_ratio": s.bitops_ratio,
                    "test_bitops_ratio": s.test_bitops_ratio,
                    "val_bitops": row.val_bitops,
                    "bitops": row.bitops,
                    "macs": row.macs,
                    "params": row.params,
                    "size_mb": row.size_mb,
                    "run_id": c.run_id,
                }
            )
    return out


def _metric_name(hib: bool) -> str:
    return "accuracy (%)" if hib else "MAE (degrees)"


def plot_pareto(
    chains: Sequence[Chain], states: Mapping[str, State], hib: bool, path: Path, title: str
) -> None:
    """Every state on (validation BitOps reduction, validation metric) and their front."""
    plt = pyplot()

    pts = [s for o, s in states.items() if o]
    xy = [(s.metric, s.bitops_ratio) for s in pts]
    front = pareto(xy, hib)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "vsDoP*Xh"  # one per chain length, as many steps as the chains have
    for n in sorted({len(s.order) for s in pts}):
        marker = markers[(n - 1) % len(markers)]
        sel = [s for s in pts if len(s.order) == n]
        if sel:
            ax.scatter(
                [s.bitops_ratio for s in sel],
                [s.metric for s in sel],
                marker=marker,
                alpha=0.6,
                label=f"{n} step{'s' if n > 1 else ''}",
            )
    fx = [pts[i].bitops_ratio for i in front]
    fy = [pts[i].metric for i in front]
    ax.plot(fx, fy, "k--", lw=1, label="Pareto front (validation)")
    for i in front:
        ax.annotate(
            pts[i].order,
            (pts[i].bitops_ratio, pts[i].metric),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    base = chains[0].base.val_metric
    ax.axhline(base, color="grey", lw=0.8, ls=":", label=f"baseline {base:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("validation BitOps reduction (baseline / chain, expected per sample)")
    ax.set_ylabel(f"validation {_metric_name(hib)}")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_waterfall(chain: Chain, hib: bool, path: Path, title: str) -> None:
    """One chain step by step: test BitOps reduction (bars), validation and test metric."""
    plt = pyplot()

    labels = ["baseline", *[f"+{r.name}" for r in chain.rows[1:]]]
    ratios = [_ratio(chain.base.bitops, r.bitops) for r in chain.rows]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    bars = ax.bar(labels, ratios, color="tab:blue", alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylabel("test BitOps reduction (x, log)")
    for b, r in zip(bars, ratios, strict=True):
        ax.annotate(
            f"{r:.1f}x",
            (b.get_x() + b.get_width() / 2, r),
            ha="center",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax2 = ax.twinx()
    ax2.plot(
        labels, [r.val_metric for r in chain.rows], "s--", color="tab:orange", label="validation"
    )
    ax2.plot(labels, [r.test_metric for r in chain.rows], "o-", color="tab:red", label="test")
    ax2.set_ylabel(_metric_name(hib), color="tab:red")
    ax2.legend(fontsize=7)
    ax.set_title(title)
    save_figure(fig, path)


def plot_matrix(
    matrix: Sequence[Sequence[float]], stages: Sequence[str], hib: bool, path: Path, title: str
) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    grid = [[float(v) for v in line] for line in matrix]
    vals = [v for line in grid for v in line if not math.isnan(v)]
    lim = max([abs(v) for v in vals] or [1.0])
    cmap = "RdBu" if hib else "RdBu_r"
    im = ax.imshow(grid, cmap=cmap, vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(stages)), [f"before {s}" for s in stages], fontsize=8)
    ax.set_yticks(range(len(stages)), stages)
    for i, line in enumerate(matrix):
        for j, v in enumerate(line):
            if not math.isnan(v):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"mean Δ validation {_metric_name(hib)}")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


# ---------------------------------------------------------------- the command


def _matrix_rows(matrix: Sequence[Sequence[float]], stages: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"": x, **{y: matrix[i][j] for j, y in enumerate(stages)}} for i, x in enumerate(stages)
    ]


def write_report(rcfg: ReportConfig, chains: Sequence[Chain], store: str = "") -> dict[str, Path]:
    """Write the requested studies' files from every chain read (``chains``, several of one
    order folded into its best by validation); returns {study: results folder}."""
    if not chains:
        raise ConfigError("report.source", "no chains", "a study with finished chains")
    hib = chains[0].higher_is_better
    best = best_per_order(chains, rcfg.tie_tol)
    stages = stages_of(best)
    states = prefix_states(best)
    pairs = pairwise(states, stages, hib, rcfg.tie_tol)
    task = "classification, accuracy in %" if hib else "rotation regression, MAE in degrees"
    folded = len(chains) - len(best)
    store = re.sub(r"//[^/@]*@", "//***@", store)  # no credentials in the written files
    base = chains[0].base
    head = (
        f"Generated by `chaincomp report` from MLflow ({store or 'tracking.uri'}), source "
        f"`{rcfg.source}`: {len(chains)} chains read, {folded} folded into their order's "
        f"best by validation ({len(best)} orders); {task}. Baseline validation metric "
        f"{base.val_metric:.2f}, test {base.test_metric:.2f}. BitOps are expected per sample "
        "on each split (early exits at their measured rates).\n\n" + SELECTION
    )
    written: dict[str, Path] = {}

    def folder(study: str) -> Path:
        p = Path(rcfg.out_dir) / study / "results" / rcfg.label
        p.mkdir(parents=True, exist_ok=True)
        written[study] = p
        return p

    steps = step_rows(chains, kept=[c.run_id for c in best])
    for study in rcfg.studies:
        out = folder(study)
        if study == "pairwise":
            write_csv(out / "pairwise.csv", pairs, PAIR_KEYS)
            text = markdown(
                head,
                "## Pairwise orders",
                "Each pair of stages applied both ways from the same baseline; the winner has the "
                "better validation metric (differences within "
                f"{rcfg.tie_tol} go to the larger validation BitOps reduction; `tie`: the same "
                "validation metric and BitOps both ways, no edge in the precedence graph). "
                "`dominates`: the winner also reduces validation BitOps at least as much; `no` "
                "marks a trade-off (better metric, less compression). The test columns are "
                "reported beside and decide nothing.",
                markdown_table(pairs, PAIR_KEYS),
            )
            write_text(out / "pairwise.md", text)
        elif study == "precedence":
            prec = precedence(pairs, stages)
            edges = "".join(f"  {x} --> {y}\n" for x, y in prec["edges"])
            paper = "".join(c for c in PAPER_ORDER if c in stages)
            ties = [p["pair"] for p in pairs if p["winner"] == "tie"]
            tied = f"Tied pairs (no edge): {', '.join(ties)}." if ties else ""
            if prec["cycle"]:
                derived = (
                    f"The graph has a cycle ({' -> '.join(prec['cycle'])}); the order by "
                    f"pairwise wins is **{'->'.join(prec['order'])}**."
                )
            else:
                kind = (
                    "the only order consistent with every pair"
                    if prec["unique"]
                    else (
                        "one of several orders consistent with the pairs; ready stages taken by "
                        "pairwise wins"
                    )
                )
                derived = f"Topological sort: **{'->'.join(prec['order'])}** ({kind})."
            if prec["order"] == paper and prec["unique"]:
                verdict = "reproduced (the only consistent order)"
            elif consistent(paper, prec["edges"]) and not prec["cycle"]:
                verdict = "consistent with every pair, but not the only consistent order"
            else:
                broken = [f"{x}->{y}" for x, y in prec["edges"] if paper.index(x) > paper.index(y)]
                verdict = f"not reproduced (the pairs prefer {', '.join(broken) or 'otherwise'})"
            wins = [{"stage": s, "wins": prec["wins"][s]} for s in stages]
            text = markdown(
                head,
                "## Precedence graph",
                "Edge X --> Y: X before Y won its pair by validation (`pairwise.md`).",
                "```mermaid\ngraph LR\n" + edges + "```",
                tied,
                derived,
                f"The paper's order {'->'.join(paper)}: {verdict}." if len(paper) > 1 else "",
                markdown_table(wins, ("stage", "wins")),
            )
            write_text(out / "precedence.md", text)
            write_csv(
                out / "precedence.csv",
                [{"before": x, "after": y} for x, y in prec["edges"]],
                ("before", "after"),
            )
        elif study == "insertion":
            ins = insertion(states, pairs, stages, hib, rcfg.tie_tol)
            write_csv(out / "insertion.csv", ins, INSERTION_KEYS)
            kept = sum(1 for r in ins if r["preference_kept"])
            text = markdown(
                head,
                "## Insertion",
                "For each pair won by A->B (by validation) and each third stage C: A->C->B "
                "against B->C->A, the preference kept where A->C->B is better by validation. "
                f"The pairwise preference holds in {kept} of {len(ins)} cases.",
                markdown_table(ins, INSERTION_KEYS),
            )
            write_text(out / "insertion.md", text)
        elif study == "all_orders":
            rows = all_orders(best, stages, hib)
            write_csv(out / "orders.csv", rows, ORDER_KEYS)
            write_csv(out / "steps.csv", steps, STEP_KEYS)
            matrix = order_effect(best, stages, "val")
            test_matrix = order_effect(best, stages, "test")
            paper = "".join(c for c in PAPER_ORDER if c in stages)
            intro = (
                "Ranked by the final validation metric, then the larger validation BitOps "
                "reduction; `pareto`: no other order has a better validation metric and a larger "
                "validation BitOps reduction. `runs`: the chains of the order read, folded into "
                "the best by validation (the one shown; `steps.csv` lists every chain read). The "
                "test columns are reported beside and decide nothing."
            )
            rank = next((r["rank"] for r in rows if r["order"] == paper), None)
            if rank is not None:
                shared = sum(1 for r in rows if r["rank"] == rank) - 1
                front = next(r["pareto"] for r in rows if r["order"] == paper)
                intro += f" The paper's {'->'.join(paper)} ranks {rank} of {len(rows)}"
                intro += f" (tied with {shared} other orders)" if shared else ""
                intro += f" and is {'on' if front else 'off'} the Pareto front of the orders."
            text = markdown(
                head,
                f"## All {len(rows)} orders",
                intro,
                markdown_table(rows, ORDER_KEYS[:-1]),
                "## Order effect",
                "Row X, column Y: mean final validation metric of the orders with X before Y "
                "minus the mean of those with Y before X.",
                markdown_table(_matrix_rows(matrix, stages), ("", *stages)),
                "The same on the test split (reported beside, decides nothing):",
                markdown_table(_matrix_rows(test_matrix, stages), ("", *stages)),
                "![Pareto front](pareto.png)\n![waterfall](waterfall.png)\n"
                "![order effect](order_effect.png)",
            )
            write_text(out / "orders.md", text)
            plot_pareto(
                best, states, hib, out / "pareto.png", f"{rcfg.label}: every chain and prefix"
            )
            full = [c for c in best if len(c.order) == len(stages)]
            show = next((c for c in full if c.order == paper), full[0] if full else best[0])
            plot_waterfall(
                show, hib, out / "waterfall.png", f"{rcfg.label}: {'->'.join(show.order)}"
            )
            plot_matrix(
                matrix,
                stages,
                hib,
                out / "order_effect.png",
                f"{rcfg.label}: order effect (validation)",
            )
        elif study == "headline":
            chain = next((c for c in best if c.order == PAPER_ORDER), best[-1])
            srows = [r for r in steps if r["run_id"] == chain.run_id]
            keys = tuple(k for k in STEP_KEYS if k not in ("chain", "kept", "run_id"))
            write_csv(out / "steps.csv", srows, STEP_KEYS)
            ratio = _ratio(chain.base.bitops, chain.last.bitops)
            delta = chain.last.test_metric - chain.base.test_metric
            refs = [
                {"result": name, "BitOps reduction": f"{r:.1f}x", "accuracy change (points)": d}
                for name, r, d in REFERENCES
            ]
            runs = f", best by validation of {chain.runs} runs" if chain.runs > 1 else ""
            refs.insert(
                0,
                {
                    "result": f"chaincomp {'->'.join(chain.order)} (this run{runs})",
                    "BitOps reduction": f"{ratio:.1f}x",
                    "accuracy change (points)": f"{delta:+.2f}",
                },
            )
            text = markdown(
                head,
                f"## {'->'.join(chain.order)} step by step",
                markdown_table(srows, keys),
                "## Against the reported results",
                "Test split: BitOps reduction and test metric change of the final chain.",
                markdown_table(refs, ("result", "BitOps reduction", "accuracy change (points)")),
                "![waterfall](waterfall.png)",
            )
            write_text(out / "headline.md", text)
            plot_waterfall(
                chain, hib, out / "waterfall.png", f"{rcfg.label}: {'->'.join(chain.order)}"
            )
    return written


def report(cfg: Any) -> dict[str, Path]:
    """``chaincomp report``: read ``report.source`` from ``tracking.*`` and write the files."""
    from omegaconf import OmegaConf

    from chaincomp.tracking.mlflow_tracker import Tracker, TrackingConfig

    section = OmegaConf.to_container(cfg.report, resolve=True) if "report" in cfg else {}
    rcfg = ReportConfig.from_dict(section)  # type: ignore[arg-type]
    tsec: Any = OmegaConf.to_container(cfg.tracking, resolve=True)
    tcfg = TrackingConfig(**{**tsec, "enabled": True})
    tracker = Tracker(tcfg)
    chains = load_chains(tracker.client, tracker.experiment_id, rcfg.source)
    return write_report(rcfg, chains, store=tcfg.uri)
