"""Compression stages: one class per technique, found by name, letter or ``_target_``.

``stage_class("prune")`` / ``stage_class("P")`` -> :class:`~chaincomp.stages.prune.Prune`, etc.
The contract is :class:`~chaincomp.stages.base.Stage`; ``conf/stage/<name>.yaml`` holds each
one's ``_target_``, settings and search space. A stage defined outside this package is found
through the ``_target_`` of its ``conf/stage`` file (see :func:`~chaincomp.stages.base.stages`).
"""

from chaincomp.stages.base import (
    FineTuneSettings,
    Phase,
    RecordError,
    ReplayInfo,
    Stage,
    StageContext,
    StageRecord,
    StageSettings,
    record_from_json,
    stage_class,
    stages,
)
from chaincomp.stages.distill import Distill, DistillSettings
from chaincomp.stages.early_exit import EarlyExit, EarlyExitSettings, ExitNet
from chaincomp.stages.prune import Prune, PruneSettings
from chaincomp.stages.quantize import QuantConv2d, Quantize, QuantizeSettings, QuantLinear

__all__ = [
    "Distill",
    "DistillSettings",
    "EarlyExit",
    "EarlyExitSettings",
    "ExitNet",
    "FineTuneSettings",
    "Phase",
    "Prune",
    "PruneSettings",
    "QuantConv2d",
    "QuantLinear",
    "Quantize",
    "QuantizeSettings",
    "RecordError",
    "ReplayInfo",
    "Stage",
    "StageContext",
    "StageRecord",
    "StageSettings",
    "record_from_json",
    "stage_class",
    "stages",
]
