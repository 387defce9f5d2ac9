"""The fused fake-quant kernels compile for a real GPU, and a quantized net traces whole.

The interpreter tests (``test_fq_triton.py``) run the kernels' Python, which accepts code the
Triton compiler refuses: an H200 rejected ``nan = tl.PropagateNan.ALL`` (an enum bound to a
name) that every interpreter test had passed. Here each kernel variant the launcher can ask for
is compiled ahead of time for an sm_90 (H100/H200) target, to the cubin, on this machine
without a GPU. And ``torch.compile`` must see a quantized net as one graph: a graph break in
the quantizer (``torch.result_type`` did break it) splits the step into one graph per layer
and recompiles for every layer shape.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

# one fresh interpreter per check: conftest.py selected Triton's interpreter for this process,
# and a kernel compiled for the GPU needs the compiler proper
COMPILE = textwrap.dedent(
    """
    import itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from chaincomp.layers import fq_kernels

    ptrs = {
        "fwd": {"x_ptr": "X", "s_ptr": "*fp32", "y_ptr": "X"},
        "bwd": {"g_ptr": "X", "x_ptr": "X", "s_ptr": "*fp32", "gx_ptr": "X", "part_ptr": "*fp32"},
    }
    done = 0
    for name, dtype, per_channel, round_step, step_grad in itertools.product(
        ("fwd", "bwd"), ("bf16", "fp32"), (False, True), (False, True), (False, True)
    ):
        if name == "fwd" and step_grad or dtype == "fp32" and round_step:
            continue
        fn = getattr(fq_kernels, name)
        sig = {k: "*" + dtype if v == "X" else v for k, v in ptrs[name].items()}
        sig |= {"n": "i32", "inner": "i32", "qmin": "fp32", "qmax": "fp32"}
        const = {"PER_CHANNEL": per_channel, "ROUND": int(dtype == "bf16"),
                 "ROUND_STEP": round_step, "BLOCK": 1024}
        if name == "bwd":
            const["STEP_GRAD"] = step_grad
        sig |= {k: "constexpr" for k in const}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], (name, dtype)
        done += 1
    print("compiled", done)
    """
)


def test_every_kernel_variant_compiles_for_an_sm90_gpu() -> None:
    pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["compiled", "18"]  # 6 forward and 12 backward variants


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_quantized_lsq_net_traces_without_graph_breaks(layout: torch.memory_format) -> None:
    """In either layout: the chain trains in channels_last, where the eager quantizer's ``out=``
    buffers (not contiguous) broke the graph at every quantizer."""
    from chaincomp.layers.quant import ActQuantizer, quantize_net
    from chaincomp.models.resnet import ResNet

    torch.manual_seed(0)
    net = ResNet(blocks=(1, 1), widths=(8, 16))
    names = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    quantize_net(net, {n: [4, 4] for n in names}, learn_scale=True)
    net.to(memory_format=layout)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=layout)
    quants = [m for m in net.modules() if isinstance(m, ActQuantizer)]
    for q in quants:
        q.observing = True
    net(x)
    for q in quants:
        q.finish_calibration()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    eager = net(x)
    eager.sum().backward()
    steps = [q.step.grad.clone() for q in quants]
    net.zero_grad()
    compiled = torch.compile(net, backend="aot_eager")(x)  # autograd traced, no code generation
    compiled.sum().backward()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for q, g in zip(quants, steps, strict=True):
        assert torch.allclose(q.step.grad, g, rtol=1e-4, atol=1e-7)


def test_the_traceable_result_dtype_is_torchs() -> None:
    from chaincomp.layers.quant import _result_dtype

    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for xd, sd, x_shape, s_shape in itertools.product(
        floats, floats, ((), (3,), (2, 3, 4, 4)), ((), (1,), (2, 1, 1, 1))
    ):
        if len(s_shape) > len(x_shape):
            continue
        x, s = torch.zeros(x_shape, dtype=xd), torch.ones(s_shape, dtype=sd)
        assert _result_dtype(x, s) == torch.result_type(x, s), (xd, sd, x_shape, s_shape)
