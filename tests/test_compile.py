"""``trainer.compile``: fits train through ``torch.compile`` with the eager path's numbers.

The setting exists for the GPU QAT step, which waits on the host (``benchmarks/qat_profile.py``);
what can be checked without a GPU is checked here: the config's values and its one-line error,
that a compiled fit really trains through compiled code and leaves nothing behind (no wrapper in
the state dict, no compiled code kept), that a training step of a fake-quantized net with exit
heads and LSQ steps has the eager step's loss and gradients within rounding, and that the prefix
cache tells the two apart while a config without the setting (an older run's) keys as before.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from omegaconf import open_dict

from chaincomp.chain import chain_spec, prefix_keys
from chaincomp.errors import ConfigError
from chaincomp.layers.exits import attach_exits
from chaincomp.layers.quant import ActQuantizer
from chaincomp.pipeline import COMPILE_MODES, build_module, fit, trainer_config
from chaincomp.stages.quantize import QuantizeSettings, quantize_module


def test_compile_values_and_the_error_naming_the_key(cfg_factory) -> None:  # type: ignore[no-untyped-def]
    assert trainer_config(cfg_factory()).compile_mode is None  # off by default
    assert trainer_config(cfg_factory("trainer.compile=true")).compile_mode == "default"
    for mode in COMPILE_MODES:
        assert trainer_config(cfg_factory(f"trainer.compile={mode}")).compile_mode == mode
    with pytest.raises(ConfigError) as e:
        trainer_config(cfg_factory("trainer.compile=fast"))
    msg = str(e.value)
    assert "trainer.compile" in msg and "'fast'" in msg
    assert "reduce-overhead" in msg and "false" in msg and "\n" not in msg


def test_the_cache_tells_compiled_fits_apart_and_keys_old_configs_as_before(cfg_factory) -> None:  # type: ignore[no-untyped-def]
    overrides = ("data=digits", "model=small_cnn", "chain.order=[Q]")
    plain, compiled = cfg_factory(*overrides), cfg_factory(*overrides, "trainer.compile=true")
    before = cfg_factory(*overrides)  # a config from before the setting existed
    with open_dict(before):
        del before.trainer["compile"]
    keys = [prefix_keys(c, chain_spec(c)) for c in (plain, compiled, before)]
    assert keys[0] == keys[2]
    assert keys[0][0] != keys[1][0] and keys[0][1] != keys[1][1]


def _quantized_exit_module(digits_base):  # type: ignore[no-untyped-def]
    cfg, dm, net = digits_base
    module = build_module(cfg, dm, copy.deepcopy(net))
    torch.manual_seed(3)
    attach_exits(module, [0], "pool", 1.0, dm.example_input(1), 0.5)
    quantize_module(module, dm, QuantizeSettings(w_bits=4, a_bits=4, learn_scale=True))
    return cfg, dm, module


def test_a_compiled_training_step_has_the_eager_loss_and_gradients(digits_base) -> None:  # type: ignore[no-untyped-def]
    """One training step of a fake-quantized net with an exit head and LSQ steps, through
    ``training_step`` (the task loss plus the heads' auxiliary loss), eager and compiled from
    the same state: the same loss, and every parameter's gradient within 1 % in norm (measured:
    1e-3 at worst, on an LSQ step, where a value's rounding flips; a wrong gradient is off by
    its own size). Several steps are not compared: a flipped level compounds, and the compiled
    kernels' summation order (so their rounding) differs between processes."""
    _, dm, eager = _quantized_exit_module(digits_base)
    compiled = copy.deepcopy(eager)
    x, y = next(iter(dm.loader("train", "cpu")))

    def step(module, mode):  # type: ignore[no-untyped-def]
        module.compile_mode = mode
        module.on_fit_start()  # what a fit does first: builds the compiled net when asked
        assert (module.__dict__["_train_net"] is not None) == (mode is not None)
        module.train()
        loss = module.training_step((x, y), 0)
        loss.backward()
        module.remove_guard()
        assert module.__dict__["_train_net"] is None
        return loss.detach(), {
            n: p.grad for n, p in module.named_parameters() if p.grad is not None
        }

    loss_e, grads_e = step(eager, None)
    loss_c, grads_c = step(compiled, "default")
    assert torch.allclose(loss_c, loss_e, rtol=1e-5, atol=0)
    assert grads_c.keys() == grads_e.keys()
    names = list(grads_e)
    assert any(n.endswith("act_quant.step") for n in names)
    assert any(n.startswith("net.exits.") for n in names)  # the auxiliary loss reached the heads
    for n in names:
        err = (grads_c[n] - grads_e[n]).norm() / grads_e[n].norm()
        assert err < 1e-2, (n, float(err))


def test_a_compiled_fit_trains_through_compiled_code_and_leaves_nothing(
    digits_base, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, module = _quantized_exit_module(digits_base)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    tcfg = dataclasses.replace(trainer_config(cfg), max_epochs=1, limit_train_batches=2)
    calls: list[tuple[object, str]] = []
    real = torch.compile

    def spy(model, **kw):  # type: ignore[no-untyped-def]
        calls.append((model, kw["mode"]))
        return real(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    fit(copy.deepcopy(module), dm, tcfg)
    assert calls == []  # off by default
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fit(module, dm, dataclasses.replace(tcfg, compile=True))
    assert calls == [(module.net, "default")]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it compiled
    assert module.__dict__["_train_net"] is None  # dropped when the fit ended
    after = module.state_dict()
    assert after.keys() == start.keys()  # no compiled wrapper's parameters beside the net's
    steps = [k for k in after if k.endswith("act_quant.step")]
    heads = [k for k in after if k.startswith("net.exits.") and k.endswith("weight")]
    assert steps and heads
    for k in (*steps, *heads):  # LSQ steps and exit heads trained
        assert not torch.equal(after[k], start[k]), k
    quants = [m for m in module.net.modules() if isinstance(m, ActQuantizer)]
    assert quants and all(q.is_calibrated for q in quants)


@pytest.mark.slow
def test_a_compiled_dpqe_chain_runs_and_replays(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every stage's fits compiled (D's student beside its eager teacher, P's phases, Q's
    calibrated net, E's heads): the chain ends as the eager one does within the recipe's noise,
    with the same architecture, and its saved chain replays to the same outputs."""
    from chaincomp.chain import load_chain, run_chain
    from chaincomp.pipeline import build_data

    from .conftest import compose_cfg
    from .test_chain import FAST

    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("trainer.compile=true",))):
        cfg = compose_cfg(*FAST, f"chain.cache_dir={tmp_path / 'cache'}", *extra)
        runs[name] = (cfg, run_chain(cfg, tmp_path / name))
    eager, (cfg, compiled) = runs["eager"][1], runs["compiled"]
    assert compiled.letters == eager.letters == "DPQE"
    assert not any(s.cached for s in compiled.steps)  # its own cache entries, none of eager's
    for a, b in zip(eager.steps[:4], compiled.steps[:4], strict=True):  # before E's choice
        assert (a.name, a.params, a.bitops) == (b.name, b.params, b.bitops)
    assert abs(compiled.last.val_metric - eager.last.val_metric) < 10.0
    dm = build_data(cfg)
    fresh = load_chain(tmp_path / "compiled" / "chain", build_module(cfg, dm))
    module = compiled.module
    x, _ = next(iter(dm.loader("test", "cpu")))
    module.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(module(x), fresh(x))
