"""The chain result schema: what ``summary.json`` must hold and what a reader refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chaincomp.chain import RESULT_SCHEMA, ChainResult, StepResult


def _row(name: str, stage: str, metric: float, bitops: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "stage": stage,
        "val_metric": metric + 1,
        "test_metric": metric,
        "macs": bitops / 1024,
        "bitops": bitops,
        "val_bitops": bitops * 2 if "val_exit_rates" in extra else bitops,
        "params": 1000,
        "size_mb": 0.5,
        "train_time_s": 1.0,
        "time_s": 2.0,
        **extra,
    }


def _summary() -> dict[str, Any]:
    return ChainResult(
        "classify",
        "accuracy",
        True,
        "dpqe",
        ("P", "E"),
        "PE",
        (
            StepResult.from_row(_row("baseline", "baseline", 90.0, 1024.0**2)),
            StepResult.from_row(_row("P", "prune", 89.0, 2048.0, **{"prune.removed": 12})),
            StepResult.from_row(_row("E", "early_exit", 88.5, 512.0, val_exit_rates=[0.5, 0.5])),
        ),
        ({"stage": "prune", "version": 1},),
        "run-1",
    ).to_json()


def test_summary_json_carries_the_ratios_a_jq_user_reads(tmp_path: Path) -> None:
    d = _summary()
    assert d["schema"] == RESULT_SCHEMA and d["higher_is_better"] is True
    assert d["bitops_ratio"] == 2048.0  # 1024^2 / 512
    assert d["val_bitops_ratio"] == 1024.0  # the exits are taken half as often on validation
    assert d["metric_delta"] == -1.5
    assert d["test_metric"] == 88.5 and d["val_exit_rates"] == [0.5, 0.5]
    assert d["stages"][0]["prune.removed"] == 12
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(d))
    back = ChainResult.load(path)
    assert back.last.extra == {"val_exit_rates": [0.5, 0.5]}
    assert back.steps[1].extra == {"prune.removed": 12}
    assert back.to_json() == d


def test_another_schema_version_is_refused() -> None:
    d = _summary()
    d["schema"] = RESULT_SCHEMA + 1
    with pytest.raises(ValueError, match=f"schema {RESULT_SCHEMA + 1}, expected {RESULT_SCHEMA}"):
        ChainResult.from_json(d)
    del d["schema"]  # summary.json of a version before the schema existed
    with pytest.raises(ValueError, match="schema None"):
        ChainResult.from_json(d)


def test_steps_must_match_the_order() -> None:
    d = _summary()
    d["order"] = ["E", "P"]
    with pytest.raises(ValueError, match=r"steps \['P', 'E'\] do not match order \['E', 'P'\]"):
        ChainResult.from_json(d)
    d = _summary()
    del d["task"]
    with pytest.raises(ValueError, match="missing 'task'"):
        ChainResult.from_json(d)


def test_a_step_without_validation_bitops_takes_the_test_splits() -> None:
    row = _row("P", "prune", 80.0, 300.0)
    del row["val_bitops"]
    assert StepResult.from_row(row).val_bitops == 300.0
