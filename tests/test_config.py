"""The config tree composes for every group option; bad values fail with the key named."""

from __future__ import annotations

import pytest

from chaincomp.data import DataConfig
from chaincomp.errors import ConfigError
from chaincomp.pipeline import optim_config, tracking_config, trainer_config

from .conftest import CONF, compose_cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("data", options("data"))
def test_every_data_option_composes_and_validates(data: str) -> None:
    over = [f"data={data}"] + (["data.path=/somewhere"] if data == "imagefolder" else [])
    cfg = compose_cfg(*over)
    dc = DataConfig.from_dict(dict(cfg.data))
    assert dc.name == data


@pytest.mark.parametrize("group", ["optim", "trainer", "tracking"])
def test_every_option_of_the_other_groups_validates(group: str) -> None:
    build = {"optim": optim_config, "trainer": trainer_config, "tracking": tracking_config}[group]
    for option in options(group):
        if option == "gpu":
            continue  # needs CUDA; checked in test_gpu_trainer_needs_cuda
        build(compose_cfg(f"{group}={option}"))


def test_gpu_trainer_needs_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="trainer.accelerator: gpu requested but no CUDA device"):
        trainer_config(compose_cfg("trainer=gpu"))


def test_bad_values_fail_with_the_key() -> None:
    with pytest.raises(ConfigError, match="trainer.precision"):
        trainer_config(compose_cfg("trainer.precision=fp8"))
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        trainer_config(compose_cfg("trainer.max_epochs=-1"))
    with pytest.raises(ConfigError, match="optim.name"):
        optim_config(compose_cfg("optim.name=lbfgs"))


def test_unknown_key_is_rejected_by_hydra() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="data.colour"):
        compose_cfg("data.colour=1")


def test_defaults() -> None:
    cfg = compose_cfg()
    assert cfg.data.name == "digits" and cfg.model.name == "small_cnn"
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
