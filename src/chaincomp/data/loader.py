"""Device-resident batches with on-device augmentation.

Datasets of this size fit in accelerator memory: the whole split is kept on the device as uint8
NCHW, and every batch is gathered, augmented (random crop with zero padding + horizontal flip),
turned into the task's (inputs, target), normalised and cut out (Cutout) on the device. No worker
processes, no host-to-device copies per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from chaincomp.errors import ConfigError
from chaincomp.tasks import Task

# Cutout's generator per pass is seeded apart from the pass's own (seed + pass index)
CUTOUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Augment:
    """Random crop (zero padding of ``crop_padding`` pixels, then crop back), horizontal flip,
    and Cutout (DeVries & Taylor, 2017): a ``cutout`` x ``cutout`` square per image, centred on
    a uniformly drawn pixel and clipped at the borders, set to zero after normalisation (the
    training mean). ``__call__`` does crop and flip on [0, 1] pixels; :meth:`cut` the square, on
    normalised inputs, from its own generator (:class:`DeviceBatches` seeds one per pass), so
    turning Cutout on changes nothing else: the same order, crops, flips and task targets."""

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        for key in ("crop_padding", "cutout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"data.{key}", f"{value!r} invalid", "an integer >= 0")

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def cut(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``x`` (normalised, NCHW) with each image's Cutout square set to zero, in place."""
        if self.cutout <= 0:
            return x
        b, _, h, w = x.shape
        s, dev = self.cutout, x.device
        top = torch.randint(0, h, (b, 1), device=dev, generator=generator) - s // 2
        left = torch.randint(0, w, (b, 1), device=dev, generator=generator) - s // 2
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        in_rows = (rows >= top) & (rows < top + s)  # (b, h)
        in_cols = (cols >= left) & (cols < left + s)  # (b, w)
        return x.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            off = torch.randint(0, 2 * p + 1, (2, b), device=x.device, generator=generator)
            rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.flip:
            mask = torch.rand(b, device=x.device, generator=generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x


class DeviceBatches:
    """An iterable of ``(inputs, target)`` batches computed on ``images.device``.

    Contract: ``len()`` is the number of batches per pass; each ``iter()`` is one pass. With
    ``shuffle`` every pass draws a new order (and new augmentation/rotation) from a generator
    seeded with ``seed + pass_index``, so a run is reproducible. ``extras`` are fixed per-sample
    task values (val/test rotation angles); without them the task draws fresh ones.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        task: Task,
        mean: Tensor,
        std: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment | None = None,
        extras: Tensor | None = None,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError("data.batch_size", f"{batch_size} is not positive", ">= 1")
        self.images, self.labels, self.task, self.extras = images, labels, task, extras
        dev = images.device
        self.mean = mean.to(dev).view(1, -1, 1, 1)
        self.inv_std = (1.0 / std).to(dev).view(1, -1, 1, 1)
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment = augment if augment is not None and augment.active else None
        self.seed, self.channels_last = seed, channels_last
        self.passes = 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        n, dev = len(self.images), self.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(self.seed + self.passes)
        cutter: tuple[Augment, torch.Generator] | None = None
        if self.augment is not None and self.augment.cutout > 0:
            cut_gen = torch.Generator(device=dev)
            cut_gen.manual_seed(self.seed + self.passes + CUTOUT_SEED_OFFSET)
            cutter = self.augment, cut_gen
        self.passes += 1
        order = torch.randperm(n, device=dev, generator=gen) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            x = self.images[idx].float().mul_(1.0 / 255.0)
            if self.augment is not None:
                x = self.augment(x, gen)
            extras = self.extras[idx] if self.extras is not None else None
            x, target = self.task.prepare(x, self.labels[idx], extras, gen)
            x = (x - self.mean) * self.inv_std
            if cutter is not None:
                x = cutter[0].cut(x, cutter[1])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, target
