"""Search: the space (ask/tell), real sweeps on digits, failures, resume after SIGKILL, workers on
a real PostgreSQL server, lineage through a real MLflow server, ``chaincomp ui``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from chaincomp.chain.result import from_rows
from chaincomp.errors import ConfigError
from chaincomp.search import SearchConfig, build_space, sweep
from chaincomp.search.driver import space_of
from chaincomp.search.objective import Objective

from .conftest import compose_cfg

TINY = (
    "data=digits",
    "model=small_cnn",
    "model.width_mult=0.5",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "chain.steps.D.settings.epochs=1",
    "chain.steps.P.settings.epochs=1",
    "chain.steps.Q.settings.epochs=1",
    "chain.steps.E.settings.epochs=1",
    "chain.steps.Q.settings.calib_batches=1",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sweep_args(tmp: Path, *extra: str, tracking: str | None = None) -> list[str]:
    uri = tracking or f"sqlite:///{tmp / 'mlflow.db'}"
    return [
        *TINY,
        f"chain.cache_dir={tmp / 'cache'}",
        f"search.storage={tmp / 'study.journal'}",
        f"tracking.uri={uri}",
        *extra,
    ]


# ---------------------------------------------------------------- the space, ask / tell


def test_space_names_are_stable_and_conditional() -> None:
    cfg = compose_cfg()
    space = space_of(cfg, SearchConfig.from_cfg(cfg))
    assert len(space.orders) == 24 and "DPQE" in space.orders
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    stage_of = {"D": "distill", "P": "prune", "Q": "quantize", "E": "early_exit"}
    seen_orders = set()
    for _ in range(40):
        trial = study.ask()
        order, overrides = space.suggest(trial)
        seen_orders.add(order)
        assert set(overrides) == set(order)
        names = set(trial.params) - {"order"}
        assert {n.split(".")[0] for n in names} == {stage_of[s] for s in order}
        for step, values in overrides.items():
            for key, value in values.items():
                assert trial.params[f"{stage_of[step]}.{key}"] == value
        # the order's choices are the same in every trial
        dist = trial.distributions["order"]
        assert list(dist.choices) == list(space.orders)
        study.tell(trial, [1.0, 1.0])
    assert len(seen_orders) > 10
    assert {"prune.ratio", "quantize.w_bits", "distill.width_mult"} <= set(space.param_names())


def test_space_subsets_and_explicit_orders() -> None:
    cfg = compose_cfg()
    catalogue = OmegaConf.to_container(cfg.chain.steps, resolve=True)
    assert len(build_space(catalogue, ["P", "Q", "E"], None, True, 1).orders) == 3 + 6 + 6
    assert build_space(catalogue, ["P", "Q"], ["PQ", "Q"], False, 1).orders == ("PQ", "Q")
    with pytest.raises(ConfigError, match="search.orders"):
        build_space(catalogue, ["P", "Q"], ["PX"], False, 1)
    with pytest.raises(ConfigError, match="search.stages: unknown step 'Z'"):
        build_space(catalogue, ["P", "Z"], None, False, 1)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("search.sampler=cmaes", "search.sampler"),
        ("search.objective=cost", "search.max_metric_loss"),
        ("search.n_trials=0", "search.n_trials"),
        ("search.trial_timeout=0", "search.trial_timeout"),
        ("+search.speed=1", "search.speed"),
        ("search.stagewise_start=middle", "search.stagewise_start"),
        ("search.stage_trials=0", "search.stage_trials"),
        ("search.stagewise=true,search.sampler=grid", "search.stagewise"),
    ],
)
def test_bad_search_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        SearchConfig.from_cfg(compose_cfg(*override.split(",")))


def test_a_diverged_trial_fails_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chaincomp.search.objective as sw

    cfg = compose_cfg(*TINY, "tracking.enabled=false")
    scfg = SearchConfig.from_cfg(cfg)
    row = {"val_metric": 90.0, "test_metric": 90.0, "bitops": 1.0, "macs": 1.0, "params": 1}
    base = {**row, "name": "baseline", "stage": "baseline", "size_mb": 1.0}
    diverged = {**base, "name": "Q", "stage": "quantize", "val_metric": float("nan")}
    fake = from_rows(
        [base, diverged],
        task="classify",
        metric_name="accuracy",
        higher_is_better=True,
        chain="dpqe",
        order=["Q"],
        letters="Q",
    )
    monkeypatch.setattr(sw, "run_chain", lambda *a, **k: fake)
    obj = Objective(cfg, scfg, space_of(cfg, scfg), tmp_path, sw.NullTracker(), None)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(obj, n_trials=1, catch=(Exception,))
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.FAIL
    assert t.user_attrs["fail_reason"].startswith("TrialDiverged: non-finite result")


# ---------------------------------------------------------------- real sweeps


def test_sweep_on_digits_gives_a_front_and_lineage(tmp_path: Path) -> None:
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "search.n_trials=4",
            "search.sampler=random",
            "search.orders=[PQ,QP,Q,PQE]",
            "search.name=small",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    assert summary["states"] == {"COMPLETE": 4}
    front = summary["front"]
    assert front and all(r["val_bitops_ratio"] > 1 for r in front)
    bitops = [r["val_bitops"] for r in front]
    metrics = [r["val_metric"] for r in front]
    assert bitops == sorted(bitops) and metrics == sorted(
        metrics
    )  # a real front: more cost, more accuracy
    for name in ("front.csv", "front.md", "front.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"front.png", "front.csv"}
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    study = optuna.load_study(
        study_name="small",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
        ),
    )
    by_run = {t.user_attrs["mlflow_run_id"]: t.number for t in study.trials}
    for child in children:
        assert int(child.data.tags["optuna.trial"]) == by_run[child.info.run_id]
        steps = client.search_runs([exp], f"tags.mlflow.parentRunId = '{child.info.run_id}'")
        assert len(steps) == 1 + len(child.data.tags["chaincomp.order"])  # baseline + steps
        trial = study.trials[by_run[child.info.run_id]]
        # the trial's Optuna choices under their own names, its order as one string
        assert child.data.params["optuna.order"] == trial.params["order"]
        assert child.data.tags["optuna.order"] == trial.params["order"]
        assert {k for k in child.data.params if k.startswith("optuna.")} == {
            f"optuna.{k}" for k in trial.params
        }
    # the front, marked in the runs table and logged on the sweep run
    tagged = {c.info.run_id for c in children if c.data.tags["chaincomp.pareto"] == "true"}
    assert tagged == {r["mlflow_run_id"] for r in front}
    assert parent.data.metrics["front_size"] == len(front)
    assert study.metric_names == ["val_accuracy", "val_bitops"]
    # the compressed network of a front trial, downloaded from MLflow, reloads and re-measures
    # to the test metric its chain recorded
    from chaincomp.chain import load_chain
    from chaincomp.pipeline import build_data, build_module

    best = front[-1]
    local = client.download_artifacts(best["mlflow_run_id"], "chain", str(tmp_path / "dl"))
    dm = build_data(cfg)
    module = load_chain(local, build_module(cfg, dm))
    assert module.evaluate(dm.loader("test", "cpu")) == pytest.approx(best["test_metric"], abs=1e-9)

    # the same command again: nothing new, nothing repeated; different orders are refused
    again = sweep(cfg, tmp_path / "out2")
    assert again["trials"] == 4 and again["mlflow_run_id"] == summary["mlflow_run_id"]
    other = compose_cfg(*_sweep_args(tmp_path, "search.orders=[PQ]", "search.name=small"))
    with pytest.raises(ConfigError, match="search.orders"):
        sweep(other, tmp_path / "out3")


def test_failed_trials_are_recorded_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a student that cannot be built (a bad student name is refused up front now, so the
    # failure is made inside the step, where a trial can only find it)
    from chaincomp.stages import Distill

    def broken(self, module, ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("student no_such_model cannot be built")

    monkeypatch.setattr(Distill, "apply", broken)
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "search.n_trials=4",
            "search.sampler=grid",
            "search.orders=[Q,D,PQ,DQ]",
            "search.name=fails",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    assert summary["states"] == {"COMPLETE": 2, "FAIL": 2}
    reasons = {f["reason"] for f in summary["failed"]}
    assert reasons == {"RuntimeError: student no_such_model cannot be built"}
    study = _journal_study(tmp_path / "study.journal", "fails")
    failed_orders = {t.params["order"] for t in study.trials if t.state.name == "FAIL"}
    assert failed_orders == {"D", "DQ"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chaincomp").experiment_id])
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert failed and all("no_such_model" in r.data.tags["error"] for r in failed)
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _journal_study(path: Path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def test_sigkilled_worker_is_detected_and_the_sweep_finishes(tmp_path: Path) -> None:
    # full digits epochs so that a trial lasts seconds: the kill lands inside one
    args = _sweep_args(
        tmp_path,
        "search.n_trials=3",
        "search.sampler=random",
        "search.orders=[DPQ,PQE]",
        "search.name=killed",
        "trainer.limit_train_batches=null",
        "chain.steps.D.settings.epochs=6",
    )
    cmd = [
        sys.executable,
        "-m",
        "chaincomp.cli",
        "sweep",
        *args,
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            time.sleep(0.2)
            if not (tmp_path / "study.journal").exists():
                continue
            try:
                study = _journal_study(tmp_path / "study.journal", "killed")
            except KeyError:
                continue
            if any(
                t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs and t.number >= 1
                for t in study.trials
            ):
                time.sleep(0.5)  # inside the trial: its chain and step runs are open
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    running = [
        t
        for t in _journal_study(tmp_path / "study.journal", "killed").trials
        if t.state.name == "RUNNING"
    ]
    assert len(running) == 1, "the kill did not land inside a trial"
    victim = running[0].number
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    study = _journal_study(tmp_path / "study.journal", "killed")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1
    dead = next(t for t in study.trials if t.number == victim)
    assert dead.state.name == "FAIL" and "died" in dead.user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == victim]
    assert len(retry) == 1 and retry[0].params == dead.params and retry[0].state.name == "COMPLETE"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chaincomp").experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "KILLED"


# ---------------------------------------------------------------- PostgreSQL, two workers


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server on 127.0.0.1 (Debian's postgresql), torn down after."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (apt-get install postgresql) not found")
    pytest.importorskip("psycopg")  # psycopg 3: what SQLAlchemy 2.1 uses for postgresql://
    data = Path(tempfile.mkdtemp(prefix="chaincomp-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(
        # UTF8: under LC_ALL=C initdb picks SQL_ASCII, whose strings psycopg 3 returns as bytes
        [*as_user, initdb, "-D", str(data / "db"), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
        check=True,
        capture_output=True,
        env=env,
    )
    subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data / "db"),
            "-w",
            "-l",
            str(data / "log"),
            "-o",
            f"-p {port} -k {data} -h 127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"  # as conf/search shows it
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop"],
            capture_output=True,
            env=env,
        )
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_on_postgresql_record_every_trial_once(
    tmp_path: Path, postgres_url: str
) -> None:
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "search.n_trials=4",
            "search.n_workers=2",
            "search.sampler=random",
            "search.orders=[PQ,QE,Q,P]",
            "search.name=pg",
            f"search.storage={postgres_url}",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    trials = study.trials
    assert 4 <= len(trials) <= 5  # two workers may both start the last trial
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers took trials
    from chaincomp.tracking import BOOT, HOST

    # the worker's identity, by which a resumed sweep tells a dead worker (storage.dead_worker)
    assert {(t.user_attrs["host"], t.user_attrs["boot"]) for t in trials} == {(HOST, BOOT)}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chaincomp").experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    numbers = sorted(int(r.data.tags["optuna.trial"]) for r in children)
    assert numbers == sorted(t.number for t in trials)  # each trial exactly one chain run


# ---------------------------------------------------------------- MLflow server, ui


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "art"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", 120)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def test_lineage_through_a_real_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "search.n_trials=2",
            "search.sampler=grid",
            "search.orders=[PQ,Q]",
            "search.name=served",
            tracking=mlflow_server,
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["chaincomp.command"] == "sweep" and parent.info.status == "FINISHED"
    exp = parent.info.experiment_id
    chains = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["chaincomp.order"] for r in chains) == ["PQ", "Q"]
    for chain in chains:
        steps = client.search_runs([exp], f"tags.mlflow.parentRunId = '{chain.info.run_id}'")
        assert sorted(r.info.run_name for r in steps)[0] in ("1:P", "1:Q")
        assert "bitops_ratio" in chain.data.metrics
    assert "front.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_chaincomp_ui_serves_the_store(tmp_path: Path) -> None:
    # a store with one experiment and one run in it: the UI must serve exactly this store
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("served-store")
    run_id = client.create_run(exp_id, run_name="the-run").info.run_id
    client.log_metric(run_id, "val_metric", 87.5)
    client.set_terminated(run_id)
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "chaincomp.cli",
        "ui",
        f"tracking.uri={uri}",
        "tracking.experiment=served-store",
        f"+port={port}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the link to the experiment's runs table
        query = "workflowType=machine_learning&viewStateShareKey=chaincomp"
        link = f"{base}/#/experiments/{exp_id}/runs?{query}"
        assert line.startswith(f"MLflow UI for {uri}: {link} "), line
        _wait_http(base + "/", 120)
        with urllib.request.urlopen(link, timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            assert "mlflow" in r.read().decode("utf-8", "replace").lower()
        api = f"{base}/api/2.0/mlflow"
        with urllib.request.urlopen(
            f"{api}/experiments/get-by-name?experiment_name=served-store", timeout=10
        ) as r:
            experiment = json.loads(r.read())["experiment"]
        assert experiment["experiment_id"] == exp_id
        # the view the link names: MLflow's "model training" kind, chaincomp's columns, runs
        # oldest first (a chain's steps in chain order)
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        view = json.loads(tags["mlflow.sharedViewState.chaincomp"])
        assert view["orderByKey"] == "attributes.start_time" and view["orderByAsc"] is True
        assert {"metrics.`val_metric`", "metrics.`bitops_ratio`", "tags.`chaincomp.order`"} <= set(
            view["selectedColumns"]
        )
        with urllib.request.urlopen(f"{api}/runs/get?run_id={run_id}", timeout=10) as r:
            run = json.loads(r.read())["run"]
        assert run["info"]["run_name"] == "the-run"
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"val_metric": 87.5}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# ---------------------------------------------------------------- bad search keys, up front


def _no_study_was_made(tmp: Path) -> bool:
    return not (tmp / "study.journal").exists() and not (tmp / "out" / "trials").exists()


def test_a_misspelled_search_key_stops_the_sweep_before_any_trial(tmp_path: Path) -> None:
    cfg = compose_cfg(*_sweep_args(tmp_path, "+search.n_trails=3", "tracking.enabled=false"))
    with pytest.raises(ConfigError) as info:
        sweep(cfg, tmp_path / "out")
    assert info.value.key == "search.n_trails"
    assert str(info.value).startswith("search.n_trails: unknown key; allowed: ")
    assert "n_trials" in info.value.allowed.split(", ")  # type: ignore[union-attr]
    assert _no_study_was_made(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+chain.steps.P.search.ratoi={type: float, low: 0.1, high: 0.5}",
            "chain.steps.P.search.ratoi: prune has no setting 'ratoi'; allowed: cutout, epochs, importance",
        ),
        ("chain.steps.Q.search.w_bits.high=9", "chain.steps.Q.search.w_bits: value 9 is invalid"),
        (
            "chain.steps.P.search.importance.choices=[l1,l3]",
            "chain.steps.P.search.importance: value 'l3' is invalid",
        ),
    ],
)
def test_a_bad_stage_search_space_stops_the_sweep_before_any_trial(
    tmp_path: Path, override: str, message: str
) -> None:
    # without the up-front check each of these fails only inside the trials that draw it
    cfg = compose_cfg(*_sweep_args(tmp_path, override, "tracking.enabled=false"))
    with pytest.raises(ConfigError) as info:
        sweep(cfg, tmp_path / "out")
    assert str(info.value).startswith(message)
    assert _no_study_was_made(tmp_path)


# ---------------------------------------------------------------- samplers and objectives


def _study(tmp: Path, name: str) -> optuna.Study:
    return _journal_study(tmp / "study.journal", name)


def test_nsga2_sweep_samples_with_nsga2_and_records_the_constraints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chaincomp.search.driver as sw

    made: list[optuna.samplers.BaseSampler] = []
    real = sw.make_sampler
    monkeypatch.setattr(sw, "make_sampler", lambda *a: made.append(real(*a)) or made[-1])
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "search.n_trials=3",
            "search.sampler=nsga2",
            "search.stages=[P,Q]",
            "search.orders=[P,Q,PQ]",
            "search.max_metric_loss=100",
            "search.name=nsga",
            "chain.steps.P.settings.epochs=0",
            "chain.steps.Q.settings.epochs=0",
            "tracking.enabled=false",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    assert summary["states"] == {"COMPLETE": 3} and summary["sampler"] == "nsga2"
    assert made and all(isinstance(s, optuna.samplers.NSGAIISampler) for s in made)
    study = _study(tmp_path, "nsga")
    assert len(study.directions) == 2
    for t in study.trials:
        # NSGA-II drew these trials (its generation mark) and saw each trial's constraints
        assert t.system_attrs["NSGAIISampler:generation"] == 0
        assert t.system_attrs["constraints"] == t.user_attrs["constraints"]
        assert t.user_attrs["constraints"][0] == pytest.approx(
            t.user_attrs["val_metric_loss"] - 100
        )


def test_metric_objective_is_the_best_metric_within_the_bitops_budget(tmp_path: Path) -> None:
    budget = 1.0e7  # P alone (float, ~5e7 BitOps) is over it; Q and PQ (4-bit) are under it
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "search.objective=metric",
            f"search.bitops_budget={budget}",
            "search.sampler=grid",
            "search.stages=[P,Q]",
            "search.orders=[P,Q,PQ]",
            "search.n_trials=3",
            "search.name=metric",
            "tracking.enabled=false",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    assert summary["states"] == {"COMPLETE": 3}
    study = _study(tmp_path, "metric")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE]  # accuracy, one objective
    trials = {t.user_attrs["letters"]: t for t in study.trials}
    assert all(t.value == t.user_attrs["val_metric"] for t in trials.values())
    assert trials["P"].user_attrs["val_bitops"] > budget
    feasible = [t for t in trials.values() if t.user_attrs["val_bitops"] <= budget]
    assert sorted(t.user_attrs["letters"] for t in feasible) == ["PQ", "Q"]
    front = summary["front"]
    assert {r["trial"] for r in front} == {t.number for t in feasible}  # P is not an answer
    best = max(front, key=lambda r: r["val_metric"])
    assert best["trial"] == max(feasible, key=lambda t: t.user_attrs["val_metric"]).number
    assert best["val_bitops"] <= budget


@pytest.mark.slow  # ~30 s: a baseline and a fine-tune worth comparing
def test_cost_objective_is_the_fewest_bitops_within_the_metric_loss(tmp_path: Path) -> None:
    # Q: 1-bit weights, 2-bit activations (2 bits for the first and last layer), no training:
    # by far the cheapest, and ruined;
    # P: a tenth of the channels, fine-tuned: costlier, and close to the baseline
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "search.objective=cost",
            "search.max_metric_loss=15",
            "search.sampler=grid",
            "search.stages=[P,Q]",
            "search.orders=[P,Q]",
            "search.n_trials=2",
            "search.name=cost",
            "chain.steps.P.settings.ratio=0.1",
            "chain.steps.Q.settings.w_bits=1",
            "chain.steps.Q.settings.a_bits=2",
            "chain.steps.Q.settings.first_bits=2",
            "chain.steps.Q.settings.last_bits=2",
            "chain.steps.Q.settings.epochs=0",
            "tracking.enabled=false",
            # a baseline worth keeping (TINY's is near chance)
            "trainer.limit_train_batches=null",
            "trainer.max_epochs=4",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    assert summary["states"] == {"COMPLETE": 2}
    study = _study(tmp_path, "cost")
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE]  # BitOps, one objective
    p, q = (next(t for t in study.trials if t.user_attrs["letters"] == o) for o in ("P", "Q"))
    assert all(t.value == t.user_attrs["val_bitops"] for t in (p, q))
    assert q.value < p.value  # Q is cheaper ...
    base = q.user_attrs["baseline_val_metric"]
    assert base > 70
    # ... but loses more than allowed
    assert base - q.user_attrs["val_metric"] > 15, (base, q.user_attrs["val_metric"])
    assert base - p.user_attrs["val_metric"] <= 15, (base, p.user_attrs["val_metric"])
    front = summary["front"]
    assert [r["trial"] for r in front] == [p.number]  # the cheapest feasible trial, alone


def test_non_dominated_keeps_exactly_the_front() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.study import StudyDirection
    from optuna.trial import create_trial

    from chaincomp.search.front import non_dominated

    def t(acc: float, bitops: float) -> optuna.trial.FrozenTrial:
        return create_trial(
            values=[acc, bitops], params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)}
        )

    trials = [t(90, 100), t(85, 50), t(80, 60), t(90, 100), t(95, 200), t(70, 200)]
    dirs = [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    kept = [(x.values[0], x.values[1]) for x in non_dominated(trials, dirs)]
    # (80, 60) is dominated by (85, 50); (70, 200) by everything; equal points both stay
    assert kept == [(90, 100), (85, 50), (90, 100), (95, 200)]


# ---------------------------------------------------------------- journal lock


_LOCKED_STUDY = """
import optuna
from chaincomp.search import SearchConfig
from chaincomp.search.storage import make_storage
from chaincomp.tracking import NullTracker
scfg = SearchConfig(storage=".chaincomp/optuna.journal")  # relative, as the default
storage = make_storage(scfg, NullTracker())
study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
print("trials", len(study.trials))
"""


def test_a_stale_journal_lock_of_a_killed_sweep_does_not_hang_the_rerun(tmp_path: Path) -> None:
    # the lock a process killed while holding it leaves under the relative default path: a
    # symlink whose relative target dangles; Optuna alone waits on it forever at full CPU
    run = [sys.executable, "-c", _LOCKED_STUDY]
    first = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "trials 2" in first.stdout, first.stderr[-2000:]
    lock = tmp_path / ".chaincomp" / "optuna.journal.lock"
    os.symlink(".chaincomp/optuna.journal", lock)  # what a kill inside the lock leaves
    assert lock.is_symlink() and not lock.exists()
    rerun = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "trials 4" in rerun.stdout  # the rerun resumed the study and finished
    assert "removed the stale journal lock" in rerun.stderr
    assert not lock.is_symlink()


# ---------------------------------------------------------------- seeds, budget, cache use


def test_the_configured_chain_is_trial_0_and_seeds_are_not_repeated_on_resume(
    tmp_path: Path,
) -> None:
    from chaincomp.chain import run_chain

    args = _sweep_args(
        tmp_path,
        "chain.order=[P,Q]",
        "search.orders=[PQ,QP,P]",
        "search.sampler=random",
        "search.name=seeded",
        "search.n_trials=3",
        "+search.seed_chains=[{order: QP, quantize.w_bits: 8}]",
        "tracking.enabled=false",
    )
    cfg = compose_cfg(*args)
    # the hand-set chain, run first by hand: the seeded trial finds all of it in the cache
    run_chain(cfg, tmp_path / "by-hand")
    summary = sweep(cfg, tmp_path / "out")
    study = _journal_study(tmp_path / "study.journal", "seeded")
    t0, t1 = study.trials[0], study.trials[1]
    assert t0.user_attrs["seed"] == "configured" and t0.params["order"] == "PQ"
    assert t0.params["prune.ratio"] == cfg.chain.steps.P.settings.ratio
    assert t0.params["quantize.w_bits"] == cfg.chain.steps.Q.settings.w_bits
    assert (t0.user_attrs["stage_runs"], t0.user_attrs["cached_steps"]) == (0, 2)
    assert t1.user_attrs["seed"] == "seed_chains[0]" and t1.params["order"] == "QP"
    assert t1.params["quantize.w_bits"] == 8
    assert summary["seeds"] == {"configured": 0, "seed_chains[0]": 1}
    assert summary["cached_steps"] >= 2 and 0 < summary["cache_hit_rate"] <= 1
    again = sweep(compose_cfg(*args[:-2], "search.n_trials=4", args[-1]), tmp_path / "out2")
    study = _journal_study(tmp_path / "study.journal", "seeded")
    assert len(study.trials) == 4 and again["seeds"] == summary["seeds"]
    assert [t.number for t in study.trials if "seed" in t.user_attrs] == [0, 1]


def test_a_budget_in_epochs_stops_the_sweep(tmp_path: Path) -> None:
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "chain.order=[P,Q]",
            "search.orders=[PQ,QP,P,Q]",
            "search.sampler=random",
            "search.name=budget",
            "search.n_trials=10",
            "search.budget_epochs=5",
            "tracking.enabled=false",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    study = _journal_study(tmp_path / "study.journal", "budget")
    spent = [t.user_attrs["epochs_trained"] for t in study.trials]
    # trial 0 (PQ): the baseline's 2 epochs + 1 + 1; the sweep stops once 5 are spent
    assert spent[0] == 4 and sum(spent[:-1]) < 5 <= sum(spent)
    assert summary["epochs_trained"] == sum(spent) and summary["trials"] == len(spent) < 10


def test_a_hopeless_trial_is_pruned_after_its_first_step(tmp_path: Path) -> None:
    # trial 0 is the hand-set chain PQ; trial 1 distills into a student twice as wide and
    # barely trained: after its first step it costs more than PQ and is far less accurate
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "chain.order=[P,Q]",
            "search.orders=[PQ,DP]",
            "search.sampler=random",
            "search.name=pruned",
            "search.n_trials=2",
            "search.prune_margin=5.0",
            "trainer.limit_train_batches=null",  # a baseline worth comparing with
            "trainer.max_epochs=4",
            "+search.seed_chains=[{order: DP, distill.width_mult: 2.0}]",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    study = _journal_study(tmp_path / "study.journal", "pruned")
    done, pruned = study.trials
    assert done.state.name == "COMPLETE" and pruned.state.name == "PRUNED"
    reason = pruned.user_attrs["pruned_reason"]
    assert reason.startswith("after step 1 (D of DP)") and "dominated by trial 0 (PQ" in reason
    assert pruned.user_attrs["stage_runs"] == 1  # P never ran
    assert pruned.user_attrs["steps_skipped"] == 1 and summary["stage_runs_saved_by_pruning"] == 1
    assert summary["states"] == {"COMPLETE": 1, "PRUNED": 1}
    assert summary["pruned"] == [{"trial": 1, "reason": reason}]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and "ChainPruned: after step 1" in run.data.tags["error"]
    steps = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in steps) == ["1:D", "baseline"]


# ---------------------------------------------------------------- stage-by-stage search


def backward_step(sampler, study: optuna.Study, number: int) -> str:  # type: ignore[no-untyped-def]
    from chaincomp.search.samplers import stagewise_plan

    plan = stagewise_plan(study, number, sampler._space, sampler._stage_trials, sampler._start)
    assert plan is not None
    return plan.step


def test_stagewise_sampler_searches_one_step_at_a_time_around_the_incumbent() -> None:
    """No training: a synthetic objective (metric falls with prune.ratio, BitOps fall with it
    and with fewer bits). Seeds are left alone; then each block of ``stage_trials`` trials
    varies only one step's settings, the rest being the incumbent's at the time."""
    from chaincomp.search.samplers import StagewiseSampler, incumbent

    cfg = compose_cfg("chain.order=[P,Q]", "search.orders=[PQ,QP]")
    space = space_of(cfg, SearchConfig.from_cfg(cfg))
    base = optuna.samplers.RandomSampler(seed=1)
    sampler = StagewiseSampler(base, space, stage_trials=3)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seed = space.seed_params("PQ", {"P": {"ratio": 0.5}, "Q": {"w_bits": 8, "a_bits": 8}})
    study.enqueue_trial(seed, user_attrs={"seed": "configured"})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        order, o = space.suggest(trial)
        p, q = o["P"], o["Q"]
        metric = 90 - 10 * p["ratio"] ** 2 - (8 - q["w_bits"]) * 0.5
        bitops = (1 - p["ratio"]) * q["w_bits"] * q["a_bits"] * (1.1 if order == "QP" else 1)
        return metric, bitops

    study.optimize(objective, n_trials=13)
    trials = study.trials
    assert trials[0].params == seed and 0 not in sampler.plans  # the seed, as queued
    p_names = {p.name for p in space.params["P"]}
    q_names = {p.name for p in space.params["Q"]}
    steps = []
    for t in trials[1:]:
        plan = sampler.plans[t.number]
        steps.append(plan.step)
        assert t.params["order"] == plan.order == "PQ"  # the incumbent's order, kept
        fixed = q_names if plan.step == "P" else p_names
        inc = study.trials[plan.incumbent]
        assert {k: t.params[k] for k in fixed} == {k: inc.params[k] for k in fixed}
    assert steps == ["P"] * 3 + ["Q"] * 3 + ["P"] * 3 + ["Q"] * 3
    backward = StagewiseSampler(base, space, stage_trials=3, start="last")
    assert [backward_step(backward, study, n) for n in (1, 4, 7)] == ["Q", "P", "Q"]
    # the searched step's settings do vary
    assert len({t.params["prune.ratio"] for t in trials[1:4]}) == 3
    # the incumbent: the cheapest trial at least as good on validation as the seed
    best = incumbent(study)
    assert best is not None
    ok = [t for t in trials if t.values[0] >= trials[0].values[0]]
    assert best.values[1] == min(t.values[1] for t in ok)


def test_a_stagewise_sweep_reuses_the_incumbents_prefix(tmp_path: Path) -> None:
    """Real chains on digits: trials searching the second step take the first from the cache."""
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "chain.order=[P,Q]",
            "search.orders=[PQ]",
            "search.sampler=random",
            "search.name=stagewise",
            "search.n_trials=5",
            "search.stagewise=true",
            "search.stage_trials=2",
            "tracking.enabled=false",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    study = _journal_study(tmp_path / "study.journal", "stagewise")
    t = study.trials
    assert [x.user_attrs.get("stagewise", "")[:1] for x in t] == ["", "P", "P", "Q", "Q"]
    # trials 1-2 search P: P and Q run; trials 3-4 search Q: P is the incumbent's, cached
    assert [x.user_attrs["stage_runs"] for x in t[1:]] == [2, 2, 1, 1]
    assert [x.user_attrs["cached_steps"] for x in t[3:]] == [1, 1]
    assert summary["stage_runs"] == sum(x.user_attrs["stage_runs"] for x in t) < 2 * len(t)


def test_a_stagewise_trial_is_judged_only_from_its_searched_step_on(tmp_path: Path) -> None:
    """With prune_margin 0 every prefix that trails a cheaper front chain stops; the
    incumbent's own prefix (shared by the trials that search a later step) is not judged."""
    cfg = compose_cfg(
        *_sweep_args(
            tmp_path,
            "chain.order=[P,Q]",
            "search.orders=[PQ]",
            "search.sampler=random",
            "search.name=stagewise_pruned",
            "search.n_trials=5",
            "search.stagewise=true",
            "search.stage_trials=2",
            "search.prune_margin=0.0",
            "tracking.enabled=false",
        )
    )
    summary = sweep(cfg, tmp_path / "out")
    t = _journal_study(tmp_path / "study.journal", "stagewise_pruned").trials
    for x in t[1:3]:  # searching P: judged after P; a pruned one never ran Q
        ran = (x.user_attrs["stage_runs"], x.user_attrs.get("steps_skipped", 0))
        assert ran == ((1, 1) if x.state.name == "PRUNED" else (2, 0))
    for x in t[3:]:  # searching Q: the cached P is the incumbent's, never judged
        assert x.state.name == "COMPLETE" and x.user_attrs["stage_runs"] == 1
    skipped = sum(x.user_attrs.get("steps_skipped", 0) for x in t)
    assert summary["stage_runs_saved_by_pruning"] == skipped


