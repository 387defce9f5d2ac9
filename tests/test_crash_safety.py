"""Crash safety and concurrency (issue 16): checks before anything trains, one-line errors for
stores that cannot be opened, runs a killed process left RUNNING closed by the next run, three
commands started together in one empty folder, and (slow) a SIGKILL battery over a sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from chaincomp.chain import PrefixCache, run_chain
from chaincomp.errors import ConfigError
from chaincomp.search import SearchConfig, sweep
from chaincomp.search.storage import make_storage
from chaincomp.tracking import NullTracker, Tracker, TrackingConfig

from .conftest import QUIET, compose_cfg

TINY = (
    "data=digits",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
)


PLAIN = ("model=custom", "model._target_=tests.user_models.PlainNet")


def _never_train(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("training started before the configuration was checked")


# ------------------------------------------------------------------ checks before training


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (
            ("chain.order=[P,E]", "chain.steps.E.settings.points=[7]"),
            "chain.steps.E.settings.points",
            "no stage 7 in SmallCNN (3 stages)",
        ),
        (
            # a model without its own width_mult is thinned generically, never widened
            (*PLAIN, "chain.order=[D]", "chain.steps.D.settings.width_mult=2.0"),
            "chain.steps.D.settings.width_mult",
            "can only be thinned",
        ),
        (
            # two D steps of a user's model: the second widens the first's thinned student
            (
                *PLAIN,
                "chain.order=[D,D2]",
                "+stage@chain.steps.D2=distill",
                "chain.steps.D.settings.width_mult=0.5",
                "chain.steps.D2.settings.width_mult=4.0",
            ),
            "chain.steps.D2.settings.width_mult",
            "past its own width",
        ),
        ((*PLAIN, "chain.order=[Q,E]"), "chain.steps.E.settings", "PlainNet exposes no exit"),
        (
            # E's heads move to the student, which has one stage fewer than the teacher
            (
                "model=resnet10",
                "+model@chain.steps.D.settings.student=small_cnn",
                "chain.order=[E,D]",
                "chain.steps.E.settings.points=[3]",
            ),
            "chain.steps.E.settings.points",
            "no stage 3 in SmallCNN",
        ),
    ],
    ids=[
        "exit-point",
        "widen-no-width_mult",
        "widen-thinned",
        "no-stages",
        "exit-point-of-student",
    ],
)
def test_bad_settings_stop_before_the_baseline_trains(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: tuple[str, ...],
    key: str,
    says: str,
) -> None:
    monkeypatch.setattr("chaincomp.chain.runner.fine_tuner", _never_train)
    cfg = compose_cfg(*TINY, *QUIET, f"chain.cache_dir={tmp_path / 'cache'}", *overrides)
    with pytest.raises(ConfigError) as err:
        run_chain(cfg, tmp_path / "out")
    assert err.value.key == key, str(err.value)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cache").iterdir())  # nothing stored, nothing trained


def test_a_bad_baseline_checkpoint_is_one_line_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from chaincomp.models import build_model

    monkeypatch.setattr("chaincomp.chain.runner.fine_tuner", _never_train)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"  # a half-width SmallCNN's weights for the full-width one
    net = build_model({"_target_": "chaincomp.models.SmallCNN", "width_mult": 0.5}, 1, 10, (8, 8))
    torch.save(net.state_dict(), other)
    for path, says in ((garbage, "is not a readable state dict"), (other, "other shape")):
        cfg = compose_cfg(
            *TINY,
            *QUIET,
            f"chain.cache_dir={tmp_path / 'cache'}",
            "chain.order=[P]",
            f"chain.baseline.checkpoint={path}",
        )
        with pytest.raises(ConfigError) as err:
            run_chain(cfg, tmp_path / "out")
        assert err.value.key == "chain.baseline.checkpoint" and says in str(err.value)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            ("chain.steps.P.settings.ratio=abc",),
            "chain.steps.P.settings.ratio: invalid value 'abc'; allowed: a number",
        ),
        (
            ("model=custom", "model._target_=nope.Net"),
            "model._target_: cannot import 'nope.Net' (ModuleNotFoundError: No module named 'nope')",
        ),
    ],
    ids=["ratio-abc", "missing-module"],
)
def test_bad_values_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], says: str
) -> None:
    monkeypatch.setattr("chaincomp.chain.runner.fine_tuner", _never_train)
    cfg = compose_cfg(*TINY, *QUIET, f"chain.cache_dir={tmp_path / 'cache'}", *overrides)
    with pytest.raises(ConfigError) as err:
        run_chain(cfg, tmp_path / "out")
    assert str(err.value).startswith(says) and "\n" not in str(err.value)


def test_an_unwritable_cache_dir_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chaincomp.chain.runner.fine_tuner", _never_train)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = compose_cfg(*TINY, *QUIET, f"chain.cache_dir={blocker / 'cache'}", "chain.order=[P]")
    with pytest.raises(ConfigError, match=r"^chain.cache_dir: cannot write in .*a-file/cache"):
        run_chain(cfg, tmp_path / "out")


def test_a_sweep_checks_every_step_it_may_choose_before_its_first_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chaincomp.chain.runner.fine_tuner", _never_train)
    journal = tmp_path / "study.journal"
    cfg = compose_cfg(
        *TINY,
        *QUIET,
        f"chain.cache_dir={tmp_path / 'cache'}",
        f"search.storage={journal}",
        "search.orders=[P,PE]",
        "chain.steps.E.settings.points=[5]",
    )
    with pytest.raises(ConfigError) as err:
        sweep(cfg, tmp_path / "out")
    assert err.value.key == "chain.steps.E.settings.points"
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    assert optuna.get_all_study_names(storage) == []  # no study, no trial failed


def test_an_unwritable_journal_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    scfg = SearchConfig(storage=str(blocker / "optuna.journal"))
    with pytest.raises(ConfigError, match=r"^search.storage: cannot write in .*a-file"):
        make_storage(scfg, NullTracker())


def test_a_refused_postgresql_connection_is_one_line() -> None:
    pytest.importorskip("psycopg")  # the driver SQLAlchemy 2.1 uses for postgresql://
    scfg = SearchConfig(storage="postgresql://chaincomp:secret@127.0.0.1:9/optuna")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        make_storage(scfg, NullTracker())
    text = str(err.value)
    assert err.value.key == "search.storage" and "\n" not in text
    assert "127.0.0.1" in text and "secret" not in text  # the password is not printed
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize(
    ("uri", "says"),
    [("http://127.0.0.1:9", "no tracking server answers"), ("bogus://x", "cannot open")],
)
def test_a_tracking_store_that_cannot_be_opened_is_one_line(uri: str, says: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        Tracker(TrackingConfig(uri=uri))
    assert err.value.key == "tracking.uri" and says in str(err.value)
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 30


# --------------------------------------------------------------- processes: kill, concurrency


def _chaincomp(*args: str) -> list[str]:
    return [sys.executable, "-m", "chaincomp.cli", *args]


def _runs(db: Path) -> list:  # type: ignore[type-arg]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("chaincomp")
    return client.search_runs([exp.experiment_id]) if exp else []


def _peek(db: Path) -> list[tuple[str, str]]:
    """(run name, status) of every run, read with sqlite3 while another process writes the
    store (an MlflowClient would race that process's creation of the schema)."""
    import sqlite3

    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return list(con.execute("SELECT name, status FROM runs"))
    except sqlite3.Error:
        return []


def test_three_runs_started_together_in_an_empty_folder(tmp_path: Path) -> None:
    # the default store (sqlite:///mlflow.db) and run directories (runs/run/<second>-<pid>)
    args = _chaincomp("run", *TINY, "chain.order=[P]", "chain.steps.P.settings.epochs=1")
    env = {**os.environ, "CHAINCOMP_CACHE_DIR": str(tmp_path / ".cc")}
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()[-3000:]
    summaries = sorted((tmp_path / "runs" / "run").glob("*/summary.json"))
    assert len(summaries) == 3
    chains = [r for r in _runs(tmp_path / "mlflow.db") if "mlflow.parentRunId" not in r.data.tags]
    assert len(chains) == 3 and {r.info.status for r in chains} == {"FINISHED"}
    assert len({r.data.tags["chaincomp.pid"] for r in chains}) == 3


def _long_p_run(tmp_path: Path, db: Path, *extra: str) -> list[str]:
    """``chaincomp run`` of a 60-epoch P on full digits: seconds inside one step (12 epochs took
    0.9 s on the EPYC of 2026-11-29, so a kill a second into the step landed after it; 60: 4 s)."""
    return _chaincomp(
        "run",
        *TINY,
        "trainer.limit_train_batches=null",
        "chain.order=[P]",
        "chain.steps.P.settings.epochs=60",
        f"tracking.uri=sqlite:///{db}",
        f"chain.cache_dir={tmp_path / 'cache'}",
        *extra,
    )


def _signal_inside_p(proc: subprocess.Popen, db: Path, sig: int) -> None:  # type: ignore[type-arg]
    """Send ``sig`` once P's step run is open (a second into its fine-tune)."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if ("1:P", "RUNNING") in _peek(db):
            time.sleep(1.0)
            proc.send_signal(sig)
            return


def test_a_rerun_closes_the_runs_its_killed_predecessor_left_running(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    args = _long_p_run(tmp_path, db)
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _signal_inside_p(proc, db, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = {r.info.run_name for r in _runs(db) if r.info.status == "RUNNING"}
    assert left == {"chain P", "1:P"}, f"the kill did not land inside P: {left}"
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    said = f"closed 2 MLflow run(s) left RUNNING by killed process(es) {proc.pid} as KILLED"
    assert said in res.stdout + res.stderr
    runs = _runs(db)
    killed = {r.info.run_name: r for r in runs if r.info.status == "KILLED"}
    assert set(killed) == {"chain P", "1:P"}
    assert all(f"pid {proc.pid}" in r.data.tags["error"] for r in killed.values())
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = [r.info.run_name for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == ["1:P", "baseline", "baseline", "chain P"]


def test_sigterm_exits_143_with_its_runs_killed(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    args = _long_p_run(tmp_path, db, f"hydra.run.dir={tmp_path / 'out'}")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _signal_inside_p(proc, db, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert "terminated (SIGTERM); its MLflow runs are closed as KILLED" in err.decode()
    status = dict(_peek(db))
    assert status["chain P"] == "KILLED" and status["1:P"] == "KILLED"
    assert "RUNNING" not in status.values()


# ------------------------------------------------------------------ the SIGKILL battery


def _study(journal: Path, name: str) -> optuna.Study | None:
    if not journal.exists():
        return None
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def _moment(name: str, journal: Path, study_name: str, db: Path, seen: dict[str, int]):  # type: ignore[no-untyped-def]
    """A predicate: is the sweep at moment ``name`` now?"""
    lock = journal.with_name(journal.name + ".lock")

    def trials(state: str) -> list[optuna.trial.FrozenTrial]:
        study = _study(journal, study_name)
        return [t for t in (study.trials if study else []) if t.state.name == state]

    def running_step(prefix: str) -> bool:
        return any(s == "RUNNING" and (n or "").startswith(prefix) for n, s in _peek(db))

    checks = {
        "during the baseline": lambda: running_step("baseline"),
        "mid-step": lambda: running_step("1:") or running_step("2:"),
        "right after a trial": lambda: len(trials("COMPLETE")) > seen.get("complete", 0),
        "at trial start": lambda: any(
            "mlflow_run_id" not in t.user_attrs for t in trials("RUNNING")
        ),
        "holding the journal lock": lambda: lock.is_symlink(),
    }
    return checks[name]


BATTERY = (
    "during the baseline",
    "mid-step",
    "right after a trial",
    "at trial start",
    "holding the journal lock",
)


@pytest.mark.slow
def test_sigkill_battery_nothing_hangs_nothing_stays_running_every_entry_loads(
    tmp_path: Path,
) -> None:
    journal, db, cache = tmp_path / "study.journal", tmp_path / "mlflow.db", tmp_path / "cache"
    n_trials = 8
    args = _chaincomp(
        "sweep",
        *TINY,
        "trainer.limit_train_batches=null",
        "trainer.max_epochs=3",
        "chain.steps.D.settings.epochs=2",
        "chain.steps.P.settings.epochs=2",
        "chain.steps.Q.settings.epochs=2",
        "chain.steps.E.settings.epochs=1",
        "search.sampler=random",
        "search.orders=[DP,PQ,QE,PE,DQ]",
        f"search.n_trials={n_trials}",
        "search.name=battery",
        f"search.storage={journal}",
        f"tracking.uri=sqlite:///{db}",
        f"chain.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    landed = []
    for moment in BATTERY:
        study = _study(journal, "battery")
        seen = {
            "complete": len(
                [t for t in (study.trials if study else []) if t.state.name == "COMPLETE"]
            )
        }
        at = _moment(moment, journal, "battery", db, seen)
        proc = subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None:
                if at():
                    proc.send_signal(signal.SIGKILL)
                    landed.append(moment)
                    break
                time.sleep(0.002 if moment == "holding the journal lock" else 0.1)
        finally:
            proc.kill()
            proc.wait()
        if proc.returncode == 0:
            break  # the sweep finished before this moment came
    t0 = time.time()
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.time() - t0 < 900
    study = _study(journal, "battery")
    assert study is not None
    states = [t.state.name for t in study.trials]
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    counted = [t for t in study.trials if not (t.state.name == "FAIL" and t.number in retried)]
    assert len(counted) == n_trials and states.count("RUNNING") == 0
    assert all(t.state.name == "COMPLETE" for t in counted)
    assert not [r.info.run_name for r in _runs(db) if r.info.status == "RUNNING"]
    entries = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    assert entries and all(PrefixCache(cache).load(k) is not None for k in entries)
    assert len(landed) >= 3, f"kills landed at {landed}"
    lost = states.count("FAIL")  # killed mid-trial, re-queued and run again
    print(
        f"SIGKILL battery: {len(landed)} kills ({', '.join(landed)}); {lost} trial(s) failed and "
        f"re-run; {n_trials} trials complete; 0 runs RUNNING; {len(entries)} cache entries load; "
        f"final rerun {time.time() - t0:.0f} s"
    )


@pytest.mark.parametrize("size", [0, -3, 2.5, "big", True])
def test_a_bad_image_size_is_one_line(size: object) -> None:
    from chaincomp.data import DataConfig

    with pytest.raises(ConfigError, match=r"^data.image_size: .* invalid; allowed: null"):
        DataConfig(name="digits", image_size=size)  # type: ignore[arg-type]
