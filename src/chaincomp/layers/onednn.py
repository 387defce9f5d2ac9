"""A guard around a oneDNN bug that corrupts weight gradients of small strided 1x1 convolutions.

On the CPU, oneDNN's 1x1 backward-weights kernel for a channels_last (nhwc) source with a stride
above 1 (its "reduce to unit stride" path) computes wrong weight gradients, and writes past its
workspace, when the convolution has fewer input channels than the kernel's channel block (8 with
AVX2, 16 with AVX-512): uxlfoundation/oneDNN issue 6035, open at the time of writing. With
PyTorch 2.13.0 on this project's 2-core AVX2 machine, a pruned ResNet shortcut (7 -> 15 channels,
1x1, stride 2, 14x14 input) got weight gradients off by 10-100 % of their size, different on every
call; larger inputs can hang the kernel. Forward values and input gradients are right; NCHW is
right. Pruning and narrow students produce exactly these shapes, so every chain on the CPU could
meet it (and a cached rerun then differed from the run that wrote the cache).

:func:`guard_strided_1x1` makes each such convolution compute in NCHW: its weight is made
NCHW-contiguous, and hooks hand it a channels_last input as NCHW and turn its output back to
channels_last, so the rest of the net keeps its layout (an NCHW input passes untouched). The values are the same convolution's; the cost is two
copies of a small tensor per guarded layer and step. CUDA convolutions are not touched.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


@functools.lru_cache(maxsize=1)
def channel_block() -> int:
    """The input-channel block of oneDNN's CPU 1x1 kernels on this machine: 16 with AVX-512,
    else 8 (AVX2). oneDNN picks its instruction set from the CPU, not from ATen's dispatch
    (``ATEN_CPU_CAPABILITY`` may lower the latter), so the CPU's flags decide where readable."""
    try:
        with open("/proc/cpuinfo") as f:
            return 16 if "avx512f" in f.read() else 8
    except OSError:
        return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8


def is_affected(m: nn.Module, block: int | None = None) -> bool:
    """Whether ``m`` is a CPU 1x1 convolution with a stride above 1 and fewer input channels per
    group than ``block`` (default :func:`channel_block`): the shapes issue 6035 corrupts."""
    if not isinstance(m, nn.Conv2d) or m.weight.device.type != "cpu":
        return False
    block = channel_block() if block is None else block
    return (
        tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1 and m.in_channels // m.groups < block
    )


def _nchw_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))


def _nchw_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # exact NCHW strides, not .contiguous(): a tensor whose strides fit both layouts (one
    # channel, or 1x1 spatial) is "contiguous" and may still be read as channels_last
    x = args[0]
    if not (isinstance(x, Tensor) and x.dim() == 4 and x.stride() != _nchw_strides(x.shape)):
        module._guard_restore = False  # type: ignore[assignment]
        return args
    # the output goes back to channels_last only if the input was plainly in it
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    module._guard_restore = cl  # type: ignore[assignment]
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])


def _restore_layout(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    if getattr(module, "_guard_restore", False) and isinstance(out, Tensor):
        return out.contiguous(memory_format=torch.channels_last)
    return out


class Guard:
    """The hooks :func:`guard_strided_1x1` installed; :meth:`remove` takes them off (the
    weights stay NCHW, which is only a layout). ``layers``: the guarded layers' names."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.layers: list[str] = []
        self.modules: list[nn.Module] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.modules:
            m.__dict__.pop("_guarded", None)
        self.handles, self.modules = [], []


def guard_strided_1x1(net: nn.Module, block: int | None = None) -> Guard:
    """Make every affected convolution of ``net`` (:func:`is_affected`) compute in NCHW (none
    while oneDNN is off: ``torch.backends.mkldnn.enabled`` false, as ``trainer.cpu_onednn=false``
    sets it inside a fit, so such runs keep their kernels and results); the
    returned :class:`Guard` names them and removes the hooks. A layer another guard already holds
    is left to that guard."""
    guard = Guard()
    if not torch.backends.mkldnn.enabled:  # trainer.cpu_onednn=false: PyTorch's own kernels
        return guard
    for name, m in net.named_modules():
        if is_affected(m, block) and not m.__dict__.get("_guarded", False):
            assert isinstance(m, nn.Conv2d)
            m.__dict__["_guarded"] = True  # a second guard skips it (hooks would not stack right)
            guard.modules.append(m)
            # a clone, not .contiguous(): a 1x1 weight in channels_last also counts as
            # contiguous, and its strides would still make the convolution pick channels_last
            if m.weight.stride() != _nchw_strides(m.weight.shape):
                m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)
            guard.handles.append(m.register_forward_pre_hook(_nchw_input))
            guard.handles.append(m.register_forward_hook(_restore_layout))
            guard.layers.append(name)
    return guard


@contextmanager
def guarded(net: nn.Module) -> Iterator[Guard]:
    """:func:`guard_strided_1x1` for the duration of a ``with`` block (a backward pass outside
    a fit, such as the gradients Taylor pruning ranks by)."""
    guard = guard_strided_1x1(net)
    try:
        yield guard
    finally:
        guard.remove()
