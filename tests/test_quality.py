"""Quality targets of the foundation, on real data (slow: minutes on 2 CPU cores)."""

from __future__ import annotations

import pytest

from chaincomp.pipeline import build_data, build_module, fit, measure, trainer_config
from chaincomp.utils import seed_everything

from .conftest import compose_cfg, needs_shared

pytestmark = pytest.mark.slow
QUIET = ("trainer.enable_progress_bar=false", "tracking.enabled=false")


def train(*overrides: str) -> dict:
    cfg = compose_cfg(*overrides, *QUIET)
    seed_everything(int(cfg.seed))  # as `chaincomp run` does: the same net every time
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    fit(module, dm, trainer_config(cfg))
    return measure(module, dm)


def test_digits_small_cnn_reaches_95_percent() -> None:
    assert train("data=digits", "model=small_cnn")["test_metric"] >= 95.0


@needs_shared
def test_fashion_mnist_small_resnet_reaches_90_percent() -> None:
    assert (
        train("data=fashion_mnist", "model=resnet10", "trainer.max_epochs=4")["test_metric"] >= 90.0
    )


@needs_shared
def test_fashion_mnist_rotation_mae_at_most_8_degrees() -> None:
    result = train(
        "data=fashion_mnist", "data.task=rotation", "model=resnet10", "trainer.max_epochs=6"
    )
    assert result["test_metric"] <= 8.0
