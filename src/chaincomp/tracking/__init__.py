"""MLflow tracking: runs with explicit parents, flattened params, metrics and artifacts."""

from chaincomp.tracking.mlflow_tracker import (
    BOOT,
    HOST,
    MlflowMetricsCallback,
    NullTracker,
    Run,
    Tracker,
    TrackingConfig,
    flatten,
    local_process_gone,
    make_tracker,
    pid_alive,
)

__all__ = [
    "BOOT",
    "HOST",
    "MlflowMetricsCallback",
    "NullTracker",
    "Run",
    "Tracker",
    "TrackingConfig",
    "flatten",
    "local_process_gone",
    "make_tracker",
    "pid_alive",
]
