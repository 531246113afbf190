"""``flushed_exp``: exp for values that may lie far below zero or be -inf, without a CPU's slow paths.

The chunked scans' decay weights (exponentials of summed log decays, masked with -inf) and the loss's
softmax (logits minus their maximum) are such values. On a CPU, two slow paths lie in wait there
(benchmarks/RESULTS.md, "Exponentials far below zero"): ``torch.exp`` of float32 goes through MKL's
vectorised exp, 100-180x slower where the result is below float32's smallest normal (x < -87.3) and
20x where x is -inf; and a subnormal result, once in a matrix product, makes that product up to 200x
slower. A Mamba-2 chunk of 64 tokens decays past -87 at initialisation, and a trained language model's
logits can spread wider than 87.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOG2_E = 1.4426950408889634
FLUSHED_BELOW = -100.0  # log2: results under 2^-100 (8e-31) are flushed to 0


def flushed_exp(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """exp(x), on a CPU in float32 as exp2(x log2 e), within 4e-6 of exp(x) (relative: the product's
    rounding), and 0 below 2^-100 (8e-31 relative to an undecayed term or the largest logit: far below
    float32's resolution of any sum that holds one). Elsewhere (accelerators; float64, whose exp2 is the
    slower one on a CPU) plain exp. ``inplace``: written over ``x`` (no gradient through it), where a
    caller's ``x`` is spent, as the loss's chunk of logits is."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.exp_() if inplace else x.exp()
    # At most one new tensor, as exp makes: the flush (threshold: one pass, where a comparison and masked_fill
    # took two and three times as long), then the scaling and exp2 over it in place. A CPU allocator hands a
    # large tensor out as fresh pages, which cost more than a pass: three new tensors took x8 longer.
    threshold = F.threshold_ if inplace else F.threshold
    return threshold(x, FLUSHED_BELOW / LOG2_E, float("-inf")).mul_(LOG2_E).exp2_()
