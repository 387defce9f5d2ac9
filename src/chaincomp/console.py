"""The console: quiet by default, one progress line per step, chaincomp's own lines in the log.

:func:`quiet` mutes what every command would otherwise repeat per ``Trainer.fit`` (Lightning's
GPU/TPU banner, its tips and dataloader notes, known deprecation warnings of the libraries);
``verbose=true`` (or ``chaincomp <command> -v``) keeps them. chaincomp's own messages
(``chaincomp.*`` loggers: each step's result, caches, reaped runs) go to the console and to the
run's log file through Hydra's logging. :class:`StepProgressBar` is the Trainer's progress bar
with the step it belongs to in its description (``trial 3 DPQE · step 2/4 P (prune) · epoch 1/2``),
shown on a terminal only (:func:`progress_bars`): in a file or pipe the step lines say it all.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar

#: library loggers that print banners and notes at INFO on every Trainer
NOISY_LOGGERS = (
    "mlflow.store.db.utils",  # "Creating initial MLflow database tables..."
    "alembic.runtime.migration",
    "optuna",  # "Trial N finished with values ...": the sweep prints its own progress line
    "pytorch_lightning",
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning_fabric",
)

#: warnings that say nothing a chaincomp user can act on (messages, as regular expressions)
NOISY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*The number of training batches \(\d+\) is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*`training_step` returned `None`.*",
    r".*Argument ``group`` is an experimental feature.*",  # Optuna's TPE, as chaincomp sets it
)


def quiet(verbose: bool = False) -> None:
    """Mute the libraries' per-fit noise (idempotent); ``verbose`` leaves everything on."""
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    optuna = sys.modules.get("optuna")
    if optuna is not None:  # Optuna sets its own level (INFO) when it first logs: set it now
        optuna.logging.set_verbosity(logging.WARNING)


def progress_bars(enabled: bool) -> bool:
    """Whether Trainer progress bars are drawn: ``trainer.enable_progress_bar`` and stderr a
    terminal (a bar in a log file is one line per refresh)."""
    return enabled and sys.stderr.isatty()


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, its description naming the chain and step (``label``)."""

    def __init__(self, label: str):
        super().__init__()  # one bar per fit, reset each epoch...
        self.label = label

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.leave = True  # ...and left on the console when the fit ends: one line per step
        return bar

    def init_validation_tqdm(self) -> Any:
        bar = super().init_validation_tqdm()
        bar.disable = True  # the epoch's validation shows in the train bar's postfix
        return bar

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.set_description(
            f"{self.label} · epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )


__all__ = ["NOISY_LOGGERS", "NOISY_WARNINGS", "StepProgressBar", "progress_bars", "quiet"]
