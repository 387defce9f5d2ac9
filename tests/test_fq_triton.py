"""The Triton fake quantizer (``CHAINCOMP_QUANT_KERNEL=triton``) against the eager one, run on
the CPU by Triton's interpreter. Skipped where Triton is not installed (``make setup`` installs
it). Forward values and input gradients must be identical to eager's on the same inputs, in
float32 and in bf16 (where eager rounds every intermediate to bf16); the LSQ step gradient
equals a float64 sum to float32 precision (eager's agrees in float32; in bf16 it multiplies in
bf16 first and is several percent off).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")  # conftest.py set TRITON_INTERPRET=1 before anything imported it

from chaincomp.errors import ConfigError
from chaincomp.layers import fq_triton
from chaincomp.layers.quant import _FakeQuant, fake_quant, quant_kernel

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter was not selected first"
)


def _both(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, g: torch.Tensor):  # type: ignore[no-untyped-def]
    """(y, grad_x, grad_step) of the eager node and of the Triton kernels."""
    out = []
    for apply in (_FakeQuant.apply, fq_triton.fake_quant_triton):
        xi = x.detach().clone().requires_grad_()
        si = step.detach().clone().requires_grad_(step.requires_grad)
        y = apply(xi, si, qmin, qmax)
        y.backward(g.to(y.dtype))
        out.append((y.detach(), xi.grad, si.grad))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_activations_match_eager(dtype: torch.dtype, layout: str) -> None:
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 7, 9) * 2).relu().to(dtype)  # unsigned 4 bits, after a ReLU
    x[0, 0, 0, :4] = torch.tensor([0.25, 0.75, 1.25, 30.0])  # ties at step 0.5, one clipped
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    step = torch.tensor(0.5, requires_grad=True)
    g = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    (y0, gx0, gs0), (y1, gx1, gs1) = _both(x, step, 0, 15, g)
    assert y1.dtype == y0.dtype and y1.stride() == y0.stride()
    assert torch.equal(y1, y0)
    assert torch.equal(gx1, gx0)
    # LSQ: sum(g * (q - t * inside)) over the elements, with eager's t (rounded to x's dtype)
    t = (x.float() / step.detach()).to(dtype).double()
    q, inside = t.clamp(0, 15).round(), ((t >= 0) & (t <= 15)).double()
    expected = (g.to(dtype).double() * (q - t * inside)).sum()
    assert abs(gs1.double() - expected) <= 1e-5 * abs(expected)
    if dtype == torch.float32:
        assert abs(gs0.double() - expected) <= 1e-5 * abs(expected)
    else:  # eager's terms and products are bf16, summed in float32: 0.09 % off here
        assert abs(gs0.double() - expected) <= 2e-3 * abs(expected)


@pytest.mark.parametrize("round_step", [False, True])
def test_bf16_rounds_where_eager_rounds(round_step: bool) -> None:
    """A step bf16 cannot hold (0.3): eager rounds ``x / step`` and ``q * step`` to bf16, and on
    CUDA reads the step itself in bf16 (here: eager given a bf16 step). Both match."""
    x = torch.linspace(-3, 3, 301).to(torch.bfloat16)
    step = torch.tensor(0.3)
    if round_step:
        eager = _FakeQuant.apply(x, step.to(torch.bfloat16), -8, 7)
        y = torch.empty_like(x)
        fwd, _ = fq_triton._kernels()
        fwd[(1,)](x, step, y, 301, 1, -8.0, 7.0, False, 1, True, fq_triton.BLOCK)
    else:
        eager, y = _FakeQuant.apply(x, step, -8, 7), fq_triton.fake_quant_triton(x, step, -8, 7)
    assert torch.equal(y, eager)
    exact = torch.round(torch.clamp(x.double() / 0.3, -8, 7)) * 0.3
    assert not torch.equal(eager.double(), exact)  # bf16 rounding did matter


def test_per_channel_weights_match_eager() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    step = (w.reshape(6, -1).abs().amax(dim=1) / 7).reshape(-1, 1, 1, 1)
    (y0, gx0, _), (y1, gx1, _) = _both(w, step, -7, 7, torch.randn(6, 4, 3, 3))
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)


def test_kernel_choice_is_validated_and_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    step = torch.tensor(0.25)
    monkeypatch.setenv("CHAINCOMP_QUANT_KERNEL", "fast")
    with pytest.raises(ConfigError, match="CHAINCOMP_QUANT_KERNEL.*allowed: eager, triton"):
        quant_kernel()
    monkeypatch.setenv("CHAINCOMP_QUANT_KERNEL", "triton")
    y = fake_quant(x, step, -8, 7)
    assert y.grad_fn is not None and "Triton" in type(y.grad_fn).__name__
    monkeypatch.delenv("CHAINCOMP_QUANT_KERNEL")
    assert "Triton" not in type(fake_quant(x, step, -8, 7).grad_fn).__name__


def test_a_quantized_net_trains_the_same_with_either_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One training step of a w4/a4 LSQ net (digits, small_cnn): the same loss and the same
    gradients with the Triton kernels as with the eager quantizer (step sizes within 1 %: eager's
    form cancels, the kernels sum each element's term)."""
    from chaincomp.layers.quant import QUANT_LAYERS
    from chaincomp.pipeline import build_data, build_module
    from chaincomp.stages.quantize import QuantizeSettings, quantize_module

    from .conftest import QUIET, compose_cfg

    cfg = compose_cfg("data=digits", "model=small_cnn", "model.width_mult=0.5", *QUIET)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    quantize_module(module, dm, QuantizeSettings(w_bits=4, a_bits=4, learn_scale=True))
    x, y = next(iter(dm.loader("train")))
    calls = []
    original = fq_triton.fake_quant_triton
    monkeypatch.setattr(fq_triton, "fake_quant_triton", lambda *a: calls.append(1) or original(*a))
    results = []
    for kernel in ("eager", "triton"):
        monkeypatch.setenv("CHAINCOMP_QUANT_KERNEL", kernel)
        module.zero_grad(set_to_none=True)
        loss = module.task.loss(module(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (loss0, g0), (loss1, g1) = results
    n_quant = sum(isinstance(m, QUANT_LAYERS) for m in module.modules())
    assert len(calls) == 2 * n_quant >= 4  # the triton pass quantized every input and weight
    assert loss1 == loss0 and g1.keys() == g0.keys() and any("step" in n for n in g0)
    for name in g0:
        if name.endswith("step"):
            # eager subtracts two large dot products (sum(g y) - sum(g_x x)): it cancels
            assert torch.allclose(g1[name], g0[name], rtol=1e-2, atol=1e-7), name
        else:
            assert torch.equal(g1[name], g0[name]), name


def test_nan_stays_nan_and_unsupported_steps_stay_eager() -> None:
    x = torch.tensor([float("nan"), 0.4, 9.0])
    step = torch.tensor(0.5)
    (y0, _, _), (y1, _, _) = _both(x, step, -8, 7, torch.ones(3))
    assert torch.equal(y1.nan_to_num(-1), y0.nan_to_num(-1))
    assert y1.isnan()[0]
    w = torch.randn(4, 2, 3, 3)
    assert fq_triton.supports(w, torch.ones(4, 1, 1, 1))
    assert not fq_triton.supports(w, torch.ones(4, 1, 1, 1, requires_grad=True))  # no step grad
    assert not fq_triton.supports(torch.randn(4, 4), torch.ones(1, 4))  # not per dim-0 index
    assert not fq_triton.supports(w.half(), torch.tensor(0.5))  # fp16: eager
