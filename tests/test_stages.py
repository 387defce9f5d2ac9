"""Real effects of each stage: channels gone, weights on the grid, exits taken, KD loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from chaincomp.cost import count_cost
from chaincomp.stages import (
    Distill,
    EarlyExit,
    ExitNet,
    Prune,
    QuantConv2d,
    Quantize,
    QuantLinear,
)
from chaincomp.stages.early_exit import attach_exits, collect, simulate
from chaincomp.stages.quantize import ActQuantizer, weight_levels
from chaincomp.tasks import Classification, Rotation

from .conftest import make_ctx


def _conv_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}


def test_prune_removes_channels_and_the_macs_they_account_for(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    example = dm.example_input(1)
    before = count_cost(module.net, example)
    shapes0 = _conv_shapes(module.net)
    stage = Prune.from_config({"ratio": 0.5, "epochs": 0})
    record = stage.run(module, make_ctx(cfg, dm))
    after = count_cost(module.net, example)
    shapes1 = _conv_shapes(module.net)
    # every inner conv lost channels; the input conv keeps its 1 input channel
    assert all(shapes1[n][0] < shapes0[n][0] for n in shapes0)
    assert shapes1["stem.0"][1] == shapes0["stem.0"][1] == 1
    # the parameters are physically smaller, not zeroed
    assert (
        sum(p.numel() for p in module.net.parameters())
        < 0.4 * sum(math.prod(s) for s in shapes0.values()) + 10_000
    )
    # MACs fall by exactly what the removed channels account for: per conv, the MACs scale by
    # (C_in' * C_out') / (C_in * C_out) at the same output size
    expected = 0
    for layer in before.layers:
        if layer.kind == "conv":
            s0, s1 = shapes0[layer.name], shapes1[layer.name]
            expected += layer.macs * (s1[0] * s1[1]) // (s0[0] * s0[1])
        else:
            lin = module.net.get_submodule(layer.name)
            expected += lin.in_features * lin.out_features
    assert after.macs == expected
    assert record["macs"] == [before.macs, after.macs]
    assert stage.summary()["macs_reduction"] > 0.6  # ~1 - 0.5^2 for the inner convs


def test_prune_macs_target(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    before = count_cost(digits_module.net, dm.example_input(1)).macs
    Prune.from_config({"macs_target": 0.5, "epochs": 0}).run(digits_module, make_ctx(cfg, dm))
    after = count_cost(digits_module.net, dm.example_input(1)).macs
    assert 0.3 * before < after <= 0.5 * before


def test_prune_with_exit_heads_and_quantized_layers(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    ctx = make_ctx(cfg, dm)
    q = Quantize.from_config({"epochs": 0, "w_bits": 4, "a_bits": 4})
    ctx.records.append(q.run(module, ctx))
    e = EarlyExit.from_config({"epochs": 0, "threshold_mode": "fixed"})
    ctx.records.append(e.run(module, ctx))
    net = module.net
    assert isinstance(net, ExitNet)
    Prune.from_config({"ratio": 0.5, "epochs": 0}).run(module, ctx)
    assert isinstance(module.net, ExitNet)
    channels = net.backbone.exit_channels()
    for k, p in enumerate(net.points):  # each head's input follows its stage's pruned output
        head_conv = next(m for m in net.exits[k].modules() if isinstance(m, nn.Conv2d))
        assert isinstance(head_conv, QuantConv2d)
        assert head_conv.in_channels == channels[p] < 32
    outs = net.forward_all(dm.example_input(3))
    assert all(o.shape == (3, dm.num_outputs) for o in outs)
    assert all(isinstance(m, QuantConv2d) for m in net.modules() if isinstance(m, nn.Conv2d))


def test_quantized_weights_lie_on_2_pow_b_levels_per_channel(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    Quantize.from_config({"epochs": 1, "w_bits": 3, "a_bits": 4}).run(
        module, make_ctx(cfg, dm, max_batches=3)
    )
    layers = [m for m in module.net.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert layers and len(layers) == sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.net.modules()
    )
    first = module.net.stem[0]
    assert (first.weight_bits, first.act_bits) == (8, 8)
    assert (module.net.head.fc.weight_bits, module.net.head.fc.act_bits) == (8, 8)
    for m in layers:
        wq = m.quantized_weight().detach().reshape(m.weight.shape[0], -1)
        for row in wq:
            assert len(torch.unique(row)) <= 2**m.weight_bits
        if m is not first and not isinstance(m, QuantLinear):
            assert m.weight_bits == 3 and m.act_bits == 4
    # activations: unsigned after ReLU, at most 2^a levels
    x, _ = next(iter(dm.loader("val", "cpu")))
    seen: list[torch.Tensor] = []
    quant = module.net.stages[0][0][0].act_quant
    handle = quant.register_forward_hook(lambda m, i, o: seen.append(o))
    module.eval()
    module(x)
    handle.remove()
    assert not quant.is_signed and len(torch.unique(seen[0])) <= 2**4
    assert module.net.stem[0].act_quant.is_signed  # the normalised image has negative values
    # the counter reads the bits that were set
    report = count_cost(module.net, dm.example_input(1))
    for layer in report.layers:
        mod = module.net.get_submodule(layer.name)
        assert layer.bitops == layer.macs * mod.weight_bits * mod.act_bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_grid_and_straight_through_gradient(bits: int) -> None:
    conv = QuantConv2d(4, 6, 3, weight_bits=bits, act_bits=8)
    wq = conv.quantized_weight()
    for row in wq.detach().reshape(6, -1):
        assert len(torch.unique(row)) <= (2 if bits == 1 else 2 * weight_levels(bits) + 1)
    wq.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_learned_activation_step_gets_a_gradient() -> None:
    q = ActQuantizer(4, learn_scale=True)
    q.observing = True
    q(torch.rand(8, 3) * 2)
    q.finish_calibration()
    q.train()
    y = q(torch.rand(8, 3) * 3)
    y.sum().backward()
    assert q.step.grad is not None and q.step.grad != 0


def _exit_module(digits_base, digits_module):  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    stage = EarlyExit.from_config({"epochs": 1, "threshold_mode": "fixed", "threshold": 0.9})
    stage.run(module, make_ctx(cfg, dm, max_batches=5))
    return cfg, dm, module


def test_threshold_zero_exits_everything_at_the_first_head(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    from chaincomp.pipeline import measure

    _cfg, dm, module = _exit_module(digits_base, digits_module)
    net = module.net
    net.threshold.fill_(0.0)
    row = measure(module, dm)
    n_test = len(dm._splits["test"][0])
    assert net.exit_counts[0].item() == n_test and net.exit_counts[1:].sum().item() == 0
    assert row["test_exit_rates"][0] == 1.0
    report = count_cost(net, dm.example_input(1))
    prefix = report.sum(["backbone.stem", "backbone.stages.0", "exits.0"])
    assert row["bitops"] == prefix < report.bitops


def test_threshold_above_one_exits_nothing_early(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    from chaincomp.pipeline import measure

    _cfg, dm, module = _exit_module(digits_base, digits_module)
    net = module.net
    net.threshold.fill_(1.01)
    row = measure(module, dm)
    assert row["test_exit_rates"][-1] == 1.0
    report = count_cost(net, dm.example_input(1))
    assert row["bitops"] == report.bitops
    x, _ = next(iter(dm.loader("test", "cpu")))
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module(x), net.forward_all(x)[-1], atol=1e-5)


def test_dynamic_inference_matches_simulation_and_rates_sum_to_one(
    digits_base, digits_module
) -> None:  # type: ignore[no-untyped-def]
    from chaincomp.pipeline import measure

    _cfg, dm, module = _exit_module(digits_base, digits_module)
    net = module.net
    outs, target = collect(module, dm.loader("test", "cpu"))
    net.threshold.fill_(module.task.confidence(outs[0]).median().item())
    row = measure(module, dm)
    rates = row["test_exit_rates"]
    assert sum(rates) == pytest.approx(1.0) and 0.3 < rates[0] < 0.7  # ~half leave at the first
    metric, sim_rates, _ = simulate(module.task, outs, target, float(net.threshold))
    assert metric == pytest.approx(row["test_metric"], abs=1e-6)
    assert sim_rates == pytest.approx(rates)
    report = count_cost(net, dm.example_input(1))
    assert row["bitops"] < report.bitops


def test_validation_threshold_keeps_the_metric_within_max_loss(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    stage = EarlyExit.from_config({"epochs": 1, "max_loss": 1.0})
    record = stage.run(module, make_ctx(cfg, dm, max_batches=5))
    sel = record["val_selection"]
    assert sel["metric"] >= sel["full_metric"] - 1.0
    assert sum(sel["rates"]) == pytest.approx(1.0)
    # heads that no validation sample leaves at are removed; the rest are the record's points
    net = module.net
    assert net.points == record["points"] and len(net.exits) == len(net.points)
    assert set(record["dropped_points"]) | set(net.points) == {0, 1}
    used = [r for r in sel["rates"][:-1] if r > 0]
    assert len(used) == len(net.points)


def test_frozen_backbone_is_not_trained(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    EarlyExit.from_config({"epochs": 1}).run(module, make_ctx(cfg, dm, max_batches=5))
    after = module.net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)


def test_kd_loss_with_alpha_zero_is_the_task_loss(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    stage = Distill.from_config({"alpha": 0.0, "width_mult": 0.5})
    stage.apply(module, make_ctx(cfg, dm))
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    batch = next(iter(dm.loader("train", "cpu")))
    module.eval()
    loss = module.training_step(batch, 0)
    assert loss.item() == pytest.approx(
        module.task.loss(module(batch[0]), batch[1]).item(), abs=1e-6
    )
    # with alpha > 0 the KD term is in the loss
    stage2 = Distill.from_config({"alpha": 0.5, "temperature": 2.0})
    stage2.apply(module, make_ctx(cfg, dm))
    assert "kd" in module.loss_terms and module.task_weight == 0.5


def test_distill_losses() -> None:
    s = torch.randn(5, 10)
    t = torch.randn(5, 10)
    cls = Classification()
    assert cls.distill_loss(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert cls.distill_loss(s, t, 4.0).item() > 0
    rot = Rotation()
    out = torch.tensor([[0.2, -1.0], [0.5, -2.0]])
    teacher = torch.tensor([[0.1, 0.0], [0.4, 0.0]])
    assert rot.distill_loss(out, teacher, 1.0).item() == pytest.approx(
        rot.loss(out, teacher[:, 0]).item()
    )


def test_distill_transfers_bits_and_exits_and_drops_pruning(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    ctx = make_ctx(cfg, dm, max_batches=3)
    for stage in (Prune.from_config({"ratio": 0.3, "epochs": 0}),
                  Quantize.from_config({"epochs": 0, "w_bits": 2}),
                  EarlyExit.from_config({"epochs": 0, "threshold_mode": "fixed"})):  # fmt: skip
        ctx.records.append(stage.run(module, ctx))
    teacher = module.net
    record = Distill.from_config({"epochs": 1, "width_mult": 0.5}).run(module, ctx)
    student = module.net
    assert student is not teacher and isinstance(student, ExitNet)
    assert student.points == teacher.points == [0, 1]
    assert record["transferred"] == ["early_exit", "quantize"] and record["dropped"] == ["prune"]
    inner = [m for n, m in student.named_modules() if isinstance(m, QuantConv2d) and "stem" not in n
             and "exits" not in n]  # fmt: skip
    assert inner and all(m.weight_bits == 2 for m in inner)
    assert record["model"]["width_mult"] == pytest.approx(0.25)
    assert not module.loss_terms and module.task_weight == 1.0


def test_attach_exits_rejects_unknown_points(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    from chaincomp.errors import ConfigError

    _, dm, _ = digits_base
    with pytest.raises(ConfigError, match="stage.early_exit.points"):
        attach_exits(digits_module, [7], "conv", 1.0, dm.example_input(1), 1.0)


def test_an_exitnet_whose_heads_are_all_dropped_is_the_backbone(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    from chaincomp.pipeline import measure

    _cfg, dm, module = _exit_module(digits_base, digits_module)
    net = module.net
    assert net.drop_exits(set()) == [0, 1] and net.points == []
    row = measure(module, dm)
    assert row["test_exit_rates"] == [1.0]
    assert row["bitops"] == count_cost(net.backbone, dm.example_input(1)).bitops
