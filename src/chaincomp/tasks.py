"""Tasks: what a batch's target is, the loss, the metric and the confidence used by early exit.

A :class:`Task` is the only place that knows the difference between classification and
regression; the data pipeline, the LightningModule and the stages call its methods.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from chaincomp.errors import ConfigError


class Task(ABC):
    """Contract.

    - ``num_outputs(num_classes)``: width of the network's output layer.
    - ``eval_extras(labels, generator)``: per-sample values fixed once for a val/test split
      (rotation angles) or None.
    - ``prepare(x, labels, extras, generator)``: turn a batch of images in [0, 1] and their labels
      into ``(inputs, target)``; ``extras`` is None on the training split (draw at random).
    - ``loss(outputs, target)``: scalar training loss.
    - ``make_metric()``: a torchmetrics Metric; ``update_metric(metric, outputs, target)`` feeds
      it; ``metric.compute()`` is in the unit of ``metric_name`` (accuracy in %, MAE in degrees).
    - ``confidence(outputs)``: per-sample score in (0, 1], higher = more certain (the
      early-exit criterion: a sample leaves when its confidence >= the threshold).
    - ``distill_loss(student, teacher, temperature)``: the knowledge-distillation term.
    """

    name: str
    metric_name: str
    higher_is_better: bool

    @abstractmethod
    def num_outputs(self, num_classes: int) -> int: ...

    def eval_extras(self, labels: Tensor, generator: torch.Generator) -> Tensor | None:
        return None

    @abstractmethod
    def prepare(
        self, x: Tensor, labels: Tensor, extras: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def loss(self, outputs: Tensor, target: Tensor) -> Tensor: ...

    @abstractmethod
    def make_metric(self) -> torchmetrics.Metric: ...

    @abstractmethod
    def update_metric(
        self, metric: torchmetrics.Metric, outputs: Tensor, target: Tensor
    ) -> None: ...

    @abstractmethod
    def confidence(self, outputs: Tensor) -> Tensor: ...

    @abstractmethod
    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor: ...


class _Percent(torchmetrics.Metric):
    """Accuracy in percent (top-1), over all samples seen."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    correct: Tensor
    total: Tensor

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.correct += (preds == target).sum()
        self.total += target.numel()

    def compute(self) -> Tensor:
        return 100.0 * self.correct / self.total.clamp_min(1)


class Classification(Task):
    """Cross-entropy over the classes; with ``label_smoothing`` e (``data.label_smoothing``)
    against the target ``(1 - e) * one_hot + e / num_classes`` (Szegedy et al. 2016), in every
    fit's task loss (the baseline's, the stages' fine-tunes', the exit heads'). The metric and
    the distillation term are unchanged."""

    name = "classify"
    metric_name = "accuracy"
    higher_is_better = True

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(
        cls, rotation_max_deg: float = 45.0, label_smoothing: float = 0.0
    ) -> Classification:
        return cls(label_smoothing)

    def num_outputs(self, num_classes: int) -> int:
        return num_classes

    def prepare(self, x, labels, extras, generator):  # type: ignore[no-untyped-def]
        return x, labels

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), target, label_smoothing=self.label_smoothing)

    def make_metric(self) -> torchmetrics.Metric:
        return _Percent()

    def update_metric(self, metric: torchmetrics.Metric, outputs: Tensor, target: Tensor) -> None:
        metric.update(outputs.argmax(dim=1), target)

    def confidence(self, outputs: Tensor) -> Tensor:
        return outputs.float().softmax(dim=1).amax(dim=1)

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        """Hinton et al. (2015): T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
        t = temperature
        log_p = F.log_softmax(student.float() / t, dim=1)
        q = F.softmax(teacher.float() / t, dim=1)
        return F.kl_div(log_p, q, reduction="batchmean") * t * t


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of ``x`` (B, C, H, W) counter-clockwise by ``degrees`` (B,), zero fill."""
    rad = degrees.to(x.dtype) * (math.pi / 180.0)
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Rotation(Task):
    """Regress the angle (degrees, U(-max_deg, max_deg)) a real image was rotated by.

    Outputs are (mean, log-variance) of the angle in units of ``max_deg``; the loss is the
    Gaussian NLL; the metric is the MAE in degrees; confidence is ``1 / (1 + std)`` with the
    predicted std in degrees (so ``confidence >= c`` means ``std <= 1/c - 1`` degrees).
    """

    name = "rotation"
    metric_name = "mae_deg"
    higher_is_better = False
    LOGVAR_MIN, LOGVAR_MAX = -10.0, 4.0

    def __init__(self, max_deg: float = 45.0):
        if not 0 < max_deg <= 180:
            raise ConfigError(
                "data.rotation_max_deg", f"{max_deg} out of range", "0 < value <= 180"
            )
        self.max_deg = float(max_deg)

    @classmethod
    def from_config(cls, rotation_max_deg: float = 45.0, label_smoothing: float = 0.0) -> Rotation:
        if label_smoothing:
            raise ConfigError(
                "data.label_smoothing",
                f"{label_smoothing} given, but a regression has no labels to smooth",
                "0.0 with data.task=rotation",
            )
        return cls(rotation_max_deg)

    def num_outputs(self, num_classes: int) -> int:
        return 2

    def eval_extras(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        return (torch.rand(len(labels), generator=generator) * 2 - 1) * self.max_deg

    def prepare(self, x, labels, extras, generator):  # type: ignore[no-untyped-def]
        if extras is None:
            extras = (
                torch.rand(len(x), generator=generator, device=x.device) * 2 - 1
            ) * self.max_deg
        return rotate(x, extras), (extras / self.max_deg).to(torch.float32)

    def loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """beta-NLL (Seitzer et al., 2022, beta=0.5): the Gaussian NLL weighted per sample by the
        detached std, which keeps the mean's gradient from exploding where the predicted
        variance is small; the optimum is still the true mean and variance."""
        mean, logvar = outputs.float().unbind(dim=1)
        logvar = logvar.clamp(self.LOGVAR_MIN, self.LOGVAR_MAX)
        nll = 0.5 * (logvar + (target - mean) ** 2 * torch.exp(-logvar))
        return (nll * torch.exp(0.5 * logvar).detach()).mean()

    def make_metric(self) -> torchmetrics.Metric:
        return torchmetrics.MeanAbsoluteError()

    def update_metric(self, metric: torchmetrics.Metric, outputs: Tensor, target: Tensor) -> None:
        metric.update(outputs[:, 0].float() * self.max_deg, target * self.max_deg)

    def confidence(self, outputs: Tensor) -> Tensor:
        logvar = outputs[:, 1].float().clamp(self.LOGVAR_MIN, self.LOGVAR_MAX)
        return 1.0 / (1.0 + (0.5 * logvar).exp() * self.max_deg)

    def distill_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        """The task loss with the teacher's predicted mean as the target (temperature unused)."""
        return self.loss(student, teacher[:, 0].float().detach())


TASKS: dict[str, type[Classification] | type[Rotation]] = {
    "classify": Classification,
    "rotation": Rotation,
}


def make_task(name: str, rotation_max_deg: float = 45.0, label_smoothing: float = 0.0) -> Task:
    """Build the task named by ``data.task``."""
    if name not in TASKS:
        raise ConfigError("data.task", f"unknown task {name!r}", sorted(TASKS))
    return TASKS[name].from_config(rotation_max_deg, label_smoothing)
