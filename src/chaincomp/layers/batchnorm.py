"""A faster CPU batch norm for training in channels_last when the channel count fills no vector.

PyTorch's CPU batch-norm kernels for a channels_last input vectorize along the channels. When
the channel count is not a multiple of the vector width (16 floats with AVX-512, 8 with AVX2),
every pixel's channels run through the scalar remainder loop: a 12-channel batch norm on a
128 x 28 x 28 batch took 17 ms forward + backward on a 2-core AVX-512 machine (torch 2.13),
against 3.7 ms in NCHW and 5.8 ms with 16 channels. Narrow students (D at ``width_mult`` 0.75
of a 16-channel stem gives 12) and pruned nets (any count) have such layers, and with them a
step of the demo's 0.75-wide student cost more than one of its full-width teacher.

:func:`fast_batchnorm` routes the training-mode forward of every such ``nn.BatchNorm2d`` through
:class:`ChannelsLastBatchNorm`: the same batch statistics (two-pass: mean, then the mean of the
squared deviations), the same running-stat update (unbiased variance, ``momentum``) and the
same gradients, computed with reductions and element-wise operations on the activation viewed
as a ``(N*H*W/k, k*C)`` matrix, ``k*C`` a multiple of the vector width: every operation is
vectorized. Results equal PyTorch's up to float32 rounding (a different summation order), not
bit for bit. Anything else (eval mode, another device or dtype, an NCHW input, ``momentum``
None, no affine or no running stats, fewer than two values per channel, a channel count that
fills the vectors) runs PyTorch's own ``forward``. Double backward raises (``once_differentiable``).
A copy of the net made during a fit (``copy.deepcopy``) keeps the fast forward, bound to the
copy's own layer; no handle removes it there.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# A layer that holds the fast forward carries this key in its __dict__ (the instance attribute
# ``forward`` shadows the class's; removing it restores PyTorch's).
_MARK = "_chaincomp_fast_bn"


@functools.lru_cache(maxsize=1)
def vector_width() -> int:
    """Floats per vector of ATen's CPU kernels: 16 with its AVX-512 dispatch, else 8."""
    return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8


def fold(channels: int, rows: int, width: int | None = None) -> int:
    """The ``k`` that makes ``k * channels`` a multiple of the vector width (``width`` or
    :func:`vector_width`), or 1 when ``rows`` (= N*H*W) is not divisible by it."""
    width = vector_width() if width is None else width
    k = width // math.gcd(channels, width)
    return k if rows % k == 0 else 1


def _channel_sum(m: Tensor, k: int, channels: int) -> Tensor:
    """Per-channel sums of a ``(rows, k*C)`` matrix: the column sums folded over the k groups."""
    return m.sum(0).view(k, channels).sum(0)


class ChannelsLastBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels_last ``x`` (N, C, H, W); updates ``running_mean``
    and ``running_var`` in place; returns a new channels_last tensor (not a view)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        momentum: float,
        eps: float,
    ) -> Tensor:
        n, c, h, w = x.shape
        count = n * h * w
        k = fold(c, count)
        v = x.permute(0, 2, 3, 1).reshape(count // k, k * c)  # a view: x is channels_last
        mean = _channel_sum(v, k, c) / count
        centred = v - mean.repeat(k)
        var = _channel_sum(centred * centred, k, c) / count
        rstd = torch.rsqrt(var + eps)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(
            bias.repeat(k),
            centred,
            (weight * rstd).repeat(k),
            out=out.permute(0, 2, 3, 1).view(count // k, k * c),
        )
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)
        ctx.save_for_backward(centred, rstd, weight)
        ctx.shape = (n, c, h, w, k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        centred, rstd, weight = ctx.saved_tensors
        n, ch, h, w, k = ctx.shape
        count = n * h * w
        g = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        g = g.reshape(count // k, k * ch)
        sum_g = _channel_sum(g, k, ch)
        sum_gx = _channel_sum(g * centred, k, ch)  # = grad_weight / rstd
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d x = w * rstd * (g - mean(g) - centred * rstd^2 * mean(g * centred)), as
            # g * a + c + centred * b with per-channel a, b, c: two passes over the activation
            a = weight * rstd
            b = -a * rstd * rstd * sum_gx / count
            c = -a * sum_g / count
            flat = torch.addcmul(c.repeat(k), g, a.repeat(k)).addcmul_(centred, b.repeat(k))
            grad_x = flat.view(n, h, w, ch).permute(0, 3, 1, 2)
        return grad_x, sum_gx * rstd, sum_g, None, None, None, None


def applies(m: nn.Module, x: Tensor) -> bool:
    """Whether this call of the batch norm ``m`` takes :class:`ChannelsLastBatchNorm`."""
    assert isinstance(m, nn.BatchNorm2d)
    if not (m.training and m.affine and m.track_running_stats and m.momentum is not None):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if torch.is_autocast_enabled("cpu") or x.shape[1] % vector_width() == 0:
        return False
    n, _, h, w = x.shape
    return n * h * w > 1 and x.is_contiguous(memory_format=torch.channels_last)


class _FastForward:
    """The ``forward`` a switched layer holds: the fast batch norm where :func:`applies`, else
    PyTorch's. An object, not a bound method or a partial: a deep copy of the net binds it to
    the copied layer, and a pickled net loads."""

    def __init__(self, m: nn.BatchNorm2d) -> None:
        self.m = m

    def __call__(self, x: Tensor) -> Tensor:
        m = self.m
        if not applies(m, x):
            return type(m).forward(m, x)
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
        out: Tensor = ChannelsLastBatchNorm.apply(
            x, m.weight, m.bias, m.running_mean, m.running_var, float(m.momentum or 0.0), m.eps
        )
        return out


class FastBatchNorm:
    """The layers :func:`fast_batchnorm` switched (``layers``: their names); ``remove()``
    gives them PyTorch's forward back."""

    def __init__(self) -> None:
        self.layers: list[str] = []
        self.modules: list[nn.Module] = []

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("forward", None)
            m.__dict__.pop(_MARK, None)
        self.layers, self.modules = [], []


def fast_batchnorm(net: nn.Module) -> FastBatchNorm:
    """Give every ``nn.BatchNorm2d`` of ``net`` the fast training forward (each call decides with
    :func:`applies`, so layers on CUDA, in eval mode or with a channel count that fills the
    vectors keep PyTorch's kernels). A layer another handle already switched is left to it."""
    handle = FastBatchNorm()
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d) and not m.__dict__.get(_MARK, False):
            m.__dict__[_MARK] = True
            m.forward = _FastForward(m)  # type: ignore[method-assign,assignment]
            handle.modules.append(m)
            handle.layers.append(name)
    return handle
