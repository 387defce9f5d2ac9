"""The Triton kernels of :mod:`chaincomp.layers.fq_triton` (imported at its first call, so that
Triton reads ``TRITON_INTERPRET`` then; kernels live at module level, where Triton resolves the
names they call)."""

import triton
import triton.language as tl


@triton.jit
def _round(v, ROUND: tl.constexpr):
    # float32 -> float32 rounded to bf16 (ROUND 1: eager's compute dtype for a bf16 input),
    # round half to even on the bits (the same in Triton's interpreter and on the GPU)
    if ROUND == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v


@triton.jit
def _levels(
    x_ptr,
    s_ptr,
    offs,
    m,
    inner,
    qmin,
    qmax,
    PER_CHANNEL: tl.constexpr,
    ROUND: tl.constexpr,
    ROUND_STEP: tl.constexpr,
):
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        s = tl.load(s_ptr + offs // inner, mask=m, other=1.0).to(tl.float32)
    else:
        s = tl.load(s_ptr).to(tl.float32)
    if ROUND_STEP:  # eager on CUDA reads a 0-dim step in the compute dtype
        s = _round(s, ROUND)
    # correctly rounded, as eager (a plain / compiles to an approximate division on CUDA)
    t = _round(tl.math.div_rn(x, s), ROUND)
    # NaN in, NaN out, as torch.clamp (the enum inline: Triton cannot bind it to a name)
    y = tl.minimum(
        tl.maximum(t, qmin, propagate_nan=tl.PropagateNan.ALL),
        qmax,
        propagate_nan=tl.PropagateNan.ALL,
    )
    # round half to even, as torch.round: y - floor(y) is exact in float32
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    q = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))
    return s, t, q


@triton.jit
def fwd(
    x_ptr,
    s_ptr,
    y_ptr,
    n,
    inner,
    qmin,
    qmax,
    PER_CHANNEL: tl.constexpr,
    ROUND: tl.constexpr,
    ROUND_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s, _t, q = _levels(x_ptr, s_ptr, offs, m, inner, qmin, qmax, PER_CHANNEL, ROUND, ROUND_STEP)
    y = _round(q * s, ROUND)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def bwd(
    g_ptr,
    x_ptr,
    s_ptr,
    gx_ptr,
    part_ptr,
    n,
    inner,
    qmin,
    qmax,
    PER_CHANNEL: tl.constexpr,
    ROUND: tl.constexpr,
    ROUND_STEP: tl.constexpr,
    STEP_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _s, t, q = _levels(x_ptr, s_ptr, offs, m, inner, qmin, qmax, PER_CHANNEL, ROUND, ROUND_STEP)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inside = (t >= qmin) & (t <= qmax)
    tl.store(gx_ptr + offs, tl.where(inside, g, 0.0).to(gx_ptr.dtype.element_ty), mask=m)
    if STEP_GRAD:
        # d y / d step: q - t inside the range, the clamped level outside (LSQ)
        r = tl.where(m, g * (q - tl.where(inside, t, 0.0)), 0.0)
        tl.store(part_ptr + pid, tl.sum(r, axis=0))
