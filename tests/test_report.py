"""``chaincomp report``: the order-study analysis on exact synthetic chains, a real grid study on
digits read back from MLflow into tables and plots, and the analysis notebook run on it."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from chaincomp import report as rp
from chaincomp.errors import ConfigError
from chaincomp.search import sweep

from .conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "order_analysis.ipynb"


def _chain(order: str, metrics: list[float], bitops: list[float], hib: bool = True) -> rp.Chain:
    rows = [rp.StepRow(k, "baseline" if k == 0 else order[k - 1], m, m, b, b, 1.0, 1.0)
            for k, (m, b) in enumerate(zip(metrics, bitops, strict=True))]  # fmt: skip
    return rp.Chain(order, f"run-{order}", hib, rows)


# ---------------------------------------------------------------- analysis on exact numbers


def test_pairwise_precedence_and_insertion_on_known_chains() -> None:
    # three stages A, B, C; prefixes share their numbers (as the prefix cache guarantees)
    m = {"": 90.0, "A": 89.0, "B": 88.0, "C": 87.0, "AB": 86.0, "BA": 85.0, "AC": 84.0,
         "CA": 86.5, "BC": 82.0, "CB": 83.0, "ABC": 80.0, "ACB": 81.0, "BAC": 79.0,
         "BCA": 78.0, "CAB": 82.5, "CBA": 77.0}  # fmt: skip
    chains = [_chain(o, [m[o[:k]] for k in range(4)], [1000.0, 100.0, 10.0, 1.0])
              for o in ("ABC", "ACB", "BAC", "BCA", "CAB", "CBA")]  # fmt: skip
    states = rp.prefix_states(chains)
    assert states["AB"].metric == 86.0 and states["AB"].delta == -4.0
    assert states["ABC"].bitops_ratio == 1000.0
    pairs = rp.pairwise(states, ["A", "B", "C"], True, 0.0)
    assert [(p["pair"], p["winner"]) for p in pairs] == [
        ("A,B", "AB"),
        ("A,C", "CA"),
        ("B,C", "CB"),
    ]
    prec = rp.precedence(pairs, ["A", "B", "C"])
    assert prec["order"] == "CAB" and prec["cycle"] is None and prec["unique"]
    ins = rp.insertion(states, pairs, ["A", "B", "C"], True, 0.0)
    # A->B with C inside: ACB 81 vs BCA 78 kept; C->A with B: CBA 77 vs ABC 80 not kept;
    # C->B with A: CAB 82.5 vs BAC 79 kept
    assert [(r["pair"], r["inserted"], r["preference_kept"]) for r in ins] == [
        ("A->B", "C", True), ("C->A", "B", False), ("C->B", "A", True)]  # fmt: skip
    matrix = rp.order_effect(chains, ["A", "B", "C"])
    # A before B: ABC 80, ACB 81, CAB 82.5; B before A: BAC 79, BCA 78, CBA 77
    assert matrix[0][1] == pytest.approx((80 + 81 + 82.5) / 3 - (79 + 78 + 77) / 3)
    assert matrix[1][0] == pytest.approx(-matrix[0][1]) and math.isnan(matrix[0][0])


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
    states = {"": base, **{o: rp.State(o, m, m - 90.0, r)
              for o, m, r in (("AB", 88.0, 4.0), ("BA", 88.0, 4.0), ("AC", 87.0, 4.0),
                              ("CA", 86.0, 4.0), ("BC", 85.0, 2.0), ("CB", 85.0, 2.0))}}  # fmt: skip
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


@pytest.mark.parametrize(
    ("section", "key"),
    [({"studies": ["pairs"], "source": "s"}, "report.studies"),
     ({"studies": [], "source": "s"}, "report.studies"),
     ({"source": ""}, "report.source"),
     ({"source": "s", "tie_tol": -1.0}, "report.tie_tol"),
     ({"source": "s", "label": "a/b"}, "report.label"),
     ({"source": "s", "colour": 1}, "report.colour")],
)  # fmt: skip
def test_bad_report_config_names_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        rp.ReportConfig.from_dict(section)


# ---------------------------------------------------------------- a real study on digits

TINY = (
    "data=digits", "model=small_cnn", "model.width_mult=0.5", "trainer.max_epochs=2",
    "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
    "chain.steps.P.settings.epochs=1", "chain.steps.Q.settings.epochs=1",
    "chain.steps.E.settings.epochs=1", "chain.steps.Q.settings.calib_batches=1",
    "search=orders", "search.stages=[P,Q,E]", "search.n_trials=6", "search.name=tiny_orders",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every order of P, Q, E on digits (a grid study: 6 chains, 15 stage runs)."""
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = compose_cfg(*TINY, f"chain.cache_dir={tmp / 'cache'}",
                      f"search.storage={tmp / 'study.journal'}", f"tracking.uri={uri}")  # fmt: skip
    summary = sweep(cfg, tmp / "out")
    assert summary["states"] == {"COMPLETE": 6}
    return tmp, uri


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_of_a_grid_study_matches_mlflow(tiny_study: tuple[Path, str]) -> None:
    tmp, uri = tiny_study
    out = tmp / "experiments"
    cfg = compose_cfg(*TINY, f"tracking.uri={uri}", f"report.out_dir={out}", "report.label=digits",
                      "report.studies=[pairwise,precedence,insertion,all_orders]")  # fmt: skip
    written = rp.report(cfg)
    assert set(written) == {"pairwise", "precedence", "insertion", "all_orders"}
    res = {s: out / s / "results" / "digits" for s in written}
    pairs = _read_csv(res["pairwise"] / "pairwise.csv")
    assert [p["pair"] for p in pairs] == ["P,Q", "P,E", "Q,E"]
    assert all(p["winner"] in (p["first"], p["second"], "tie") for p in pairs)
    decided = [p for p in pairs if p["winner"] != "tie"]
    ins = _read_csv(res["insertion"] / "insertion.csv")
    assert len(ins) == len(decided)  # one third stage per decided pair
    for row in ins:
        assert row["inserted"] not in row["pair"]
    orders = _read_csv(res["all_orders"] / "orders.csv")
    assert sorted(r["order"] for r in orders) == sorted(["PQE", "PEQ", "QPE", "QEP", "EPQ", "EQP"])
    ranks = [int(r["rank"]) for r in orders]
    assert ranks[0] == 1 and ranks == sorted(ranks) and all(1 <= r <= 6 for r in ranks)
    metrics = [float(r["test_metric"]) for r in orders]
    assert metrics == sorted(metrics, reverse=True)
    steps = _read_csv(res["all_orders"] / "steps.csv")
    assert len(steps) == 6 * 4  # baseline + 3 steps per chain

    # the numbers are the chain runs' own: final metric and BitOps ratio of each trial's run
    client = MlflowClient(uri)
    for row in orders:
        run = client.get_run(row["run_id"])
        assert run.data.tags["chaincomp.order"] == row["order"]
        assert float(row["test_metric"]) == pytest.approx(run.data.metrics["test_metric"])
        assert float(row["bitops_ratio"]) == pytest.approx(run.data.metrics["bitops_ratio"])
    text = (res["precedence"] / "precedence.md").read_text()
    assert "Topological sort" in text or "cycle" in text
    for name in ("pareto.png", "waterfall.png", "order_effect.png"):
        assert (res["all_orders"] / name).read_bytes()[:4] == b"\x89PNG"