def test_a_grid_study_runs_every_order_once_across_workers_resumes_and_a_dead_worker() -> None:
    """No training: workers with different seeds (as each worker and each resume gets) share
    one grid, and a trial whose worker died is re-run at its own grid point. Before, a resumed
    orders study ran 6 of 24 orders twice and 6 never (Optuna names grid points by index into
    a seed-shuffled list)."""
    from chaincomp.search.samplers import make_sampler
    from chaincomp.search.storage import StaleHandler
    from chaincomp.tracking import NullTracker

    cfg = compose_cfg("search=orders")
    scfg = SearchConfig.from_cfg(cfg)
    space = space_of(cfg, scfg)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="grid", directions=["maximize"])

    def worker(seed: int) -> optuna.Study:
        sampler = make_sampler(scfg, space, seed)
        return optuna.load_study(study_name="grid", storage=storage, sampler=sampler)

    def run_one(s: optuna.Study) -> None:  # optimize: the grid sampler stops the study itself
        s.optimize(lambda t: float(len(space.suggest(t, with_params=False)[0])), n_trials=1)

    a, b = worker(0), worker(7919)
    for k in range(9):
        run_one(a if k % 2 else b)
    # a worker dies in the middle of a trial: failed, then re-queued by the handler
    dead = a.ask()
    space.suggest(dead, with_params=False)
    storage.set_trial_state_values(dead._trial_id, optuna.trial.TrialState.FAIL)
    StaleHandler(NullTracker(), retry=True)(study, storage.get_trial(dead._trial_id))
    resumed = worker(104729 * 10)  # a later resume: another seed again
    while sum(t.state.name == "COMPLETE" for t in study.trials) < len(space.orders):
        run_one(resumed)
    done = [t.params["order"] for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(done) == sorted(space.orders)  # all 24, each once
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retried) == 1 and retried[0].params["order"] == dead.params["order"]
    # settings whose worker dies every time (a native crash) run at most MAX_RERUNS more times
    from chaincomp.search.storage import MAX_RERUNS

    crashing = resumed.ask()
    deaths = 0
    while True:
        deaths += 1
        storage.set_trial_state_values(crashing._trial_id, optuna.trial.TrialState.FAIL)
        before = len(study.trials)
        StaleHandler(NullTracker(), retry=True)(study, storage.get_trial(crashing._trial_id))
        if len(study.trials) == before:
            break
        crashing = resumed.ask()  # the queued re-run
        assert crashing.user_attrs["retry_of"] == study.trials[-2].number
    assert deaths == 1 + MAX_RERUNS


