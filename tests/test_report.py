"""``chaincomp report``: the order-study analysis on exact synthetic chains, a real grid study on
digits read back from MLflow into tables and plots, and the analysis notebook run on it."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from chaincomp import report as rp
from chaincomp.chain.result import METRIC_KEYS, ChainResult, from_rows
from chaincomp.errors import ConfigError
from chaincomp.report import plots as report_plots
from chaincomp.search import sweep

from .conftest import chaincomp_cli, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "order_analysis.ipynb"


def _chain(
    order: str,
    val: list[float],
    test: list[float] | None = None,
    val_bitops: list[float] | None = None,
    bitops: list[float] | None = None,
    hib: bool = True,
    run_id: str = "",
) -> rp.Chain:
    """A chain with per-step validation and test numbers (test = validation unless given;
    BitOps 1000, 100, 10, 1 on both splits unless given)."""
    n = len(order) + 1
    test = val if test is None else test
    val_bitops = [1000.0 / 10**k for k in range(n)] if val_bitops is None else val_bitops
    bitops = val_bitops if bitops is None else bitops
    rows = [
        {
            "name": "baseline" if k == 0 else order[k - 1],
            "stage": "baseline" if k == 0 else order[k - 1],
            "val_metric": val[k],
            "test_metric": test[k],
            "bitops": bitops[k],
            "val_bitops": val_bitops[k],
            "macs": bitops[k],
            "params": 1.0,
            "size_mb": 1.0,
        }
        for k in range(n)
    ]
    task = "classify" if hib else "rotation"
    result = from_rows(
        rows,
        task=task,
        metric_name="accuracy" if hib else "mae_deg",
        higher_is_better=hib,
        chain="test",
        order=list(order),
        letters=order,
        mlflow_run_id=run_id or f"run-{order}",
    )
    return rp.Chain(result)


# ---------------------------------------------------------------- analysis on exact numbers

# Three stages A, B, C; prefixes share their numbers (as the prefix cache guarantees). The test
# split mirrors validation (test = 200 - val) and has its own BitOps, so every decision taken on
# the test split would come out the other way: the tests below fail for a report that selects
# on test.
VAL = {
    "": 90.0,
    "A": 89.0,
    "B": 88.0,
    "C": 87.0,
    "AB": 86.0,
    "BA": 85.0,
    "AC": 84.0,
    "CA": 86.5,
    "BC": 82.0,
    "CB": 83.0,
    "ABC": 80.0,
    "ACB": 83.0,
    "BAC": 79.0,
    "BCA": 82.0,
    "CAB": 81.0,
    "CBA": 78.0,
}
# final validation BitOps reduction of each full order (the baseline has 1000 BitOps)
VAL_RATIO = {"ABC": 40.0, "ACB": 10.0, "BAC": 30.0, "BCA": 20.0, "CAB": 5.0, "CBA": 50.0}
ORDERS3 = ("ABC", "ACB", "BAC", "BCA", "CAB", "CBA")


def _grid3(**kw: Any) -> list[rp.Chain]:
    chains = []
    for o in ORDERS3:
        val = [VAL[o[:k]] for k in range(4)]
        vb = [1000.0, 100.0, 100.0, 1000.0 / VAL_RATIO[o]]
        chains.append(_chain(o, val, [200.0 - v for v in val], vb, [1000.0, 50.0, 5.0, 1.0], **kw))
    return chains


def test_pairwise_precedence_and_insertion_decide_on_validation() -> None:
    chains = _grid3()
    states = rp.prefix_states(chains)
    assert states["AB"].metric == 86.0 and states["AB"].delta == -4.0
    assert states["AB"].test_metric == 114.0 and states["AB"].test_delta == 4.0
    assert states["ABC"].bitops_ratio == 40.0 and states["ABC"].test_bitops_ratio == 1000.0
    pairs = rp.pairwise(states, ["A", "B", "C"], True, 0.0)
    # by validation AB 86 > BA 85, CA 86.5 > AC 84, CB 83 > BC 82 (test: the reverse)
    assert [(p["pair"], p["winner"]) for p in pairs] == [
        ("A,B", "AB"),
        ("A,C", "CA"),
        ("B,C", "CB"),
    ]
    assert pairs[0]["first_test_metric"] == 114.0 and pairs[0]["second_test_metric"] == 115.0
    assert pairs[0]["val_margin"] == pytest.approx(1.0)
    prec = rp.precedence(pairs, ["A", "B", "C"])
    assert prec["order"] == "CAB" and prec["cycle"] is None and prec["unique"]  # test: BAC
    ins = rp.insertion(states, pairs, ["A", "B", "C"], True, 0.0)
    # A->B with C inside: ACB 83 vs BCA 82 kept; C->A with B: CBA 78 vs ABC 80 not kept;
    # C->B with A: CAB 81 vs BAC 79 kept (on test each the other way)
    assert [(r["pair"], r["inserted"], r["preference_kept"]) for r in ins] == [
        ("A->B", "C", True),
        ("C->A", "B", False),
        ("C->B", "A", True),
    ]
    assert ins[0]["kept_test_metric"] == 117.0 and ins[0]["reversed_test_metric"] == 118.0


def test_a_pair_the_test_split_would_give_the_other_way() -> None:
    # test favours A->B (88 vs 84), validation favours B->A (87 vs 85)
    ab = _chain("AB", [90.0, 89.0, 85.0], [90.0, 89.0, 88.0])
    ba = _chain("BA", [90.0, 88.0, 87.0], [90.0, 88.0, 84.0])
    pairs = rp.pairwise(rp.prefix_states([ab, ba]), ["A", "B"], True, 0.0)
    assert [p["winner"] for p in pairs] == ["BA"]
    assert rp.precedence(pairs, ["A", "B"])["order"] == "BA"
    # lower is better (MAE): the same numbers as errors make A->B the winner on validation
    ab = _chain("AB", [90.0, 89.0, 85.0], [90.0, 89.0, 88.0], hib=False)
    ba = _chain("BA", [90.0, 88.0, 87.0], [90.0, 88.0, 84.0], hib=False)
    assert rp.pairwise(rp.prefix_states([ab, ba]), ["A", "B"], False, 0.0)[0]["winner"] == "AB"
    # a tie on the validation metric goes to the larger validation BitOps reduction, whatever
    # the test split's BitOps (an early exit's rate differs per split)
    ab = _chain(
        "AB", [90.0, 89.0, 86.0], [90.0, 89.0, 86.0], [1000.0, 100.0, 10.0], [1000.0, 100.0, 5.0]
    )
    ba = _chain(
        "BA", [90.0, 88.0, 86.0], [90.0, 88.0, 86.0], [1000.0, 100.0, 20.0], [1000.0, 100.0, 1.0]
    )
    pair = rp.pairwise(rp.prefix_states([ab, ba]), ["A", "B"], True, 0.0)[0]
    assert pair["winner"] == "AB" and pair["first_val_bitops_ratio"] == 100.0
    assert pair["first_test_bitops_ratio"] == 200.0 and pair["second_test_bitops_ratio"] == 1000.0


def test_ranking_front_and_order_effect_are_on_validation() -> None:
    chains = _grid3()
    rows = rp.all_orders(chains, ["A", "B", "C"], True)
    # final validation metric: ACB 83, BCA 82, CAB 81, ABC 80, BAC 79, CBA 78 (test reversed)
    assert [r["order"] for r in rows] == ["ACB", "BCA", "CAB", "ABC", "BAC", "CBA"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["test_metric"] for r in rows] == [117.0, 118.0, 119.0, 120.0, 121.0, 122.0]
    # front of (val metric, val BitOps ratio): CAB (81, 5x) is dominated by ACB (83, 10x) and
    # BAC (79, 30x) by ABC (80, 40x). On test (mirrored metric, 1000x everywhere) only CBA
    # would be on it.
    assert {r["order"] for r in rows if r["pareto"]} == {"ACB", "BCA", "ABC", "CBA"}
    assert [(r["val_bitops_ratio"], r["test_bitops_ratio"]) for r in rows[:1]] == [(10.0, 1000.0)]
    # equal validation metrics: the larger validation BitOps reduction ranks first (AB, 100x;
    # on test BA would: 1000x vs 10x)
    tied = [
        _chain(
            "AB",
            [90.0, 89.0, 85.0],
            val_bitops=[1000.0, 100.0, 10.0],
            bitops=[1000.0, 100.0, 100.0],
        ),
        _chain(
            "BA", [90.0, 88.0, 85.0], val_bitops=[1000.0, 100.0, 20.0], bitops=[1000.0, 100.0, 1.0]
        ),
    ]
    assert [(r["order"], r["rank"]) for r in rp.all_orders(tied, ["A", "B"], True)] == [
        ("AB", 1),
        ("BA", 2),
    ]
    matrix = rp.order_effect(chains, ["A", "B", "C"])
    # A before B: ABC 80, ACB 83, CAB 81; B before A: BAC 79, BCA 82, CBA 78
    assert matrix[0][1] == pytest.approx((80 + 83 + 81) / 3 - (79 + 82 + 78) / 3)
    assert matrix[1][0] == pytest.approx(-matrix[0][1]) and math.isnan(matrix[0][0])
    assert rp.order_effect(chains, ["A", "B", "C"], "test")[0][1] == pytest.approx(-matrix[0][1])


def test_chains_of_one_order_are_folded_into_the_best_by_validation() -> None:
    # a second ABC, worse on validation (79 vs 80) and better on test (125 vs 120)
    worse = _chain("ABC", [90.0, 89.0, 85.5, 79.0], [110.0, 111.0, 130.0, 125.0], run_id="r1")
    chains = [*_grid3(), worse]  # the grid's ABC: validation 80, test 120
    best = rp.best_per_order(chains)
    assert [c.order for c in best] == list(ORDERS3)
    abc = best[0]
    assert abc.run_id == "run-ABC" and abc.runs == 2 and abc.last.test_metric == 120.0
    assert all(c.runs == 1 for c in best[1:])
    # the better on validation wins whichever comes first, and the count is kept on refolding
    again = rp.best_per_order([worse, *reversed(chains[:-1])])
    assert again[0].run_id == "run-ABC" and again[0].runs == 2
    assert rp.best_per_order(again)[0].runs == 2
    # a prefix measured differently by two chains: the better by validation is kept
    assert rp.prefix_states([worse, *chains])["AB"].metric == 86.0
    assert rp.prefix_states([*chains, worse])["AB"].metric == 86.0


def test_chains_from_different_baselines_are_flagged_in_the_head(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A study resumed on another machine trains its baseline again: the report says how many
    baselines its chains start from and their spread; one shared baseline adds nothing."""
    cfg = rp.ReportConfig.from_dict({"source": "s", "studies": ["all_orders"]})
    one = rp.context(cfg, _grid3())
    assert "different baselines" not in one.head
    moved = _chain("ABC", [90.4, 89.0, 86.0, 80.5], [109.0, 111.0, 114.0, 120.0], run_id="r2")
    chains = [*_grid3(), moved]
    with caplog.at_level("WARNING", logger="chaincomp.report"):
        two = rp.context(cfg, chains)
    assert (
        "**The chains start from 2 different baselines** (validation 90.00-90.40, test "
        "109.00-110.00;" in two.head
    )
    assert "2 different baselines" in caplog.text
    # NaN baselines (a metric not measured) are one baseline, not one per chain
    nan = float("nan")
    blank = [_chain(o, [nan, 1.0, 2.0, 3.0], run_id=f"n{o}") for o in ORDERS3]
    assert "different baselines" not in rp.context(cfg, blank).head
    # a last-bit difference shows in the digits
    near = _chain("ABC", [90.000001, 89.0, 86.0, 80.5], [110.0, 111.0, 114.0, 120.0], run_id="r3")
    assert "validation 90.000000-90.000001" in rp.context(cfg, [*_grid3(), near]).head


