"""The order-study analysis on chains: every prefix state, pairwise winners, the precedence
graph, insertions, the ranking of full orders, the Pareto front and the order-effect matrix.
Every decision is on the validation split; the test split rides along."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from typing import Any, Literal

from chaincomp.report.config import PAPER_ORDER
from chaincomp.report.load import Chain


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


def ratio(base: float, x: float) -> float:
    """``base / x``, guarded against x = 0 (a BitOps reduction)."""
    return base / max(x, 1e-12)


def state_of(chain: Chain, k: int) -> State:
    """The state of ``chain`` after ``k`` steps (validation deciding, test beside)."""
    base, row = chain.base, chain.rows[k]
    return State(
        chain.order[:k],
        row.val_metric,
        row.val_metric - base.val_metric,
        ratio(base.val_bitops, row.val_bitops),
        row.test_metric,
        row.test_metric - base.test_metric,
        ratio(base.bitops, row.bitops),
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
                # sorted: the cycle reported does not depend on the hash seed
                TopologicalSorter({s: sorted(graph[s] & left) for s in sorted(left)}).prepare()
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
