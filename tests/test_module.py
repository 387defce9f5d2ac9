"""CompressibleModule + optimizer configs: real training on digits, loss terms, both tasks."""

from __future__ import annotations

import itertools

import pytest
import torch

from chaincomp.errors import ConfigError
from chaincomp.optim import OPTIMIZERS, SCHEDULES, OptimConfig
from chaincomp.pipeline import build_data, build_module, fit, measure, trainer_config

from .conftest import compose_cfg

QUIET = ("trainer.enable_progress_bar=false", "tracking.enabled=false")


def test_training_on_digits_learns() -> None:
    cfg = compose_cfg("data=digits", "model=small_cnn", "trainer.max_epochs=3", *QUIET)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    before = measure(module, dm)["val_metric"]
    fit(module, dm, trainer_config(cfg))
    after = measure(module, dm)
    assert before < 30 and after["val_metric"] > 85
    assert after["macs"] > 0 and after["bitops"] == after["macs"] * 1024


def test_fit_leaves_the_module_on_the_device_it_trained_on(monkeypatch) -> None:
    """Lightning's teardown moves the module to the CPU when ``fit`` ends; ``pipeline.fit`` puts
    it back on the trainer's root device. Stub trainer: its root device is ``meta`` (a stand-in
    for the GPU, which this machine lacks) and its ``fit`` leaves the module on the CPU, where
    Lightning's teardown would have put it."""
    from types import SimpleNamespace

    from chaincomp.pipeline import TrainerConfig

    cfg = compose_cfg("data=digits", "model=small_cnn", *QUIET)
    dm = build_data(cfg)
    module = build_module(cfg, dm)

    def stub_fit(mod, datamodule=None):  # type: ignore[no-untyped-def]
        assert next(mod.parameters()).device.type == "cpu"

    stub = SimpleNamespace(fit=stub_fit, strategy=SimpleNamespace(root_device=torch.device("meta")))
    monkeypatch.setattr(TrainerConfig, "make", lambda self, *a, **k: stub)
    fit(module, dm, trainer_config(cfg), max_epochs=1)
    assert {p.device.type for p in module.parameters()} == {"meta"}


def test_stage_loss_terms_are_added() -> None:
    cfg = compose_cfg("data=digits", "model=small_cnn", *QUIET)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    batch = next(iter(dm.loader("train", "cpu")))
    torch.manual_seed(0)
    module.eval()  # same BN statistics for both calls
    plain = module.training_step(batch, 0)
    module.loss_terms["const"] = lambda m, x, out, target: torch.tensor(5.0)
    with_term = module.training_step(batch, 0)
    assert with_term.item() == pytest.approx(plain.item() + 5.0, abs=1e-5)


def test_rotation_training_reports_mae_in_degrees() -> None:
    cfg = compose_cfg(
        "data=digits", "data.task=rotation", "model=small_cnn", "trainer.max_epochs=4", *QUIET
    )
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    untrained = measure(module, dm, ("val",))["val_metric"]
    fit(module, dm, trainer_config(cfg))
    trained = measure(module, dm, ("val",))["val_metric"]
    assert 0 < trained < untrained and untrained < 45  # degrees; uniform guessing ~22.5


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_warmup_rises_to_exactly_lr_then_decays(name: str, schedule: str) -> None:
    lr, steps, warm = 0.037, 20, 0.2
    p = torch.nn.Parameter(torch.ones(2))
    opt, sched = OptimConfig(name=name, schedule=schedule, lr=lr, warmup_fraction=warm).build(
        [p], steps
    )
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])  # the LR this optimizer step uses
        opt.step()
        sched.step()
    peak = max(range(steps), key=lambda i: lrs[i])
    assert lrs[0] < lr / 2  # the first step is well below the peak
    assert 0 < peak <= warm * steps  # the peak comes at the end of the warm-up ...
    assert all(a < b for a, b in itertools.pairwise(lrs[: peak + 1]))  # ... rising
    assert lrs[peak] == pytest.approx(lr, rel=1e-9, abs=0)  # and it is optim.lr
    assert max(lrs) <= lr * (1 + 1e-9)
    after = lrs[peak:]
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(after))
    if schedule == "constant":
        assert after == pytest.approx([lr] * len(after))
    else:
        assert lrs[-1] < 0.1 * lr  # decayed towards 0 by the last step