def _tables(html: str) -> list[int]:
    """The number of rows (``<tr>``) of each ``<table>`` of rendered HTML."""
    return [part.split("</table>")[0].count("<tr>") for part in html.split("<table>")[1:]]


def _render(path: Path) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(path.read_text())


def test_written_report_selects_on_validation_counts_folds_and_renders(tmp_path: Path) -> None:
    worse = _chain("ABC", [90.0, 89.0, 85.5, 79.0], [110.0, 111.0, 130.0, 125.0], run_id="r1")
    chains = [*_grid3(), worse]
    rcfg = rp.ReportConfig(studies=rp.STUDIES, label="toy", source="toy", out_dir=str(tmp_path))
    written = rp.write_report(rcfg, chains, store="sqlite:///x.db")
    assert set(written) == set(rp.STUDIES)
    res = {s: tmp_path / s / "results" / "toy" for s in rp.STUDIES}
    pairs = _read_csv(res["pairwise"] / "pairwise.csv")
    assert [(p["pair"], p["winner"]) for p in pairs] == [
        ("A,B", "AB"),
        ("A,C", "CA"),
        ("B,C", "CB"),
    ]
    assert float(pairs[0]["first_test_metric"]) == 114.0
    text = (res["precedence"] / "precedence.md").read_text()
    assert "Topological sort: **C->A->B** (the only order consistent with every pair)" in text
    orders = _read_csv(res["all_orders"] / "orders.csv")
    assert [(r["order"], r["rank"], r["runs"], r["pareto"]) for r in orders] == [
        ("ACB", "1", "1", "True"),
        ("BCA", "2", "1", "True"),
        ("CAB", "3", "1", "False"),
        ("ABC", "4", "2", "True"),
        ("BAC", "5", "1", "False"),
        ("CBA", "6", "1", "True"),
    ]
    abc = orders[3]
    assert abc["run_id"] == "run-ABC" and float(abc["test_metric"]) == 120.0
    steps = _read_csv(res["all_orders"] / "steps.csv")
    assert len(steps) == 7 * 4  # every chain read, the folded one too
    assert {r["run_id"] for r in steps if r["kept"] == "False"} == {"r1"}
    for study, path in written.items():
        md = next(path.glob("*.md")).read_text()
        assert "7 chains read, 1 folded into their order's best by validation (6 orders)" in md
        assert rp.SELECTION in md, study

    # every table renders as one, with its rows; every heading as a heading
    expected = {
        "pairwise": [4],
        "precedence": [4],
        "insertion": [4],
        "all_orders": [7, 4, 4],
        "headline": [5, 4],
    }
    for study, rows in expected.items():
        (md,) = res[study].glob("*.md")
        html = _render(md)
        assert _tables(html) == rows, study
        headings = [line for line in md.read_text().splitlines() if line.startswith("## ")]
        assert headings and html.count("<h2>") == len(headings), study
        lines = md.read_text().splitlines()
        for i, line in enumerate(lines):  # a blank line before every table and heading
            starts = line.startswith("#") or (line.startswith("|") and lines[i - 1][:1] != "|")
            assert not starts or i == 0 or lines[i - 1] == "", (study, line)
    # the check catches a table glued to its paragraph (as orders.md had it)
    glued = tmp_path / "glued.md"
    glued.write_text("Ranked by the metric. " + rp.markdown_table([{"a": 1}], ["a"]))
    assert _tables(_render(glued)) == []


