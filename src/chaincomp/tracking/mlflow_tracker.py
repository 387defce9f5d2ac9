"""A thin layer over ``mlflow.MlflowClient``.

Runs are opened with an explicit parent (``mlflow.parentRunId`` tag), so sweeps can nest
sweep -> chain -> stage without relying on MLflow's thread-local active run. A run left by an
exception is marked FAILED with the reason as a tag; nothing stays RUNNING: every run carries
the host and pid of its process (``chaincomp.host``, ``chaincomp.pid``), and a run its process
left RUNNING when it was killed is closed as KILLED by the next chain started on that host
(:meth:`Tracker.reap_dead`).

The store is opened once per process under a file lock (a SQLite store: ``<db>.lock`` beside
it), so processes started together never race MLflow's schema creation or create the
experiment twice; a store that cannot be opened is one :class:`ConfigError` naming
``tracking.uri``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from chaincomp.errors import ConfigError

MAX_PARAM_LEN = 6000
HOST = socket.gethostname()
log = logging.getLogger("chaincomp.tracking")


def _boot_id() -> str:
    """This boot of this machine's kernel (Linux's random boot id; "" where there is none): a
    process recorded under another boot id is gone, whatever its pid is now (a rebooted
    machine, or a fresh one with the same host name). Containers on one kernel share it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


BOOT = _boot_id()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie counts as dead)."""
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


def local_process_gone(boot: str | None, pid: Any) -> str | None:
    """Why a process recorded on this host (its boot id ``boot``, its ``pid``) is gone, or None
    while it may run: it ran under another boot of this machine (its pid may be another
    process's now), or its pid is gone. This process, or one without a pid yet, may run."""
    if boot and BOOT and boot != BOOT:
        return f"pid {pid} ran before this machine's boot"
    if pid is None or pid == os.getpid():
        return None
    return None if pid_alive(int(pid)) else f"pid {pid} died"


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock for creating the store ``uri``: ``<db>.lock`` beside a SQLite file (its
    folder is created), else one per URI in the temp folder (other stores create their schema
    server-side; the lock still keeps two local processes from creating one experiment twice)."""
    import hashlib

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :]).expanduser()
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                "tracking.uri", f"cannot create the folder of {str(db)!r} ({exc.strerror})"
            ) from None
        lock = db.with_name(db.name + ".lock")
    else:
        digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
        lock = Path(tempfile.gettempdir()) / f"chaincomp-mlflow-{digest}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ConfigError(
            "tracking.uri", f"cannot write beside the store ({lock}: {exc.strerror})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _probe_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is one line, not MLflow's minutes of retries."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            "tracking.uri",
            f"no tracking server answers at {uri} ({exc.strerror or exc})",
            "a running server (mlflow server ...), sqlite:///path.db, or tracking=none",
        ) from None


@dataclass(frozen=True)
class TrackingConfig:
    """``enabled``: log to MLflow at all; ``uri``: tracking URI (default a SQLite file in the
    working directory; any MLflow URI: ``postgresql://...``, ``http://127.0.0.1:5000``);
    ``experiment``: experiment name; ``run_name``: optional name of the top run."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "chaincomp"
    run_name: str | None = None

    def __post_init__(self) -> None:
        if self.enabled and not self.uri:
            raise ConfigError(
                "tracking.uri", "empty", "an MLflow tracking URI such as sqlite:///mlflow.db"
            )
        if not self.experiment:
            raise ConfigError("tracking.experiment", "empty", "a non-empty experiment name")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (lists become JSON strings)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


class Run:
    """An open MLflow run (or a null one). Metric values that are not finite numbers are skipped."""

    def __init__(self, client: Any, run_id: str | None):
        self.client, self.run_id = client, run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.client is None:
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:MAX_PARAM_LEN])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.client is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / name
            file.write_text(text)
            self.client.log_artifact(self.run_id, str(file))