def test_report_of_an_unknown_source_names_the_key(tiny_study: tuple[Path, str]) -> None:
    tmp, uri = tiny_study
    cfg = compose_cfg(*TINY, f"tracking.uri={uri}", "report.source=nothing_here",
                      f"report.out_dir={tmp / 'x'}")  # fmt: skip
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
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT)}})  # fmt: skip
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "6 chains" in outputs and "derived order" in outputs


@pytest.mark.parametrize(
    ("name", "source", "letters"),
    [("orders_fashion", "orders_fashion", "DPQE"), ("orders_rotation", "orders_rotation", "DPQE"),
     ("orders_cifar10", "orders_cifar10", "DPQE"), ("headline_cifar10", "headline_cifar10", "DPQE")],
)  # fmt: skip
def test_study_configs_compose_and_validate(name: str, source: str, letters: str) -> None:
    from omegaconf import OmegaConf

    from chaincomp.chain.runner import chain_spec
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
    cfg = compose_cfg(*args, "chain.steps.D.settings.epochs=2", "search.n_trials=24",
                      f"chain.cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}",
                      f"search.storage={tmp_path / 'study.journal'}",
                      f"report.out_dir={tmp_path / 'experiments'}", "report.label=digits",
                      "report.studies=[pairwise,precedence,insertion,all_orders]")  # fmt: skip
    summary = sweep(cfg, tmp_path / "out")
    assert summary["states"] == {"COMPLETE": 24}
    res = tmp_path / "experiments"
    rp.report(cfg)
    assert len(_read_csv(res / "pairwise" / "results" / "digits" / "pairwise.csv")) == 6
    orders = _read_csv(res / "all_orders" / "results" / "digits" / "orders.csv")
    assert len(orders) == 24 and "DPQE" in {r["order"] for r in orders}
    ins = _read_csv(res / "insertion" / "results" / "digits" / "insertion.csv")
    ties = sum(1 for p in _read_csv(res / "pairwise" / "results" / "digits" / "pairwise.csv")
               if p["winner"] == "tie")  # fmt: skip
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
