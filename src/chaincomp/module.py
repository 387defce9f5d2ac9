"""CompressibleModule: the one LightningModule for every task and every compression stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from chaincomp.layers.batchnorm import FastBatchNorm, fast_batchnorm
from chaincomp.layers.onednn import Guard, guard_strided_1x1
from chaincomp.optim import OptimConfig
from chaincomp.tasks import Task

# A loss term a stage contributes: (module, inputs, outputs, target) -> scalar tensor.
LossTerm = Callable[["CompressibleModule", Tensor, Tensor, Tensor], Tensor]


class CompressibleModule(pl.LightningModule):
    """Holds ``net`` and the task; trains, validates and tests it.

    Contract:
    - ``forward(x)`` is ``net(x)``: the task head's output.
    - The training loss is ``task_weight * task.loss(outputs, target)``, plus
      ``net.auxiliary_loss(task, target)`` when the net defines it (exit heads), plus every term
      in ``loss_terms`` (stages add and remove their own terms by name, e.g. the KD term).
    - ``val/<metric>`` and ``test/<metric>`` are logged per epoch in the task's unit
      (accuracy in %, MAE in degrees); ``train/loss`` (and each loss term) every
      ``trainer.log_every_n_steps`` training steps, from the first step of each epoch.
    - With ``channels_last`` (the trainer's setting, on CUDA and on the CPU) every fit starts by
      putting the net's 4-D weights in channels_last, and the batches come channels_last: the
      convolutions and batch norms then all run in that layout. (Without it, the layout is
      whatever the first convolution picks from its input: a one-channel image batch is
      ambiguous, and a fake-quantized input drops the net into the slower NCHW path on the CPU.)
      Mixed precision is the Trainer's setting.
    - During a fit, the CPU's small strided 1x1 convolutions compute in NCHW
      (:func:`chaincomp.layers.onednn.guard_strided_1x1`: oneDNN corrupts their weight gradients
      in channels_last).
    - With ``fast_bn`` (``trainer.cpu_fast_batchnorm``, from ``pipeline.build_module`` and again
      in ``pipeline.fit``), during a fit the CPU's
      channels_last batch norms whose channel count fills no vector train through
      :func:`chaincomp.layers.batchnorm.fast_batchnorm` (the same statistics and gradients up
      to float32 rounding, faster).
    - With ``compile_mode`` (``trainer.compile``, set like ``fast_bn``), each fit's training
      steps call ``torch.compile(net, mode=compile_mode)``, built when the fit starts and
      dropped (with torch's compiled code) when it ends; ``forward``, validation, test and
      :meth:`evaluate` call ``net`` itself. The fast batch norm stays off while compiling.
    """

    def __init__(
        self,
        net: nn.Module,
        task: Task,
        optim: OptimConfig,
        channels_last: bool = True,
        fast_bn: bool = True,
        compile_mode: str | None = None,
    ):
        super().__init__()
        self.net = net
        self.task = task
        self.optim_cfg = optim
        self.channels_last = channels_last
        self.loss_terms: dict[str, LossTerm] = {}
        self.fast_bn = fast_bn
        self._guard: Guard | None = None
        self._fast_bn: FastBatchNorm | None = None
        self.compile_mode = compile_mode
        # not a registered submodule: the compiled wrapper shares net's parameters, and
        # state_dict / parameters() must see them once
        self.__dict__["_train_net"] = None
        self.task_weight = 1.0
        self.val_metric = task.make_metric()
        self.test_metric = task.make_metric()

    @property
    def metric_name(self) -> str:
        return self.task.metric_name

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.remove_guard()
        self._guard = guard_strided_1x1(self.net)
        mode = getattr(self, "compile_mode", None)  # a module pickled before the setting: off
        if mode:
            self.__dict__["_train_net"] = torch.compile(self.net, mode=mode, dynamic=False)
        elif self.fast_bn:
            self._fast_bn = fast_batchnorm(self.net)

    def on_fit_end(self) -> None:
        self.remove_guard()

    def remove_guard(self) -> None:
        """Take off the oneDNN guard, the fast batch norm and the compiled net a fit installed
        (``pipeline.fit`` calls it also when the fit raised, where Lightning skips
        ``on_fit_end``)."""
        for attr in ("_guard", "_fast_bn"):
            handle = getattr(self, attr, None)
            if handle is not None:
                handle.remove()
            setattr(self, attr, None)
        if self.__dict__.get("_train_net") is not None:
            self.__dict__["_train_net"] = None
            torch._dynamo.reset()  # the fit's graphs (and CUDA graph pools) go with it

    def _logs_step(self, batch_idx: int) -> bool:
        """Whether this training step logs its losses: every ``trainer.log_every_n_steps``-th
        (Lightning writes to the loggers only then anyway; each ``self.log`` call costs a few
        milliseconds of Python, several percent of a small net's CPU step)."""
        trainer = self._trainer
        every = max(int(getattr(trainer, "log_every_n_steps", 1)), 1) if trainer is not None else 1
        return batch_idx % every == 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, target = batch
        log = self._logs_step(batch_idx)
        compiled = self.__dict__.get("_train_net")
        outputs = compiled(x) if compiled is not None else self(x)
        loss = self.task_weight * self.task.loss(outputs, target)
        aux = getattr(self.net, "auxiliary_loss", None)
        extra = aux(self.task, target) if aux is not None else None
        if extra is not None:
            if log:
                self.log("train/loss_aux", extra, on_step=True, on_epoch=False)
            loss = loss + extra
        for name, term in self.loss_terms.items():
            extra = term(self, x, outputs, target)
            if log:
                self.log(f"train/loss_{name}", extra, on_step=True, on_epoch=False)
            loss = loss + extra
        if log:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, target = batch
        self.task.update_metric(self.val_metric, self(x), target)
        self.log(
            f"val/{self.metric_name}", self.val_metric, on_step=False, on_epoch=True, prog_bar=True
        )

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, target = batch
        self.task.update_metric(self.test_metric, self(x), target)
        self.log(f"test/{self.metric_name}", self.test_metric, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        steps = int(self.trainer.estimated_stepping_batches)
        opt, sched = self.optim_cfg.build(params, steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def evaluate(self, batches: Any) -> float:
        """The task metric of ``net`` over ``batches`` (eval mode, no Trainer needed)."""
        metric = self.task.make_metric().to(self.device)
        was_training = self.training
        self.eval()
        for x, target in batches:
            self.task.update_metric(metric, self(x), target)
        self.train(was_training)
        return float(metric.compute())
