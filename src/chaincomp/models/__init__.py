"""Model zoo and the builder that instantiates ``conf/model/*.yaml`` (any ``_target_``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_object
from torch import nn

from chaincomp.errors import ConfigError
from chaincomp.models.base import ClassifierHead, StagedNet
from chaincomp.models.resnet import BasicBlock, ResNet
from chaincomp.models.small_cnn import SmallCNN
from chaincomp.models.vgg import VGG, VGG_STAGES
from chaincomp.utils import config_dir

__all__ = [
    "VGG",
    "VGG_STAGES",
    "BasicBlock",
    "ClassifierHead",
    "ResNet",
    "SmallCNN",
    "StagedNet",
    "build_model",
    "check_output",
    "takes_argument",
]

# keys of a model config that describe it but are not constructor arguments
META_KEYS = ("name", "_target_")


def model_names() -> list[str]:
    """The model configs of ``conf/model/`` (what a config may name as a model)."""
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def takes_argument(model_cfg: Mapping[str, Any], name: str) -> bool | None:
    """Whether the constructor of ``model_cfg['_target_']`` accepts ``name`` (``**kwargs``
    counts); None when the target cannot be imported (:func:`build_model` says why)."""
    try:
        params = inspect.signature(get_object(str(model_cfg.get("_target_")))).parameters
    except Exception:
        return None
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_model(
    model_cfg: Mapping[str, Any], in_channels: int, num_outputs: int, input_size: tuple[int, int]
) -> nn.Module:
    """Instantiate ``model_cfg['_target_']`` with the config's other keys.

    The data-dependent arguments ``in_channels``, ``num_outputs`` and ``input_size`` are passed
    when the constructor accepts them (a user's own module may take none of them). The result is
    checked with :func:`check_output`.
    """
    cfg = dict(model_cfg)
    target = cfg.get("_target_")
    if not target:
        raise ConfigError(
            "model._target_", "missing", "a class path such as chaincomp.models.ResNet"
        )
    try:
        cls = get_object(str(target))
    except Exception as exc:
        cause = exc.__cause__ or exc  # Hydra wraps the ImportError in a multi-line message
        reason = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
        raise ConfigError(
            "model._target_", f"cannot import {target!r} ({reason})", "an importable class path"
        ) from None
    kwargs = {k: v for k, v in cfg.items() if k not in META_KEYS}
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    data_args = {
        "in_channels": in_channels,
        "num_outputs": num_outputs,
        "input_size": tuple(input_size),
    }
    for key, value in data_args.items():
        if accepts_any or key in params:
            kwargs.setdefault(key, value)
    unknown = [k for k in kwargs if not accepts_any and k not in params]
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", f"not an argument of {target}", sorted(params))
    try:
        net = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("model", f"{target} rejected its settings: {exc}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(
            "model._target_", f"{target} did not build an nn.Module", "an nn.Module class"
        )
    check_output(net, in_channels, num_outputs, input_size)
    return net


def check_output(
    net: nn.Module, in_channels: int, num_outputs: int, input_size: tuple[int, int]
) -> None:
    """Run a 2-sample forward and require an output of shape (2, num_outputs)."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, in_channels, *input_size))
    except Exception as exc:
        raise ConfigError(
            "model",
            f"forward on a ({in_channels}, {input_size[0]}, {input_size[1]}) input failed: {exc}",
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            "model",
            f"output {shape} does not fit the task",
            f"a tensor of shape (batch, {num_outputs}) for this data.task",
        )
