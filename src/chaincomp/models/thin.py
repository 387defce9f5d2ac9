"""A thinner copy of any model: the student D builds when the model takes no ``width_mult``.

:func:`thinned` is a model factory like any ``_target_`` of ``conf/model``: its config is
``{"_target_": "chaincomp.models.thin.thinned", "base": <the model's config>, "width_mult": w}``,
so the student is rebuilt from its record like every other model (replay, ``load_chain``), and a
second D multiplies ``width_mult`` again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

TARGET = "chaincomp.models.thin.thinned"


def thinned(
    base: Mapping[str, Any],
    width_mult: float,
    in_channels: int,
    num_outputs: int,
    input_size: tuple[int, int],
) -> nn.Module:
    """``base`` built, every prunable channel group cut to ``width_mult`` of its channels, and
    every layer re-initialized.

    Contract: the result is an instance of the base model's class with the same graph (depthwise
    convolutions, residual additions and concatenations stay consistent: the groups are those of
    Torch-Pruning's dependency graph, traced through the real forward); linear layers keep their
    outputs (the task head's ``num_outputs``); each group keeps ``round(n * width_mult)``
    channels, at least 1; the shapes depend only on ``base`` and ``width_mult`` (never on the
    weights), and no weight of the full-width model survives (each module's
    ``reset_parameters``). ``width_mult`` must be in (0, 1]: a model without its own
    ``width_mult`` argument can only be thinned.
    """
    from chaincomp.models import build_model

    if not 0 < width_mult <= 1:
        raise ValueError(f"width_mult {width_mult} is outside (0, 1]")
    net = build_model(base, in_channels, num_outputs, tuple(input_size))  # type: ignore[arg-type]
    if width_mult < 1:
        was = net.training
        net.eval()
        graph = tp.DependencyGraph().build_dependency(
            net, example_inputs=torch.zeros(1, in_channels, *input_size)
        )
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        roots = [
            (g[0].dep.target.module, g[0].dep.handler)
            for g in graph.get_all_groups(ignored_layers=linears, root_module_types=[nn.Conv2d])
        ]
        # Which channels go does not matter (every weight is re-initialized below): the last.
        for module, handler in roots:
            n = graph.get_out_channels(module)
            keep = max(1, round(n * width_mult))
            if keep < n:
                graph.get_pruning_group(module, handler, idxs=list(range(keep, n))).prune()
        net.train(was)
    for m in net.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return net
