"""Model zoo: every conf/model/*.yaml builds for every input/task shape; exits; custom modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from omegaconf import OmegaConf
from torch import nn

from chaincomp.cost import count_cost
from chaincomp.errors import ConfigError
from chaincomp.models import ResNet, StagedNet, build_model

from .conftest import CONF

MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "custom")


def model_cfg(name: str, **over: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    assert isinstance(cfg, dict)
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("shape,outputs", [((1, 8, 8), 10), ((1, 28, 28), 2), ((3, 32, 32), 10)])
def test_every_model_config_builds_for_every_shape(
    name: str, shape: tuple[int, int, int], outputs: int
) -> None:
    kw = {"width_mult": 0.25}
    net = build_model(model_cfg(name, **kw), shape[0], outputs, shape[1:])
    assert isinstance(net, StagedNet)
    net.eval()
    x = torch.randn(3, *shape)
    assert net(x).shape == (3, outputs)
    feats = net.forward_stages(x)
    assert len(feats) == len(net.exit_points()) == len(net.exit_channels())
    assert [f.shape[1] for f in feats] == net.exit_channels()
    assert net.exit_points()[0] == "stages.0"


def test_width_multiplier_scales_channels() -> None:
    full = ResNet(3, 10, (2, 2, 2, 2))
    half = ResNet(3, 10, (2, 2, 2, 2), width_mult=0.5)
    assert full.exit_channels() == [64, 128, 256, 512]
    assert half.exit_channels() == [32, 64, 128, 256]
    # MACs of a conv net scale with the square of the width (all but the stem input / head)
    ratio = count_cost(half, (1, 3, 32, 32)).macs / count_cost(full, (1, 3, 32, 32)).macs
    assert 0.24 < ratio < 0.27


class TinyUserNet(nn.Module):
    """A user's own module: no chaincomp arguments at all."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_custom_target_module() -> None:
    net = build_model({"_target_": f"{__name__}.TinyUserNet", "hidden": 5}, 1, 10, (8, 8))
    assert isinstance(net, TinyUserNet)
    assert net.body[3].in_features == 5


def test_custom_module_whose_output_does_not_fit_the_task() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model: output \(2, 10\) does not fit the task; allowed: a tensor of shape \(batch, 2\)",
    ):
        build_model({"_target_": f"{__name__}.TinyUserNet"}, 1, 2, (8, 8))
    with pytest.raises(ConfigError, match=r"model: output \(2, 1, 8, 8\) does not fit"):
        build_model({"_target_": "torch.nn.Identity"}, 1, 10, (8, 8))


def test_model_config_errors_name_the_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.depth: not an argument of chaincomp.models.ResNet; allowed: .*blocks",
    ):
        build_model(model_cfg("resnet18", depth=3), 3, 10, (32, 32))
    with pytest.raises(ConfigError, match="model._target_: cannot import 'nope.Net'"):
        build_model({"_target_": "nope.Net"}, 3, 10, (32, 32))


def test_resnet_is_traceable_by_torch_pruning() -> None:
    net = ResNet(3, 10, (1, 1, 1, 1), width_mult=0.25)
    example = torch.randn(1, 3, 32, 32)
    before = count_cost(net, example).macs
    pruner = tp.pruner.MetaPruner(
        net,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[net.head.fc],
    )
    pruner.step()
    assert net(example).shape == (1, 10)
    assert net.exit_channels() == [8, 16, 32, 64]
    assert count_cost(net, example).macs < 0.3 * before


def test_reference_model_files_exist() -> None:
    for name in ("small_cnn", "resnet18", "resnet34", "vgg11", "vgg16", "custom"):
        assert Path(CONF / "model" / f"{name}.yaml").is_file()