def test_a_worker_that_dies_in_native_code_is_replaced_and_the_sweep_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers; the first training forward aborts its process (SIGABRT, as a crash inside
    oneDNN does). The sweep starts another worker, which fails and re-queues the dead worker's
    trial, and every trial completes."""
    marker = tmp_path / "abort-once"
    marker.write_text("")
    monkeypatch.setenv("CHAINCOMP_TEST_ABORT_FILE", str(marker))
    own_model = ("model=custom", "model._target_=tests.user_models.AbortOnceNet")
    args = [a for a in _sweep_args(tmp_path) if not a.startswith("model")]
    cfg = compose_cfg(
        *args,
        *own_model,
        *(
            "chain.order=[Q]",
            "chain.order=[Q]",
            "search.stages=[Q]",
            "search.sampler=random",
            "search.name=abort",
            "search.n_trials=3",
            "search.n_workers=2",
            "tracking.enabled=false",
        ),
    )
    summary = sweep(cfg, tmp_path / "out")
    assert not marker.exists()  # a worker did die
    t = _journal_study(tmp_path / "study.journal", "abort").trials
    failed = [x for x in t if x.state.name == "FAIL"]
    assert len(failed) == 1 and "died" in failed[0].user_attrs["fail_reason"]
    assert [x.user_attrs.get("retry_of") for x in t].count(failed[0].number) == 1
    assert summary["states"] == {"COMPLETE": 3, "FAIL": 1}


def test_a_hung_trial_is_killed_at_trial_timeout_failed_not_requeued_and_the_sweep_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker (a subprocess, since ``search.trial_timeout`` is set); the first trial's
    first training forward never returns. The sweep kills that worker after the timeout,
    records the trial as FAIL naming the setting, does not run it again, starts another
    worker and finishes the other trials."""
    marker = tmp_path / "hang-once"
    marker.write_text("")
    monkeypatch.setenv("CHAINCOMP_TEST_HANG_FILE", str(marker))
    args = [a for a in _sweep_args(tmp_path) if not a.startswith("model")]
    cfg = compose_cfg(
        *args,
        "model=custom",
        "model._target_=tests.user_models.HangOnceNet",
        "chain.order=[Q]",
        "search.stages=[Q]",
        "search.sampler=random",
        "search.name=hang",
        "search.n_trials=3",
        "search.trial_timeout=20",
        "tracking.enabled=false",
    )
    summary = sweep(cfg, tmp_path / "out")
    assert not marker.exists()  # a trial did hang
    t = _journal_study(tmp_path / "study.journal", "hang").trials
    failed = [x for x in t if x.state.name == "FAIL"]
    assert len(failed) == 1
    assert "search.trial_timeout (20 s)" in failed[0].user_attrs["fail_reason"]
    assert not [x for x in t if "retry_of" in x.user_attrs]  # not queued again
    assert summary["states"] == {"COMPLETE": 2, "FAIL": 1}


