"""Training throughput: chaincomp's path (Hydra config -> ChainDataModule -> CompressibleModule ->
Lightning Trainer) against a plain PyTorch loop on the same model, data, augmentation, batch size,
precision and device, in one run. Prints images/s of each and their ratio (framework / plain),
then the framework path again with the quantize stage's fake quantization in place (its settings,
``chain.steps.Q.settings``: w4/a4, per-channel weights, LSQ activation steps) and the QAT
overhead (float images/s / QAT images/s; the target is <= 1.5x), then the same pair with early-exit
heads attached (``chain.steps.E.settings``: points, head, width; training runs every head) and
its QAT overhead.

    python benchmarks/train_throughput.py                       # CPU default: fashion_mnist, resnet10
    python benchmarks/train_throughput.py data=cifar10 model=resnet18 data.batch_size=512 \
        --epochs 3                                              # the GPU reference setting

Any chaincomp override works as a positional argument (``trainer=cpu`` measures on the CPU of a
GPU machine). The device is chosen once, from the trainer config, before anything trains; every
path records the device its parameters and batches were on, and the run fails if one differs.
The first epoch of each path is warm-up (allocator, cuDNN autotuning) and is not timed.
On the CPU (``--interleave``, the default there) each round also runs one fit with the plain
loop interleaved step by step (:class:`Interleaved`) and prints the median ratio of the paired
step times: on a shared 2-core VM, separate fits swing by +-15 % over seconds, so the
separate-fit ratio needs many rounds, and the interleaved one does not.
``run(overrides, epochs, steps)`` does the work and returns the numbers (tests reuse it).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from chaincomp.data.loader import Augment
from chaincomp.layers import fq_triton
from chaincomp.layers.batchnorm import fast_batchnorm
from chaincomp.layers.exits import attach_exits, backbone_of
from chaincomp.layers.onednn import guard_strided_1x1
from chaincomp.layers.quant import KERNEL_ENV
from chaincomp.pipeline import build_data, build_module, trainer_config
from chaincomp.stages.base import StageSettings
from chaincomp.stages.early_exit import EarlyExitSettings
from chaincomp.stages.quantize import QuantizeSettings, quantize_module
from chaincomp.utils import config_dir, keep_freed_memory_in_heap, seed_everything

CPU_DEFAULTS = ("data=fashion_mnist", "model=resnet10")
CPU_STEPS = 60  # batches per epoch on CPU unless --steps says otherwise
PLAIN_PRECISIONS = ("32-true", "32", "bf16-mixed")  # what the plain loop reproduces
EXIT_TRAIN = ("joint", "frozen")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochTimer(pl.Callback):
    """Wall time and images of every training epoch but the first, and the devices training
    really ran on: the trainer's root device, the parameters' and every batch's device."""

    def __init__(self) -> None:
        self.seconds, self.images, self._start, self._n = 0.0, 0, 0.0, 0
        self.devices: set[str] = set()

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.devices.add(str(trainer.strategy.root_device))

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        _sync(pl_module.device)
        self._start, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:  # once per epoch: no per-step cost in the timed loop
            self.devices.add(str(next(pl_module.parameters()).device))
            self.devices.add(str(batch[0].device))
        self._n += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        _sync(pl_module.device)
        if trainer.current_epoch > 0:
            self.seconds += time.perf_counter() - self._start
            self.images += self._n