def test_chains_are_read_from_the_store_without_dropping_any() -> None:
    from types import SimpleNamespace as NS

    class Page(list[Any]):
        token = None

    def run(run_id: str, name: str, start: int, metrics: dict[str, float]) -> Any:
        return NS(
            info=NS(run_id=run_id, run_name=name, start_time=start),
            data=NS(metrics=metrics, params={"data.task": "classify"}, tags={}),
        )

    def steps(val: list[float], val_bitops: bool) -> list[dict[str, float]]:
        out = []
        for k, v in enumerate(val):
            m = {"val_metric": v, "test_metric": v + 1, "bitops": 100.0 / (k + 1)}
            if val_bitops:
                m["val_bitops"] = 50.0 / (k + 1)
            out.append(m)
        return out

    trials = {
        "t1": ("AB", 1, steps([90.0, 89.0, 87.0], True)),
        "t2": ("AB", 2, steps([90.0, 89.0, 88.0], True)),
        "t3": ("BA", 3, steps([90.0, 88.0, 86.0], False)),  # an older store: no val_bitops
        "t4": ("AB", 4, [steps([90.0, 89.0, 87.0], True)[k] if k != 1 else {} for k in range(3)]),
    }  # a step without metrics: not a chain

    class Client:  # a store copied without its artifacts: no summary.json to read
        def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
            raise MlflowException(f"no artifact {path} of {run_id}")

        def search_runs(
            self, _ids: list[str], filter_string: str, max_results: int, page_token: str | None
        ) -> Page:
            if "optuna.study" in filter_string:
                return Page(run(t, t, start, {}) for t, (_, start, _) in trials.items())
            order, _, ms = trials[filter_string.split("'")[1]]
            names = ["baseline", *[f"{k + 1}:{c}" for k, c in enumerate(order)]]
            return Page(run(f"s{k}", names[k], 0, m) for k, m in enumerate(ms))

    chains = rp.load_chains(Client(), "0", "study")
    assert [(c.order, c.run_id) for c in chains] == [("AB", "t1"), ("AB", "t2"), ("BA", "t3")]
    assert chains[0].last.val_bitops == 50.0 / 3 and chains[0].last.bitops == 100.0 / 3
    assert chains[2].last.val_bitops == chains[2].last.bitops == 100.0 / 3  # the fallback
    assert chains[1].last.val_metric == 88.0 and chains[1].last.test_metric == 89.0
    best = rp.best_per_order(chains)
    assert [(c.order, c.run_id, c.runs) for c in best] == [("AB", "t2", 2), ("BA", "t3", 1)]


