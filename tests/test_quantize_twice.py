"""Q after Q: new bit widths replace the old ones, and the activation quantizers are
re-calibrated for them (a step size calibrated for 4 bits is meaningless at 8)."""

from __future__ import annotations

import torch

from chaincomp.stages import QuantConv2d, Quantize

from .conftest import make_ctx


def _inner_convs(net: torch.nn.Module) -> list[QuantConv2d]:
    return [m for m in net.modules() if isinstance(m, QuantConv2d) and m.weight_bits != 8]


def _input_levels(module, layer: QuantConv2d, x: torch.Tensor) -> int:  # type: ignore[no-untyped-def]
    """How many distinct values the layer's quantized input takes on ``x``."""
    seen: list[torch.Tensor] = []
    hook = layer.act_quant.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    module.eval()
    with torch.no_grad():
        module(x)
    hook.remove()
    return int(seen[0].unique().numel())


def test_quantize_after_quantize_recalibrates_new_activation_bits(
    digits_base, digits_module
) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    ctx = make_ctx(cfg, dm)
    x, _ = next(iter(dm.loader("val", "cpu")))
    first = Quantize.from_config({"epochs": 0, "w_bits": 4, "a_bits": 2, "learn_scale": False})
    ctx.records.append(first.run(digits_module, ctx))
    layers = _inner_convs(digits_module.net)
    assert layers and all(m.act_bits == 2 for m in layers)
    steps2 = [float(m.act_quant.step) for m in layers]
    assert max(_input_levels(digits_module, m, x) for m in layers) <= 4  # 2 bits: 4 levels

    second = Quantize.from_config({"epochs": 0, "w_bits": 4, "a_bits": 8, "learn_scale": True})
    second.run(digits_module, ctx)
    layers = _inner_convs(digits_module.net)
    for m, old in zip(layers, steps2, strict=True):
        q = m.act_quant
        assert m.act_bits == 8 and q.bits == 8 and q.is_calibrated
        # re-calibrated: the step spans the observed range in 255 steps (not 3 as before)
        assert float(q.step) == torch.tensor(float(q.observed_max) / 255).item()
        assert float(q.step) < old / 20
        assert q.step.requires_grad  # the later step's learn_scale applies
    assert max(_input_levels(digits_module, m, x) for m in layers) > 16


def test_quantize_after_quantize_with_same_bits_keeps_the_calibration(
    digits_base, digits_module
) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    ctx = make_ctx(cfg, dm)
    settings = {"epochs": 0, "w_bits": 4, "a_bits": 4, "learn_scale": False}
    ctx.records.append(Quantize.from_config(settings).run(digits_module, ctx))
    before = {n: p.detach().clone() for n, p in digits_module.net.state_dict().items()}
    Quantize.from_config({**settings, "w_bits": 3}).run(digits_module, ctx)
    after = digits_module.net.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing re-observed
    assert all(m.weight_bits == 3 for m in _inner_convs(digits_module.net))
