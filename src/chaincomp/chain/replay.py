"""Replay: rebuild a compressed network from its chain entry and load its weights.

An entry (``entry.json``) holds the base model config, the data shape, one record per step and
``trainable``: the names of the parameters that had ``requires_grad`` set when the entry was
written. ``requires_grad`` is not part of a state dict, so replay restores it from that list:
a chain resumed from a cached prefix then trains exactly the parameter set the live chain
trained (the same optimizer parameter groups).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chaincomp.models import build_model
from chaincomp.module import CompressibleModule
from chaincomp.pipeline import save_weights
from chaincomp.stages import ReplayInfo, record_from_json, stage_class
from chaincomp.utils import atomic_write


def trainable_names(net: nn.Module) -> list[str]:
    """Names of the parameters of ``net`` with ``requires_grad`` set, in registration order."""
    return [name for name, p in net.named_parameters() if p.requires_grad]


def set_trainable(net: nn.Module, names: list[str]) -> None:
    """Set ``requires_grad`` on exactly the parameters named in ``names``."""
    wanted = set(names)
    unknown = wanted - {name for name, _ in net.named_parameters()}
    if unknown:
        raise ValueError(f"entry names parameters the replayed net lacks: {sorted(unknown)[:3]}")
    for name, p in net.named_parameters():
        p.requires_grad_(name in wanted)


def replay_info(entry: Mapping[str, Any]) -> ReplayInfo:
    data = entry["data"]
    shape = (int(data["in_channels"]), int(data["num_outputs"]), tuple(data["image_size"]))
    return ReplayInfo(
        in_channels=shape[0],
        num_outputs=shape[1],
        image_size=shape[2],  # type: ignore[arg-type]
        build=lambda model_cfg: build_model(model_cfg, shape[0], shape[1], shape[2]),  # type: ignore[arg-type]
    )


def replay(
    entry: Mapping[str, Any], weights: Mapping[str, torch.Tensor], module: CompressibleModule
) -> CompressibleModule:
    """Rebuild ``module.net`` from a chain entry (base model + each step's record), load
    ``weights`` strictly and restore the trainable-parameter map. ``module`` supplies the task
    and optimizer settings."""
    info = replay_info(entry)
    module.net = info.build(entry["model"])
    for data in entry["records"]:
        record = record_from_json(data)
        stage_class(record.stage).replay(module, record, info)
    module.net.load_state_dict(weights, strict=True)
    if "trainable" in entry:
        set_trainable(module.net, entry["trainable"])
    return module


def load_chain(path: str | Path, module: CompressibleModule) -> CompressibleModule:
    """Replay a saved chain (a directory with ``entry.json`` and ``weights.pt``) into
    ``module``; the weights are read with ``weights_only=True``."""
    p = Path(path)
    entry = json.loads((p / "entry.json").read_text())
    weights = torch.load(p / "weights.pt", map_location="cpu", weights_only=True)
    return replay(entry, weights, module)


def save_chain(path: Path, entry: dict[str, Any], net: nn.Module) -> None:
    """``entry.json`` + ``weights.pt`` (atomically) — what :func:`load_chain` reads."""
    save_weights(net, path / "weights.pt")
    atomic_write(
        path / "entry.json",
        lambda p: Path(p).write_text(json.dumps(entry, indent=1, default=float)),
    )