class FreezeBackbone(pl.Callback):
    """What the early_exit stage does with ``train: frozen``: backbone BN in eval mode."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        pl_module.net.backbone.eval()


class PlainLoop:
    """A hand-written training loop: same tensors on the device, same augmentation, SGD + cosine,
    the same guard around oneDNN's small strided 1x1 convolutions as every fit (none in the
    default models) and, with ``fast_bn`` (``trainer.cpu_fast_batchnorm``), the same CPU batch
    norm (it takes no layer of the default models); with ``compile_mode``
    (``trainer.compile``) it trains through ``torch.compile(net, mode=compile_mode)``, as the
    framework's fits then do (and, like them, without the fast batch norm). ``start_epoch()``
    shuffles, ``step(i)`` trains on batch ``i`` of that order; its own generator, so it draws
    nothing from the global RNG. ``close()`` removes the guard and the batch norm and drops
    the compiled code."""

    def __init__(
        self,
        module: Any,
        dm: Any,
        epochs: int,
        steps: int | None,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
        fast_bn: bool = True,
        compile_mode: str | None = None,
    ) -> None:
        net = module.net.to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net, self.device, self.bf16, self.channels_last = net, device, bf16, channels_last
        self.guard = guard_strided_1x1(net)
        self.fast_bn = fast_batchnorm(net) if fast_bn and not compile_mode else None
        self.compiled = compile_mode is not None
        self.forward = torch.compile(net, mode=compile_mode, dynamic=False) if compile_mode else net
        net.train()
        x_all, y_all, _ = dm._splits["train"]
        self.x_all, self.y_all = x_all.to(device), y_all.to(device)
        self.mean = dm.mean.to(device).view(1, -1, 1, 1)
        self.std = dm.std.to(device).view(1, -1, 1, 1)
        self.aug = Augment(dm.cfg.crop_padding, dm.cfg.flip, dm.cfg.cutout)
        self.bs = bs = dm.cfg.batch_size
        self.n_batches = len(x_all) // bs if steps is None else min(steps, len(x_all) // bs)
        self.opt, self.sched = module.optim_cfg.build(net.parameters(), self.n_batches * epochs)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.cut_gen = torch.Generator(device=device).manual_seed(1)
        self.order = torch.empty(0, dtype=torch.long, device=device)  # start_epoch() draws it
        self.devices = {str(next(net.parameters()).device)}

    def start_epoch(self) -> None:
        self.order = torch.randperm(len(self.x_all), device=self.device, generator=self.gen)

    def step(self, i: int) -> None:
        idx = self.order[i * self.bs : (i + 1) * self.bs]
        x = self.x_all[idx].float().mul_(1 / 255)
        if self.aug.active:
            x = self.aug(x, self.gen)
        x = (x - self.mean) / self.std
        x = self.aug.cut(x, self.cut_gen)  # no draw, x as is, without Cutout
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if i == 0:
            self.devices.add(str(x.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = torch.nn.functional.cross_entropy(self.forward(x).float(), self.y_all[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()

    def close(self) -> set[str]:
        """Remove the guard and the batch norm; returns the devices its parameters and batches
        were on."""
        self.guard.remove()
        if self.fast_bn is not None:
            self.fast_bn.remove()
        if self.compiled:
            torch._dynamo.reset()
        self.devices.add(str(next(self.net.parameters()).device))
        return self.devices


def plain_loop(
    module,
    dm,
    epochs: int,
    steps: int | None,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    fast_bn: bool = True,
    compile_mode: str | None = None,
) -> tuple[float, set[str]]:  # type: ignore[no-untyped-def]
    """:class:`PlainLoop` for ``epochs`` epochs, the first untimed. Returns images/s and the
    devices its parameters and batches were on."""
    loop = PlainLoop(module, dm, epochs, steps, device, bf16, channels_last, fast_bn, compile_mode)
    seconds, images = 0.0, 0
    try:
        for epoch in range(epochs):
            _sync(device)
            start = time.perf_counter()
            loop.start_epoch()
            for i in range(loop.n_batches):
                loop.step(i)
            _sync(device)
            if epoch > 0:
                seconds += time.perf_counter() - start
                images += loop.n_batches * loop.bs
    finally:
        devices = loop.close()
    return images / seconds, devices


class Interleaved(pl.Callback):
    """Step-level interleaving of the framework path with the plain loop, in one fit: after
    every training step of the fit (epochs after the first), one step of ``loop``. The
    framework's step time is the interval from the end of the plain step before to the start of
    the plain step after it (the whole Lightning cycle: fetching the batch, the hooks, the
    step); the plain step's is its own. Both are taken within a fraction of a second of each
    other, so a machine's slow spells (on a shared 2-core VM, +-15 % over seconds) fall on both
    alike; the first interval of an epoch (no plain step before it) is not counted.
    ``framework_s`` / ``plain_s``: the paired step times in seconds."""

    def __init__(self, loop: PlainLoop) -> None:
        self.loop = loop
        self.framework_s: list[float] = []
        self.plain_s: list[float] = []
        self._last: float | None = None
        self._i = 0

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.current_epoch == 0:
            return
        _sync(self.loop.device)
        start = time.perf_counter()
        if self._i % self.loop.n_batches == 0:
            self.loop.start_epoch()
        self.loop.step(self._i % self.loop.n_batches)
        self._i += 1
        _sync(self.loop.device)
        end = time.perf_counter()
        if self._last is not None:
            self.framework_s.append(start - self._last)
            self.plain_s.append(end - start)
        self._last = end


def _compose(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _settings(cfg: DictConfig, step: str, cls: type[StageSettings]) -> Any:
    """The settings of catalogue step ``step`` (``chain.steps.<step>.settings``), validated."""
    node = OmegaConf.select(cfg, f"chain.steps.{step}.settings")
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    return cls.from_dict(values, f"chain.steps.{step}.settings")


def _triton_check(device: torch.device) -> dict[str, Any]:
    """The Triton kernels against the eager quantizer on ``device``: a bf16 channels_last
    activation batch (4 bits, LSQ step) and a float32 weight (per channel). Values and input
    gradients must be identical; the step gradient is reported as a relative difference."""
    from chaincomp.layers.quant import _FakeQuant

    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(64, 32, 16, 16, device=device, generator=gen).relu().to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(32, 16, 3, 3, device=device, generator=gen)
        ws = (w.reshape(32, -1).abs().amax(dim=1) / 7).reshape(-1, 1, 1, 1)
        out: dict[str, Any] = {}
        for name, (t, step, lo, hi) in {
            "act": (x, torch.tensor(0.3, device=device), 0, 15),
            "weight": (w, ws, -7, 7),
        }.items():
            res = []
            for fn in (_FakeQuant.apply, fq_triton.fake_quant_triton):
                ti = t.detach().clone().requires_grad_()
                si = step.detach().clone().requires_grad_(name == "act")
                y = fn(ti, si, lo, hi)
                y.backward(torch.ones_like(y))
                res.append((y, ti.grad, si.grad))
            (y0, g0, s0), (y1, g1, s1) = res
            out[f"{name}_values_equal"] = bool(torch.equal(y0, y1))
            out[f"{name}_grads_equal"] = bool(torch.equal(g0, g1))
            if s0 is not None and s1 is not None:
                rel = float((s1 - s0).abs() / s0.abs().clamp_min(1e-30))
                out["act_step_grad_rel_diff"] = f"{rel:.2e}"
        return out
    except Exception as e:  # report, do not crash the benchmark
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _trained_on(path: str, devices: set[str], chosen: torch.device) -> str:
    """The one device ``path`` trained on; fails loudly unless it is the chosen one."""
    if devices != {str(chosen)}:
        raise RuntimeError(
            f"{path} trained on {sorted(devices)}, not on the device chosen before fitting "
            f"({chosen}): its images/s would not compare with the other paths"
        )
    return str(chosen)


def run(
    overrides: Sequence[str] = (),
    epochs: int = 3,
    steps: int | None = None,
    qat: bool = True,
    exits: bool = True,
    exit_train: str = "joint",
    rounds: int = 1,
    triton: bool = False,
    interleave: bool | None = None,
) -> dict[str, Any]:
    """Train every path once and return the numbers.

    ``steps``: batches per epoch (None = 60 on CPU, all on CUDA; 0 = all). ``exit_train``:
    joint (every parameter trains, like the QAT line) | frozen (heads only, backbone BN in eval:
    what the early_exit step itself does). Returns ``device`` (chosen from the trainer config
    before any fit), ``trained_on`` (path -> the device it really trained on, all equal to
    ``device``), ``images_per_s`` (path -> images/s), ``ratio``, ``qat_overhead``,
    ``exits_qat_overhead``, ``samples`` (path -> images/s of each of the ``rounds`` rounds, every
    path trained once per round, in turn, framework and plain loop in alternating order;
    ``images_per_s`` is their median), the settings used, ``modules`` (path -> the trained module of
    its last round; ``initial``: the untrained one every path copies; ``interleaved_plain``: the
    interleaved plain loop's net) and ``exit_heads_before`` (the exit heads' state before
    training). ``triton``: the
    QAT path again with ``CHAINCOMP_QUANT_KERNEL=triton`` (``qat_triton``, and
    ``qat_triton_overhead`` float/QAT against the same framework path). ``interleave`` (None:
    on the CPU only; a CUDA step would have to synchronise): one more fit per round with
    :class:`Interleaved`, the framework path and the plain loop alternating step by step;
    ``interleaved`` holds the pairs' count, the median step time of each (ms) and ``ratio``,
    the median over pairs of plain step time / framework step time (framework/plain
    throughput).
    """
    if epochs < 2:
        raise ValueError("epochs must be >= 2 (the first one is warm-up)")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if exit_train not in EXIT_TRAIN:
        raise ValueError(f"exit_train must be one of {EXIT_TRAIN}, not {exit_train!r}")
    quiet = ["tracking.enabled=false", "trainer.enable_progress_bar=false"]
    tcfg = trainer_config(_compose([*overrides, *quiet]))
    # the device, once, before anything trains (Lightning moves modules back to the CPU after fit)
    cuda = tcfg.uses_cuda
    if cuda and tcfg.devices != 1:
        raise ValueError("the benchmark runs on one device: trainer.devices=1")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if triton and not cuda:
        raise ValueError("--triton measures the Triton kernels, which run on CUDA only")
    if interleave is None:
        interleave = not cuda
    if steps is None:
        steps = None if cuda else CPU_STEPS
    elif steps == 0:
        steps = None
    full = [*(() if cuda else CPU_DEFAULTS), *overrides, *quiet]
    if steps is not None:
        full.append(f"trainer.limit_train_batches={steps}")
    full.append("trainer.check_val_every_n_epoch=1000")  # time training only
    cfg = _compose(full)
    tcfg = trainer_config(cfg)
    precision = tcfg.resolved_precision()
    if precision not in PLAIN_PRECISIONS:
        raise ValueError(f"the plain loop reproduces precision {PLAIN_PRECISIONS}, not {precision}")
    if tcfg.cpu_keep_heap:  # what every chain fit does; for every path alike
        keep_freed_memory_in_heap()
    qs = _settings(cfg, "Q", QuantizeSettings)
    es = _settings(cfg, "E", EarlyExitSettings)
    seed_everything(int(cfg.get("seed", 0)))
    dm = build_data(cfg)
    if dm.task.name != "classify":
        raise ValueError("the plain loop is written for data.task=classify")
    initial = build_module(cfg, dm)
    channels_last = tcfg.channels_last
    fast_bn = tcfg.cpu_fast_batchnorm
    compile_mode = tcfg.compile_mode  # the framework's fits compile too (build_module)

    samples: dict[str, list[float]] = {}
    trained_on: dict[str, str] = {}
    modules: dict[str, Any] = {}
    heads_before: dict[str, dict[str, torch.Tensor]] = {}
    modules["initial"] = initial  # every path trains a deep copy of it

    def framework(
        path: str, module: Any, callbacks: Sequence[pl.Callback] = (), record: bool = True
    ) -> None:
        timer = EpochTimer()
        trainer = tcfg.make([timer, *callbacks], max_epochs=epochs)
        trainer.fit(module, datamodule=dm)
        trained_on[path] = _trained_on(path, timer.devices, device)
        modules[path] = module
        if record:
            samples.setdefault(path, []).append(timer.images / timer.seconds)

    points: list[int] = []
    if exits:
        backbone = backbone_of(initial.net)
        points = list(es.points) if es.points is not None else list(range(len(backbone.stages) - 1))
    triton_check = _triton_check(device) if qat and triton else {}

    bf16 = precision.startswith("bf16")
    # what the plain loop gets besides its own copy of the initial module
    loop_args = (dm, epochs, steps, device, bf16, channels_last, fast_bn, compile_mode)

    def plain() -> None:
        ips, devices = plain_loop(copy.deepcopy(initial), *loop_args)
        trained_on["plain"] = _trained_on("plain", devices, device)
        samples.setdefault("plain", []).append(ips)

    pairs: tuple[list[float], list[float]] = ([], [])

    def interleaved() -> None:
        loop = PlainLoop(copy.deepcopy(initial), *loop_args)
        inter = Interleaved(loop)
        try:
            framework("interleaved", copy.deepcopy(initial), [inter], record=False)
            modules["interleaved_plain"] = loop.net
        finally:
            devices = loop.close()
        trained_on["interleaved_plain"] = _trained_on("interleaved_plain", devices, device)
        pairs[0].extend(inter.framework_s)
        pairs[1].extend(inter.plain_s)

    for r in range(rounds):  # every path once per round: a slow spell hits all paths alike
        # the ratio's pair in alternating order (framework first in even rounds, the plain loop
        # in odd ones): whatever the path before leaves behind (heap, caches) falls on each alike
        pair = (lambda: framework("framework", copy.deepcopy(initial)), plain)
        for measure in pair if r % 2 == 0 else pair[::-1]:
            measure()
        if interleave:
            interleaved()

        if qat:
            module = copy.deepcopy(initial).to(device)
            quantize_module(module, dm, qs)
            framework("qat", module)
        for path in (("exits", "exits_qat") if qat else ("exits",)) if exits else ():
            module = copy.deepcopy(initial).to(device)
            torch.manual_seed(1)  # the same heads for both variants
            net = attach_exits(
                module, points, es.head, es.head_width, dm.example_input(1), es.exit_weight
            )
            callbacks: list[pl.Callback] = []
            if exit_train == "frozen":
                for p in net.backbone.parameters():
                    p.requires_grad_(False)
                callbacks.append(FreezeBackbone())
            if path == "exits_qat":
                quantize_module(module, dm, qs)
            heads_before[path] = {
                k: v.detach().cpu().clone() for k, v in net.exits.state_dict().items()
            }
            framework(path, module, callbacks)

        # last in the round: a kernel that breaks the CUDA context takes nothing after it
        if qat and triton and "error" not in triton_check:
            module = copy.deepcopy(initial).to(device)
            quantize_module(module, dm, qs)
            before = os.environ.get(KERNEL_ENV)
            os.environ[KERNEL_ENV] = "triton"
            calls = [0]
            kernel = fq_triton.fake_quant_triton

            def counted(*args: Any, _calls: list[int] = calls, _kernel: Any = kernel) -> Any:
                _calls[0] += 1
                return _kernel(*args)

            fq_triton.fake_quant_triton = counted  # type: ignore[assignment]
            try:
                framework("qat_triton", module)
                if calls[0] == 0:  # the eager fallback would be timed under the Triton label
                    samples.pop("qat_triton", None)
                    triton_check["error"] = "the Triton kernels never ran (eager fallback)"
            except Exception as e:  # a kernel that fails to build must not cost the other lines
                triton_check["error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                fq_triton.fake_quant_triton = kernel  # type: ignore[assignment]
                if before is None:
                    os.environ.pop(KERNEL_ENV, None)
                else:
                    os.environ[KERNEL_ENV] = before

    images_per_s = {path: statistics.median(v) for path, v in samples.items()}
    inter: dict[str, Any] = {}
    if pairs[0]:
        inter = {
            "pairs": len(pairs[0]),
            "framework_ms": 1e3 * statistics.median(pairs[0]),
            "plain_ms": 1e3 * statistics.median(pairs[1]),
            "ratio": statistics.median(p / f for f, p in zip(*pairs, strict=True)),
        }
    ips = images_per_s
    name = (
        torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    )
    return {
        "device": str(device),
        "device_name": name,
        "data": str(cfg.data.name),
        "model": str(cfg.model.name),
        "batch_size": dm.cfg.batch_size,
        "precision": precision,
        "compile": compile_mode,
        "epochs": epochs,
        "steps": steps,
        "quantize": qs,
        "exit_points": points,
        "exit_head": es.head,
        "exit_head_width": es.head_width,
        "exit_train": exit_train,
        "trained_on": trained_on,
        "images_per_s": ips,
        "samples": samples,
        "rounds": rounds,
        "ratio": ips["framework"] / ips["plain"],
        "qat_overhead": ips["framework"] / ips["qat"] if "qat" in ips else math.nan,
        "exits_qat_overhead": ips["exits"] / ips["exits_qat"] if "exits_qat" in ips else math.nan,
        "qat_triton_overhead": (
            ips["framework"] / ips["qat_triton"] if "qat_triton" in ips else math.nan
        ),
        "interleaved": inter,
        "triton_check": triton_check,
        "modules": modules,
        "exit_heads_before": heads_before,
    }


def report(r: dict[str, Any]) -> str:
    """The printed lines (stable labels: grep for them)."""
    ips = r["images_per_s"]
    q: QuantizeSettings = r["quantize"]
    qat = f"QAT w{q.w_bits}/a{q.a_bits}"
    steps = "all" if r["steps"] is None else r["steps"]
    lines = [
        f"device: {r['device_name']}; data={r['data']} model={r['model']} "
        f"batch={r['batch_size']} precision={r['precision']} epochs={r['epochs']} "
        f"(first is warm-up) steps/epoch={steps} rounds={r['rounds']} (images/s: the median)"
        + (f"; every path under torch.compile(mode={r['compile']!r})" if r["compile"] else ""),
        "trained on: " + " ".join(f"{k}={v}" for k, v in r["trained_on"].items()),
        f"framework (Lightning) : {ips['framework']:10.0f} images/s",
        f"plain PyTorch loop    : {ips['plain']:10.0f} images/s",
        f"ratio framework/plain : {r['ratio']:10.3f}",
    ]
    if r["interleaved"]:
        i = r["interleaved"]
        lines += [
            f"interleaved steps     : framework {i['framework_ms']:.2f} ms, plain loop "
            f"{i['plain_ms']:.2f} ms per step (medians of {i['pairs']} pairs)",
            f"ratio, interleaved    : {i['ratio']:10.3f}",
        ]
    if "qat" in ips:
        lines += [
            f"quantize: w{q.w_bits}/a{q.a_bits}, per-channel weights, "
            f"{'LSQ' if q.learn_scale else 'fixed'} activation steps, first/last layers "
            f"{q.first_bits}/{q.last_bits} bits, {q.calibration} calibration",
            f"framework + {qat} : {ips['qat']:10.0f} images/s",
            f"QAT overhead float/QAT: {r['qat_overhead']:10.3f}",
        ]
    if r["triton_check"]:
        lines.append(
            "Triton kernels vs eager here: "
            + " ".join(f"{k}={v}" for k, v in r["triton_check"].items())
        )
    if "qat_triton" in ips:
        lines += [
            f"{qat}, Triton kernels: {ips['qat_triton']:10.0f} images/s",
            f"QAT overhead (Triton) : {r['qat_triton_overhead']:10.3f}",
        ]
    if "exits" in ips:
        lines += [
            f"exit heads: points={r['exit_points']} head={r['exit_head']} "
            f"width={r['exit_head_width']} train={r['exit_train']} (training runs every head)",
            f"framework + exits     : {ips['exits']:10.0f} images/s",
        ]
    if "exits_qat" in ips:
        lines += [
            f"exits + {qat}     : {ips['exits_qat']:10.0f} images/s",
            f"QAT overhead w/ exits : {r['exits_qat_overhead']:10.3f}",
        ]
    lines.append(
        "images/s per round: "
        + "; ".join(f"{k} " + " ".join(f"{v:.0f}" for v in vs) for k, vs in r["samples"].items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per path (the first is warm-up)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"cap on batches per epoch (default: {CPU_STEPS} on CPU, all on CUDA; 0 = all)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="train every path this many times, in turn, and report the median images/s "
        "(a shared machine's slow spells hit every path alike)",
    )
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also one fit per round with the plain loop interleaved step by step (default: "
        "on the CPU, off on CUDA)",
    )
    parser.add_argument("--no-qat", action="store_true", help="skip the QAT measurements")
    parser.add_argument("--no-exits", action="store_true", help="skip the early-exit measurements")
    parser.add_argument(
        "--triton",
        action="store_true",
        help="also QAT with CHAINCOMP_QUANT_KERNEL=triton (fused Triton kernels; CUDA)",
    )
    parser.add_argument(
        "--exit-train",
        choices=EXIT_TRAIN,
        default="joint",
        help="joint: every parameter trains (as in the QAT line); frozen: heads only, as the "
        "early_exit step trains them",
    )
    parser.add_argument("overrides", nargs="*", help="chaincomp config overrides")
    args = parser.parse_intermixed_args()  # overrides may follow options
    r = run(
        args.overrides,
        args.epochs,
        args.steps,
        qat=not args.no_qat,
        exits=not args.no_exits,
        exit_train=args.exit_train,
        rounds=args.rounds,
        triton=args.triton,
        interleave=args.interleave,
    )
    print(report(r))


if __name__ == "__main__":
    main()
