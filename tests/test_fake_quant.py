"""The fused fake quantizer (one autograd node with a hand-derived backward) against the same
function composed of autograd ops: same values, same gradients to the input and to the LSQ step,
on hand-checked numbers, on every layout and range the layers use, and through a whole net."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chaincomp.layers import quant
from chaincomp.layers.quant import (
    ActQuantizer,
    QuantConv2d,
    fake_quant,
    fake_quant_composed,
    grad_scale,
    quantize_net,
)


def test_hand_checked_values_and_gradients() -> None:
    # step 0.1, unsigned 4 bits: x / step = [0.5, 2.6, 20, -3]
    x = torch.tensor([0.05, 0.26, 2.0, -0.3], requires_grad=True)
    step = torch.tensor(0.1, requires_grad=True)
    y = fake_quant(x, step, 0, 15)
    # round half to even (0.5 -> 0), clamp at 15 and at 0
    assert torch.allclose(y, torch.tensor([0.0, 0.3, 1.5, 0.0]))
    y.sum().backward()
    assert x.grad is not None and step.grad is not None
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # straight through inside [0, 15] only
    # LSQ: round(t) - t inside, the clamped level outside: (0 - 0.5) + (3 - 2.6) + 15 + 0
    assert step.grad.item() == pytest.approx(14.9, abs=1e-5)


def test_the_range_ends_are_inside_and_just_beyond_is_outside() -> None:
    step = torch.tensor(1.0)
    x = torch.tensor([-8.0, 7.0, 7.3, -8.2], requires_grad=True)
    fake_quant(x, step, -8, 7).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def _both(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, scale: float | None):
    """Values and gradients (to x and step) of the fused and the composed forms."""
    out = []
    for fn in (fake_quant, fake_quant_composed):
        xi = x.detach().clone().requires_grad_(True)
        si = step.detach().clone().requires_grad_(step.requires_grad)
        s = grad_scale(si, scale) if scale is not None else si
        y = fn(xi, s.abs().clamp_min(1e-8), qmin, qmax)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (y * upstream).sum().backward()
        out.append((y.detach(), xi.grad, si.grad))
    return out


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_activation_fused_equals_composed(signed: bool, channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, 5, 5, generator=g) * 2
    if not signed:
        x = x.relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    qmin, qmax = (-8, 7) if signed else (0, 15)
    step = torch.tensor(0.17, requires_grad=True)
    (y1, gx1, gs1), (y2, gx2, gs2) = _both(x, step, qmin, qmax, scale=1 / (150 * qmax) ** 0.5)
    assert torch.equal(y1, y2)  # the same operations forward: identical values
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-7)
    assert (gx1 == 0).float().mean() > 0.02  # some inputs were clipped
    assert gs1 is not None and gs2 is not None
    assert torch.allclose(gs1, gs2, rtol=1e-4, atol=1e-6) and gs1.abs() > 0


@pytest.mark.parametrize("learned", [False, True])
def test_per_channel_step_fused_equals_composed(learned: bool) -> None:
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    q = quant.weight_levels(4)
    step = (w.reshape(6, -1).abs().amax(dim=1) / q).reshape(-1, 1, 1, 1) * 0.7  # some clipping
    step.requires_grad_(learned)
    (y1, gx1, gs1), (y2, gx2, gs2) = _both(w, step, -q, q, scale=None)
    assert torch.equal(y1, y2)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-7)
    if learned:
        assert gs1 is not None and gs1.shape == step.shape
        assert torch.allclose(gs1, gs2, rtol=1e-4, atol=1e-6)
    else:
        assert gs1 is None and gs2 is None


def _act_reference(x: torch.Tensor, step: torch.Tensor, g: float, qmin: int, qmax: int):  # type: ignore[no-untyped-def]
    """An activation quantizer as autograd ops: grad_scale, |.|, the floor, the composed form."""
    s = grad_scale(step, g) if g != 1.0 else step
    return fake_quant_composed(x, s.abs().clamp_min(1e-8), qmin, qmax)


def _weight_reference(w: torch.Tensor, bits: int) -> torch.Tensor:
    """A weight quantizer as autograd ops: the detached per-channel step, the composed form."""
    q = quant.weight_levels(bits)
    flat = w.reshape(w.shape[0], -1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    step = (flat.abs().amax(dim=1).clamp_min(1e-8) / q).reshape(shape).detach()
    return fake_quant_composed(w, step, -q, q)


@pytest.mark.parametrize(
    ("step_value", "g"), [(0.17, 0.02), (-0.17, 0.02), (0.17, 1.0), (3e-9, 0.02)]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_one_node_activation_quantizer_equals_its_composition(
    step_value: float, g: float, channels_last: bool
) -> None:
    """Values identical, gradients within rounding, for a positive and a negative learned step
    (|.| flips the gradient's sign), no gradient scale, and a step below the 1e-8 floor (the
    floor's gradient is 0 there)."""
    x = torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(0)) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = []
    for fn in (quant.act_fake_quant, _act_reference):
        xi = x.detach().clone().requires_grad_()
        si = torch.tensor(step_value, requires_grad=True)
        y = fn(xi, si, g, -8, 7)
        (y * upstream).sum().backward()
        out.append((y.detach(), xi.grad, si.grad))
    (y1, gx1, gs1), (y2, gx2, gs2) = out
    assert torch.equal(y1, y2) and y1.stride() == x.stride()
    # the node passes the gradient straight through; the composition divides by the step and
    # multiplies by it again, so it rounds
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-7)
    assert set(gx1.div(upstream).nan_to_num(0).unique().tolist()) <= {0.0, 1.0}
    assert gs1 is not None and gs2 is not None
    if abs(step_value) < 1e-8:
        assert gs1.item() == gs2.item() == 0.0
    else:
        assert torch.allclose(gs1, gs2, rtol=1e-5, atol=0) and gs1.abs() > 0


