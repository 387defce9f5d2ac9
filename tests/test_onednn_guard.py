"""The guard around oneDNN's corrupt weight gradients of small strided 1x1 convolutions
(``chaincomp.layers.onednn``; uxlfoundation/oneDNN issue 6035).

Unguarded, on this project's AVX2 machine (torch 2.13.0), the shapes below get weight gradients
off by 14-230 % of their size, different on every call. The tests hold on any machine: where the
kernel is right, the guard only changes the layout.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chaincomp.layers.onednn import guard_strided_1x1, is_affected
from chaincomp.pipeline import build_data, build_module, fit, trainer_config

from .conftest import QUIET, compose_cfg

CL = torch.channels_last


def _grads(conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    conv.weight.grad = None
    out = conv(x)
    out.backward(g)
    assert conv.weight.grad is not None and x.grad is not None
    return out.detach(), x.grad, conv.weight.grad


@pytest.mark.parametrize(("c_in", "c_out", "size"), [(4, 8, 8), (7, 15, 14), (7, 16, 28)])
def test_guarded_strided_1x1_gradients_equal_float64(c_in: int, c_out: int, size: int) -> None:
    """In channels_last (as a CPU fit leaves weights and batches), a guarded 1x1 stride-2
    convolution's output, input gradient and weight gradient equal a float64 computation to
    float32 precision, the same on every call, and its output stays channels_last."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False)
    ref = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False).double()
    ref.weight.data.copy_(conv.weight.data)
    x = torch.randn(32, c_in, size, size)
    g = torch.randn(32, c_out, (size + 1) // 2, (size + 1) // 2)
    expected = _grads(ref, x.double(), g.double())
    conv.to(memory_format=CL)
    guard = guard_strided_1x1(conv, block=8)
    assert guard.layers == [""]
    runs = [_grads(conv, x.contiguous(memory_format=CL), g.contiguous(memory_format=CL))]
    runs.append(_grads(conv, x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)))
    for got, want in zip(runs[0], expected, strict=True):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert runs[0][0].is_contiguous(memory_format=CL) and not runs[0][0].is_contiguous()
    guard.remove()
    assert not conv._forward_pre_hooks and not conv._forward_hooks


def test_only_small_strided_1x1_convolutions_are_guarded() -> None:
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1),  # 3x3: right in channels_last
        nn.Conv2d(8, 4, 1),  # stride 1
        nn.Conv2d(4, 16, 1, stride=2),  # 4 < 8 input channels: guarded
        nn.Conv2d(16, 16, 1, stride=2),  # a full channel block
        nn.Conv2d(16, 16, 1, stride=2, groups=4),  # 4 per group
    )
    assert [is_affected(m, block=8) for m in net] == [False, False, True, False, True]
    x = torch.randn(2, 4, 16, 16)
    expected = net(x)
    guard = guard_strided_1x1(net, block=8)
    assert guard.layers == ["2", "4"]
    out = net(x)  # an NCHW input passes untouched
    assert torch.equal(out, expected) and out.is_contiguous()
    guard.remove()
    with torch.backends.mkldnn.flags(enabled=False):  # trainer.cpu_onednn=false
        assert guard_strided_1x1(net, block=8).layers == []


def test_cpu_training_with_a_narrow_strided_shortcut_is_reproducible() -> None:
    """A ResNet-10 at 1/16 width has a 4 -> 8 channel stride-2 shortcut on 8x8 digits: two fits
    from the same start end bit-identical (unguarded, its weight gradient was garbage that
    differed per run), and the fit leaves no hooks behind."""
    cfg = compose_cfg(
        "data=digits",
        "model=resnet10",
        "model.width_mult=0.0625",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        *QUIET,
    )
    dm = build_data(cfg)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        module = build_module(cfg, dm)
        shortcut = module.net.get_submodule("stages.1.0.shortcut.0")
        assert isinstance(shortcut, nn.Conv2d) and shortcut.in_channels == 4
        start = shortcut.weight.detach().clone()
        fit(module, dm, trainer_config(cfg))
        assert not torch.equal(shortcut.weight, start)
        assert not shortcut._forward_pre_hooks and not shortcut._forward_hooks
        states.append(module.net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_fit_that_fails_leaves_no_hooks() -> None:
    """Lightning skips ``on_fit_end`` when a fit raises; ``pipeline.fit`` still removes the
    guard, so no hook stays on the net (or on copies made of it later)."""
    import pytorch_lightning as pl

    class Boom(pl.Callback):
        def on_train_batch_start(self, *args) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    cfg = compose_cfg(
        "data=digits",
        "model=resnet10",
        "model.width_mult=0.0625",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        *QUIET,
    )
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    shortcut = module.net.get_submodule("stages.1.0.shortcut.0")
    with pytest.raises(RuntimeError, match="boom"):
        fit(module, dm, trainer_config(cfg), [Boom()])
    assert not shortcut._forward_pre_hooks and not shortcut._forward_hooks
    guard = guard_strided_1x1(module.net, block=8)  # and it can be guarded again
    assert guard.layers == ["stages.1.0.shortcut.0"]
    assert guard_strided_1x1(module.net, block=8).layers == []  # a second guard skips it
    guard.remove()
