"""Building blocks shared by every command: config -> data, net, module, trainer; measure; train.

``train_baseline(cfg)`` is what ``chaincomp train`` runs; the chain runner and the search reuse the
same functions, so there is one training path.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from torch import nn

from chaincomp.cost import CostReport, count_cost, expected_cost
from chaincomp.data import ChainDataModule, DataConfig
from chaincomp.errors import ConfigError, check_keys
from chaincomp.models import build_model
from chaincomp.module import CompressibleModule
from chaincomp.optim import OptimConfig
from chaincomp.tracking import MlflowMetricsCallback, Run, TrackingConfig, make_tracker
from chaincomp.utils import atomic_write, keep_freed_memory_in_heap, seed_everything

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true")
# torch.compile's modes (``trainer.compile``); false = no compilation, true = "default"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class TrainerConfig:
    """Lightning Trainer settings (``conf/trainer``). ``precision: auto`` = bf16-mixed on CUDA,
    32-true elsewhere; ``channels_last``: nets and batches in that layout, on CUDA and the CPU
    (faster for both with oneDNN); ``cpu_onednn``: train on the CPU
    with PyTorch's oneDNN convolution kernels (false: its native ones; torch 2.13's oneDNN
    1x1-convolution weight gradient hangs on some pruned channel counts, see README);
    ``cpu_keep_heap``: from the first fit on, the process keeps freed memory in its heap
    (:func:`~chaincomp.utils.keep_freed_memory_in_heap`; fewer page faults per step on the CPU,
    no effect on the numbers; false: the C library's defaults); ``cpu_fast_batchnorm``: on the
    CPU in channels_last, batch norms whose channel count is not a multiple of the vector width
    train through :mod:`chaincomp.layers.batchnorm` (the same arithmetic up to float32
    rounding, faster: ``benchmarks/batchnorm_cpu.py``; false: PyTorch's kernel everywhere).
    ``build_module`` gives the module this setting and ``fit`` sets it again from its own.
    ``compile``: false (default), true (= ``"default"``) or one of torch.compile's modes
    (:data:`COMPILE_MODES`; ``reduce-overhead`` replays CUDA graphs, no host work per layer):
    every fit trains through ``torch.compile(net, mode=...)``, compiled at the fit's start and
    dropped at its end (evaluation and the stages' own passes stay eager). Compiling costs
    seconds to minutes per fit; it pays where a fit is long and its step waits on the host (the
    GPU QAT step: ``benchmarks/qat_profile.py``). Not with ``cpu_fast_batchnorm`` (the compiler
    fuses batch norms itself; the fast kernel is left off while compiling)."""

    max_epochs: int = 10
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "auto"
    channels_last: bool = True
    gradient_clip_val: float | None = None
    limit_train_batches: float | int | None = None
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False
    cpu_onednn: bool = True
    cpu_keep_heap: bool = True
    cpu_fast_batchnorm: bool = True
    compile: bool | str = False

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ConfigError(
                "trainer.compile", f"unknown {self.compile!r}", ("false", "true", *COMPILE_MODES)
            )
        if self.max_epochs < 0:
            raise ConfigError("trainer.max_epochs", f"{self.max_epochs} is negative", ">= 0")
        if self.accelerator not in ACCELERATORS:
            raise ConfigError("trainer.accelerator", f"unknown {self.accelerator!r}", ACCELERATORS)
        if str(self.precision) not in PRECISIONS:
            raise ConfigError("trainer.precision", f"unknown {self.precision!r}", PRECISIONS)
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(
                "trainer.accelerator",
                f"{self.accelerator} requested but no CUDA device",
                "auto, cpu",
            )

    @property
    def uses_cuda(self) -> bool:
        return self.accelerator in ("gpu", "cuda") or (
            self.accelerator == "auto" and torch.cuda.is_available()
        )

    @property
    def compile_mode(self) -> str | None:
        """The torch.compile mode every fit trains with, None when not compiling."""
        if self.compile is True:
            return "default"
        return self.compile or None

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return str(self.precision)
        return "bf16-mixed" if self.uses_cuda else "32-true"

    def make(
        self, callbacks: Sequence[pl.Callback] = (), max_epochs: int | None = None
    ) -> pl.Trainer:
        from chaincomp.console import progress_bars

        bars = progress_bars(self.enable_progress_bar)  # on a terminal only
        return pl.Trainer(
            max_epochs=self.max_epochs if max_epochs is None else max_epochs,
            accelerator=self.accelerator,
            devices=self.devices,
            precision=self.resolved_precision(),  # type: ignore[arg-type]
            gradient_clip_val=self.gradient_clip_val,
            limit_train_batches=self.limit_train_batches,
            check_val_every_n_epoch=self.check_val_every_n_epoch,
            log_every_n_steps=self.log_every_n_steps,
            enable_progress_bar=bars,
            deterministic=self.deterministic,
            callbacks=[c for c in callbacks if bars or not isinstance(c, ProgressBar)],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )


def config_section(cfg: DictConfig | Mapping[str, Any], key: str) -> dict[str, Any]:
    """``cfg[key]`` as a plain, resolved dict (a :class:`ConfigError` naming ``key`` if absent)."""
    node = cfg.get(key) if isinstance(cfg, Mapping) else None
    if node is None:
        raise ConfigError(key, "missing section", f"a {key} group in conf/{key}/")
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def _checked(cls: type, section: str, values: dict[str, Any]) -> Any:
    check_keys(values, (f.name for f in fields(cls)), section)
    return cls(**values)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    return _checked(TrainerConfig, "trainer", config_section(cfg, "trainer"))


def optim_config(cfg: DictConfig) -> OptimConfig:
    return _checked(OptimConfig, "optim", config_section(cfg, "optim"))


def tracking_config(cfg: DictConfig) -> TrackingConfig:
    return _checked(TrackingConfig, "tracking", config_section(cfg, "tracking"))


def build_data(cfg: DictConfig) -> ChainDataModule:
    dm = ChainDataModule(DataConfig.from_dict(config_section(cfg, "data")))
    dm.setup()
    return dm


def build_net(cfg: DictConfig, dm: ChainDataModule) -> nn.Module:
    return build_model(config_section(cfg, "model"), dm.in_channels, dm.num_outputs, dm.image_size)


def build_module(
    cfg: DictConfig, dm: ChainDataModule, net: nn.Module | None = None
) -> CompressibleModule:
    tcfg = trainer_config(cfg)
    dm.channels_last = tcfg.channels_last
    return CompressibleModule(
        net if net is not None else build_net(cfg, dm),
        dm.task,
        optim_config(cfg),
        tcfg.channels_last,
        tcfg.cpu_fast_batchnorm,
        tcfg.compile_mode,
    )


def fit(
    module: CompressibleModule,
    dm: ChainDataModule,
    tcfg: TrainerConfig,
    callbacks: Sequence[pl.Callback] = (),
    max_epochs: int | None = None,
) -> float:
    """Train ``module`` with one ``Trainer.fit``; returns the wall time in seconds.

    The module ends on the device it trained on: Lightning moves it back to the CPU when ``fit``
    ends, and whatever runs next (evaluation, cost counting, the next stage) belongs on the
    accelerator (on a GPU, evaluating the ResNet-34 baseline on the CPU took 33 s of a 234 s chain).
    """
    epochs = tcfg.max_epochs if max_epochs is None else max_epochs
    if epochs == 0:
        return 0.0
    trainer = tcfg.make(callbacks, max_epochs=epochs)
    if tcfg.cpu_keep_heap:
        keep_freed_memory_in_heap()
    onednn: Any = torch.backends.mkldnn  # `enabled` is a settable flag (typed as a descriptor)
    before = bool(onednn.enabled)
    start = time.perf_counter()
    try:
        onednn.enabled = before and (tcfg.cpu_onednn or tcfg.uses_cuda)
        module.fast_bn = tcfg.cpu_fast_batchnorm
        module.compile_mode = tcfg.compile_mode
        trainer.fit(module, datamodule=dm)
    finally:
        onednn.enabled = before
        module.remove_guard()
    module.to(trainer.strategy.root_device)
    return time.perf_counter() - start


def fine_tuner(
    dm: ChainDataModule, tcfg: TrainerConfig, extra_callbacks: Sequence[pl.Callback] = ()
) -> Callable[..., float]:
    """The ``fit`` a stage gets (``StageContext.fit``): ``fit(module, epochs, callbacks=(),
    lr=None)`` puts the module in train mode (Lightning keeps the modes it finds; stages may
    freeze parts later), runs one ``Trainer.fit`` with ``callbacks`` + ``extra_callbacks`` at
    peak learning rate ``lr`` (None = the module's ``optim.lr``) and returns the wall time."""

    def _fit(
        module: CompressibleModule,
        epochs: int,
        callbacks: Sequence[pl.Callback] = (),
        lr: float | None = None,
    ) -> float:
        base = module.optim_cfg
        if lr is not None:
            module.optim_cfg = dataclasses.replace(base, lr=lr)
        module.train()
        try:
            return fit(module, dm, tcfg, [*callbacks, *extra_callbacks], max_epochs=epochs)
        finally:
            module.optim_cfg = base

    return _fit


def cost_of(net: nn.Module, dm: ChainDataModule) -> CostReport:
    return count_cost(net, dm.example_input(1))


def measure(
    module: CompressibleModule, dm: ChainDataModule, splits: Sequence[str] = ("val", "test")
) -> dict[str, Any]:
    """Metric on each split plus the cost totals: the foundation keys of every summary row.

    For a net with exits (``exit_costs`` / ``exit_rates``) each split is evaluated with real
    dynamic inference; ``<split>_exit_rates`` and ``<split>_bitops`` / ``<split>_macs`` (the
    expected cost per sample at those rates) are added, ``bitops`` / ``macs`` are the expected
    values on the last split, and ``static_bitops`` / ``static_macs`` the cost of running
    every head. Without exits ``val_bitops`` equals ``bitops``.
    """
    device = next(module.parameters()).device
    net: Any = module.net  # duck-typed: a net with exits has exit_costs / exit_rates
    report = cost_of(net, dm)
    row: dict[str, Any] = {}
    exits = hasattr(net, "exit_costs") and hasattr(net, "exit_rates")
    for split in splits:
        if exits:
            net.reset_counts()
        row[f"{split}_metric"] = module.evaluate(dm.loader(split, device))
        if exits:
            rates = net.exit_rates()
            row[f"{split}_exit_rates"] = rates
            for what in ("macs", "bitops"):
                row[f"{split}_{what}"] = expected_cost(rates, net.exit_costs(report, what))
    row.update(macs=report.macs, bitops=report.bitops, params=report.params, size_mb=report.size_mb)
    if exits:
        row.update(static_macs=report.macs, static_bitops=report.bitops)
        row.update(macs=row[f"{splits[-1]}_macs"], bitops=row[f"{splits[-1]}_bitops"])
    else:
        row.update({f"{split}_bitops": report.bitops for split in splits})
    return row


def save_weights(net: nn.Module, path: str | Path) -> Path:
    """Atomically save ``net``'s state dict (load it back with ``weights_only=True``)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return atomic_write(path, lambda p: torch.save(state, p))


def train_baseline(
    cfg: DictConfig, output_dir: str | Path, run: Run | None = None
) -> dict[str, Any]:
    """Train the configured model on the configured data; measure, save and log it.

    Returns the summary (the keys every command writes: task, metric_name, val_metric,
    test_metric, macs, bitops, params, mlflow_run_id, plus size_mb, train_time_s, checkpoint).
    """
    seed_everything(int(cfg.get("seed", 0)))
    tcfg = trainer_config(cfg)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    callbacks = [MlflowMetricsCallback(run, prefix="baseline/")] if run is not None else []
    train_time = fit(module, dm, tcfg, callbacks)
    row = measure(module, dm)
    ckpt = save_weights(module.net, Path(output_dir) / "baseline.pt")
    return {
        "task": dm.task.name,
        "metric_name": dm.task.metric_name,
        "higher_is_better": dm.task.higher_is_better,
        "dataset": dm.cfg.name,
        "model": str(cfg.model.get("name", cfg.model.get("_target_"))),
        **row,
        "train_time_s": train_time,
        "epochs": tcfg.max_epochs,
        "checkpoint": str(ckpt),
        "mlflow_run_id": run.run_id if run is not None else None,
    }


def tracker_for(cfg: DictConfig):  # type: ignore[no-untyped-def]
    return make_tracker(tracking_config(cfg))
