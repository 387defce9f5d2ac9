"""Training throughput: chaincomp's path (Hydra config -> ChainDataModule -> CompressibleModule ->
Lightning Trainer) against a plain PyTorch loop on the same model, data, augmentation, batch size
and precision, in one run. Prints images/s of each and their ratio (framework / plain), then the
framework path again with the quantize stage's fake quantization in place (w4/a4, QAT) and the
QAT overhead (float images/s / QAT images/s; the target is <= 1.5x).

    python benchmarks/train_throughput.py                       # CPU default: fashion_mnist, resnet10
    python benchmarks/train_throughput.py data=cifar10 model=resnet18 data.batch_size=512 \
        --epochs 3                                              # the GPU reference setting

Any chaincomp override works as a positional argument. The first epoch of each path is warm-up
(allocator, cuDNN autotuning) and is not timed.
"""

from __future__ import annotations

import argparse
import copy
import time

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from chaincomp.cli import config_dir
from chaincomp.data.loader import Augment
from chaincomp.pipeline import build_data, build_module, trainer_config
from chaincomp.utils import seed_everything


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class EpochTimer(pl.Callback):
    """Wall time and images of every training epoch but the first."""

    def __init__(self) -> None:
        self.seconds, self.images, self._start, self._n = 0.0, 0, 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        _sync(pl_module.device)
        self._start, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self._n += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        _sync(pl_module.device)
        if trainer.current_epoch > 0:
            self.seconds += time.perf_counter() - self._start
            self.images += self._n


def plain_loop(
    module,
    dm,
    epochs: int,
    steps: int | None,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
) -> float:  # type: ignore[no-untyped-def]
    """A hand-written loop: same tensors on the device, same augmentation, SGD + cosine."""
    net = module.net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    x_all, y_all, _ = dm._splits["train"]
    x_all, y_all = x_all.to(device), y_all.to(device)
    mean = dm.mean.to(device).view(1, -1, 1, 1)
    std = dm.std.to(device).view(1, -1, 1, 1)
    aug = Augment(dm.cfg.crop_padding, dm.cfg.flip)
    bs = dm.cfg.batch_size
    n_batches = len(x_all) // bs if steps is None else min(steps, len(x_all) // bs)
    opt, sched = module.optim_cfg.build(net.parameters(), n_batches * epochs)
    gen = torch.Generator(device=device).manual_seed(0)
    seconds, images = 0.0, 0
    for epoch in range(epochs):
        _sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(x_all), device=device, generator=gen)
        for i in range(n_batches):
            idx = order[i * bs : (i + 1) * bs]
            x = x_all[idx].float().mul_(1 / 255)
            if aug.active:
                x = aug(x, gen)
            x = (x - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(net(x).float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        _sync(device)
        if epoch > 0:
            seconds += time.perf_counter() - start
            images += n_batches * bs
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per path (the first is warm-up)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="cap on batches per epoch (default: 60 on CPU)"
    )
    parser.add_argument("--no-qat", action="store_true", help="skip the QAT measurement")
    parser.add_argument("overrides", nargs="*", help="chaincomp config overrides")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    defaults = [] if cuda else ["data=fashion_mnist", "model=resnet10"]
    steps = args.steps if args.steps is not None else (None if cuda else 60)
    overrides = [
        *defaults,
        *args.overrides,
        "tracking.enabled=false",
        "trainer.enable_progress_bar=false",
    ]
    if steps is not None:
        overrides.append(f"trainer.limit_train_batches={steps}")
    overrides.append("trainer.check_val_every_n_epoch=1000")  # time training only
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    tcfg = trainer_config(cfg)
    seed_everything(0)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    if dm.task.name != "classify":
        raise SystemExit("the plain loop is written for data.task=classify")
    plain_module = copy.deepcopy(module)
    qat_module = copy.deepcopy(module)
    timer = EpochTimer()
    trainer = tcfg.make([timer], max_epochs=args.epochs)
    trainer.fit(module, datamodule=dm)
    framework = timer.images / timer.seconds
    device = module.device
    precision = tcfg.resolved_precision()
    plain = plain_loop(
        plain_module,
        dm,
        args.epochs,
        steps,
        device,
        precision.startswith("bf16"),
        tcfg.channels_last and device.type == "cuda",
    )
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {name}; data={cfg.data.name} model={cfg.model.name} batch={dm.cfg.batch_size} precision={precision}"
    )
    print(f"framework (Lightning) : {framework:10.0f} images/s")
    print(f"plain PyTorch loop    : {plain:10.0f} images/s")
    print(f"ratio framework/plain : {framework / plain:10.3f}")
    if args.no_qat:
        return
    from chaincomp.stages.quantize import QuantizeSettings, quantize_module

    qat_module.to(device)
    settings = QuantizeSettings(w_bits=4, a_bits=4, learn_scale=True, calib_batches=2)
    quantize_module(qat_module, dm, settings)
    timer = EpochTimer()
    trainer = tcfg.make([timer], max_epochs=args.epochs)
    trainer.fit(qat_module, datamodule=dm)
    qat = timer.images / timer.seconds
    print(f"framework + QAT w4/a4 : {qat:10.0f} images/s")
    print(f"QAT overhead float/QAT: {framework / qat:10.3f}")


if __name__ == "__main__":
    main()
