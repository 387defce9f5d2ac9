"""A thin layer over ``mlflow.MlflowClient``.

Runs are opened with an explicit parent (``mlflow.parentRunId`` tag), so sweeps can nest
sweep -> chain -> stage without relying on MLflow's thread-local active run. A run left by an
exception is marked FAILED with the reason as a tag; nothing stays RUNNING.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from chaincomp.errors import ConfigError

MAX_PARAM_LEN = 6000


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
        self.client = MlflowClient(tracking_uri=cfg.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = (
            exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        )

    @contextmanager
    def run(
        self,
        name: str | None = None,
        parent: Run | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Iterator[Run]:
        """Open a run (child of ``parent`` when given); FINISHED on exit, FAILED on an exception
        (with the exception as the ``error`` tag), KILLED on KeyboardInterrupt."""
        all_tags = dict(tags or {})
        if parent is not None and parent.run_id:
            all_tags["mlflow.parentRunId"] = parent.run_id
        info = self.client.create_run(
            self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
        )
        run_id: str = info.info.run_id
        run = Run(self.client, run_id)
        try:
            yield run
        except KeyboardInterrupt:
            self.client.set_terminated(run_id, "KILLED")
            raise
        except BaseException as exc:
            self.client.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:MAX_PARAM_LEN])
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")


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


def make_tracker(cfg: TrackingConfig) -> Tracker | NullTracker:
    return Tracker(cfg) if cfg.enabled else NullTracker()


class MlflowMetricsCallback(pl.Callback):
    """Logs the Trainer's epoch metrics (``val/...``, ``train/...``) into ``run``, step = epoch,
    under an optional ``prefix`` (e.g. the stage name)."""

    def __init__(self, run: Run, prefix: str = ""):
        self.run, self.prefix = run, prefix

    def _log(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            f"{self.prefix}{k}": float(v)
            for k, v in trainer.callback_metrics.items()
            if v.numel() == 1
        }
        self.run.log_metrics(metrics, step=trainer.current_epoch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)
