"""A user's own model (no ``width_mult`` argument) through all four steps: D's generic student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from chaincomp.chain import CacheStats, load_chain, run_chain
from chaincomp.models import ResNet, SmallCNN
from chaincomp.models.thin import TARGET, thinned
from chaincomp.pipeline import build_data, build_module, measure
from chaincomp.stages.prune import shapes_of

from .conftest import QUIET, compose_cfg
from .user_models import TinyMobileNet

MOBILE = ("model=custom", "model._target_=tests.user_models.TinyMobileNet")


@pytest.mark.parametrize(
    ("cfg", "native"),
    [
        (
            {
                "_target_": "chaincomp.models.ResNet",
                "blocks": [1, 1, 1, 1],
                "widths": [16, 32, 64, 128],
            },
            lambda: ResNet(3, 10, (1, 1, 1, 1), (16, 32, 64, 128), width_mult=0.5),
        ),
        (
            {"_target_": "chaincomp.models.SmallCNN", "widths": [16, 32, 64]},
            lambda: SmallCNN(3, 10, (16, 16), (16, 32, 64), width_mult=0.5),
        ),
    ],
    ids=["resnet", "small_cnn"],
)
def test_thinned_equals_the_models_own_width_mult(cfg, native) -> None:  # type: ignore[no-untyped-def]
    """For a model that has its own ``width_mult``, the generic thinning (dependency groups of
    the traced graph, residual additions included) gives exactly the shapes of its constructor."""
    thin = thinned(cfg, 0.5, 3, 10, (16, 16))
    assert type(thin) is type(native())
    assert shapes_of(thin) == shapes_of(native())


def test_thinned_mobilenet_keeps_depthwise_and_residuals_consistent() -> None:
    full = TinyMobileNet(1, 10)
    thin = thinned({"_target_": "tests.user_models.TinyMobileNet"}, 0.5, 1, 10, (8, 8))
    assert type(thin) is TinyMobileNet
    pairs = [
        (a, b)
        for a, b in zip(full.modules(), thin.modules(), strict=True)
        if isinstance(a, nn.Conv2d)
    ]
    assert len(pairs) == 20
    for a, b in pairs:
        assert b.out_channels == round(a.out_channels * 0.5)
        if a.groups > 1:  # depthwise stays depthwise: one filter per channel
            assert b.groups == b.in_channels == b.out_channels
    # 16/24/32 blocks with expansion 4 -> 8/12/16 with 32/48/64 hidden; the head keeps 10 outputs
    assert thin.exit_channels() == [8, 12, 32]
    assert thin.head.fc.in_features == 32 and thin.head.fc.out_features == 10
    # re-initialized: batch-norm statistics back to their defaults, weights within the default
    # init's bound for the *new* fan-in (kaiming uniform, a = sqrt(5): 1 / sqrt(fan_in))
    for m in thin.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.weight.detach(), torch.ones_like(m.weight))
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max() <= fan_in**-0.5 + 1e-6
    assert thin(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # at a tiny width every group keeps at least one channel, and the net still runs
    tiny = thinned({"_target_": "tests.user_models.TinyMobileNet"}, 0.05, 1, 10, (8, 8))
    assert min(m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)) == 1
    assert tiny(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_default_dpqe_chain_runs_on_a_mobilenet_style_user_model(tmp_path: Path) -> None:
    """The default chain D -> P -> Q -> E on a model that takes no ``width_mult``: D thins it,
    P prunes the depthwise groups, Q quantizes, E attaches exits; the saved chain replays."""
    cfg = compose_cfg(
        "data=digits",
        *MOBILE,
        "trainer.max_epochs=6",
        "chain.steps.D.settings.epochs=6",
        "chain.steps.P.settings.epochs=2",
        "chain.steps.Q.settings.epochs=2",
        f"chain.cache_dir={tmp_path / 'cache'}",
        *QUIET,
    )
    stats = CacheStats()
    result = run_chain(cfg, tmp_path / "run", stats=stats)
    assert result.letters == "DPQE" and stats.executed == 4
    d, p = result.records[0], result.records[1]
    assert d["stage"] == "distill" and d["model"]["_target_"] == TARGET
    assert d["model"]["base"]["_target_"] == "tests.user_models.TinyMobileNet"
    assert d["model"]["width_mult"] == 0.5
    rows = {s.name: s for s in result.steps}
    assert rows["D"].params < 0.4 * rows["baseline"].params  # about a quarter: 0.5^2 on 1x1 convs
    assert p["stage"] == "prune" and p["channels"][1] < p["channels"][0]
    assert result.bitops_ratio > 20
    assert result.last.test_metric > 0.5  # a working classifier (10 classes: chance is 0.1)
    # the chain reloads from its directory into the thinned architecture, same outputs
    dm = build_data(cfg)
    fresh = load_chain(tmp_path / "run" / "chain", build_module(cfg, dm))
    row = measure(fresh, dm)
    assert row["test_metric"] == result.last.test_metric and row["bitops"] == result.last.bitops
