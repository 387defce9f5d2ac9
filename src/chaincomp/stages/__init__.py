"""Compression stages: one class per technique, registered by name and by letter.

``STAGES["prune"]`` / ``STAGES["P"]`` -> :class:`~chaincomp.stages.prune.Prune`, etc. The contract
is :class:`~chaincomp.stages.base.Stage`; ``conf/stage/<name>.yaml`` holds each one's settings
and search space.
"""

from chaincomp.errors import ConfigError
from chaincomp.stages.base import ReplayInfo, Stage, StageContext, StageSettings
from chaincomp.stages.distill import Distill, DistillSettings
from chaincomp.stages.early_exit import EarlyExit, EarlyExitSettings, ExitNet
from chaincomp.stages.prune import Prune, PruneSettings
from chaincomp.stages.quantize import QuantConv2d, Quantize, QuantizeSettings, QuantLinear

STAGE_CLASSES: tuple[type[Stage], ...] = (Distill, Prune, Quantize, EarlyExit)
STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in STAGE_CLASSES}
LETTERS: dict[str, str] = {cls.letter: cls.name for cls in STAGE_CLASSES}


def stage_class(name: str, key: str = "stage") -> type[Stage]:
    """The stage class for a name (``prune``) or letter (``P``)."""
    name = LETTERS.get(name, name)
    if name not in STAGES:
        raise ConfigError(key, f"unknown stage {name!r}", [*STAGES, *LETTERS])
    return STAGES[name]


__all__ = [
    "LETTERS",
    "STAGES",
    "STAGE_CLASSES",
    "Distill",
    "DistillSettings",
    "EarlyExit",
    "EarlyExitSettings",
    "ExitNet",
    "Prune",
    "PruneSettings",
    "QuantConv2d",
    "QuantLinear",
    "Quantize",
    "QuantizeSettings",
    "ReplayInfo",
    "Stage",
    "StageContext",
    "StageSettings",
    "stage_class",
]