class Tracker:
    """Opens runs in one experiment of one tracking store."""

    def __init__(self, cfg: TrackingConfig):
        from mlflow import MlflowClient

        self.cfg = cfg
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if cfg.uri.startswith(("http://", "https://")):
            _probe_server(cfg.uri)
        with store_lock(cfg.uri):
            try:
                self.client = MlflowClient(tracking_uri=cfg.uri)
                exp = self.client.get_experiment_by_name(cfg.experiment)
                self.experiment_id = (
                    exp.experiment_id
                    if exp
                    else self.client.create_experiment(
                        cfg.experiment,
                        # MLflow's UI opens a "model training" experiment on its runs table
                        tags={"mlflow.experimentKind": "custom_model_development"},
                    )
                )
            except ConfigError:
                raise
            except Exception as exc:  # MLflow / SQLAlchemy / driver: many types, one line
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ConfigError(
                    "tracking.uri",
                    f"cannot open the MLflow store {cfg.uri!r} ({type(exc).__name__}: "
                    f"{first[:300]})",
                    "sqlite:///path.db, postgresql://user@host/db, http://host:port, "
                    "or tracking=none",
                ) from None

    @contextmanager
    def run(
        self,
        name: str | None = None,
        parent: Run | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Iterator[Run]:
        """Open a run (child of ``parent`` when given); FINISHED on exit, FAILED on an exception
        (with the exception as the ``error`` tag), KILLED on KeyboardInterrupt or SystemExit
        (Ctrl-C, SIGTERM)."""
        all_tags = {"chaincomp.host": HOST, "chaincomp.pid": os.getpid(), **(tags or {})}
        if parent is not None and parent.run_id:
            all_tags["mlflow.parentRunId"] = parent.run_id
        info = self.client.create_run(
            self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
        )
        run_id: str = info.info.run_id
        run = Run(self.client, run_id)
        try:
            yield run
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (the CLI raises SystemExit)
            self.client.set_tag(run_id, "error", "interrupted (SIGINT / SIGTERM)")
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException as exc:
            self.client.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:MAX_PARAM_LEN])
            # an exception may name its own status (a pruned search trial: KILLED)
            self.client.set_terminated(run_id, str(getattr(exc, "mlflow_status", "FAILED")))
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def close_tree(
        self, run_id: str, status: str = "KILLED", reason: str = "its process died"
    ) -> int:
        """Terminate run ``run_id`` and every descendant still RUNNING as ``status`` (with
        ``reason`` as the ``error`` tag); returns how many were closed."""
        todo, closed = [run_id], 0
        while todo:
            rid = todo.pop()
            children = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'"
            )
            todo.extend(r.info.run_id for r in children)
            if self.client.get_run(rid).info.status == "RUNNING":
                self.client.set_tag(rid, "error", reason)
                self.client.set_terminated(rid, status)
                closed += 1
        return closed

    def reap_dead(self) -> int:
        """Close as KILLED every run of this experiment left RUNNING by a process of this host
        that is gone (killed: SIGKILL, out of memory, a lost machine), with its descendants;
        says so in one log line; returns how many runs were closed. Runs of live processes and
        of other hosts are never touched."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`chaincomp.host` = '{HOST}'",
        )
        closed, pids = 0, set()
        for r in found:
            pid = r.data.tags.get("chaincomp.pid", "")
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            closed += self.close_tree(r.info.run_id, reason=f"its process (pid {pid}) died")
            pids.add(int(pid))
        if closed:
            log.warning(
                "closed %d MLflow run(s) left RUNNING by killed process(es) %s as KILLED",
                closed,
                ", ".join(map(str, sorted(pids))),
            )
        return closed


class NullTracker:
    """Same interface as :class:`Tracker`; records nothing (``tracking.enabled=false``)."""

    experiment_id = None

    @contextmanager
    def run(
        self,
        name: str | None = None,
        parent: Run | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Iterator[Run]:
        yield Run(None, None)

    def reap_dead(self) -> int:
        return 0


def make_tracker(cfg: TrackingConfig) -> Tracker | NullTracker:
    return Tracker(cfg) if cfg.enabled else NullTracker()


class MlflowMetricsCallback(pl.Callback):
    """Logs the Trainer's epoch metrics (``val/...``, ``train/...``) into ``run``, step = epoch,
    under an optional ``prefix`` (e.g. the stage name). The epochs count on across the fits the
    instance takes part in (a stage that trains in phases, such as D after Q: warm-up, then
    calibration and the quantized rest), so one stage's curve has one point per epoch in order
    instead of its phases written over each other at the same steps."""

    def __init__(self, run: Run, prefix: str = ""):
        self.run, self.prefix = run, prefix
        self._next = 0  # the step of the next fit's first epoch
        self._first = 0  # the step of this fit's first epoch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first = self._next

    def _log(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            f"{self.prefix}{k}": float(v)
            for k, v in trainer.callback_metrics.items()
            if v.numel() == 1
        }
        step = self._first + trainer.current_epoch
        self._next = step + 1
        self.run.log_metrics(metrics, step=step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)