def test_a_journal_carried_to_another_machine_fails_and_requeues_its_running_trials() -> None:
    """No training. A RUNNING trial of another host stays (its worker may run) unless
    search.reap_other_hosts, which a journal carried from a finished lease needs; on this host,
    a worker recorded under another boot id is dead even where its pid is alive now."""
    from chaincomp.search.storage import HOST, StaleHandler, dead_worker, reap_stale
    from chaincomp.tracking import BOOT, NullTracker

    if not BOOT:
        pytest.skip("no boot id on this system (Linux's /proc/sys/kernel/random/boot_id)")
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="carried", directions=["maximize"])
    live_pid = os.getppid()  # a process that runs now
    trials = {}
    for name, attrs in {
        "elsewhere": {"host": "gpu-lease-1", "pid": live_pid, "boot": "b1"},
        # under another boot even its pid being this very process's proves nothing
        "rebooted": {"host": HOST, "pid": os.getpid(), "boot": "a-boot-before-this-one"},
        "alive": {"host": HOST, "pid": live_pid, "boot": BOOT},
        "starting": {},  # asked, its worker not yet at its first set_user_attr
    }.items():
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        trials[name] = t.number
    handler = StaleHandler(NullTracker(), retry=True)
    by_number = {t.number: t for t in study.trials}
    assert dead_worker(by_number[trials["alive"]].user_attrs) is None
    assert dead_worker(by_number[trials["elsewhere"]].user_attrs) is None
    assert reap_stale(study, storage, handler) == [trials["rebooted"]]
    assert reap_stale(study, storage, handler) == []  # another host: left alone by default
    assert reap_stale(study, storage, handler, other_hosts=True) == [trials["elsewhere"]]
    states = {t.number: t.state.name for t in study.trials}
    assert states[trials["alive"]] == states[trials["starting"]] == "RUNNING"
    assert states[trials["elsewhere"]] == states[trials["rebooted"]] == "FAIL"
    reason = study.trials[trials["elsewhere"]].user_attrs["fail_reason"]
    assert "gpu-lease-1" in reason and "search.reap_other_hosts" in reason
    # the reaped trials are queued again with their own parameters
    queued = [t for t in study.trials if t.state.name == "WAITING"]
    assert sorted(t.user_attrs["retry_of"] for t in queued) == sorted(
        [trials["elsewhere"], trials["rebooted"]]
    )
    for t in queued:
        assert t.system_attrs["fixed_params"] == study.trials[t.user_attrs["retry_of"]].params


