"""Hook-based per-layer cost counter (see the package docstring for the definitions)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

FLOAT_BITS = 32


def bits_of(module: nn.Module) -> tuple[int, int]:
    """(weight bits, activation bits) of a layer: its ``weight_bits``/``act_bits`` or 32/32."""
    w = getattr(module, "weight_bits", None)
    a = getattr(module, "act_bits", None)
    return int(w) if w else FLOAT_BITS, int(a) if a else FLOAT_BITS


@dataclass
class LayerCost:
    name: str
    kind: str
    macs: int
    params: int
    weight_bits: int
    act_bits: int
    calls: int = 1

    @property
    def bitops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits


@dataclass
class CostReport:
    """Costs per sample of one model at one input shape.

    ``layers`` are in first-call order. ``params`` counts every parameter of the model once;
    ``size_bits`` counts a counted layer's weight at its weight bits, everything else at 32.
    """

    layers: list[LayerCost] = field(default_factory=list)
    params: int = 0
    size_bits: int = 0

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def bitops(self) -> int:
        return sum(layer.bitops for layer in self.layers)

    @property
    def size_mb(self) -> float:
        return self.size_bits / 8 / 1e6

    def sum(self, prefixes: Iterable[str], what: str = "bitops") -> int:
        """Total ``what`` ('macs' or 'bitops') of the layers whose name is under any prefix."""
        pre = tuple(prefixes)
        return sum(
            getattr(layer, what)
            for layer in self.layers
            if any(layer.name == p or layer.name.startswith(p + ".") for p in pre)
        )

    def totals(self) -> dict[str, float]:
        return {
            "macs": self.macs,
            "bitops": self.bitops,
            "params": self.params,
            "size_mb": self.size_mb,
        }

    def rows(self) -> list[dict[str, object]]:
        return [{**asdict(layer), "bitops": layer.bitops} for layer in self.layers]


def _conv_macs(m: nn.Conv2d, out: Tensor) -> int:
    k = math.prod(m.kernel_size)
    return k * (m.in_channels // m.groups) * m.out_channels * math.prod(out.shape[2:])


def _linear_macs(m: nn.Linear, out: Tensor) -> int:
    # per sample: every leading dimension but the batch multiplies the work
    return m.in_features * m.out_features * math.prod(out.shape[1:-1])


@torch.no_grad()
def count_cost(model: nn.Module, example: Tensor | Sequence[int]) -> CostReport:
    """Count the per-sample cost of ``model`` on ``example`` (a batch-1 tensor or its shape).

    The model runs once in eval mode on the device of its parameters; its mode is restored.
    A model with a ``forward_all`` method (a net with exit heads) is run through it, so that
    every path (each exit head and the final head) is counted once.
    """
    if not isinstance(example, Tensor):
        example = torch.zeros(*example)
    param = next(model.parameters(), None)
    if param is not None:
        example = example.to(param.device)
    names = {m: n for n, m in model.named_modules()}
    found: dict[str, LayerCost] = {}

    def hook(module: nn.Module, _inp: tuple, out: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            macs, kind = _conv_macs(module, out), "conv"
        else:
            assert isinstance(module, nn.Linear)
            macs, kind = _linear_macs(module, out), "linear"
        name = names.get(module, type(module).__name__)
        w_bits, a_bits = bits_of(module)
        if name in found:
            found[name].macs += macs
            found[name].calls += 1
        else:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            found[name] = LayerCost(name, kind, macs, params, w_bits, a_bits)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        forward_all = getattr(model, "forward_all", None)
        (forward_all or model)(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    layer_modules = {m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    size_bits = 0
    seen: set[int] = set()
    for m in layer_modules:
        w_bits, _ = bits_of(m)
        for pname, p in m.named_parameters(recurse=False):
            seen.add(id(p))
            size_bits += p.numel() * (w_bits if pname == "weight" else FLOAT_BITS)
    total_params = 0
    for p in model.parameters():
        total_params += p.numel()
        if id(p) not in seen:
            size_bits += p.numel() * FLOAT_BITS
    return CostReport(layers=list(found.values()), params=total_params, size_bits=size_bits)


def expected_cost(exit_probs: Sequence[float], exit_costs: Sequence[float]) -> float:
    """Expected cost per sample of a network with exits: sum_k P(exit at k) * exit_costs[k].

    ``exit_costs[k]`` is the whole cost of a sample that leaves at exit k (backbone prefix up to k
    plus every exit head evaluated on the way, the final head counting as the last exit).
    Probabilities must be non-negative and sum to 1 (within 1e-6).
    """
    if len(exit_probs) != len(exit_costs) or not exit_probs:
        raise ValueError(
            f"exit_probs ({len(exit_probs)}) and exit_costs ({len(exit_costs)}) must match"
        )
    if any(p < 0 for p in exit_probs) or abs(sum(exit_probs) - 1.0) > 1e-6:
        raise ValueError(f"exit probabilities must be >= 0 and sum to 1, got {list(exit_probs)}")
    return float(sum(p * c for p, c in zip(exit_probs, exit_costs, strict=True)))