def test_ties_go_to_bitops_and_cycles_fall_back_to_wins() -> None:
    a = rp.State("XY", 90.0, 0.0, 10.0)
    b = rp.State("YX", 90.05, 0.05, 20.0)
    assert rp.better(b, a, True) and not rp.better(a, b, True)
    assert rp.better(b, a, True, tie_tol=0.1)  # a tie: the larger reduction wins
    assert rp.better(a, b, False)  # lower is better (MAE)
    pairs = [{"winner": "AB"}, {"winner": "BC"}, {"winner": "CA"}]
    prec = rp.precedence(pairs, ["A", "B", "C"])
    assert prec["cycle"] is not None and sorted(prec["order"]) == ["A", "B", "C"]
    assert prec["wins"] == {"A": 1, "B": 1, "C": 1}


def test_ties_give_no_edge_and_several_sorts_are_flagged() -> None:
    base = rp.State("", 90.0, 0.0, 1.0)
    states = {
        "": base,
        **{
            o: rp.State(o, m, m - 90.0, r)
            for o, m, r in (
                ("AB", 88.0, 4.0),
                ("BA", 88.0, 4.0),
                ("AC", 87.0, 4.0),
                ("CA", 86.0, 4.0),
                ("BC", 85.0, 2.0),
                ("CB", 85.0, 2.0),
            )
        },
    }
    pairs = rp.pairwise(states, ["A", "B", "C"], True, 0.0)
    assert [p["winner"] for p in pairs] == ["tie", "AC", "tie"]
    prec = rp.precedence(pairs, ["A", "B", "C"])
    assert prec["edges"] == [("A", "C")] and not prec["unique"] and prec["cycle"] is None
    assert prec["order"] == "ABC"  # A (one win) first, then B and C in the given order
    assert rp.consistent("BAC", prec["edges"]) and not rp.consistent("CAB", prec["edges"])
    assert rp.insertion(states, pairs, ["A", "B", "C"], True, 0.0) == []  # ABC/CBA not measured