def test_search_trial_timeout_kills_only_this_boots_workers_and_fails_before_the_kill() -> None:
    """No training. search.trial_timeout: a RUNNING trial recorded under another boot is not
    this run's worker's even where the pid matches; the overdue trial is failed before its
    worker is killed (no other worker may take the death for a crash and queue the hanging
    settings again), and a trial that finished meanwhile is left alone, its worker unkilled."""
    from chaincomp.search.storage import HOST, fail_overdue, overdue
    from chaincomp.tracking import BOOT, NullTracker

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="hung", directions=["maximize"])
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    old, stale, done = (study.ask(dist) for _ in range(3))
    for t, boot in ((old, BOOT), (stale, "a-boot-before-this-one"), (done, BOOT)):
        t.set_user_attr("host", HOST)
        t.set_user_attr("boot", boot)
        t.set_user_attr("pid", 4242)
        t.set_user_attr("started", time.time() - 100)
    study.tell(done, 0.5)
    assert overdue(study, {4242}, 10.0) == [(old.number, 4242)]
    states_at_kill: list[str] = []

    def kill() -> None:
        states_at_kill.append(study.trials[old.number].state.name)

    assert fail_overdue(study, storage, old.number, 10.0, NullTracker(), kill)
    assert states_at_kill == ["FAIL"]  # already failed when the worker was killed
    assert "search.trial_timeout" in study.trials[old.number].user_attrs["fail_reason"]
    assert not fail_overdue(study, storage, done.number, 10.0, NullTracker(), kill)
    assert states_at_kill == ["FAIL"] and study.trials[done.number].state.name == "COMPLETE"


def test_reap_other_hosts_is_refused_with_a_database() -> None:
    with pytest.raises(ConfigError, match="search.reap_other_hosts"):
        SearchConfig(storage="postgresql://u@h/db", reap_other_hosts=True)