def test_cosine_without_warmup_starts_at_lr() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt, sched = OptimConfig(schedule="cosine", lr=0.05, warmup_fraction=0.0).build([p], 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] < 0.05


def test_fine_tune_peaks_at_the_stage_lr() -> None:
    """Through a real Trainer: the module's per-step LR starts low and peaks at the fine-tune's lr
    (a stage's ``lr`` overrides ``optim.lr`` for its fine-tune only)."""
    import pytorch_lightning as pl

    from chaincomp.pipeline import fine_tuner

    cfg = compose_cfg(
        "data=digits",
        "model=small_cnn",
        "model.width_mult=0.5",
        "optim.warmup_fraction=0.25",
        "trainer.limit_train_batches=8",
        *QUIET,
    )
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    seen: list[float] = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    fine_tuner(dm, trainer_config(cfg))(module, 2, callbacks=[LR()], lr=0.02)
    assert len(seen) == 16
    assert seen[0] < 0.01 and max(seen) == pytest.approx(0.02, rel=1e-9)
    assert seen.index(max(seen)) == 4  # 25 % of 16 steps of linear warm-up
    assert module.optim_cfg.lr == cfg.optim.lr  # the override was for that fine-tune only


def test_bad_optim_values_name_the_key() -> None:
    with pytest.raises(
        ConfigError, match="optim.name: unknown optimizer 'adam'; allowed: adamw, sgd"
    ):
        OptimConfig(name="adam")
    with pytest.raises(ConfigError, match="optim.schedule"):
        OptimConfig(schedule="step")
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0)


@pytest.mark.parametrize("channels_last", [True, False])
def test_trainer_channels_last_decides_the_layout_of_cpu_training(channels_last: bool) -> None:
    """With ``trainer.channels_last`` a CPU fit puts the weights in channels_last and every
    convolution of a fake-quantized net runs in that layout; without it the weights keep the
    layout they were built in."""
    import pytorch_lightning as pl

    from chaincomp.stages.quantize import QuantizeSettings, quantize_module

    cfg = compose_cfg(
        "data=digits",
        "model=small_cnn",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"trainer.channels_last={channels_last}",
        *QUIET,
    )
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    quantize_module(module, dm, QuantizeSettings(w_bits=4, a_bits=4))
    convs = [m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) >= 2 and all(c.weight.is_contiguous() for c in convs)
    layouts: list[bool] = []

    def hook(mod, inp, out):  # type: ignore[no-untyped-def]
        if mod.training:
            layouts.append(out.is_contiguous(memory_format=torch.channels_last))

    class Stop(pl.Callback):
        def on_train_batch_end(self, *args) -> None:  # type: ignore[no-untyped-def]
            for h in handles:
                h.remove()

    handles = [c.register_forward_hook(hook) for c in convs]
    fit(module, dm, trainer_config(cfg), [Stop()])
    assert len(layouts) == len(convs)  # one training batch seen by every convolution
    wide = [c for c in convs if c.in_channels > 1]  # one input channel: both layouts at once
    if channels_last:
        assert set(layouts) == {True}
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in wide)
    else:
        assert all(not c.weight.is_contiguous(memory_format=torch.channels_last) for c in wide)


def test_training_losses_are_logged_every_log_every_n_steps() -> None:
    cfg = compose_cfg(
        "data=digits",
        "model=small_cnn",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=10",
        "trainer.log_every_n_steps=4",
        *QUIET,
    )
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    module.loss_terms["const"] = lambda m, x, out, target: torch.tensor(0.0)
    logged: list[str] = []
    log = module.log

    def spy(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        logged.append(name)
        return log(name, *args, **kwargs)

    module.log = spy  # type: ignore[method-assign]
    fit(module, dm, trainer_config(cfg))
    # steps 0, 4 and 8 of the 10 log the loss and the term
    assert logged.count("train/loss") == 3 and logged.count("train/loss_const") == 3
