"""benchmarks/qat_profile.py: its QAT variants quantize what their labels say, and it runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qat_profile.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaincomp_bench_qat_profile", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_variants_switch_off_exactly_one_quantizer() -> None:
    qp = _script()
    cpu = torch.device("cpu")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    float_net = qp.build("resnet18", 0.125, cpu)
    outs = {}
    for part in ("both", "weight", "act"):
        net = qp.build("resnet18", 0.125, cpu)
        net.load_state_dict(float_net.state_dict())
        qp.quantize(net, x)
        layers = [m for m in net.modules() if isinstance(m, qp.QUANT_LAYERS)]
        assert len(layers) == 21  # every conv and the classifier
        assert [m.weight_bits for m in (layers[0], layers[1], layers[-1])] == [8, 4, 8]
        if part != "both":
            qp.switch_off(net, part)
        conv = layers[1]
        w = conv.effective_weight()
        if part == "weight":
            assert w is conv.weight
        else:  # 4-bit per-channel grid: at most 15 levels per output channel
            assert not torch.equal(w, conv.weight) and w[0].unique().numel() <= 15
        a = torch.rand(2, conv.in_channels, 8, 8) * 3
        assert torch.equal(conv.act_quant(a), a) == (part == "act")
        net.eval()
        with torch.no_grad():
            outs[part] = net(x)
    float_net.eval()
    with torch.no_grad():
        ref = float_net(x)
    for part, out in outs.items():
        assert not torch.allclose(out, ref), part


def test_it_prints_every_variant_on_the_cpu() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--width", "0.125", "--batch", "4", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    calls = {}
    for label in ("float", "QAT (eager)", "QAT weights only", "QAT activations only"):
        line = next(x for x in r.stdout.splitlines() if x.startswith(label) and "ms/step" in x)
        calls[label] = int(line.split("ATen calls")[1].split("/step")[0])
    extra = {k: v - calls["float"] for k, v in calls.items() if k != "float"}
    # each quantizer adds host calls, and the two halves add up to the whole
    assert extra["QAT weights only"] > 0 and extra["QAT activations only"] > 0
    assert extra["QAT weights only"] + extra["QAT activations only"] == extra["QAT (eager)"]