def test_pareto_front_is_exact() -> None:
    pts = [(90.0, 10.0), (85.0, 100.0), (80.0, 50.0), (90.0, 5.0), (70.0, 1000.0)]
    assert rp.pareto(pts, True) == [4, 1, 0]
    assert rp.pareto([(1.0, 10.0), (2.0, 10.0)], False) == [0]  # lower MAE wins


def test_pareto_plot_draws_chains_of_any_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a 5-stage chain (e.g. D, L, P, Q, E): its full state must be drawn, not dropped for want
    # of a marker
    chain = _chain("DLPQE", [90.0, 89.0, 88.0, 87.0, 86.0, 85.0])
    states = rp.prefix_states([chain])
    figs: list[Any] = []
    monkeypatch.setattr(report_plots, "save_figure", lambda fig, path: figs.append(fig))
    rp.plot_pareto([chain], states, True, tmp_path / "pareto.png", "five steps")
    (fig,) = figs
    try:
        ax = fig.axes[0]
        drawn = [tuple(xy) for c in ax.collections for xy in c.get_offsets()]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        report_plots.pyplot().close(fig)
    five = states["DLPQE"]
    assert (five.bitops_ratio, five.metric) == (100000.0, 85.0)
    assert (100000.0, 85.0) in drawn and len(drawn) == 5  # one point per prefix, none lost
    assert [lb for lb in labels if "step" in lb and "Pareto" not in lb] == [
        "1 step",
        "2 steps",
        "3 steps",
        "4 steps",
        "5 steps",
    ]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"studies": ["pairs"], "source": "s"}, "report.studies"),
        ({"studies": [], "source": "s"}, "report.studies"),
        ({"source": ""}, "report.source"),
        ({"source": "s", "tie_tol": -1.0}, "report.tie_tol"),
        ({"source": "s", "label": "a/b"}, "report.label"),
        ({"source": "s", "colour": 1}, "report.colour"),
    ],
)
def test_bad_report_config_names_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        rp.ReportConfig.from_dict(section)


# ---------------------------------------------------------------- a real study on digits

