"""CPU training step time with PyTorch's batch norm against chaincomp's fast one
(``trainer.cpu_fast_batchnorm``), for the nets the demo chain trains.

    python benchmarks/batchnorm_cpu.py [--steps 30] [--batch 128]

For each net (the demo's ResNet-10 at a quarter width, its D student at 0.75 of that, and a
student pruned by 35 %), the two kernels train copies of the net side by side in channels_last,
one step of each in turn (so a slow spell of the machine hits both), and the script prints the
median step time of each and the ratio PyTorch / fast: above 1 is faster. A net whose channel
counts all fill the vectors takes PyTorch's kernel either way (ratio about 1).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from chaincomp.layers.batchnorm import fast_batchnorm, vector_width
from chaincomp.models import build_model


def _resnet10(width_mult: float) -> nn.Module:
    cfg = {
        "_target_": "chaincomp.models.ResNet",
        "blocks": [1, 1, 1, 1],
        "widths": [64, 128, 256, 512],
        "width_mult": width_mult,
    }
    return build_model(cfg, 1, 10, (28, 28))


def _pruned(net: nn.Module, ratio: float) -> nn.Module:
    """``net`` with ``ratio`` of every prunable channel group removed (Torch-Pruning, L1)."""
    import torch_pruning as tp

    example = torch.zeros(1, 1, 28, 28)
    pruner = tp.pruner.MetaPruner(
        net,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[net.head.fc],  # type: ignore[union-attr]
    )
    pruner.step()
    return net


def _step_time(nets: dict[str, nn.Module], steps: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opts = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for k, n in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(steps):
        for k, net in nets.items():
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(net(x), y)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v[3:]) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    cap = torch.backends.cpu.get_cpu_capability()
    print(
        f"device: CPU ({torch.get_num_threads()} threads, ATen {cap}, vector {vector_width()} "
        f"floats), torch {torch.__version__}, batch {args.batch}, channels_last"
    )
    cases = {
        "teacher (resnet10 x0.25)": _resnet10(0.25),
        "D student (x0.1875)": _resnet10(0.1875),
        "P: student pruned 35 %": _pruned(_resnet10(0.1875), 0.35),
    }
    for name, net in cases.items():
        net = net.to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
        fast = copy.deepcopy(net)
        handle = fast_batchnorm(fast)
        bns = [m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        odd = sum(c % vector_width() != 0 for c in bns)
        t = _step_time({"pytorch": net, "fast": fast}, args.steps, args.batch)
        handle.remove()
        print(
            f"{name:26s} channels {sorted(set(bns))}: {odd}/{len(bns)} batch norms fill no "
            f"vector; step pytorch {1000 * t['pytorch']:.1f} ms, fast {1000 * t['fast']:.1f} ms, "
            f"ratio {t['pytorch'] / t['fast']:.3f}"
        )


if __name__ == "__main__":
    main()
