"""Where QAT's training time goes: one training step of a CIFAR ResNet, float against QAT, split.

A plain loop (SGD, cross-entropy, bf16 autocast and channels_last on CUDA) over one random batch
held on the device, so data loading and Lightning are out of the picture. For each variant it
prints the wall time per step (synchronized), the operator calls the host makes per step
(top-level ATen calls), the GPU kernel time per step (PyTorch profiler, the sum of the device
kernels' self time) and their ratio to float:

- ``float``: the net as built;
- ``QAT``: every conv and linear fake-quantized as the quantize stage does it (w4/a4 per-channel
  weights, LSQ activation steps, first and last layer at 8 bits), calibrated on the batch;
- ``QAT, weights only`` / ``QAT, activations only``: one of the two quantizers switched off;
- with ``--kernel triton``: the same with ``CHAINCOMP_QUANT_KERNEL=triton``;
- with ``--compile [MODE]``: float and QAT again, each net under ``torch.compile`` in that mode
  (``default`` unless named; ``reduce-overhead`` replays CUDA graphs: what ``trainer.compile``
  does for a fit; the ratio to the uncompiled float step is printed; compare the two compiled
  lines with each other).

``busy`` is kernel time / wall time. Far below 100 %, the step waits on the host (Python, the
autograd dispatch, kernel launches), and fusing elementwise passes alone cannot help; near
100 %, the kernels are the cost. ``--top N`` prints the N costliest operators of the QAT step.
(The H200 run of 2026-11-27 summed the operators' rows too, twice the kernel time; halve the
"GPU kernels" figures of that run, which predate this fix.)

    python benchmarks/qat_profile.py --model resnet18 --batch 512       # on a GPU
    python benchmarks/qat_profile.py --model resnet18 --width 0.125 --batch 8 --steps 2   # CPU
    python benchmarks/qat_profile.py --width 0.125 --batch 4 --steps 2 --gpu-like   # CPU, as CUDA runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from chaincomp.layers.quant import KERNEL_ENV, QUANT_LAYERS, ActQuantizer, quantize_net
from chaincomp.models.resnet import ResNet
from chaincomp.pipeline import COMPILE_MODES

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
GPU_LIKE = {"cpu": False}  # --gpu-like: the CPU in channels_last and bf16 autocast as on CUDA


def _gpu_like(device: torch.device) -> bool:
    return device.type == "cuda" or GPU_LIKE["cpu"]


def build(model: str, width: float, device: torch.device) -> nn.Module:
    net = ResNet(blocks=BLOCKS[model], width_mult=width).to(device)
    return net.to(memory_format=torch.channels_last) if _gpu_like(device) else net


def quantize(net: nn.Module, x: torch.Tensor, bits: int = 4) -> nn.Module:
    """Fake-quantize every conv and linear (first and last at 8 bits) and calibrate on ``x``."""
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plan = {n: [bits, bits] for n in names}
    plan[names[0]] = plan[names[-1]] = [8, 8]
    quantize_net(net, plan, learn_scale=True)
    quants = [m for m in net.modules() if isinstance(m, ActQuantizer)]
    for q in quants:
        q.observing, q.percentile = True, 99.99
    with torch.no_grad(), autocast(x.device):
        net.eval()
        net(x)
        net.train()
    for q in quants:
        q.finish_calibration()
    return net


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if _gpu_like(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def switch_off(net: nn.Module, part: str) -> None:
    """Turn off the weight (``part='weight'``) or activation quantizers of a quantized net."""
    for m in net.modules():
        if isinstance(m, QUANT_LAYERS):
            if part == "weight":
                m.effective_weight = lambda m=m: m.weight  # type: ignore[method-assign]
            else:  # an uncalibrated quantizer passes its input; the weight stays quantized
                m.act_quant.is_calibrated = False
                m.effective_weight = m.quantized_weight  # type: ignore[method-assign]


def step_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step() -> None:
        with autocast(x.device):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def kernel(name: str | None) -> Iterator[None]:
    before = os.environ.get(KERNEL_ENV)
    if name is not None:
        os.environ[KERNEL_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = before


def measure(step: Callable[[], None], device: torch.device, steps: int, top: int) -> dict[str, Any]:
    """Wall ms per step (after 3 warm-up steps) and profiled GPU kernel ms per step."""
    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    wall = (time.perf_counter() - t0) / steps * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    # operator calls the host makes per step (top-level ATen calls, not their inner calls)
    calls = sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    events = prof.key_averages()
    # the device's own events (kernels, copies), as the profiler's table sums them: an
    # operator's row repeats the time of the kernels it launched
    gpu = sum(
        e.self_device_time_total
        for e in events
        if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation
    )
    gpu = gpu / steps / 1e3
    table = ""
    if top:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = events.table(sort_by=key, row_limit=top, max_name_column_width=50)
    return {"wall_ms": wall, "gpu_ms": gpu, "calls": calls / steps, "table": table}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(BLOCKS), default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=0, help="print the N costliest ops of the QAT step")
    p.add_argument("--kernel", choices=["eager", "triton"], action="append", default=None)
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="also float and QAT under torch.compile (MODE: default unless named)",
    )
    p.add_argument(
        "--gpu-like",
        action="store_true",
        help="on the CPU too: channels_last and bf16 autocast, as every CUDA run (operator counts)",
    )
    a = p.parse_args()
    GPU_LIKE["cpu"] = a.gpu_like
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32, generator=gen).to(device)
    if _gpu_like(device):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch,), generator=gen).to(device)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
        + (", channels_last, bf16 autocast" if a.gpu_like else "")
    )
    print(f"device: {name}; {a.model} width {a.width} batch {a.batch}, {a.steps} steps", flush=True)
    rows: list[tuple[str, dict[str, Any]]] = []

    def run(label: str, net: nn.Module, top: int = 0) -> None:
        r = measure(step_fn(net, x, y), device, a.steps, top)
        rows.append((label, r))
        base = rows[0][1]
        print(
            f"{label:34s} wall {r['wall_ms']:8.2f} ms/step ({r['wall_ms'] / base['wall_ms']:5.2f}x)"
            f"  ATen calls {r['calls']:6.0f}/step"
            f"  GPU kernels {r['gpu_ms']:8.2f} ms/step"
            + (
                f" ({r['gpu_ms'] / base['gpu_ms']:5.2f}x), busy {r['gpu_ms'] / r['wall_ms']:4.0%}"
                if base["gpu_ms"]
                else ""
            ),
            flush=True,
        )
        if r["table"]:
            print(r["table"], flush=True)

    torch.manual_seed(0)
    float_net = build(a.model, a.width, device)
    run("float", float_net)
    for k in a.kernel or ["eager"]:
        with kernel(k):
            run(f"QAT ({k})", quantize(build(a.model, a.width, device), x), a.top)
            net = quantize(build(a.model, a.width, device), x)
            switch_off(net, "act")
            run(f"QAT weights only ({k})", net)
            net = quantize(build(a.model, a.width, device), x)
            switch_off(net, "weight")
            run(f"QAT activations only ({k})", net)
    if a.compile:  # last: compiling takes a while, and a cut-off run keeps the lines above
        torch.manual_seed(0)
        mode = a.compile
        run(f"float, compile {mode}", torch.compile(build(a.model, a.width, device), mode=mode))
        run(
            f"QAT, compile {mode}",
            torch.compile(quantize(build(a.model, a.width, device), x), mode=mode),
        )


if __name__ == "__main__":
    main()
