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
    assert set(result["trained_on"]) == set(PATHS)
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
