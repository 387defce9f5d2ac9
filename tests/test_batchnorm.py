"""The fast CPU batch norm (chaincomp.layers.batchnorm): PyTorch's arithmetic, on the layers and
calls it is meant for, only during a fit."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from chaincomp.layers import batchnorm
from chaincomp.layers.batchnorm import ChannelsLastBatchNorm, applies, fast_batchnorm, fold


def _run(bn: nn.BatchNorm2d, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = bn(x)
    out.backward(grad)
    assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
    return {
        "out": out.detach(),
        "grad_x": x.grad,
        "grad_w": bn.weight.grad,
        "grad_b": bn.bias.grad,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
        "tracked": bn.num_batches_tracked.clone(),
    }


def _bn(channels: int, seed: int = 0) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():  # not the identity: a weight, bias and running stats of their own
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


# channels that fill no AVX2 / AVX-512 vector; 5 x 5 x 3 samples: N*H*W not divisible by the fold
@pytest.mark.parametrize(
    ("channels", "shape"), [(12, (16, 14, 14)), (10, (8, 7, 7)), (21, (3, 5, 5))]
)
def test_it_computes_what_pytorch_computes(channels: int, shape: tuple[int, int, int]) -> None:
    """Output, all three gradients and the running statistics agree with PyTorch's batch norm in
    float64 (the exact answer) as closely as PyTorch's own float32 kernel does, within a small
    factor; the batch counter moves the same."""
    n, h, w = shape
    torch.manual_seed(1)
    x = (torch.randn(n, channels, h, w) * 3 + 1).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, channels, h, w).contiguous(memory_format=torch.channels_last)
    exact = _run(_bn(channels).double(), x.double(), grad.double())
    native = _run(_bn(channels), x, grad)
    fast_bn = _bn(channels)
    handle = fast_batchnorm(fast_bn)
    assert applies(fast_bn, x)
    fast = _run(fast_bn, x, grad)
    handle.remove()
    assert fast["out"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast["tracked"], native["tracked"])
    for key in ("out", "grad_x", "grad_w", "grad_b", "running_mean", "running_var"):
        scale = exact[key].abs().max().item()
        err_native = (native[key].double() - exact[key]).abs().max().item()
        err_fast = (fast[key].double() - exact[key]).abs().max().item()
        assert err_fast <= 4 * err_native + 1e-6 * scale, key


def test_it_takes_only_the_calls_it_is_meant_for(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = ChannelsLastBatchNorm.apply
    monkeypatch.setattr(
        ChannelsLastBatchNorm, "apply", lambda *a: calls.append(a[0].shape[1]) or real(*a)
    )
    cl = torch.channels_last
    net = nn.Sequential(nn.BatchNorm2d(12), nn.Conv2d(12, 16, 1), nn.BatchNorm2d(16))
    handle = fast_batchnorm(net)
    assert handle.layers == ["0", "2"]
    net(torch.randn(4, 12, 6, 6).contiguous(memory_format=cl))
    assert calls == [12]  # 16 channels fill the vectors (8 or 16 floats): PyTorch's kernel
    net(torch.randn(4, 12, 6, 6))  # NCHW
    net.eval()
    net(torch.randn(4, 12, 6, 6).contiguous(memory_format=cl))
    assert calls == [12]
    handle.remove()
    net.train()
    net(torch.randn(4, 12, 6, 6).contiguous(memory_format=cl))
    assert calls == [12] and "forward" not in net[0].__dict__


def test_fold_fills_a_vector_or_gives_up() -> None:
    assert fold(12, 128 * 784, 16) == 4 and fold(10, 128 * 784, 16) == 8
    assert fold(12, 128 * 784, 8) == 2 and fold(16, 6, 16) == 1 and fold(12, 75, 16) == 1


@pytest.mark.parametrize("enabled", [True, False])
def test_a_fit_trains_through_it_when_the_trainer_says_so(  # type: ignore[no-untyped-def]
    digits_base: Any, enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trainer.cpu_fast_batchnorm`` decides whether a fit's batch norms run the fast kernel
    (its Function is called in every training step, or never); after the fit every layer has
    PyTorch's forward back. A vector of 32 floats makes the digits net's 8- and 16-channel
    batch norms qualify on any CPU, and leaves its 32-channel ones to PyTorch."""
    import pytorch_lightning as pl

    from chaincomp.pipeline import build_module, fit, trainer_config

    monkeypatch.setattr(batchnorm, "vector_width", lambda: 32)
    calls = [0]
    real = ChannelsLastBatchNorm.apply

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(ChannelsLastBatchNorm, "apply", counted)
    cfg, dm, net = digits_base
    tcfg = dataclasses.replace(trainer_config(cfg), cpu_fast_batchnorm=enabled, max_epochs=1)
    module = build_module(cfg, dm, copy.deepcopy(net))
    bns = [m for m in module.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    per_step: list[int] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            self.before = calls[0]

        def on_train_batch_end(self, *args: Any) -> None:
            per_step.append(calls[0] - self.before)

    fit(module, dm, tcfg, [Spy()])
    # the 8- and 16-channel layers take it, the 32-channel ones (a full vector) do not
    odd = sum(m.num_features % 32 != 0 for m in bns)
    assert 0 < odd < len(bns)
    assert per_step and set(per_step) == ({odd} if enabled else {0})
    assert not any("forward" in m.__dict__ for m in bns)


def test_a_switched_net_copies_and_pickles_and_refuses_double_backward() -> None:
    import pickle

    net = nn.Sequential(nn.BatchNorm2d(12))
    fast_batchnorm(net)
    x = torch.randn(4, 12, 6, 6).contiguous(memory_format=torch.channels_last)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        twin(x)  # the copy's own layer counts the batch, not the original's
        assert int(twin[0].num_batches_tracked) == 1 and int(net[0].num_batches_tracked) == 0
    out = net(x.requires_grad_(True))
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), x)


def test_vector_width_follows_atens_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    batchnorm.vector_width.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert batchnorm.vector_width() == 8
    batchnorm.vector_width.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert batchnorm.vector_width() == 16
    batchnorm.vector_width.cache_clear()
