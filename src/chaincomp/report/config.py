"""The report's settings (:class:`ReportConfig`) and constants: the studies it can write, the
selection sentence every file carries, the paper's order and its reported results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from chaincomp.errors import ConfigError, check_keys

STUDIES = ("pairwise", "precedence", "insertion", "all_orders", "headline")
PAPER_ORDER = "DPQE"
SELECTION = "Selection: validation metric and validation BitOps; test reported beside."
# Reported results on ResNet-34 / CIFAR-10 (BitOps reduction, accuracy change in points).
REFERENCES = (
    ("Chain of Compression v2 (arXiv 2403.17447), D->P->Q->E", 859.0, "about 0.09 (reported)"),
    ("NAC (RL search over the same methods)", 100.8, "-1.30"),
)


@dataclass(frozen=True)
class ReportConfig:
    """``studies``: which tables to write (any of :data:`STUDIES`); ``label``: the results
    subfolder; ``source``: the sweep's study name or a run's name; ``out_dir``: the experiments
    folder; ``tie_tol``: metric differences up to this count as ties (>= 0); ``summaries``:
    ``summary.json`` files or globs (:func:`chaincomp.report.summary_paths`) to read instead of
    MLflow (chains run with tracking off), empty = read ``source`` from MLflow."""

    studies: tuple[str, ...] = ("all_orders",)
    label: str = "default"
    source: str = ""
    out_dir: str = "experiments"
    tie_tol: float = 0.0
    summaries: tuple[str, ...] = ()

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
        check_keys(d, (f.name for f in fields(cls)), "report")
        values = dict(d)
        if "studies" in values:
            studies = values["studies"]
            values["studies"] = (studies,) if isinstance(studies, str) else tuple(studies)
        if "summaries" in values:
            paths = values["summaries"] or ()
            values["summaries"] = (paths,) if isinstance(paths, str) else tuple(map(str, paths))
        for key in ("label", "source", "out_dir"):
            if key in values and values[key] is not None:
                values[key] = str(values[key])
        return cls(**values)
