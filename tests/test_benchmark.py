"""benchmarks/train_throughput.py: every path trains on the device chosen before fitting."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from chaincomp.layers.exits import ExitNet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
PATHS = ("framework", "plain", "qat", "exits", "exits_qat")
TINY = ("data=digits", "model=small_cnn")


def _bench() -> ModuleType:
    name = "chaincomp_bench_train_throughput"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _check(result: dict, device_type: str) -> None:  # type: ignore[type-arg]
    assert torch.device(result["device"]).type == device_type
    # every path trained on one device, the one chosen before the first fit
    inter = ("interleaved", "interleaved_plain") if result["interleaved"] else ()
    assert set(result["trained_on"]) == {*PATHS, *inter}
    assert set(result["trained_on"].values()) == {result["device"]}
    assert result["trained_on"]["plain"] == result["trained_on"]["framework"]
    for path in PATHS:
        ips = result["images_per_s"][path]
        assert math.isfinite(ips) and ips > 0, (path, ips)
    for key in ("ratio", "qat_overhead", "exits_qat_overhead"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # the early-exit variants really trained their exit heads
    for path in ("exits", "exits_qat"):
        net = result["modules"][path].net
        assert isinstance(net, ExitNet) and len(net.exits) == len(result["exit_points"]) > 0
        before = result["exit_heads_before"][path]
        after = {k: v.detach().cpu() for k, v in net.exits.state_dict().items()}
        weights = [k for k in before if k.endswith("weight") and before[k].is_floating_point()]
        assert weights
        assert any(not torch.equal(before[k], after[k]) for k in weights), path


def test_benchmark_paths_share_the_chosen_device_cpu() -> None:
    bench = _bench()
    result = bench.run([*TINY, "trainer=cpu"], epochs=2, steps=2, rounds=2)
    _check(result, "cpu")
    assert result["device"] == "cpu"
    text = bench.report(result)
    for label in ("ratio framework/plain :", "QAT overhead float/QAT:", "QAT overhead w/ exits :"):
        assert label in text
    # two rounds: every path measured twice, the reported figure is the median of the two
    assert result["rounds"] == 2
    for path in PATHS:
        a, b = result["samples"][path]
        assert result["images_per_s"][path] == pytest.approx((a + b) / 2)


def test_interleaved_steps_leave_the_framework_fit_untouched() -> None:
    """The interleaved fit pairs each framework step with one plain-loop step; the plain steps
    leave the framework's training as it is (its weights end bit-equal to the framework path's
    own fit), and the plain loop really trained, on the chosen device."""
    bench = _bench()
    epochs, steps, rounds = 3, 3, 1
    result = bench.run([*TINY, "trainer=cpu"], epochs, steps, qat=False, exits=False, rounds=rounds)
    assert result["device"] == "cpu" and result["interleaved"]  # on by default on the CPU
    assert result["trained_on"]["interleaved_plain"] == "cpu"
    # the first interval of each timed epoch has no plain step before it
    assert result["interleaved"]["pairs"] == rounds * (epochs - 1) * (steps - 1)
    inter = result["interleaved"]
    assert inter["framework_ms"] > 0 and inter["plain_ms"] > 0 and inter["ratio"] > 0
    own = result["modules"]["framework"].state_dict()
    paired = result["modules"]["interleaved"].state_dict()
    assert own.keys() == paired.keys()
    for k in own:
        assert torch.equal(own[k], paired[k]), k
    # the plain loop's own net trained: not the initial weights, nor the framework's
    plain = result["modules"]["interleaved_plain"].state_dict()
    net = result["modules"]["framework"].net.state_dict()
    weights = [k for k in plain if k.endswith("weight")]
    assert weights and plain.keys() == net.keys()
    assert all(not torch.equal(plain[k], net[k]) for k in weights)
    start = result["modules"]["initial"].net.state_dict()
    assert all(not torch.equal(plain[k], start[k]) for k in weights)
    assert "ratio, interleaved    :" in bench.report(result)
    off = bench.run([*TINY, "trainer=cpu"], 2, 2, qat=False, exits=False, interleave=False)
    assert off["interleaved"] == {} and "interleaved" not in off["trained_on"]


def test_with_trainer_compile_both_paths_train_compiled(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``trainer.compile``: the plain loop compiles its net as the framework's fit does, so the
    ratio compares compiled with compiled (Dynamo's tracing without code generation here: the
    plumbing is under test, the compiler in tests/test_compile.py)."""
    bench = _bench()
    real = torch.compile
    calls: list[tuple[int, str]] = []

    def spy(model, mode, dynamic):  # type: ignore[no-untyped-def]
        calls.append((id(model), mode))
        return real(model, backend="eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", spy)
    args = [*TINY, "trainer=cpu", "trainer.compile=reduce-overhead"]
    result = bench.run(args, 2, 2, qat=False, exits=False, interleave=False)
    assert [mode for _, mode in calls] == ["reduce-overhead"] * 2
    assert calls[0][0] != calls[1][0]  # two nets: the framework's and the plain loop's
    assert result["compile"] == "reduce-overhead"
    assert "torch.compile(mode='reduce-overhead')" in bench.report(result)
    off = bench.run([*TINY, "trainer=cpu"], 2, 2, qat=False, exits=False, interleave=False)
    assert len(calls) == 2 and off["compile"] is None


def test_benchmark_fails_loudly_on_a_device_mismatch() -> None:
    bench = _bench()
    with pytest.raises(RuntimeError, match="plain trained on"):
        bench._trained_on("plain", {"cpu"}, torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="framework trained on"):
        bench._trained_on("framework", {"cpu", "cuda:0"}, torch.device("cuda", 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_benchmark_trains_on_cuda() -> None:
    result = _bench().run([*TINY, "trainer=gpu"], epochs=2, steps=2)
    _check(result, "cuda")
