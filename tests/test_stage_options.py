"""Stage settings no other test runs, each checked by its effect on the network: iterative,
global and Taylor pruning, post-training quantization, jointly trained and linear exit heads,
a named distillation student, and a baseline loaded from a checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from chaincomp.errors import ConfigError
from chaincomp.models.base import ClassifierHead
from chaincomp.pipeline import build_module
from chaincomp.stages import Distill, EarlyExit, Prune, QuantConv2d, Quantize, QuantLinear

from .conftest import CONF, QUIET, compose_cfg, make_ctx


def _out_channels(net: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}


def _counting(ctx: Any, calls: list[tuple[int, int]]) -> Any:
    """``ctx`` whose fit also records (channels of the net it trains, epochs) per call."""
    real = ctx.fit

    def fit(module: Any, epochs: int, callbacks: Any = (), lr: Any = None) -> float:
        calls.append((sum(_out_channels(module.net).values()), epochs))
        return float(real(module, epochs, callbacks=callbacks, lr=lr))

    return dataclasses.replace(ctx, fit=fit)


def _pruned(digits_base: Any, settings: dict[str, Any]) -> nn.Module:
    cfg, dm, net = digits_base
    module = build_module(cfg, dm, copy.deepcopy(net))
    Prune.from_config({"epochs": 0, **settings}).run(module, make_ctx(cfg, dm))
    return module.net


def _kept(before: nn.Module, after: nn.Module) -> dict[str, list[int]]:
    """Per batch norm, the indices of the original channels that survived pruning (Torch-Pruning
    keeps the surviving channels' parameters, so each one is found by its affine values)."""
    kept = {}
    for name, bn in after.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            old = before.get_submodule(name)
            pairs = list(zip(old.weight.tolist(), old.bias.tolist(), strict=True))
            assert len(set(pairs)) == len(pairs)  # the original channels are distinguishable
            kept[name] = [
                pairs.index(p) for p in zip(bn.weight.tolist(), bn.bias.tolist(), strict=True)
            ]
    return kept


# ------------------------------------------------------------------------------------- prune


@pytest.mark.parametrize(("ratio", "tolerance"), [(0.5, 0), (0.3, 1)])
def test_prune_in_two_steps_fine_tunes_after_each_and_ends_where_one_step_does(
    digits_base, ratio: float, tolerance: int
) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, net = digits_base
    one_step = _out_channels(_pruned(digits_base, {"ratio": ratio}))
    module = build_module(cfg, dm, copy.deepcopy(net))
    calls: list[tuple[int, int]] = []
    ctx = _counting(make_ctx(cfg, dm, max_batches=2), calls)
    Prune.from_config({"ratio": ratio, "steps": 2, "epochs": 1}).run(module, ctx)
    two_steps = _out_channels(module.net)
    # channel counts per layer agree with one step of the same ratio, up to each step's rounding
    assert two_steps.keys() == one_step.keys()
    assert all(abs(two_steps[n] - one_step[n]) <= tolerance for n in one_step)
    # two fine-tunes of `epochs` each: the first on the half-way net, the second on the final one
    total0, total = 120, sum(two_steps.values())
    assert len(calls) == 2 and [e for _, e in calls] == [1, 1]
    assert total0 > calls[0][0] > calls[1][0] == total
    if ratio == 0.5:  # the first step removes a quarter: int(0.75 * C) per conv
        assert calls[0][0] == 6 + 6 + 6 + 12 + 12 + 24 + 24


def test_global_prune_ranks_layers_together_and_removes_the_ratio(digits_base) -> None:  # type: ignore[no-untyped-def]
    _, _, net = digits_base
    before = _out_channels(net)
    after = _out_channels(_pruned(digits_base, {"ratio": 0.5, "scope": "global"}))
    kept = {n: after[n] / before[n] for n in before}
    assert len({round(k, 6) for k in kept.values()}) > 1  # not the same share everywhere
    assert all(k >= 0.1 for k in kept.values())  # max_layer_ratio 0.9: no layer loses more
    # the total removed is the ratio of all channels (within a channel or two)
    assert abs(sum(after.values()) - 0.5 * sum(before.values())) <= 2
    uniform = _out_channels(_pruned(digits_base, {"ratio": 0.5}))
    assert after != uniform


def test_taylor_prune_removes_the_expected_count_but_other_channels_than_l1(digits_base) -> None:  # type: ignore[no-untyped-def]
    _, _, net = digits_base
    taylor = _pruned(digits_base, {"ratio": 0.5, "importance": "taylor"})
    l1 = _pruned(digits_base, {"ratio": 0.5, "importance": "l1"})
    expected = {n: int(c * 0.5) for n, c in _out_channels(net).items()}
    assert _out_channels(taylor) == expected == _out_channels(l1)
    kept_taylor, kept_l1 = _kept(net, taylor), _kept(net, l1)
    assert kept_taylor.keys() == kept_l1.keys() and len(kept_l1) == 7
    differ = [n for n in kept_l1 if sorted(kept_l1[n]) != sorted(kept_taylor[n])]
    assert differ, "taylor kept the same channels as l1 in every layer"


# ---------------------------------------------------------------------------------- quantize


def test_ptq_only_calibrates_weights_stay_and_lie_on_the_grid(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    float_net = copy.deepcopy(module.net)
    original = {k: v.clone() for k, v in module.net.state_dict().items()}
    calls: list[tuple[int, int]] = []
    ctx = _counting(make_ctx(cfg, dm), calls)
    stage = Quantize.from_config({"ptq": True, "epochs": 3, "w_bits": 3, "a_bits": 4})
    record = stage.run(module, ctx)
    assert not [c for c in calls if c[1] > 0]  # no training at all
    assert record.train_time_s == 0
    # every float parameter and BN statistic is exactly what it was
    state = module.net.state_dict()
    for key, value in original.items():
        assert torch.equal(state[key], value), key
    layers = [m for m in module.net.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(layers) == 8 and all(m.act_quant.is_calibrated for m in layers)
    for m in layers:
        # per output channel: integers k in [-q, q] times max|w_c| / q, q = 2^(b-1) - 1
        q = 2 ** (m.weight_bits - 1) - 1
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        wq = m.quantized_weight().detach().reshape(w.shape)
        step = w.abs().amax(dim=1, keepdim=True) / q
        k = wq / step
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert k.round().abs().max() <= q
        assert (wq - w).abs().max() <= step.max() / 2 + 1e-6  # round to nearest
        assert max(len(torch.unique(row)) for row in wq) <= 2**m.weight_bits - 1
    inner = [
        m for n, m in module.net.named_modules() if isinstance(m, QuantConv2d) and n != "stem.0"
    ]
    assert all(m.weight_bits == 3 for m in inner)
    # the quantized net computes something else than the float one
    x, _ = next(iter(dm.loader("val", "cpu")))
    module.eval()
    float_net.eval()
    with torch.no_grad():
        assert not torch.allclose(module(x), float_net(x), atol=1e-3)


# -------------------------------------------------------------------------------- early exit


def test_joint_exit_training_changes_the_backbone(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    module = digits_module
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    stage = EarlyExit.from_config({"epochs": 1, "train": "joint", "threshold_mode": "fixed"})
    stage.run(module, make_ctx(cfg, dm, max_batches=5))
    after = module.net.backbone.state_dict()
    weights = [k for k in after if k.endswith("weight")]
    changed = [k for k in weights if not torch.equal(before[k], after[k])]
    assert len(changed) == len(weights)  # every conv, BN and the final linear trained
    stats = [k for k in after if k.endswith("running_mean")]
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # BN in train mode
    assert all(p.requires_grad for p in module.net.parameters())


def test_linear_exit_heads_are_linear_and_take_samples(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    from chaincomp.cost import count_cost
    from chaincomp.pipeline import measure

    cfg, dm, _ = digits_base
    module = digits_module
    stage = EarlyExit.from_config(
        {"epochs": 1, "head": "linear", "threshold_mode": "fixed", "threshold": 0.0}
    )
    stage.run(module, make_ctx(cfg, dm, max_batches=5))
    net = module.net
    channels = net.backbone.exit_channels()
    assert net.points == [0, 1]
    report = count_cost(net, dm.example_input(1))
    for k, p in enumerate(net.points):
        head = net.exits[k]
        assert type(head) is ClassifierHead
        assert not [m for m in head.modules() if isinstance(m, nn.Conv2d)]
        assert (head.fc.in_features, head.fc.out_features) == (channels[p], 10)
        assert report.sum([f"exits.{k}"], "macs") == channels[p] * 10  # pool + one linear
    row = measure(module, dm)  # threshold 0: every sample leaves at the first head
    assert row["test_exit_rates"] == [1.0, 0.0, 0.0]
    x, _ = next(iter(dm.loader("test", "cpu")))  # eval batch 1024: the whole test split
    module.eval()
    with torch.no_grad():
        outs = net.forward_all(x)
    conf0 = torch.softmax(outs[0], 1).amax(1)
    net.threshold.fill_(conf0.median().item())  # half the samples are that sure at exit 0
    row = measure(module, dm)
    assert 0.4 < row["test_exit_rates"][0] < 0.6
    with torch.no_grad():
        y = module(x)
    first = conf0 >= float(net.threshold)  # those samples got the first head's answer
    assert torch.allclose(y[first], outs[0][first], atol=1e-5)
    assert not torch.allclose(y[~first], outs[0][~first], atol=1e-3)


# ----------------------------------------------------------------------------------- distill


@pytest.mark.parametrize(
    ("student", "width_mult", "expected"),
    [
        # conf/model/small_cnn.yaml: widths [16, 32, 64] at width_mult 1.0
        (
            "small_cnn",
            1.0,
            {
                "stem.0.weight": (16, 1, 3, 3),
                "stages.2.1.0.weight": (64, 64, 3, 3),
                "head.fc.weight": (10, 64),
            },
        ),
        # conf/model/resnet10.yaml: widths [64, 128, 256, 512] x 0.25, here x 0.5 again
        ("resnet10", 0.5, {"stem.0.weight": (8, 1, 3, 3), "head.fc.weight": (10, 64)}),
    ],
)
def test_distill_into_a_named_student_builds_that_model(
    digits_base, digits_module, student: str, width_mult: float, expected: dict[str, tuple]
) -> None:  # type: ignore[no-untyped-def]
    from omegaconf import OmegaConf

    from chaincomp.models import ResNet, SmallCNN

    cfg, dm, _ = digits_base
    module = digits_module
    teacher = module.net
    ctx = make_ctx(cfg, dm)
    # the student's config is composed by Hydra from conf/model, as from the shell
    composed = compose_cfg(
        f"+model@chain.steps.D.settings.student={student}",
        f"chain.steps.D.settings.width_mult={width_mult}",
        "chain.steps.D.settings.epochs=0",
    )
    settings = OmegaConf.to_container(composed.chain.steps.D.settings, resolve=True)
    assert isinstance(settings, dict) and settings["student"]["name"] == student
    Distill.from_config(settings).run(module, ctx)
    net = module.net
    conf = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{student}.yaml"))
    assert isinstance(conf, dict)
    if student == "small_cnn":
        reference: nn.Module = SmallCNN(1, 10, (8, 8), conf["widths"], conf["width_mult"])
        assert type(net) is SmallCNN
    else:
        reference = ResNet(1, 10, conf["blocks"], conf["widths"], conf["width_mult"] * width_mult)
        assert type(net) is ResNet
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: shapes[k] for k in expected} == expected
    assert shapes != {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    assert ctx.model_cfg["name"] == student  # later steps see the student's architecture


def test_distill_student_by_name_is_one_error_naming_the_hydra_syntax() -> None:
    with pytest.raises(
        ConfigError,
        match=r"chain.steps.D.settings.student: invalid value 'resnet18'; allowed: null or a "
        r"model config composed by Hydra: \+model@chain.steps.D.settings.student=<name>",
    ):
        Distill.Settings.from_dict({"student": "resnet18"}, "chain.steps.D.settings")


# ------------------------------------------------------------------------ baseline checkpoint


def test_baseline_from_a_checkpoint_is_loaded_not_trained(digits_base, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from chaincomp.chain import CacheStats, run_chain

    _, dm, net = digits_base
    ckpt = tmp_path / "baseline.pt"
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, ckpt)
    saved = build_module(
        compose_cfg("data=digits", "model=small_cnn", *QUIET), dm, copy.deepcopy(net)
    )
    test_metric = saved.evaluate(dm.loader("test", "cpu"))
    cfg = compose_cfg(
        "data=digits",
        "model=small_cnn",
        "model.width_mult=0.5",
        "trainer.max_epochs=3",
        "chain.order=[]",
        f"chain.baseline.checkpoint={ckpt}",
        "chain.cache_dir=null",
        *QUIET,
    )
    stats = CacheStats()
    summary = run_chain(cfg, tmp_path / "run", stats=stats)
    assert stats.baselines_trained == 0
    base = summary.baseline
    assert base.test_metric == pytest.approx(test_metric, abs=1e-9)
    assert base.test_metric > 80  # the trained net, not a fresh one
    state = summary.module.net.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(state[k].cpu(), v.cpu()), k


# ------------------------------------------------------------------- CPU convolution kernels


@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_onednn_decides_the_kernels_of_training_only(digits_base, onednn: bool) -> None:  # type: ignore[no-untyped-def]
    import pytorch_lightning as pl

    from chaincomp.pipeline import fit, trainer_config

    cfg, dm, net = digits_base
    tcfg = dataclasses.replace(trainer_config(cfg), cpu_onednn=onednn, max_epochs=1)
    seen: list[bool] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            seen.append(torch.backends.mkldnn.enabled)

    module = build_module(cfg, dm, copy.deepcopy(net))
    assert torch.backends.mkldnn.enabled
    fit(module, dm, tcfg, [Spy()])
    assert seen and set(seen) == {onednn}  # every training batch ran with the chosen kernels
    assert torch.backends.mkldnn.enabled  # and the process's setting is restored afterwards


_HEAP_PROBE = """
import resource, sys, torch
if sys.argv[1] == "fit":  # a one-batch fit with the trainer's default settings
    from chaincomp.pipeline import build_data, build_module, fit, trainer_config
    from tests.conftest import QUIET, compose_cfg
    cfg = compose_cfg("data=digits", "model=small_cnn", "trainer.max_epochs=1",
                      "trainer.limit_train_batches=1", *QUIET)
    dm = build_data(cfg)
    fit(build_module(cfg, dm), dm, trainer_config(cfg))
else:
    assert sys.argv[1] == "defaults"
for _ in range(2):
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB, allocated, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_fit_makes_freed_tensors_reuse_the_heap_without_page_faults() -> None:
    """After a fit (``trainer.cpu_keep_heap``, on by default), 20 allocations of a 64 MiB tensor
    reuse the freed memory: far fewer page faults than glibc's defaults, which return the
    memory to the kernel and fault 16,384 pages back in per allocation."""
    faults = {}
    for mode in ("defaults", "fit"):
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, mode],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,
            check=True,
        )
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["defaults"] > 20 * 16384 * 0.9
    assert faults["fit"] < 2000


# ------------------------------------------------------------------ fine-tune distillation


def _noisy_labels(module: Any) -> None:
    """The task loss of ``module`` sees random labels (the KD term sees the inputs only)."""
    task = copy.copy(module.task)
    loss = task.loss
    g = torch.Generator().manual_seed(0)
    task.loss = lambda out, target: loss(out, torch.randint(0, 10, target.shape, generator=g))
    module.task = task


@pytest.mark.parametrize("stage", ["quantize", "prune"])
def test_kd_alpha_distils_the_fine_tune_from_the_steps_input_network(
    digits_base: Any, stage: str
) -> None:
    """Fine-tuned on random labels, the net forgets the task; with ``kd_alpha`` the step's
    input network holds it: the effect of the KD term, measured on the validation set."""
    cfg, dm, net = digits_base
    cls = {"quantize": Quantize, "prune": Prune}[stage]
    extra = {"ratio": 0.3} if stage == "prune" else {}
    accuracy = {}
    for alpha in (0.0, 0.9):
        module = build_module(cfg, dm, copy.deepcopy(net))
        _noisy_labels(module)
        step = cls.from_config({"epochs": 2, "lr": 0.05, "kd_alpha": alpha, **extra})
        step.run(module, make_ctx(cfg, dm))
        assert module.loss_terms == {} and module.task_weight == 1.0  # removed after the fits
        accuracy[alpha] = module.evaluate(dm.loader("val", "cpu"))
    base = build_module(cfg, dm, copy.deepcopy(net)).evaluate(dm.loader("val", "cpu"))
    assert accuracy[0.0] < base - 20, accuracy  # random labels alone ruin it
    assert accuracy[0.9] > base - 10, (base, accuracy)  # the input net's knowledge holds it


def test_kd_teacher_baseline_distils_from_the_contexts_baseline_not_the_input(
    digits_base: Any,
) -> None:
    """``kd_teacher: baseline`` takes its teacher from ``ctx.baseline``: an untrained
    "baseline" teaches the quantized net to forget the task, the trained input net does not."""
    cfg, dm, net = digits_base
    untrained = build_module(cfg, dm).net
    accuracy = {}
    for teacher in ("input", "baseline"):
        module = build_module(cfg, dm, copy.deepcopy(net))
        ctx = dataclasses.replace(make_ctx(cfg, dm), baseline=lambda: untrained)
        settings = {"epochs": 2, "lr": 0.05, "kd_alpha": 0.9, "kd_teacher": teacher}
        Quantize.from_config(settings).run(module, ctx)
        accuracy[teacher] = module.evaluate(dm.loader("val", "cpu"))
    assert accuracy["input"] > 90 and accuracy["baseline"] < accuracy["input"] - 20, accuracy
    module = build_module(cfg, dm, copy.deepcopy(net))  # no baseline in the context: one error
    with pytest.raises(ConfigError, match=r"stage\.quantize\.kd_teacher.*allowed: input"):
        Quantize.from_config({"kd_alpha": 0.5, "kd_teacher": "baseline"}).run(
            module, make_ctx(cfg, dm)
        )


def test_kd_alpha_is_a_fine_tune_setting_of_p_q_and_low_rank_only() -> None:
    with pytest.raises(ConfigError, match=r"chain\.steps\.Q\.settings\.kd_alpha.*\[0, 1\)"):
        Quantize.from_config({"kd_alpha": 1.0}, "chain.steps.Q.settings")
    with pytest.raises(ConfigError, match=r"stage\.distill.*kd_alpha"):  # D has its own alpha
        Distill.from_config({"kd_alpha": 0.5})
