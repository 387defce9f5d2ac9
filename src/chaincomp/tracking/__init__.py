"""MLflow tracking: runs with explicit parents, flattened params, metrics and artifacts."""

from chaincomp.tracking.mlflow_tracker import (
    MlflowMetricsCallback,
    NullTracker,
    Run,
    Tracker,
    TrackingConfig,
    flatten,
    make_tracker,
)

__all__ = [
    "MlflowMetricsCallback",
    "NullTracker",
    "Run",
    "Tracker",
    "TrackingConfig",
    "flatten",
    "make_tracker",
]
