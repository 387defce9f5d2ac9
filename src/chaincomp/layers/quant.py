"""Fake-quantized layers: :class:`QuantConv2d` / :class:`QuantLinear` and their quantizers.

Each layer quantizes, in its forward:

- its **input activation** per tensor: unsigned ``[0, 2^b - 1]`` when calibration saw no negative
  input (after a ReLU), signed ``[-2^(b-1), 2^(b-1) - 1]`` otherwise (the raw image);
- its **weight** per output channel, symmetric: ``b >= 2`` on the integers
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` times ``max|w_c| / (2^(b-1) - 1)``; ``b = 1`` as
  ``sign(w) * mean|w_c|`` (binary).

A wrapped layer computes in float until its activation quantizer is calibrated (observing the
input ranges on real batches); from then on input and weight are fake-quantized. Rounding uses
the straight-through estimator (identity gradient inside the clipping range); with
``learn_scale`` the activation step sizes are learned (LSQ, Esser et al. 2020). The layers are
subclasses of ``nn.Conv2d`` / ``nn.Linear``, so Torch-Pruning and the cost counter still see
convs and linears; the counter reads ``weight_bits`` / ``act_bits``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from chaincomp.errors import ConfigError
from chaincomp.layers import fq_triton
from chaincomp.module import CompressibleModule


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.round()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class _ReplaceSTE(torch.autograd.Function):
    """Forward ``q`` exactly (not ``w + (q - w)``, which is off by rounding), gradient to ``w``."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, q: Tensor) -> Tensor:
        return q

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward (exactly), identity backward."""
    return _RoundSTE.apply(x)  # type: ignore[no-any-return]


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` forward (exactly: ``x + (y - y)`` with ``y = x * scale``), gradient multiplied by
    ``scale`` backward (LSQ step-size gradient scaling)."""
    y = x * scale
    return x.detach() + (y - y.detach())


