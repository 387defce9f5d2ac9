"""``chaincomp report``: the tables and plots of a study, read back from MLflow.

A study is the set of chains of one Optuna sweep (``report.source`` = the study name, read from
the trial runs tagged ``optuna.study``) or one ``chaincomp run`` (``report.source`` = its run
name; the latest finished one). Everything comes from the tracking store: the chain runs and
their per-step child runs (``baseline``, ``1:D``, ``2:P`` ...) with their metrics, so a report can
be regenerated anywhere the store is reachable.

Every state after k steps of a chain is itself a chain (the prefix cache makes it the same
weights), so one grid over the 24 orders of D, P, Q, E holds the pairs (2-step prefixes) and the
insertions (3-step prefixes) of the paper's study as well:

* ``pairwise``: each pair of stages in both orders; the winner has the better test metric
  (ties within ``tie_tol`` go to the larger BitOps reduction).
* ``precedence``: the graph of the pairwise winners and its topological sort (or its cycle).
* ``insertion``: for a pair won by A->B and each third stage C: A->C->B against B->C->A.
* ``all_orders``: every full order, the Pareto front (metric vs BitOps ratio), the per-step
  waterfall of D->P->Q->E and the order-effect matrix.
* ``headline``: the per-step table of one chain against the paper's reported ratios.

Outputs go to ``<out_dir>/<study>/results/<label>/`` as ``.md``, ``.csv`` and ``.png`` files,
each written atomically.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

from chaincomp import utils
from chaincomp.errors import ConfigError
from chaincomp.utils import atomic_write, pyplot, write_csv

STUDIES = ("pairwise", "precedence", "insertion", "all_orders", "headline")
PAPER_ORDER = "DPQE"
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
    """The state after ``k`` steps of a chain (k = 0: the baseline)."""

    k: int
    name: str
    val_metric: float
    test_metric: float
    bitops: float
    macs: float
    params: float
    size_mb: float


@dataclass
class Chain:
    """One finished chain run: its order (step names), task direction and per-step rows."""

    order: str
    run_id: str
    higher_is_better: bool
    rows: list[StepRow] = field(default_factory=list)

    @property
    def base(self) -> StepRow:
        return self.rows[0]

    @property
    def last(self) -> StepRow:
        return self.rows[-1]


# ---------------------------------------------------------------- reading MLflow


def load_chains(client: Any, experiment_id: str, source: str) -> list[Chain]:
    """The finished chains of study ``source`` (trial runs), else of the latest finished run
    named ``source``. One chain per order (the latest). Raises ConfigError when none."""
    runs = _search(client, experiment_id,
                   f"tags.`optuna.study` = '{source}' and tags.`chaincomp.command` = 'run' "
                   "and attributes.status = 'FINISHED'")  # fmt: skip
    if not runs:
        runs = _search(client, experiment_id,
                       f"attributes.run_name = '{source}' and tags.`chaincomp.command` = 'run' "
                       "and attributes.status = 'FINISHED'")[:1]  # fmt: skip
    if not runs:
        raise ConfigError("report.source", f"no finished chain of {source!r} in the store",
                          "the search.name of a sweep or the tracking.run_name of a run")  # fmt: skip
    chains: dict[str, Chain] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        chain = _chain_of(client, experiment_id, run)
        if chain is not None:
            chains[chain.order] = chain  # later runs of an order replace earlier ones
    return sorted(chains.values(), key=lambda c: c.order)


def _search(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  max_results=1000, page_token=token)  # fmt: skip
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
        if k < 0 or "test_metric" not in m:
            continue
        rows[k] = StepRow(k, name, m.get("val_metric", math.nan), m["test_metric"],
                          m.get("bitops", math.nan), m.get("macs", math.nan),
                          m.get("params", math.nan), m.get("size_mb", math.nan))  # fmt: skip
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
    """A chain state: the order of the steps taken so far and its measurements."""

    order: str
    metric: float
    delta: float
    bitops_ratio: float


def prefix_states(chains: Iterable[Chain]) -> dict[str, State]:
    """Every prefix of every chain (the baseline is ``''``), keyed by its order string."""
    out: dict[str, State] = {}
    for chain in chains:
        base = chain.base
        for k, row in enumerate(chain.rows):
            order = chain.order[:k]
            out.setdefault(order, State(order, row.test_metric, row.test_metric - base.test_metric,
                                        base.bitops / max(row.bitops, 1e-12)))  # fmt: skip
    return out


def better(a: State, b: State, higher_is_better: bool, tie_tol: float = 0.0) -> bool:
    """Whether ``a`` beats ``b``: the better test metric; within ``tie_tol`` the larger BitOps
    reduction (and ``a`` on an exact tie)."""
    diff = (a.metric - b.metric) if higher_is_better else (b.metric - a.metric)
    if abs(diff) > tie_tol:
        return diff > 0
    return a.bitops_ratio >= b.bitops_ratio


def same(a: State, b: State, tie_tol: float = 0.0) -> bool:
    """Whether neither order is better: metrics within ``tie_tol`` and the same BitOps."""
    close = abs(a.metric - b.metric) <= tie_tol
    return close and math.isclose(a.bitops_ratio, b.bitops_ratio, rel_tol=1e-9)


def stages_of(chains: Sequence[Chain]) -> list[str]:
    """The stage names of the study, in the order of the paper (D, P, Q, E) where present."""
    names = sorted({c for chain in chains for c in chain.order})
    rank = {c: i for i, c in enumerate(PAPER_ORDER)}
    return sorted(names, key=lambda c: (rank.get(c, len(rank)), c))


def pairwise(states: Mapping[str, State], stages: Sequence[str], hib: bool,
             tie_tol: float) -> list[dict[str, Any]]:  # fmt: skip
    """One row per unordered pair with both 2-step orders measured; ``winner`` is the better
    order or ``'tie'`` (same metric within ``tie_tol`` and the same BitOps)."""
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
        rows.append({"pair": f"{a},{b}", "first": ab.order, "first_metric": ab.metric,
                     "first_bitops_ratio": ab.bitops_ratio, "second": ba.order,
                     "second_metric": ba.metric, "second_bitops_ratio": ba.bitops_ratio,
                     "winner": winner, "dominates": dominates,
                     "margin": abs(ab.metric - ba.metric)})  # fmt: skip
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
            return {"edges": edges, "order": ranking, "cycle": cycle, "unique": False,
                    "wins": wins}  # fmt: skip
        unique = unique and len(ready) == 1
        order += ready[0]
        left.remove(ready[0])
    return {"edges": edges, "order": order, "cycle": None, "unique": unique, "wins": wins}


def consistent(order: str, edges: Sequence[tuple[str, str]]) -> bool:
    """Whether ``order`` puts X before Y for every edge (X, Y) among its stages."""
    return all(order.index(x) < order.index(y) for x, y in edges if x in order and y in order)


def insertion(states: Mapping[str, State], pairs: Sequence[Mapping[str, Any]],
              stages: Sequence[str], hib: bool, tie_tol: float) -> list[dict[str, Any]]:  # fmt: skip
    """For each pair won by A->B and each third stage C: A->C->B vs B->C->A (tied pairs have
    no preference to keep and are left out)."""
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
            rows.append({"pair": f"{a}->{b}", "inserted": c, "kept_order": acb.order,
                         "kept_metric": acb.metric, "kept_bitops_ratio": acb.bitops_ratio,
                         "reversed_order": bca.order, "reversed_metric": bca.metric,
                         "reversed_bitops_ratio": bca.bitops_ratio,
                         "preference_kept": better(acb, bca, hib, tie_tol)})  # fmt: skip
    return rows


def order_effect(chains: Sequence[Chain], stages: Sequence[str]) -> list[list[float]]:
    """M[i][j] = mean final test metric of full orders with stage i before stage j, minus the
    mean of those with j before i (NaN on the diagonal or where either side is empty)."""
    full = [c for c in chains if len(c.order) == len(stages)]
    out = []
    for x in stages:
        line = []
        for y in stages:
            before = [c.last.test_metric for c in full if x in c.order and y in c.order
                      and c.order.index(x) < c.order.index(y)]  # fmt: skip
            after = [c.last.test_metric for c in full if x in c.order and y in c.order
                     and c.order.index(x) > c.order.index(y)]  # fmt: skip
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
            for j, (m2, r2) in enumerate(points) if j != i
        )  # fmt: skip
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: -points[i][1])


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


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def save_figure(fig: Any, path: Path) -> None:
    plt = pyplot()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def step_rows(chains: Sequence[Chain]) -> list[dict[str, Any]]:
    """One row per step of every chain (the long table)."""
    out = []
    for c in chains:
        for row in c.rows:
            out.append({"chain": c.order, "k": row.k, "step": row.name,
                        "test_metric": row.test_metric, "val_metric": row.val_metric,
                        "delta": row.test_metric - c.base.test_metric,
                        "bitops_ratio": c.base.bitops / max(row.bitops, 1e-12),
                        "bitops": row.bitops, "macs": row.macs, "params": row.params,
                        "size_mb": row.size_mb, "run_id": c.run_id})  # fmt: skip
    return out


STEP_KEYS = ("chain", "k", "step", "test_metric", "val_metric", "delta", "bitops_ratio", "bitops",
             "macs", "params", "size_mb", "run_id")  # fmt: skip


def _metric_name(hib: bool) -> str:
    return "accuracy (%)" if hib else "MAE (degrees)"


def plot_pareto(chains: Sequence[Chain], states: Mapping[str, State], hib: bool, path: Path,
                title: str) -> None:  # fmt: skip
    plt = pyplot()

    pts = [s for o, s in states.items() if o]
    xy = [(s.metric, s.bitops_ratio) for s in pts]
    front = pareto(xy, hib)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for n, marker in ((1, "v"), (2, "s"), (3, "D"), (4, "o")):
        sel = [s for s in pts if len(s.order) == n]
        if sel:
            ax.scatter([s.bitops_ratio for s in sel], [s.metric for s in sel], marker=marker,
                       alpha=0.6, label=f"{n} step{'s' if n > 1 else ''}")  # fmt: skip
    fx = [pts[i].bitops_ratio for i in front]
    fy = [pts[i].metric for i in front]
    ax.plot(fx, fy, "k--", lw=1, label="Pareto front")
    for i in front:
        ax.annotate(pts[i].order, (pts[i].bitops_ratio, pts[i].metric), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    base = chains[0].base.test_metric
    ax.axhline(base, color="grey", lw=0.8, ls=":", label=f"baseline {base:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("BitOps reduction (baseline / chain, expected per sample)")
    ax.set_ylabel(f"test {_metric_name(hib)}")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_waterfall(chain: Chain, hib: bool, path: Path, title: str) -> None:
    plt = pyplot()

    labels = ["baseline", *[f"+{r.name}" for r in chain.rows[1:]]]
    ratios = [chain.base.bitops / max(r.bitops, 1e-12) for r in chain.rows]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    bars = ax.bar(labels, ratios, color="tab:blue", alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylabel("BitOps reduction (x, log)")
    for b, r in zip(bars, ratios, strict=True):
        ax.annotate(f"{r:.1f}x", (b.get_x() + b.get_width() / 2, r), ha="center", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax2 = ax.twinx()
    ax2.plot(labels, [r.test_metric for r in chain.rows], "o-", color="tab:red")
    ax2.set_ylabel(f"test {_metric_name(hib)}", color="tab:red")
    ax.set_title(title)
    save_figure(fig, path)


def plot_matrix(matrix: Sequence[Sequence[float]], stages: Sequence[str], hib: bool, path: Path,
                title: str) -> None:  # fmt: skip
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
    fig.colorbar(im, ax=ax, label=f"mean Δ test {_metric_name(hib)}")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


# ---------------------------------------------------------------- the command


def write_report(rcfg: ReportConfig, chains: Sequence[Chain], store: str = "") -> dict[str, Path]:
    """Write the requested studies' files; returns {study: results folder}."""
    if not chains:
        raise ConfigError("report.source", "no chains", "a study with finished chains")
    hib = chains[0].higher_is_better
    stages = stages_of(chains)
    states = prefix_states(chains)
    pairs = pairwise(states, stages, hib, rcfg.tie_tol)
    task = (
        "classification, test accuracy in %" if hib else "rotation regression, test MAE in degrees"
    )
    store = re.sub(r"//[^/@]*@", "//***@", store)  # no credentials in the written files
    head = (f"Generated by `chaincomp report` from MLflow ({store or 'tracking.uri'}), source "
            f"`{rcfg.source}`: {len(chains)} chains; {task}. Baseline test metric "
            f"{chains[0].base.test_metric:.2f}. BitOps are expected per sample on the test "
            "split (early exits at their measured rates).\n\n")  # fmt: skip
    written: dict[str, Path] = {}

    def folder(study: str) -> Path:
        p = Path(rcfg.out_dir) / study / "results" / rcfg.label
        p.mkdir(parents=True, exist_ok=True)
        written[study] = p
        return p

    steps = step_rows(chains)
    for study in rcfg.studies:
        out = folder(study)
        if study == "pairwise":
            keys: tuple[str, ...] = ("pair", "first", "first_metric", "first_bitops_ratio", "second",
                    "second_metric", "second_bitops_ratio", "winner", "margin", "dominates")  # fmt: skip
            write_csv(out / "pairwise.csv", pairs, keys)
            text = head + "## Pairwise orders\n\nEach pair of stages applied both ways from the "
            text += "same baseline; the winner has the better test metric"
            text += f" (differences within {rcfg.tie_tol} go to the larger BitOps reduction; "
            text += (
                "`tie`: the same metric and BitOps both ways, no edge in the precedence graph). "
            )
            text += "`dominates`: the winner also reduces BitOps at least as much; `no` marks a "
            text += "trade-off (better metric, less compression).\n\n"
            write_text(out / "pairwise.md", text + markdown_table(pairs, keys))
        elif study == "precedence":
            prec = precedence(pairs, stages)
            lines = [head, "## Precedence graph\n\n", "```mermaid\ngraph LR\n"]
            lines += [f"  {x} --> {y}\n" for x, y in prec["edges"]]
            lines.append("```\n\n")
            paper = "".join(c for c in PAPER_ORDER if c in stages)
            ties = [p["pair"] for p in pairs if p["winner"] == "tie"]
            if ties:
                lines.append(f"Tied pairs (no edge): {', '.join(ties)}.\n\n")
            if prec["cycle"]:
                lines.append(f"The graph has a cycle ({' -> '.join(prec['cycle'])}); the order by "
                             f"pairwise wins is **{'->'.join(prec['order'])}**.\n")  # fmt: skip
            else:
                kind = "the only order consistent with every pair" if prec["unique"] else (
                    "one of several orders consistent with the pairs; ready stages taken by "
                    "pairwise wins")  # fmt: skip
                lines.append(f"Topological sort: **{'->'.join(prec['order'])}** ({kind}).\n")
            if prec["order"] == paper and prec["unique"]:
                verdict = "reproduced (the only consistent order)"
            elif consistent(paper, prec["edges"]) and not prec["cycle"]:
                verdict = "consistent with every pair, but not the only consistent order"
            else:
                broken = [f"{x}->{y}" for x, y in prec["edges"]
                          if paper.index(x) > paper.index(y)]  # fmt: skip
                verdict = f"not reproduced (the pairs prefer {', '.join(broken) or 'otherwise'})"
            lines.append(f"\nThe paper's order {'->'.join(paper)}: {verdict}.\n")
            wins = [{"stage": s, "wins": prec["wins"][s]} for s in stages]
            lines.append("\n" + markdown_table(wins, ("stage", "wins")))
            write_text(out / "precedence.md", "".join(lines))
            write_csv(out / "precedence.csv",
                      [{"before": x, "after": y} for x, y in prec["edges"]], ("before", "after"))  # fmt: skip
        elif study == "insertion":
            ins = insertion(states, pairs, stages, hib, rcfg.tie_tol)
            keys = ("pair", "inserted", "kept_order", "kept_metric", "kept_bitops_ratio",
                    "reversed_order", "reversed_metric", "reversed_bitops_ratio",
                    "preference_kept")  # fmt: skip
            write_csv(out / "insertion.csv", ins, keys)
            kept = sum(1 for r in ins if r["preference_kept"])
            text = head + "## Insertion\n\nFor each pair won by A->B and each third stage C: "
            text += f"A->C->B against B->C->A. The pairwise preference holds in {kept} of "
            text += f"{len(ins)} cases.\n\n"
            write_text(out / "insertion.md", text + markdown_table(ins, keys))
        elif study == "all_orders":
            full = [c for c in chains if len(c.order) == len(stages)]
            rows: list[dict[str, Any]] = [{"order": c.order, "test_metric": c.last.test_metric,
                     "delta": c.last.test_metric - c.base.test_metric,
                     "bitops_ratio": c.base.bitops / max(c.last.bitops, 1e-12),
                     "macs": c.last.macs, "params": c.last.params, "size_mb": c.last.size_mb,
                     "run_id": c.run_id} for c in full]  # fmt: skip
            rows.sort(
                key=lambda r: (
                    -float(r["test_metric"]) if hib else float(r["test_metric"]),
                    -float(r["bitops_ratio"]),
                )
            )
            on_front = set(pareto([(r["test_metric"], r["bitops_ratio"]) for r in rows], hib))
            for i, r in enumerate(rows):
                r["pareto"] = i in on_front
            for r in rows:  # competition ranking: equal chains share a rank
                r["rank"] = 1 + sum(
                    1 for o in rows
                    if (o["test_metric"] > r["test_metric"] if hib else o["test_metric"] < r["test_metric"])
                    or (o["test_metric"] == r["test_metric"] and o["bitops_ratio"] > r["bitops_ratio"])
                )  # fmt: skip
            keys = ("rank", "order", "test_metric", "delta", "bitops_ratio", "pareto", "macs",
                    "params", "size_mb", "run_id")  # fmt: skip
            write_csv(out / "orders.csv", rows, keys)
            write_csv(out / "steps.csv", steps, STEP_KEYS)
            matrix = order_effect(chains, stages)
            paper = "".join(c for c in PAPER_ORDER if c in stages)
            rank = next((r["rank"] for r in rows if r["order"] == paper), None)
            text = head + f"## All {len(rows)} orders\n\nRanked by the final test metric; "
            text += "`pareto`: no other order has a better metric and a larger BitOps reduction. "
            if rank is not None:
                shared = sum(1 for r in rows if r["rank"] == rank) - 1
                front = next(r["pareto"] for r in rows if r["order"] == paper)
                text += f"The paper's {'->'.join(paper)} ranks {rank} of {len(rows)}"
                text += f" (tied with {shared} other orders)" if shared else ""
                text += f" and is {'on' if front else 'off'} the Pareto front of the orders.\n\n"
            text += markdown_table(rows, keys[:-1])
            text += "\n## Order effect\n\nRow X, column Y: mean final test metric of the orders "
            text += "with X before Y minus the mean of those with Y before X.\n\n"
            mrows = [{"": x, **{y: matrix[i][j] for j, y in enumerate(stages)}}
                     for i, x in enumerate(stages)]  # fmt: skip
            text += markdown_table(mrows, ("", *stages))
            text += "\n![Pareto front](pareto.png)\n![waterfall](waterfall.png)\n"
            text += "![order effect](order_effect.png)\n"
            write_text(out / "orders.md", text)
            plot_pareto(chains, states, hib, out / "pareto.png",
                        f"{rcfg.label}: every chain and prefix")  # fmt: skip
            show = next((c for c in full if c.order == paper), full[0] if full else chains[0])
            plot_waterfall(
                show, hib, out / "waterfall.png", f"{rcfg.label}: {'->'.join(show.order)}"
            )
            plot_matrix(
                matrix, stages, hib, out / "order_effect.png", f"{rcfg.label}: order effect"
            )
        elif study == "headline":
            chain = next((c for c in chains if c.order == PAPER_ORDER), chains[-1])
            srows = [r for r in steps if r["chain"] == chain.order]
            keys = ("k", "step", "test_metric", "delta", "bitops_ratio", "bitops", "macs",
                    "params", "size_mb")  # fmt: skip
            write_csv(out / "steps.csv", srows, STEP_KEYS)
            ratio = chain.base.bitops / max(chain.last.bitops, 1e-12)
            delta = chain.last.test_metric - chain.base.test_metric
            refs = [{"result": name, "BitOps reduction": f"{r:.1f}x", "accuracy change (points)": d}
                    for name, r, d in REFERENCES]  # fmt: skip
            refs.insert(0, {"result": f"chaincomp {'->'.join(chain.order)} (this run)",
                            "BitOps reduction": f"{ratio:.1f}x",
                            "accuracy change (points)": f"{delta:+.2f}"})  # fmt: skip
            text = head + f"## {'->'.join(chain.order)} step by step\n\n"
            text += markdown_table(srows, keys)
            text += "\n## Against the reported results\n\n"
            text += markdown_table(refs, ("result", "BitOps reduction", "accuracy change (points)"))
            text += "\n![waterfall](waterfall.png)\n"
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
