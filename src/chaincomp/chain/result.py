"""The one result schema of a chain: :class:`ChainResult` (its steps and records), written as
``summary.json`` by the runner and read back by the report, the notebook and the search.

Contract:

* ``steps[0]`` is the baseline, ``steps[k]`` the state after the k-th step of ``order``.
* Every step carries the foundation metrics (:data:`METRIC_KEYS`): the task metric on the
  validation and test splits and the cost of the network at that point (``val_bitops`` /
  ``bitops``: expected BitOps per sample on the validation / test split, which differ only when
  early exits are taken).
* ``higher_is_better`` is the task's direction, stored once here: no reader re-derives it.
* ``to_json`` / ``from_json`` round-trip exactly (``from_json(r.to_json()) == r``);
  ``from_json`` rejects another ``schema`` version with a :class:`ValueError` naming it.
* ``module`` (the final LightningModule) lives in memory only and is never written.

The JSON keeps the derived numbers (``bitops_ratio``, ``metric_delta``, the final step's metrics
at the top level) for readers that only have ``jq``; they are recomputed, never read back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaincomp.utils import write_json

RESULT_SCHEMA = 1
METRIC_KEYS = ("val_metric", "test_metric", "macs", "bitops", "val_bitops", "params", "size_mb")
TIME_KEYS = ("train_time_s", "eval_time_s", "other_time_s", "time_s")
_STEP_FIELDS = ("name", "stage", "cached", *TIME_KEYS, *METRIC_KEYS)
_DERIVED = (
    "bitops_ratio",
    "val_bitops_ratio",
    "macs_ratio",
    "metric_delta",
    "val_metric_delta",
)


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


@dataclass(frozen=True)
class StepResult:
    """The state after one step (or the baseline): ``name`` is the step's name in the chain's
    catalogue (``"baseline"`` for step 0), ``stage`` its stage's name; ``cached``: taken from
    the prefix cache; where the step's wall time ``time_s`` went: ``train_time_s`` (inside
    ``Trainer.fit``), ``eval_time_s`` (evaluating and counting the cost), ``other_time_s`` (the
    rest: the stage's own work outside fits, cache writes, logging); NaN when not recorded
    (older results); ``extra``: everything else the step measured (``<split>_exit_rates``,
    ``static_bitops``, the stage's own summary as ``<stage>.<key>``)."""

    name: str
    stage: str
    val_metric: float
    test_metric: float
    macs: float
    bitops: float
    val_bitops: float
    params: float
    size_mb: float
    cached: bool = False
    train_time_s: float = math.nan
    eval_time_s: float = math.nan
    other_time_s: float = math.nan
    time_s: float = math.nan
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StepResult:
        """A runner row (or a ``summary.json`` step): the known keys become fields, the rest
        ``extra``. A missing ``val_bitops`` (older stores) is the test split's ``bitops``."""
        missing = [k for k in ("name", "stage", "val_metric", "test_metric") if k not in row]
        if missing:
            raise ValueError(f"chain result step: missing {missing}")
        values = {k: row[k] for k in _STEP_FIELDS if k in row}
        for k in (*METRIC_KEYS, *TIME_KEYS):
            values[k] = _float(values.get(k))
        if math.isnan(values["val_bitops"]):
            values["val_bitops"] = values["bitops"]
        values["cached"] = bool(values.get("cached", False))
        extra = {
            k: v
            for k, v in row.items()
            if k not in _STEP_FIELDS and k not in ("task", "metric_name")
        }
        return cls(**values, extra=extra)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "cached": self.cached,
            **{k: getattr(self, k) for k in METRIC_KEYS},
            "train_time_s": self.train_time_s,
            "time_s": self.time_s,
            # recorded since the fit / eval / other split: absent (not NaN) in older results
            **{
                k: getattr(self, k)
                for k in ("eval_time_s", "other_time_s")
                if not math.isnan(getattr(self, k))
            },
            **self.extra,
        }


@dataclass(frozen=True)
class ChainResult:
    """A finished chain: ``order`` (step names), ``letters`` (their stages' letters),
    ``steps`` (baseline first), ``records`` (the stage records in force, as JSON, replayable
    with :func:`chaincomp.chain.replay`), the task's ``metric_name`` and direction, and the
    MLflow run that logged it (None without tracking)."""

    task: str
    metric_name: str
    higher_is_better: bool
    chain: str
    order: tuple[str, ...]
    letters: str
    steps: tuple[StepResult, ...]
    records: tuple[Mapping[str, Any], ...] = ()
    mlflow_run_id: str | None = None
    module: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.steps or self.steps[0].name != "baseline":
            raise ValueError("chain result: steps must start with the baseline")
        names = tuple(s.name for s in self.steps[1:])
        if names != tuple(self.order):
            raise ValueError(
                f"chain result: steps {list(names)} do not match order {list(self.order)}"
            )

    # -------------------------------------------------------------- derived numbers
    @property
    def baseline(self) -> StepResult:
        return self.steps[0]

    @property
    def last(self) -> StepResult:
        return self.steps[-1]

    @property
    def bitops_ratio(self) -> float:
        """Baseline / final expected BitOps on the test split."""
        return self.baseline.bitops / max(1e-12, self.last.bitops)

    @property
    def val_bitops_ratio(self) -> float:
        """Baseline / final expected BitOps on the validation split (what selection uses)."""
        return self.baseline.val_bitops / max(1e-12, self.last.val_bitops)

    @property
    def macs_ratio(self) -> float:
        return self.baseline.macs / max(1e-12, self.last.macs)

    @property
    def metric_delta(self) -> float:
        """Final minus baseline test metric (negative = lower accuracy / lower MAE)."""
        return self.last.test_metric - self.baseline.test_metric

    @property
    def val_metric_delta(self) -> float:
        return self.last.val_metric - self.baseline.val_metric

    # -------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The ``summary.json`` dict (plain JSON types; NaN stays a float)."""
        last = self.last.to_json()
        top = {k: last[k] for k in METRIC_KEYS}
        top.update({k: v for k, v in last.items() if k.endswith("exit_rates")})
        return {
            "schema": RESULT_SCHEMA,
            "task": self.task,
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            **top,
            "mlflow_run_id": self.mlflow_run_id,
            "chain": self.chain,
            "order": list(self.order),
            "letters": self.letters,
            "baseline": self.baseline.to_json(),
            "stages": [s.to_json() for s in self.steps[1:]],
            **{k: getattr(self, k) for k in _DERIVED},
            "records": [dict(r) for r in self.records],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ChainResult:
        """Read a ``summary.json`` dict; ValueError on another schema version or a malformed
        one (the message names the key)."""
        schema = d.get("schema")
        if schema != RESULT_SCHEMA:
            raise ValueError(f"chain result: schema {schema!r}, expected {RESULT_SCHEMA}")
        for key in ("task", "metric_name", "higher_is_better", "order", "baseline", "stages"):
            if key not in d:
                raise ValueError(f"chain result: missing {key!r}")
        steps = (StepResult.from_row(d["baseline"]), *(StepResult.from_row(s) for s in d["stages"]))
        return cls(
            task=str(d["task"]),
            metric_name=str(d["metric_name"]),
            higher_is_better=bool(d["higher_is_better"]),
            chain=str(d.get("chain", "")),
            order=tuple(d["order"]),
            letters=str(d.get("letters", "".join(d["order"]))),
            steps=steps,
            records=tuple(d.get("records", ())),
            mlflow_run_id=d.get("mlflow_run_id"),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``summary.json`` atomically."""
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ChainResult:
        return cls.from_json(json.loads(Path(path).read_text()))


def from_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    task: str,
    metric_name: str,
    higher_is_better: bool,
    chain: str,
    order: Sequence[str],
    letters: str,
    records: Sequence[Mapping[str, Any]] = (),
    mlflow_run_id: str | None = None,
    module: Any = None,
) -> ChainResult:
    """A :class:`ChainResult` from the runner's rows (baseline first)."""
    return ChainResult(
        task,
        metric_name,
        higher_is_better,
        chain,
        tuple(order),
        letters,
        tuple(StepResult.from_row(r) for r in rows),
        tuple(records),
        mlflow_run_id,
        module,
    )