def fake_quant_composed(x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
    """:func:`fake_quant` written as a composition of autograd ops (a straight-through round
    inside ``clamp(x / step) * step``): the reference the fused form is tested against. Nothing
    in the chain calls it."""
    return round_ste(torch.clamp(x / step, qmin, qmax)) * step


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum()`` in float32 without the product tensor where the layouts allow."""
    compiling = torch.compiler.is_compiling()  # compiled: the product fuses into the sum
    if a.dtype == b.dtype == torch.float32 and a.stride() == b.stride() and not compiling:
        if a.is_contiguous():
            return torch.dot(a.view(-1), b.view(-1))
        if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
            # both in memory order (the same order: equal strides), one view call each
            n = a.numel()
            return torch.dot(a.as_strided((n,), (1,)), b.as_strided((n,), (1,)))
    return (a * b).sum(dtype=torch.float32)


def _result_dtype(x: Tensor, step: Tensor) -> torch.dtype:
    """``torch.result_type(x, step)`` for a floating ``x`` (a 0-dim ``step`` takes ``x``'s dtype),
    written with dtypes only, so ``torch.compile`` traces it without a graph break."""
    if x.dtype == step.dtype or (
        step.dim() == 0 and x.dim() > 0 and x.is_floating_point() and step.is_floating_point()
    ):
        return x.dtype
    return torch.promote_types(x.dtype, step.dtype)


class _FakeQuant(torch.autograd.Function):
    """Forward: ``round(clamp(x / step, qmin, qmax)) * step`` (the same operations, so the same
    values, as :func:`fake_quant_composed`), plus a float mask of the clipping range. Backward,
    derived by hand, one multiply and (LSQ) one dot product instead of the composed form's
    dozen elementwise ops:

    - ``x``: the straight-through gradient, ``grad`` where ``qmin <= x / step <= qmax``, else 0;
    - ``step`` (only when it requires a gradient: LSQ): ``sum(grad * r)`` over the elements
      (reduced to ``step``'s shape), ``r = round(x / step) - x / step`` inside the range and the
      clamped level (``qmin`` or ``qmax``) outside it: ``r`` is formed in the forward from the
      level and ``t = x / step`` (:func:`_levels_into`), each element's difference of two
      neighbours, so a bf16 ``r`` keeps its precision (forming it from the rounded output
      ``y = level * step`` and ``x``, or summing ``grad * y`` and ``grad * x`` apart and
      subtracting, loses it: 6 % off on a bf16 test tensor).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
        # t and y take x's exact strides (a one-channel channels_last batch stays channels_last,
        # so the convolution that reads y keeps that layout)
        lsq = ctx.needs_input_grad[1]
        y, inside, r = _levels_into(x, step, qmin, qmax, lsq)
        if lsq:
            ctx.save_for_backward(inside, r)
        else:
            ctx.save_for_backward(inside)
        ctx.step_shape = step.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        inside = ctx.saved_tensors[0]
        grad_x = grad * inside
        grad_step = None
        if ctx.needs_input_grad[1]:
            r = ctx.saved_tensors[1]
            if math.prod(ctx.step_shape) == 1:
                grad_step = _dot(grad, r).reshape(ctx.step_shape)
            else:
                grad_step = (grad * r).sum_to_size(ctx.step_shape)
        return grad_x if ctx.needs_input_grad[0] else None, grad_step, None, None


def _levels_into(
    x: Tensor, s: Tensor, qmin: int, qmax: int, lsq: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(y, inside, r)``: :class:`_FakeQuant`'s forward (the same operations, so the same
    values) and, with ``lsq``, the step gradient's per-element term ``r = level - t * inside``
    (``t = x / s``; else None). Under ``torch.compile`` the same operations out of place
    (Dynamo breaks the graph at an ``out=`` tensor that is not contiguous, such as a
    channels_last one); the compiler plans the buffers itself."""
    dtype = _result_dtype(x, s)
    if torch.compiler.is_compiling():
        t = x / s
        levels = torch.clamp(t, qmin, qmax)
        inside = torch.eq(levels, t).to(dtype)
        levels = levels.round()
        r = torch.addcmul(levels, t, inside, value=-1) if lsq else None
        return levels * s, inside, r
    t = torch.div(x, s)
    y = torch.clamp(t, qmin, qmax)
    if t.stride() != x.stride() or y.stride() != x.stride():
        # a layout the operators do not keep (a one-channel channels_last batch reads as NCHW
        # too): buffers with x's exact strides, so the convolution that reads y keeps the layout
        t = torch.div(x, s, out=torch.empty_like(x, dtype=dtype))
        y = torch.clamp(t, qmin, qmax, out=torch.empty_like(x, dtype=dtype))
    if not lsq:
        # 1.0 inside the clipping range, 0.0 outside, written over t: a float mask (on the
        # CPU, bool masks and torch.where run several times slower than a float multiply)
        inside = torch.eq(y, t, out=t)
        y.round_().mul_(s)  # in place: two tensors allocated per call, not four
        return y, inside, None
    inside = torch.eq(y, t, out=torch.empty_like(t))
    y.round_()
    r = torch.addcmul(y, t, inside, value=-1)  # t is needed up to here
    y.mul_(s)
    return y, inside, r


class _ActFakeQuant(torch.autograd.Function):
    """An activation quantizer's whole training step in one node: ``fake_quant(x, s)`` with
    ``s = max(|step|, 1e-8)`` and LSQ's gradient scale ``g`` on the step. Its values are those
    of ``fake_quant(x, grad_scale(step, g).abs().clamp_min(1e-8))`` (the reference, composed of
    five more autograd nodes and about a dozen more operator calls), its gradients equal within
    rounding: to ``x`` the straight-through gradient, to ``step`` :class:`_FakeQuant`'s ``s``
    gradient times ``g * sign(step)`` where ``|step| >= 1e-8`` (``clamp_min`` passes the gradient
    there), else 0. Fewer host calls per layer: a GPU QAT step waits on the host
    (``benchmarks/qat_profile.py``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, g: float, qmin: int, qmax: int) -> Tensor:
        s = step.abs().clamp_min_(1e-8)
        lsq = ctx.needs_input_grad[1]
        y, inside, r = _levels_into(x, s, qmin, qmax, lsq)
        if lsq:
            ctx.save_for_backward(inside, r, step)
            ctx.g = g
        else:
            ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        inside = ctx.saved_tensors[0]
        grad_x = grad * inside
        grad_step = None
        if ctx.needs_input_grad[1]:
            _, r, step = ctx.saved_tensors
            k = torch.where(step.abs() >= 1e-8, step.sign() * ctx.g, 0.0)
            grad_step = (_dot(grad, r) * k).reshape(step.shape)
        return grad_x if ctx.needs_input_grad[0] else None, grad_step, None, None, None


def _channel_step(w: Tensor, q: int) -> Tensor:
    """``max(max|w_c|, 1e-8) / q`` per output channel ``c`` (dim 0), shaped to broadcast against
    ``w``; call it without gradient (the weight quantizers' step gets none)."""
    step = torch.linalg.vector_norm(w, math.inf, dim=tuple(range(1, w.dim())), keepdim=True)
    return step.clamp_min_(1e-8).div_(q)


class _WeightFakeQuant(torch.autograd.Function):
    """Per-output-channel symmetric weight quantization in one node: ``step_c = max(max|w_c|,
    1e-8) / q`` (no gradient, as the reference's detached step), then :class:`_FakeQuant`'s
    forward and its straight-through input gradient. The values are the reference's
    (``fake_quant(w, step.detach(), -q, q)``) exactly: ``max|w_c|`` is the infinity norm."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, q: int) -> Tensor:
        y, inside, _ = _levels_into(w, _channel_step(w, q), -q, q)
        ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.saved_tensors[0], None


KERNEL_ENV = "CHAINCOMP_QUANT_KERNEL"
QUANT_KERNELS = ("eager", "triton")


def quant_kernel() -> str:
    """Which fake quantizer runs: ``$CHAINCOMP_QUANT_KERNEL``, ``eager`` (default) or ``triton``
    (:mod:`chaincomp.layers.fq_triton`: two fused kernels on CUDA; opt-in: an H200 measured
    them no faster, the QAT step being host-bound). Any other value is a :class:`ConfigError`
    naming the variable."""
    choice = os.environ.get(KERNEL_ENV, "eager")
    if choice not in QUANT_KERNELS:
        raise ConfigError(KERNEL_ENV, f"unknown quantization kernel {choice!r}", QUANT_KERNELS)
    return choice


@functools.lru_cache(maxsize=1)
def _warn_eager(reason: str) -> None:
    warnings.warn(f"{KERNEL_ENV}=triton: {reason}; using the eager quantizer", stacklevel=3)


def _use_triton(x: Tensor, step: Tensor) -> bool:
    if quant_kernel() != "triton":
        return False
    if not fq_triton.available():
        _warn_eager("Triton is not installed")
        return False
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False  # CPU tensors: the eager form (Triton's interpreter is for tests)
    return fq_triton.supports(x, step)


def fake_quant(x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(x / step), qmin, qmax) * step`` with a straight-through round: the gradient
    to ``x`` is the identity inside the clipping range and 0 outside; the gradient to ``step``
    (when it requires one) is LSQ's. ``step`` broadcasts against ``x`` (a scalar per tensor, or
    a column per channel). One fused autograd node (:class:`_FakeQuant`); the values and
    gradients equal those of :func:`fake_quant_composed`. With ``CHAINCOMP_QUANT_KERNEL=triton``
    on CUDA, the two Triton kernels of :mod:`chaincomp.layers.fq_triton` instead (the same
    values; the step gradient within rounding)."""
    if _use_triton(x, step):
        return fq_triton.fake_quant_triton(x, step, qmin, qmax)
    return _FakeQuant.apply(x, step, qmin, qmax)  # type: ignore[no-any-return]


def act_fake_quant(x: Tensor, step: Tensor, g: float, qmin: int, qmax: int) -> Tensor:
    """An activation quantizer's forward: ``fake_quant(x, max(|step|, 1e-8))`` with LSQ's
    gradient scale ``g`` on ``step`` (``grad_scale``), as one node (:class:`_ActFakeQuant`); with
    ``CHAINCOMP_QUANT_KERNEL=triton`` on CUDA, the reference composition around the kernels."""
    if quant_kernel() == "triton":
        s = (grad_scale(step, g) if g != 1.0 else step).abs().clamp_min(1e-8)
        if _use_triton(x, s):
            return fake_quant(x, s, qmin, qmax)
    return _ActFakeQuant.apply(x, step, g, qmin, qmax)  # type: ignore[no-any-return]


def weight_levels(bits: int) -> int:
    """Largest integer magnitude of a symmetric ``bits``-bit weight grid (1 bit: binary)."""
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def quantize_weight(w: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric fake quantization of a weight (STE)."""
    if bits == 1:
        shape = (-1,) + (1,) * (w.dim() - 1)
        alpha = w.reshape(w.shape[0], -1).abs().mean(dim=1).reshape(shape)
        return _ReplaceSTE.apply(w, torch.where(w >= 0, alpha, -alpha).detach())  # type: ignore[no-any-return]
    q = weight_levels(bits)
    if quant_kernel() == "triton":  # the kernels take the step as an input
        with torch.no_grad():
            step = _channel_step(w, q)
        return fake_quant(w, step, -q, q)
    return _WeightFakeQuant.apply(w, q)  # type: ignore[no-any-return]


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantizer with a calibrated (optionally learned) step size.

    Buffers: ``signed`` (1.0 when the calibrated input had negative values), ``calibrated``.
    Until calibrated it only records ``observed_max`` / ``observed_min`` and passes ``x`` through.
    """

    signed: Tensor
    calibrated: Tensor
    observed_max: Tensor
    observed_min: Tensor

    def __init__(self, bits: int, learn_scale: bool = False):
        super().__init__()
        self.bits = bits
        self.step = nn.Parameter(torch.tensor(1.0), requires_grad=learn_scale)
        self.register_buffer("signed", torch.tensor(0.0))
        self.register_buffer("calibrated", torch.tensor(0.0))
        self.register_buffer("observed_max", torch.tensor(0.0))
        self.register_buffer("observed_min", torch.tensor(0.0))
        self.observing = False
        self.percentile: float | None = None
        self.is_calibrated = False  # python mirrors of the buffers: no device sync per forward
        self.is_signed = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.is_calibrated = bool(self.calibrated.item() > 0)
        self.is_signed = bool(self.signed.item() > 0)

    @property
    def qrange(self) -> tuple[int, int]:
        if self.is_signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            with torch.no_grad():
                flat = x.detach().float().flatten()
                if self.percentile is not None and flat.numel() > 1:
                    sample = flat[:: max(1, flat.numel() // 200_000)]
                    hi = torch.quantile(sample.abs(), self.percentile / 100.0)
                else:
                    hi = flat.abs().max()
                self.observed_max.copy_(torch.maximum(self.observed_max, hi))
                self.observed_min.copy_(torch.minimum(self.observed_min, flat.min()))
            return x
        if not self.is_calibrated:
            return x
        qmin, qmax = self.qrange
        g = 1.0
        if self.step.requires_grad and self.training:
            g = 1.0 / math.sqrt(x.numel() // x.shape[0] * qmax)
        return act_fake_quant(x, self.step, g, qmin, qmax)

    def reset_calibration(self) -> None:
        """Forget the calibration (the layer computes in float until calibrated again)."""
        self.calibrated.fill_(0.0)
        self.is_calibrated = False

    def finish_calibration(self) -> None:
        self.is_signed = bool(self.observed_min.item() < -1e-6)
        self.signed.fill_(1.0 if self.is_signed else 0.0)
        qmax = self.qrange[1]
        with torch.no_grad():
            self.step.fill_(max(self.observed_max.item(), 1e-6) / qmax)
        self.calibrated.fill_(1.0)
        self.is_calibrated = True
        self.observing = False


class _QuantMixin:
    weight: Tensor
    weight_bits: int
    act_bits: int
    act_quant: ActQuantizer

    def __init__(
        self,
        *args: Any,
        weight_bits: int = 8,
        act_bits: int = 8,
        learn_scale: bool = False,
        **kwargs: Any,
    ):
        """The layer's own arguments (``nn.Conv2d`` / ``nn.Linear``), then the quantizer's."""
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._setup_quant(weight_bits, act_bits, learn_scale)

    def _setup_quant(self, weight_bits: int, act_bits: int, learn_scale: bool) -> None:
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.act_quant = ActQuantizer(act_bits, learn_scale)

    def quantized_weight(self) -> Tensor:
        return quantize_weight(self.weight, self.weight_bits)

    def effective_weight(self) -> Tensor:
        """The quantized weight once calibrated; before that the layer computes in float."""
        return self.quantized_weight() if self.act_quant.is_calibrated else self.weight

    def extra_repr(self) -> str:  # type: ignore[misc]
        return f"{super().extra_repr()}, w_bits={self.weight_bits}, a_bits={self.act_bits}"  # type: ignore[misc]


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight are fake-quantized (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.act_quant(x), self.effective_weight(), self.bias)

    @classmethod
    def wrap(
        cls, conv: nn.Conv2d, weight_bits: int, act_bits: int, learn_scale: bool
    ) -> QuantConv2d:
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            weight_bits=weight_bits,
            act_bits=act_bits,
            learn_scale=learn_scale,
        )
        new.to(conv.weight.device)
        new.load_state_dict(conv.state_dict(), strict=False)
        return new


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose input and weight are fake-quantized (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.act_quant(x), self.effective_weight(), self.bias)

    @classmethod
    def wrap(
        cls, lin: nn.Linear, weight_bits: int, act_bits: int, learn_scale: bool
    ) -> QuantLinear:
        new = cls(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            weight_bits=weight_bits,
            act_bits=act_bits,
            learn_scale=learn_scale,
        )
        new.to(lin.weight.device)
        new.load_state_dict(lin.state_dict(), strict=False)
        return new


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_net(net: nn.Module, plan: dict[str, list[int]], learn_scale: bool) -> int:
    """Swap the planned layers for their quantized twins (in place); returns how many."""
    count = 0
    for name, (w_bits, a_bits) in plan.items():
        m = net.get_submodule(name)
        if isinstance(m, QUANT_LAYERS):  # Q after Q: the new widths replace the old ones
            if m.act_bits != a_bits:  # a step size calibrated for other bits is meaningless
                m.act_quant.reset_calibration()
            m.weight_bits, m.act_bits = w_bits, a_bits
            m.act_quant.bits = a_bits
            m.act_quant.step.requires_grad_(learn_scale)
            continue
        if isinstance(m, nn.Conv2d):
            _set_module(net, name, QuantConv2d.wrap(m, w_bits, a_bits, learn_scale))
        elif isinstance(m, nn.Linear):
            _set_module(net, name, QuantLinear.wrap(m, w_bits, a_bits, learn_scale))
        count += 1
    return count


@torch.no_grad()
def calibrate(
    module: CompressibleModule, batches: Any, n_batches: int, percentile: float | None
) -> None:
    """Observe input ranges of every uncalibrated quantizer on ``n_batches`` batches, then fix
    their step sizes. Runs every path (``forward_all`` when the net has exits)."""
    quants = [m for m in module.net.modules() if isinstance(m, ActQuantizer)]
    todo = [q for q in quants if not q.is_calibrated]
    if not todo:
        return
    for q in todo:
        q.observing, q.percentile = True, percentile
        q.observed_max.zero_()
        q.observed_min.zero_()
    was = module.training
    module.eval()
    forward = getattr(module.net, "forward_all", module.net)
    try:
        for i, (x, _) in enumerate(batches):
            if i >= n_batches:
                break
            forward(x)
    finally:
        module.train(was)
        for q in todo:
            q.finish_calibration()
