"""DataConfig (validated settings) and the LightningDataModule that serves device batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from chaincomp.data.formats import RawDataset
from chaincomp.data.loader import Augment, DeviceBatches
from chaincomp.data.sources import SOURCES, load_raw
from chaincomp.errors import ConfigError, check_keys
from chaincomp.tasks import TASKS, Task, make_task


@dataclass
class DataConfig:
    """Settings of ``conf/data/*.yaml``; invalid values fail here with the key named.

    ``val_size``: a fraction in (0, 1) or a count of training images held out for validation
    (seeded by ``split_seed``). ``max_train_samples`` caps the remaining training images (seeded
    subset) for quick runs. ``seed`` drives shuffling and augmentation. ``label_smoothing``
    (classification only, in [0, 1)) goes to the task's loss (:class:`~chaincomp.tasks.Classification`).
    """

    name: str = "digits"
    path: str | None = None
    cache_dir: str | None = None
    download: bool = True
    task: str = "classify"
    val_size: float = 0.1
    split_seed: int = 0
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 1024
    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0
    max_train_samples: int | None = None
    channels: int | None = None
    image_size: int | None = None
    rotation_max_deg: float = 45.0
    label_smoothing: float = 0.0
    mean: list[float] | None = None
    std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SOURCES:
            raise ConfigError("data.name", f"unknown dataset {self.name!r}", sorted(SOURCES))
        if self.task not in TASKS:
            raise ConfigError("data.task", f"unknown task {self.task!r}", sorted(TASKS))
        if not (
            0 < self.val_size < 1 or (self.val_size >= 1 and float(self.val_size).is_integer())
        ):
            raise ConfigError(
                "data.val_size", f"{self.val_size} invalid", "a fraction in (0, 1) or a count >= 1"
            )
        for key in ("batch_size", "eval_batch_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"data.{key}", f"{getattr(self, key)} is not positive", ">= 1")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(
                "data.max_train_samples", f"{self.max_train_samples} invalid", ">= 1 or null"
            )
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(
                "data.image_size",
                f"{size!r} invalid",
                "null (the images' own size) or an integer >= 1 (image folders are resized to it)",
            )
        if self.channels not in (None, 1, 3):
            raise ConfigError("data.channels", f"{self.channels} invalid", "1, 3 or null")
        if (self.mean is None) != (self.std is None):
            raise ConfigError(
                "data.mean", "mean and std must be given together", "both lists or both null"
            )
        Augment(self.crop_padding, self.flip, self.cutout)  # validates
        ls = self.label_smoothing
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0 <= ls < 1:
            raise ConfigError("data.label_smoothing", f"{ls!r} invalid", "a number in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        check_keys(d, {f.name for f in fields(cls)} - {"extra"}, "data")
        return cls(**d)


def channel_stats(images: np.ndarray) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and std (in [0, 1] units) of uint8 NHWC images, via histograms."""
    levels = np.arange(256, dtype=np.float64)
    hist = np.stack(
        [np.bincount(images[..., c].ravel(), minlength=256) for c in range(images.shape[-1])]
    )
    count = hist.sum(1)
    mean = (hist * levels).sum(1) / count
    var = np.maximum((hist * levels**2).sum(1) / count - mean**2, 0.0)
    return (
        torch.tensor(mean / 255.0, dtype=torch.float32),
        torch.tensor(np.sqrt(var) / 255.0, dtype=torch.float32).clamp_min(1e-3),
    )


class ChainDataModule(pl.LightningDataModule):
    """Train/val/test splits of one dataset for one task, served as device batches.

    Contract: after ``setup()`` the attributes ``in_channels``, ``image_size`` (H, W),
    ``num_classes``, ``num_outputs`` and ``task`` are set; the train split is carved from the
    official training set with ``split_seed`` and the test split is never used for selection.
    Loaders live on the trainer's device (or ``self.device``), chosen when they are requested.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.task: Task = make_task(cfg.task, cfg.rotation_max_deg, cfg.label_smoothing)
        self.device = torch.device("cpu")
        self.channels_last = False
        self._splits: dict[str, tuple[Tensor, Tensor, Tensor | None]] | None = None
        self._on_device: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor | None]] = {}

    # ----------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        c = self.cfg
        raw: RawDataset = load_raw(
            c.name,
            c.path,
            c.cache_dir,
            c.download,
            {"channels": c.channels, "image_size": c.image_size},
        )
        n = len(raw.train_x)
        n_val = int(c.val_size) if c.val_size >= 1 else round(n * c.val_size)
        if not 0 < n_val < n:
            raise ConfigError(
                "data.val_size", f"{c.val_size} leaves no train or val data of {n}", f"1..{n - 1}"
            )
        perm = np.random.default_rng(c.split_seed).permutation(n)
        val_idx, train_idx = np.sort(perm[:n_val]), perm[n_val:]
        if c.max_train_samples is not None:
            train_idx = train_idx[: c.max_train_samples]
        train_idx = np.sort(train_idx)
        x_tr = raw.train_x[train_idx]
        if c.mean is not None and c.std is not None:
            mean, std = (
                torch.tensor(c.mean, dtype=torch.float32),
                torch.tensor(c.std, dtype=torch.float32),
            )
        else:
            mean, std = channel_stats(x_tr)
        self.mean, self.std = mean, std
        self.in_channels = int(x_tr.shape[-1])
        self.image_size = (int(x_tr.shape[1]), int(x_tr.shape[2]))
        self.classes = raw.classes
        self.num_classes = len(raw.classes)
        self.num_outputs = self.task.num_outputs(self.num_classes)

        def pack(x: np.ndarray, y: np.ndarray, split: str) -> tuple[Tensor, Tensor, Tensor | None]:
            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            yt = torch.from_numpy(y.astype(np.int64))
            extras = None
            if split != "train":
                g = torch.Generator().manual_seed(
                    c.split_seed * 1000 + {"val": 1, "test": 2}[split]
                )
                extras = self.task.eval_extras(yt, g)
            return xt, yt, extras

        self._splits = {
            "train": pack(x_tr, raw.train_y[train_idx], "train"),
            "val": pack(raw.train_x[val_idx], raw.train_y[val_idx], "val"),
            "test": pack(raw.test_x, raw.test_y, "test"),
        }

    def split_size(self, split: str) -> int:
        self.setup()
        assert self._splits is not None
        return len(self._splits[split][0])

    # --------------------------------------------------------------------------- loaders
    def _target_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return self.device

    def loader(
        self, split: str, device: torch.device | str | None = None, train: bool | None = None
    ) -> DeviceBatches:
        """Batches of ``split`` ('train', 'val', 'test') on ``device``.

        ``train`` (default: split == 'train') shuffles, augments, drops the last partial batch
        and draws random task targets; otherwise order and targets are fixed.
        """
        self.setup()
        assert self._splits is not None
        if split not in self._splits:
            raise ConfigError("split", f"unknown split {split!r}", sorted(self._splits))
        dev = torch.device(device) if device is not None else self._target_device()
        key = (split, str(dev))
        if key not in self._on_device:
            self._on_device[key] = tuple(
                t.to(dev) if t is not None else None for t in self._splits[split]
            )  # type: ignore[assignment]
        x, y, extras = self._on_device[key]
        train = split == "train" if train is None else train
        c = self.cfg
        return DeviceBatches(
            x,
            y,
            self.task,
            self.mean,
            self.std,
            c.batch_size if train else c.eval_batch_size,
            shuffle=train,
            drop_last=train and len(x) > c.batch_size,
            augment=Augment(c.crop_padding, c.flip, c.cutout) if train else None,
            extras=None if train else extras,
            seed=c.seed,
            channels_last=self.channels_last,
        )

    @contextmanager
    def training_augment(self, cutout: int | None = None) -> Iterator[None]:
        """Within the block, training loaders cut out squares of side ``cutout`` (None: keep
        ``data.cutout``); the data's own setting is back afterwards, also after an error."""
        if cutout is None:
            yield
            return
        before = self.cfg
        self.cfg = dataclasses.replace(before, cutout=cutout)
        try:
            yield
        finally:
            self.cfg = before

    def train_dataloader(self) -> DeviceBatches:
        return self.loader("train")

    def val_dataloader(self) -> DeviceBatches:
        return self.loader("val")

    def test_dataloader(self) -> DeviceBatches:
        return self.loader("test")

    def example_input(self, batch: int = 1) -> Tensor:
        """A zero input of the right shape (for cost counting and shape checks)."""
        self.setup()
        return torch.zeros(batch, self.in_channels, *self.image_size)
