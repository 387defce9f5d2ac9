"""CompressibleModule + optimizer configs: real training on digits, loss terms, both tasks."""

from __future__ import annotations

import pytest
import torch

from chaincomp.errors import ConfigError
from chaincomp.optim import OPTIMIZERS, SCHEDULES, OptimConfig
from chaincomp.pipeline import build_data, build_module, fit, measure, trainer_config

from .conftest import compose_cfg

QUIET = ("trainer.enable_progress_bar=false", "tracking.enabled=false")


def test_training_on_digits_learns() -> None:
    cfg = compose_cfg("data=digits", "model=small_cnn", "trainer.max_epochs=3", *QUIET)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    before = measure(module, dm)["val_metric"]
    fit(module, dm, trainer_config(cfg))
    after = measure(module, dm)
    assert before < 30 and after["val_metric"] > 85
    assert after["macs"] > 0 and after["bitops"] == after["macs"] * 1024


def test_stage_loss_terms_are_added() -> None:
    cfg = compose_cfg("data=digits", "model=small_cnn", *QUIET)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    batch = next(iter(dm.loader("train", "cpu")))
    torch.manual_seed(0)
    module.eval()  # same BN statistics for both calls
    plain = module.training_step(batch, 0)
    module.loss_terms["const"] = lambda m, x, out, target: torch.tensor(5.0)
    with_term = module.training_step(batch, 0)
    assert with_term.item() == pytest.approx(plain.item() + 5.0, abs=1e-5)


def test_rotation_training_reports_mae_in_degrees() -> None:
    cfg = compose_cfg(
        "data=digits", "data.task=rotation", "model=small_cnn", "trainer.max_epochs=4", *QUIET
    )
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    untrained = measure(module, dm, ("val",))["val_metric"]
    fit(module, dm, trainer_config(cfg))
    trained = measure(module, dm, ("val",))["val_metric"]
    assert 0 < trained < untrained and untrained < 45  # degrees; uniform guessing ~22.5


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_optimizers_and_schedules_build_and_step(name: str, schedule: str) -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt, sched = OptimConfig(name=name, schedule=schedule, lr=0.1, warmup_fraction=0.1).build(
        [p], 20
    )
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(lr >= 0 for lr in lrs)
    if schedule != "constant":
        assert lrs[-1] < max(lrs)


def test_bad_optim_values_name_the_key() -> None:
    with pytest.raises(
        ConfigError, match="optim.name: unknown optimizer 'adam'; allowed: adamw, sgd"
    ):
        OptimConfig(name="adam")
    with pytest.raises(ConfigError, match="optim.schedule"):
        OptimConfig(schedule="step")
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0)
