"""Exact cost accounting: MACs, params, weight bits and BitOps, counted on a real forward.

Per layer l (every ``nn.Conv2d`` / ``nn.Linear``, subclasses included, found with isinstance):

- conv MACs = k_h * k_w * C_in / groups * C_out * H_out * W_out; linear MACs = in * out
  (per sample; a module called twice counts twice);
- BitOps = MACs * b_w * b_a.

Bit widths are read from the module: a layer that carries integer attributes ``weight_bits``
and ``act_bits`` (the quantize stage's modules do) is counted with them; any other layer is
float, 32/32. Parameters that do not belong to a counted layer (BatchNorm, ...) are counted as
32-bit in the model size.

Early exit: :func:`expected_cost` turns exit probabilities and the cost of leaving at each exit
into the expected cost per sample, sum_k P(exit at k) * cost_k.
"""

from chaincomp.cost.counter import (
    CostReport,
    LayerCost,
    bits_of,
    count_cost,
    expected_cost,
)

__all__ = ["CostReport", "LayerCost", "bits_of", "count_cost", "expected_cost"]
