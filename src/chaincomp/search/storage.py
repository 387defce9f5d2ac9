"""Where a study lives and what happens to trials whose worker died.

Storage: a journal file by default (Optuna's JournalStorage; safe for several local processes),
or any database URL (``postgresql://...``, with Optuna's heartbeat) for several machines. Running
the same command again with the same study name resumes it: finished trials stay, the study runs
until ``n_trials`` trials are finished or running (:func:`counted`). A trial whose worker died
(this host: its pid is gone, :func:`reap_stale`; other hosts: the database heartbeat) is marked
FAIL, its MLflow runs are closed as KILLED, and (``retry_stale``) it is re-queued with the same
parameters (:class:`StaleHandler`).

Contract: a running trial carries the user attrs ``host`` (:data:`HOST`), ``boot`` (its boot
id, :data:`BOOT`) and ``pid`` of its worker, and ``mlflow_run_id`` of its chain run; a
re-queued trial carries ``retry_of`` = the number of the failed trial it replaces, which then
no longer counts towards ``n_trials``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from chaincomp.errors import ConfigError
from chaincomp.search.config import SearchConfig
from chaincomp.tracking import BOOT, HOST, NullTracker, Tracker, local_process_gone
from chaincomp.utils import writable_dir

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
        try:
            return optuna.storages.RDBStorage(
                scfg.storage,
                heartbeat_interval=scfg.heartbeat_interval,
                grace_period=scfg.grace_period,
                **{key: StaleHandler(tracker, scfg.retry_stale)},  # type: ignore[arg-type]
            )
        except ModuleNotFoundError as exc:
            raise ConfigError(
                "search.storage",
                f"the database driver {exc.name!r} is not installed",
                "pip install 'chaincomp[postgres]' (psycopg 3, which postgresql://... uses), "
                "or a journal file path",
            ) from None
        except Exception as exc:  # SQLAlchemy: refused, unknown host, bad password, ...
            raise ConfigError(
                "search.storage",
                f"cannot open {_redact(scfg.storage)} ({type(exc).__name__}: {_first_line(exc)})",
                "a reachable database URL (postgresql://user@host/db) or a journal file path",
            ) from None
    from optuna.storages.journal import JournalFileBackend

    # absolute: Optuna's lock is a symlink to the journal, and a relative target dangles (it
    # resolves against the lock's folder), so a stale lock could never be told stale
    path = Path(scfg.storage).expanduser().absolute()
    allowed = "a journal file in a writable folder, or postgresql://user@host/db"
    writable_dir(path.parent, "search.storage", allowed)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError("search.storage", f"cannot write the journal {str(path)!r}", allowed)
    break_dangling_lock(path)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _first_line(exc: BaseException) -> str:
    """The first line of the innermost cause (SQLAlchemy wraps the driver's message)."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip()
    return (text.splitlines()[0] if text else type(inner).__name__)[:300]


def _redact(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


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


def close_runs(tracker: Tracker | NullTracker, run_id: str | None, status: str = "KILLED") -> None:
    """Terminate a chain run and every descendant still RUNNING (a killed worker's runs)."""
    if run_id and isinstance(tracker, Tracker):
        tracker.close_tree(run_id, status, "worker died during the trial")


#: How often a trial whose worker died is run again with the same settings.
MAX_RERUNS = 2


class StaleHandler:
    """What happens to a trial whose worker died: MLflow runs closed, optionally re-queued."""

    def __init__(self, tracker: Tracker | NullTracker, retry: bool):
        self.tracker, self.retry = tracker, retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        close_runs(self.tracker, trial.user_attrs.get("mlflow_run_id"))
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        retried = {t.user_attrs.get("retry_of") for t in trials.values()}
        # re-runs so far of these settings: after MAX_RERUNS a worker death is taken as caused
        # by the settings (a native crash), not by the machine, and the trial stays failed
        reruns, cur = 0, trial
        while "retry_of" in cur.user_attrs and cur.user_attrs["retry_of"] in trials:
            reruns, cur = reruns + 1, trials[cur.user_attrs["retry_of"]]
        if self.retry and trial.number not in retried and reruns < MAX_RERUNS:
            # the same parameters; a grid trial also keeps its grid point, so the grid sampler
            # does not hand that point out again (it would run twice, another never)
            system: dict[str, Any] = {"fixed_params": dict(trial.params)}
            for key in ("grid_id", "search_space"):
                if key in trial.system_attrs:
                    system[key] = trial.system_attrs[key]
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    system_attrs=system,
                    user_attrs={"retry_of": trial.number},
                )
            )


