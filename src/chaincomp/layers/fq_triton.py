"""Fake quantization as two Triton kernels (CUDA): one pass forward, one pass backward.

The eager :class:`chaincomp.layers.quant._FakeQuant` makes about ten elementwise passes over an
activation per training step (divide, clamp, compare, round, multiply, their dtype copies, the
masked gradient and the LSQ dot product); on an H200 they double the GPU kernel time of a
ResNet-18 training step (8.4 -> 16.4 ms at batch 512). Here the forward reads ``x`` once and
writes ``y`` once; the backward reads the gradient and ``x`` once, writes the input gradient
and, for a learned (LSQ) step, one partial sum per block.

Numerics follow eager PyTorch, which computes in ``torch.result_type(x, step)``: with a 0-dim
step (per-tensor activations) and a bf16 input that type is bf16, so eager rounds ``x / step``
and ``q * step`` to bf16, and on CUDA the step itself too (a CUDA 0-dim operand is read in the
common dtype; a CPU one in float32). The kernels compute in float32 with correctly rounded
division and product and round at the same points as eager on that device (fp16 stays eager),
so the forward values are eager's, and the input gradient too (a 0/1 mask times the gradient);
the step gradient sums each element's term in float32 per block (eager's bf16 form multiplies
in bf16 first), so it agrees within rounding. NaN inputs give NaN, as eager.

Opt-in: ``CHAINCOMP_QUANT_KERNEL=triton`` (see :func:`chaincomp.layers.quant.fake_quant`). On an
H200 (2026-11-27) they matched eager (values and input gradients) but QAT was no faster (2.99x
float against eager's 2.55x on ResNet-18, 2.79x against 2.82x on ResNet-34): the QAT step waits
on the host, and a Triton launch costs the host more than an ATen call
(``benchmarks/qat_profile.py``), so eager stays the default. Tests run these kernels on
the CPU with Triton's interpreter (``TRITON_INTERPRET=1`` before the first call).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

BLOCK = 1024


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether Triton can be imported (tried once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    """The two kernels (:mod:`chaincomp.layers.fq_kernels`), imported at the first call."""
    from chaincomp.layers import fq_kernels

    return fq_kernels.fwd, fq_kernels.bwd


def _round_code(x: Tensor, step: Tensor) -> int:
    return 1 if torch.result_type(x, step) == torch.bfloat16 else 0


def _dense(x: Tensor) -> bool:
    """Whether ``x`` fills its storage in one of the layouts the flat kernels can walk."""
    return x.is_contiguous() or (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    )


def supports(x: Tensor, step: Tensor) -> bool:
    """Whether the kernels take this call: a dense ``x`` with ``step`` on its device, a
    per-tensor step or a gradient-free step of shape ``(x.shape[0], 1, ...)`` (per output
    channel), computing in float32 or bf16 (fp16: eager). Unlike the eager node, the kernels
    keep ``x`` for the backward, so ``x`` must not be modified in place after the call."""
    if x.dim() == 0 or step.device != x.device or not _dense(x):
        return False
    if torch.result_type(x, step) not in (torch.float32, torch.bfloat16):
        return False
    if step.numel() == 1:
        return True
    # one step per index of dim 0, without a gradient (the chain's weight steps are detached)
    per_channel = (x.shape[0],) + (1,) * (x.dim() - 1)
    return tuple(step.shape) == per_channel and step.is_contiguous() and not step.requires_grad


class _FakeQuantTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
        fwd, _ = _kernels()
        dtype = torch.result_type(x, step)
        y = torch.empty_like(
            x, dtype=dtype
        )  # x's strides: the flat walk matches element for element
        n = x.numel()
        per_channel = step.numel() > 1
        inner = max(n // x.shape[0], 1) if per_channel else 1
        code = _round_code(x, step)
        round_step = code == 1 and step.dim() == 0 and step.is_cuda
        grid = (max(1, -(-n // BLOCK)),)
        fwd[grid](
            x, step, y, n, inner, float(qmin), float(qmax), per_channel, code, round_step, BLOCK
        )
        ctx.save_for_backward(x, step)
        ctx.meta = (qmin, qmax, per_channel, inner, code, round_step)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        _, bwd = _kernels()
        x, step = ctx.saved_tensors
        qmin, qmax, per_channel, inner, code, round_step = ctx.meta
        if grad.stride() != x.stride():
            grad = grad.contiguous(memory_format=_layout(x))
        n = x.numel()
        blocks = max(1, -(-n // BLOCK))
        grad_x = torch.empty_like(x)
        step_grad = bool(ctx.needs_input_grad[1]) and not per_channel
        part = torch.empty(blocks if step_grad else 1, device=x.device, dtype=torch.float32)
        bwd[(blocks,)](
            grad, x, step, grad_x, part, n, inner, float(qmin), float(qmax),
            per_channel, code, round_step, step_grad, BLOCK,
        )  # fmt: skip
        grad_step = part.sum().reshape(step.shape).to(step.dtype) if step_grad else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_step, None, None


def _layout(x: Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def fake_quant_triton(x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
    """:func:`chaincomp.layers.quant.fake_quant` in two kernels (see the module docstring);
    the caller checks :func:`supports` first. A per-channel step (one per index of dim 0) gets
    no gradient (the chain's weight steps are detached)."""
    return _FakeQuantTriton.apply(x, step, qmin, qmax)  # type: ignore[no-any-return]
