"""The dry pass before anything trains: every check that the config and the untrained nets allow.

``chaincomp run`` (and every sweep trial) calls :func:`preflight_chain` on the chain it is about
to run; ``chaincomp sweep`` calls :func:`preflight_catalogue` on every step it may choose, once,
before its first trial. Each step's :meth:`~chaincomp.stages.Stage.preflight` sees the untrained
net the chain would hand it (the baseline's architecture, or the student of a D before it) and
raises a :class:`~chaincomp.errors.ConfigError` naming the key the user typed
(``chain.steps.E.settings.points``), so a bad value stops the command in seconds rather than
after the baseline (and D, P, Q) trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from chaincomp.chain.spec import Step
from chaincomp.stages import ReplayInfo, Stage


def preflight_chain(
    steps: Sequence[Step], net: nn.Module, model_cfg: dict[str, Any], info: ReplayInfo
) -> None:
    """Check ``steps`` in order on the nets they would receive. When a step replaces the net
    (a student), the earlier steps that may transfer to it are checked on the new net too (the
    exit points of an E before D must exist in the student)."""
    done: list[Stage] = []  # type: ignore[type-arg]
    for step in steps:
        stage = step.make()
        replaced = stage.preflight(net, model_cfg, info)
        if replaced is not None:
            net, model_cfg = replaced
            for earlier in done:
                earlier.preflight(net, model_cfg, info)
        else:
            done.append(stage)


def preflight_catalogue(
    steps: Sequence[Step], net: nn.Module, model_cfg: dict[str, Any], info: ReplayInfo
) -> None:
    """Check every step of a search catalogue on every net a chain of them can reach: the
    baseline's and the net of each replacing step (P, Q, E keep the architecture's kind)."""
    nets = [(net, model_cfg)]
    for step in steps:
        replaced = step.make().preflight(net, model_cfg, info)
        if replaced is not None:
            nets.append(replaced)
    for step in steps:
        for other_net, other_cfg in nets[1:]:
            step.make().preflight(other_net, other_cfg, info)


__all__ = ["preflight_catalogue", "preflight_chain"]