def dead_worker(attrs: dict[str, Any], other_hosts: bool = False) -> str | None:
    """Why the worker of a RUNNING trial with these user attrs is gone, or None if it may run:
    on this host, it ran under another boot (a restarted machine, or a fresh one of the same
    name, where its pid may belong to another process now) or its pid is gone; on another
    host, only with ``other_hosts`` (``search.reap_other_hosts``: a journal file carried from a
    machine that no longer runs it). A trial without a host yet is starting (its worker records
    host, boot and pid first thing) and may run."""
    host, pid, boot = attrs.get("host"), attrs.get("pid"), attrs.get("boot")
    if host is None:
        return None
    if host != HOST:
        return f"worker on host {host} (search.reap_other_hosts)" if other_hosts else None
    gone = local_process_gone(boot, pid)
    return f"worker {gone}" if gone else None


def reap_stale(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    handler: StaleHandler,
    other_hosts: bool = False,
) -> list[int]:
    """Fail RUNNING trials whose worker is gone (:func:`dead_worker`); returns their numbers.

    Uses the public storage API (trial ids looked up by study name and trial number)."""
    reaped = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = dead_worker(t.user_attrs, other_hosts)
        if reason is None:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker reaped it first
        handler(study, storage.get_trial(trial_id))
        reaped.append(t.number)
    return reaped


def overdue(study: optuna.Study, pids: set[int], limit: float) -> list[tuple[int, int]]:
    """(trial number, worker pid) of every RUNNING trial of these worker processes on this host
    and boot whose chain started more than ``limit`` seconds ago (``search.trial_timeout``)."""
    now = time.time()
    return [
        (t.number, int(t.user_attrs["pid"]))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get("host") == HOST
        and t.user_attrs.get("boot") in (None, "", BOOT)
        and t.user_attrs.get("pid") in pids
        and now - float(t.user_attrs.get("started", now)) > limit
    ]


def fail_overdue(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    number: int,
    limit: float,
    tracker: Tracker | NullTracker,
    kill: Callable[[], None] = lambda: None,
) -> bool:
    """Record trial ``number`` as FAIL, ``fail_reason`` naming ``search.trial_timeout``, then
    ``kill()`` its worker and close its MLflow runs; False (nothing done) if it finished in the
    meantime. Failed before the kill, so no other worker takes the killed one's trial for a
    death and queues the hanging settings again. Not re-queued: they would hang again."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number
    )
    reason = f"ran past search.trial_timeout ({limit:g} s): its worker was killed"
    try:
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
        return False  # it finished (or was reaped) in the meantime
    kill()
    run_id = storage.get_trial(trial_id).user_attrs.get("mlflow_run_id")
    if run_id and isinstance(tracker, Tracker):
        tracker.close_tree(run_id, "KILLED", reason)
    return True


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: all but failed trials that were re-queued, and
    but trials still queued (WAITING: a seed or a re-queued trial, which run anyway)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(
        1
        for t in trials
        if t.state != TrialState.WAITING
        and not (t.state == TrialState.FAIL and t.number in retried)
    )


def waiting(study: optuna.Study) -> int:
    """Trials queued and not yet started (seeds, re-queued trials of dead workers)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def epochs_trained(study: optuna.Study) -> int:
    """Training epochs the study's trials spent (the ``budget_epochs`` budget)."""
    return sum(int(t.user_attrs.get("epochs_trained", 0)) for t in study.get_trials(deepcopy=False))


__all__ = [
    "BOOT",
    "HOST",
    "StaleHandler",
    "break_dangling_lock",
    "close_runs",
    "counted",
    "dead_worker",
    "epochs_trained",
    "fail_overdue",
    "make_storage",
    "overdue",
    "reap_stale",
    "waiting",
]