TINY = (
    "data=digits",
    "model=small_cnn",
    "model.width_mult=0.5",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "chain.steps.P.settings.epochs=1",
    "chain.steps.Q.settings.epochs=1",
    "chain.steps.E.settings.epochs=1",
    "chain.steps.Q.settings.calib_batches=1",
    "search=orders",
    "search.stages=[P,Q,E]",
    "search.n_trials=6",
    "search.name=tiny_orders",
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every order of P, Q, E on digits (a grid study: 6 chains, 15 stage runs)."""
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = compose_cfg(
        *TINY,
        f"chain.cache_dir={tmp / 'cache'}",
        f"search.storage={tmp / 'study.journal'}",
        f"tracking.uri={uri}",
    )
    summary = sweep(cfg, tmp / "out")
    assert summary["states"] == {"COMPLETE": 6}
    return tmp, uri


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_of_a_grid_study_matches_mlflow(tiny_study: tuple[Path, str]) -> None:
    tmp, uri = tiny_study
    out = tmp / "experiments"
    cfg = compose_cfg(
        *TINY,
        f"tracking.uri={uri}",
        f"report.out_dir={out}",
        "report.label=digits",
        "report.studies=[pairwise,precedence,insertion,all_orders]",
    )
    written = rp.report(cfg)
    assert set(written) == {"pairwise", "precedence", "insertion", "all_orders"}
    res = {s: out / s / "results" / "digits" for s in written}
    steps = _read_csv(res["all_orders"] / "steps.csv")
    assert len(steps) == 6 * 4  # baseline + 3 steps per chain
    # every prefix's validation numbers, by hand from the long table
    val = {
        r["chain"][: int(r["k"])]: (float(r["val_metric"]), float(r["val_bitops_ratio"]))
        for r in steps
    }

    def winner(x: str, y: str) -> str:  # higher accuracy, then larger BitOps reduction
        if val[x] == val[y]:
            return "tie"
        return x if val[x] > val[y] else y

    pairs = _read_csv(res["pairwise"] / "pairwise.csv")
    assert [p["pair"] for p in pairs] == ["P,Q", "P,E", "Q,E"]
    for p in pairs:
        assert float(p["first_val_metric"]) == val[p["first"]][0]
        assert p["winner"] == winner(p["first"], p["second"])
    edges = [(p["winner"][0], p["winner"][1]) for p in pairs if p["winner"] != "tie"]
    fits = [
        "".join(o)
        for o in itertools.permutations("PQE")
        if all(o.index(x) < o.index(y) for x, y in edges)
    ]
    text = (res["precedence"] / "precedence.md").read_text()
    if len(fits) == 1:
        assert f"Topological sort: **{'->'.join(fits[0])}** (the only order" in text
    elif fits:
        derived = text.split("Topological sort: **")[1].split("**")[0].replace("->", "")
        assert derived in fits and "one of several orders" in text
    else:
        assert "The graph has a cycle" in text
    ins = _read_csv(res["insertion"] / "insertion.csv")
    assert len(ins) == len(edges)  # one third stage per decided pair
    for row in ins:
        assert row["inserted"] not in row["pair"]
        kept = winner(row["kept_order"], row["reversed_order"]) != row["reversed_order"]
        assert row["preference_kept"] == str(kept)
    orders = _read_csv(res["all_orders"] / "orders.csv")
    assert sorted(r["order"] for r in orders) == sorted(["PQE", "PEQ", "QPE", "QEP", "EPQ", "EQP"])
    by_val = sorted(orders, key=lambda r: (-float(r["val_metric"]), -float(r["val_bitops_ratio"])))
    assert [r["order"] for r in orders] == [r["order"] for r in by_val]
    for r in orders:  # competition ranking on validation
        assert int(r["rank"]) == 1 + sum(val[o["order"]] > val[r["order"]] for o in orders)
        assert r["runs"] == "1"

    # the numbers are the chain runs' own: final metrics and BitOps ratios of each trial's run
    client = MlflowClient(uri)
    for row in orders:
        run = client.get_run(row["run_id"])
        assert run.data.tags["chaincomp.order"] == row["order"]
        for col, key in (
            ("val_metric", "val_metric"),
            ("test_metric", "test_metric"),
            ("val_bitops_ratio", "val_bitops_ratio"),
            ("test_bitops_ratio", "bitops_ratio"),
        ):
            assert float(row[col]) == pytest.approx(run.data.metrics[key]), col
    md = (res["all_orders"] / "orders.md").read_text()
    assert "6 chains read, 0 folded" in md and rp.SELECTION in md
    assert _tables(_render(res["all_orders"] / "orders.md")) == [7, 4, 4]
    for name in ("pareto.png", "waterfall.png", "order_effect.png"):
        assert (res["all_orders"] / name).read_bytes()[:4] == b"\x89PNG"


def test_the_report_reads_each_chains_summary_json(tiny_study: tuple[Path, str]) -> None:
    tmp, uri = tiny_study
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("chaincomp").experiment_id
    runs = client.search_runs(
        [exp], "tags.`optuna.study` = 'tiny_orders' and tags.`chaincomp.command` = 'run'"
    )
    assert len(runs) == 6
    for run in runs:
        trial = int(run.data.tags["optuna.trial"])
        on_disk = ChainResult.load(tmp / "out" / "trials" / f"{trial:04d}" / "summary.json")
        result = rp.read_result(client, exp, run)
        assert result == on_disk and result.records == on_disk.records  # the file, records too
        # the step runs' metrics (what a store copied without artifacts falls back to) agree
        rebuilt = rp.load._from_step_runs(client, exp, run)
        assert rebuilt is not None and rebuilt.order == result.order
        for a, b in zip(rebuilt.steps, result.steps, strict=True):
            assert [getattr(a, k) for k in METRIC_KEYS] == [getattr(b, k) for k in METRIC_KEYS]


def test_a_report_from_summary_files_equals_the_one_from_mlflow(
    tiny_study: tuple[Path, str],
) -> None:
    """``report.summaries``: the chains' own summary.json files (a run with tracking off) give
    the same tables as the MLflow store; only the head paragraph names the other origin."""
    tmp, uri = tiny_study
    files = sorted((tmp / "out" / "trials").glob("*/summary.json"))
    assert len(files) == 6
    studies = "report.studies=[pairwise,precedence,insertion,all_orders]"
    base = (*TINY, "report.label=digits", studies)
    via_mlflow = rp.report(compose_cfg(*base, f"tracking.uri={uri}", f"report.out_dir={tmp / 'm'}"))
    listed = ",".join(str(f) for f in files)
    via_files = rp.report(
        compose_cfg(
            *base,
            "tracking.uri=sqlite:///nowhere/at/all.db",  # never opened
            f"report.summaries=[{listed}]",
            f"report.out_dir={tmp / 'f'}",
        )
    )
    assert set(via_files) == set(via_mlflow)
    for study, folder in via_mlflow.items():
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(p.name for p in via_files[study].iterdir())
        for name in names:
            a, b = folder / name, via_files[study] / name
            if name.endswith(".csv"):  # the same rows (chains listed in another order)
                assert sorted(a.read_text().splitlines()) == sorted(b.read_text().splitlines())
            elif name.endswith(".md"):
                head_a, rest_a = a.read_text().split("\n", 1)
                head_b, rest_b = b.read_text().split("\n", 1)
                assert rest_a == rest_b and "from MLflow" in head_a
                assert f"from files {files[0]}" in head_b
    with pytest.raises(ConfigError, match=r"report\.summaries.*no such file"):
        rp.report(compose_cfg(*base, f"report.summaries=[{tmp / 'none.json'}]"))


def test_a_sweep_with_tracking_off_reports_from_a_glob_without_mlflow(tmp_path: Path) -> None:
    """The GPU machine's path (no MLflow, SQLAlchemy or Alembic installed there): ``chaincomp
    sweep tracking=none`` with spawned workers, then ``chaincomp report
    report.summaries=[<run dir>/trials/*/summary.json]``, where importing any of those fails in
    every process (stub packages first on PYTHONPATH, which the workers inherit). Every order's
    chain is found through the glob, each file once; a glob that matches nothing is one
    ConfigError naming the key."""
    import subprocess
    import sys

    stubs = tmp_path / "stubs"
    for name in ("mlflow", "sqlalchemy", "alembic"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    run_dir, out = tmp_path / "sweep", tmp_path / "experiments"
    common = [
        *TINY[:-3],
        "search.stages=[P,Q]",
        "search.n_trials=2",
        "search.n_workers=2",
        "search.name=no_mlflow",
        "tracking=none",
        f"chain.cache_dir={tmp_path / 'cache'}",
        f"search.storage={tmp_path / 'study.journal'}",
    ]
    env = {"PYTHONPATH": f"{stubs}{os.pathsep}{ROOT / 'src'}"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return chaincomp_cli(*args, cwd=tmp_path, env=env)

    blocked = subprocess.run(
        [sys.executable, "-c", "import mlflow"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert "no mlflow here" in blocked.stderr
    swept = cli("sweep", *common, f"hydra.run.dir={run_dir}")
    assert swept.returncode == 0, swept.stderr[-2000:]
    pattern = f"{run_dir}/trials/*/summary.json"
    reported = cli(
        "report",
        *common,
        f"report.summaries=['{pattern}','{pattern}']",  # overlapping entries: each file once
        f"report.out_dir={out}",
        "report.label=digits",
        "report.studies=[pairwise,all_orders]",
    )
    assert reported.returncode == 0, reported.stderr[-2000:]
    rows = _read_csv(out / "all_orders" / "results" / "digits" / "orders.csv")
    assert sorted((r["order"], r["runs"]) for r in rows) == [("PQ", "1"), ("QP", "1")]
    head = (out / "pairwise" / "results" / "digits" / "pairwise.md").read_text().split("\n")[0]
    assert "(2 files)" in head
    with pytest.raises(ConfigError, match=r"report\.summaries.*no such file: .*nothing"):
        rp.summary_paths((pattern, str(tmp_path / "nothing" / "*.json")))


def test_report_of_an_unknown_source_names_the_key(tiny_study: tuple[Path, str]) -> None:
    tmp, uri = tiny_study
    cfg = compose_cfg(
        *TINY, f"tracking.uri={uri}", "report.source=nothing_here", f"report.out_dir={tmp / 'x'}"
    )
    with pytest.raises(ConfigError, match=r"report\.source"):
        rp.report(cfg)
    assert not (tmp / "x").exists()


def test_notebook_is_stripped_and_runs_on_the_study(tiny_study: tuple[Path, str]) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    _, uri = tiny_study
    env = {"CHAINCOMP_TRACKING_URI": uri, "CHAINCOMP_STUDY": "tiny_orders"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "6 chains" in outputs and "derived order" in outputs
    # three figures drawn inline (the front, the order effect, the stage positions), labelled
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(figures) == 3
    source = "\n".join(c.source for c in nb.cells)
    assert source.count("set_xlabel") == 3 and source.count("set_title") == 3


@pytest.mark.parametrize(
    ("name", "source", "letters"),
    [
        ("orders_fashion", "orders_fashion", "DPQE"),
        ("orders_rotation", "orders_rotation", "DPQE"),
        ("orders_cifar10", "orders_cifar10", "DPQE"),
        ("orders_cifar10_cpu", "orders_cifar10_cpu", "DPQE"),
        ("orders_cifar10_cpu_kd", "orders_cifar10_cpu_kd", "DPQE"),
        ("orders_cifar10_cpu_onecycle", "orders_cifar10_cpu_onecycle", "DPQE"),
        ("headline_cifar10", "headline_cifar10", "DPQE"),
    ],
)
def test_study_configs_compose_and_validate(name: str, source: str, letters: str) -> None:
    from omegaconf import OmegaConf

    from chaincomp.chain import chain_spec
    from chaincomp.search import SearchConfig

    cfg = compose_cfg(f"experiment={name}")
    assert chain_spec(cfg).letters == letters
    SearchConfig.from_cfg(cfg)
    rcfg = rp.ReportConfig.from_dict(OmegaConf.to_container(cfg.report, resolve=True))  # type: ignore[arg-type]
    assert rcfg.source == source


@pytest.mark.slow
def test_the_four_stage_order_study_on_digits_end_to_end(tmp_path: Path) -> None:
    """The CPU-size study pipeline at digits size: the 24-order grid of D, P, Q, E through
    ``sweep`` (64 stage runs), then every table of studies a-d through ``report``."""
    args = [a for a in TINY if not a.startswith(("search.stages", "search.n_trials"))]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg(
        *args,
        "chain.steps.D.settings.epochs=2",
        "search.n_trials=24",
        f"chain.cache_dir={tmp_path / 'cache'}",
        f"tracking.uri={uri}",
        f"search.storage={tmp_path / 'study.journal'}",
        f"report.out_dir={tmp_path / 'experiments'}",
        "report.label=digits",
        "report.studies=[pairwise,precedence,insertion,all_orders]",
    )
    summary = sweep(cfg, tmp_path / "out")
    assert summary["states"] == {"COMPLETE": 24}
    res = tmp_path / "experiments"
    rp.report(cfg)
    assert len(_read_csv(res / "pairwise" / "results" / "digits" / "pairwise.csv")) == 6
    orders = _read_csv(res / "all_orders" / "results" / "digits" / "orders.csv")
    assert len(orders) == 24 and "DPQE" in {r["order"] for r in orders}
    ins = _read_csv(res / "insertion" / "results" / "digits" / "insertion.csv")
    ties = sum(
        1
        for p in _read_csv(res / "pairwise" / "results" / "digits" / "pairwise.csv")
        if p["winner"] == "tie"
    )
    assert len(ins) == 2 * (6 - ties)  # two third stages per decided pair
    text = (res / "precedence" / "results" / "digits" / "precedence.md").read_text()
    assert "The paper's order D->P->Q->E" in text


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    from chaincomp.utils import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.md", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert path.read_text() == "x" and (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.md"]  # no temporary left behind
