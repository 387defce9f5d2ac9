"""Where a study lives and what happens to trials whose worker died.

Storage: a journal file by default (Optuna's JournalStorage; safe for several local processes),
or any database URL (``postgresql://...``, with Optuna's heartbeat) for several machines. Running
the same command again with the same study name resumes it: finished trials stay, the study runs
until ``n_trials`` trials are finished or running (:func:`counted`). A trial whose worker died
(this host: its pid is gone, :func:`reap_stale`; other hosts: the database heartbeat) is marked
FAIL, its MLflow runs are closed as KILLED, and (``retry_stale``) it is re-queued with the same
parameters (:class:`StaleHandler`).

Contract: a running trial carries the user attrs ``host`` (:data:`HOST`) and ``pid`` of its
worker, and ``mlflow_run_id`` of its chain run; a re-queued trial carries ``retry_of`` = the
number of the failed trial it replaces, which then no longer counts towards ``n_trials``.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import optuna
from optuna.trial import TrialState

from chaincomp.search.config import SearchConfig
from chaincomp.tracking import NullTracker, Tracker

HOST = socket.gethostname()
log = logging.getLogger("chaincomp.search")


def make_storage(scfg: SearchConfig, tracker: Tracker | NullTracker) -> optuna.storages.BaseStorage:
    if scfg.is_database:
        import inspect

        params = inspect.signature(optuna.storages.RDBStorage).parameters
        # optuna >= 4.9 renamed failed_trial_callback to heartbeat_stale_trial_callback
        key = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in params
            else "failed_trial_callback"
        )
        return optuna.storages.RDBStorage(
            scfg.storage,
            heartbeat_interval=scfg.heartbeat_interval,
            grace_period=scfg.grace_period,
            **{key: StaleHandler(tracker, scfg.retry_stale)},  # type: ignore[arg-type]
        )
    from optuna.storages.journal import JournalFileBackend

    # absolute: Optuna's lock is a symlink to the journal, and a relative target dangles (it
    # resolves against the lock's folder), so a stale lock could never be told stale
    path = Path(scfg.storage).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    break_dangling_lock(path)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def break_dangling_lock(journal: Path) -> bool:
    """Remove ``<journal>.lock`` when it is a symlink whose target does not exist: a lock left by
    a process killed while holding it under a relative journal path, which Optuna's grace
    period cannot expire (it waits forever). A live lock always points at the existing journal,
    so it is never touched; a stale one with a valid target expires after Optuna's 30 s."""
    lock = journal.with_name(journal.name + ".lock")
    if lock.is_symlink() and not lock.exists():
        lock.unlink(missing_ok=True)
        log.warning("removed the stale journal lock %s (its target does not exist)", lock)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def close_runs(tracker: Tracker | NullTracker, run_id: str | None, status: str = "KILLED") -> None:
    """Terminate a chain run and every descendant still RUNNING (a killed worker's runs)."""
    if not run_id or not isinstance(tracker, Tracker):
        return
    client = tracker.client
    todo = [run_id]
    while todo:
        rid = todo.pop()
        children = client.search_runs(
            [tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'"
        )
        todo.extend(r.info.run_id for r in children)
        if client.get_run(rid).info.status == "RUNNING":
            client.set_tag(rid, "error", "worker died during the trial")
            client.set_terminated(rid, status)


class StaleHandler:
    """What happens to a trial whose worker died: MLflow runs closed, optionally re-queued."""

    def __init__(self, tracker: Tracker | NullTracker, retry: bool):
        self.tracker, self.retry = tracker, retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        close_runs(self.tracker, trial.user_attrs.get("mlflow_run_id"))
        retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
        if self.retry and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def reap_stale(
    study: optuna.Study, storage: optuna.storages.BaseStorage, handler: StaleHandler
) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone; returns their numbers.

    Uses the public storage API (trial ids looked up by study name and trial number)."""
    reaped = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        if host != HOST or pid is None or pid == os.getpid() or _alive(int(pid)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", f"worker pid {pid} died")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker reaped it first
        handler(study, storage.get_trial(trial_id))
        reaped.append(t.number)
    return reaped


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: all but failed trials that were re-queued."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


__all__ = [
    "HOST",
    "StaleHandler",
    "break_dangling_lock",
    "close_runs",
    "counted",
    "make_storage",
    "reap_stale",
]