def test_the_one_node_activation_quantizer_in_the_layers_other_cases() -> None:
    """bf16 activations with a float32 step (the GPU chain's case), an input that needs no
    gradient while the step does (the first layer), and a step without a gradient."""
    x = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0)).relu() * 2
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for dtype, x_grad, step_grad in [
        (torch.bfloat16, True, True),
        (torch.float32, False, True),
        (torch.float32, True, False),
    ]:
        out = []
        for fn in (quant.act_fake_quant, _act_reference):
            xi = x.to(dtype).requires_grad_(x_grad)
            si = torch.tensor(0.3, requires_grad=step_grad)
            y = fn(xi, si, 0.05 if step_grad else 1.0, 0, 15)
            (y * upstream.to(dtype)).sum().backward()
            out.append((y.detach(), xi.grad, si.grad))
        (y1, gx1, gs1), (y2, gx2, gs2) = out
        assert y1.dtype == y2.dtype == dtype and torch.equal(y1, y2), dtype
        assert (gx1 is None) == (gx2 is None) == (not x_grad)
        if x_grad:
            assert torch.allclose(
                gx1.float(), gx2.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6
            )
        assert (gs1 is None) == (gs2 is None) == (not step_grad)
        if step_grad:
            # bf16: both sum bf16 products; they round at different points, within 1 %
            rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            assert torch.allclose(gs1, gs2, rtol=rtol) and gs1.abs() > 0, dtype
            # against LSQ's step gradient in float64 on the quantizer's own t = x / step
            # (rounded to x's dtype): g * sum(upstream * (level - t * inside)). bf16: the
            # one node is 0.06 % off, the composed reference 0.5 % (it rounds x / step^2)
            t = (x.to(dtype).float() / 0.3).to(dtype).double()
            inside = ((t >= 0) & (t <= 15)).double()
            exact = (
                0.05 * (upstream.to(dtype).double() * (t.clamp(0, 15).round() - t * inside)).sum()
            )
            tol = 2e-3 if dtype == torch.bfloat16 else 1e-5
            assert abs(gs1.double() - exact) <= tol * abs(exact), (dtype, float(gs1), float(exact))


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_one_node_weight_quantizer_equals_its_composition(
    shape: tuple[int, ...], bits: int
) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w[0] = 0.0  # an all-zero channel: the step's floor
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = []
    for fn in (quant.quantize_weight, _weight_reference):
        wi = w.clone().requires_grad_()
        y = fn(wi, bits)
        (y * upstream).sum().backward()
        out.append((y.detach(), wi.grad))
    (y1, g1), (y2, g2) = out
    assert torch.equal(y1, y2) and torch.allclose(g1, g2, rtol=1e-6, atol=1e-7)
    q = quant.weight_levels(bits)
    assert y1[1:].abs().amax() > 0 and (y1[0] == 0).all()
    levels = y1[1] / (y1[1].abs().amax() / q)
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the grid of row 1


def test_a_quantized_net_trains_the_same_with_either_form(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    quantize_net(net, {"0": [8, 8], "3": [4, 4], "7": [8, 8]}, learn_scale=True)
    x = torch.randn(16, 3, 8, 8)
    y = torch.randint(0, 5, (16,))
    acts = [m for m in net.modules() if isinstance(m, ActQuantizer)]
    for a in acts:
        a.observing = True
    net.eval()
    net(x)
    for a in acts:
        a.finish_calibration()
    net.train()
    grads = []
    for reference in (False, True):
        if reference:  # every quantizer composed of autograd ops, as the layers once were
            monkeypatch.setattr(quant, "act_fake_quant", _act_reference)
            monkeypatch.setattr(quant, "quantize_weight", _weight_reference)
        twin = copy.deepcopy(net)
        loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        grads.append((loss.detach(), {k: p.grad for k, p in twin.named_parameters()}))
    (l1, g1), (l2, g2) = grads
    assert torch.equal(l1, l2)
    assert isinstance(net[3], QuantConv2d) and "3.act_quant.step" in g1
    for k in g1:
        assert g1[k] is not None and g2[k] is not None, k
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6), k


def test_the_output_keeps_the_input_strides_of_a_one_channel_channels_last_batch() -> None:
    # (N, 1, H, W) normalised by a (1, C, 1, 1) mean comes with channels_last strides; a
    # convolution reading the quantized batch picks its layout from these strides
    x = (torch.rand(4, 1, 6, 6) - torch.zeros(1, 1, 1, 1)) / torch.ones(1, 1, 1, 1)
    x = x.as_strided(x.shape, (36, 1, 6, 1))
    y = fake_quant(x, torch.tensor(0.1), -128, 127)
    assert y.stride() == x.stride() == (36, 1, 6, 1)
    assert torch.equal(y, fake_quant_composed(x, torch.tensor(0.1), -128, 127))
