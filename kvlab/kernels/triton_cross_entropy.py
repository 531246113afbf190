"""The fused head + cross-entropy's per-row reduction in Triton: loss and gradient in two passes over a row.

``kvlab.kernels.cross_entropy.linear_cross_entropy`` makes each chunk's
logits with a matmul and hands them here. One program per row: the first
pass over the vocabulary keeps a running max and sum of exponentials
(online logsumexp), the second overwrites the logits with their gradient
(softmax - one-hot) * scale. The torch path instead runs six elementwise
kernels over the chunk and keeps it in float32; this one reads the logits
twice, writes them once and keeps their dtype (bf16 logits stay bf16, halving
the chunk), with float32 arithmetic inside.
It is not autotuned: the autotuner re-runs a kernel to time it, and this
one overwrites its input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.cross_entropy import IGNORE
from kvlab.kernels.cross_entropy import linear_cross_entropy as _chunked_linear_cross_entropy
from kvlab.kernels.triton_common import block, interpreting


@triton.jit
def _cross_entropy_rows(LOGITS, LABELS, LOSS, V, grad_scale, IGNORE_INDEX: tl.constexpr, WANT_GRAD: tl.constexpr,
                        BLOCK_V: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * V
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    valid = label != IGNORE_INDEX
    target = tl.where(valid, label, 0)
    # read before the gradient pass overwrites the row
    target_logit = tl.load(logits + target).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target_logit, 0.0))
    if WANT_GRAD:
        scale = tl.where(valid, grad_scale, 0.0)
        for start in range(0, V, BLOCK_V):
            in_row = start + cols < V
            x = tl.load(logits + start + cols, mask=in_row, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
            tl.store(logits + start + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=in_row)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, grad_scale: float | None):
    """``kvlab.kernels.cross_entropy.cross_entropy_rows``' contract; the gradient keeps the logits' dtype."""
    logits, labels = logits.contiguous(), labels.contiguous()
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _cross_entropy_rows[(logits.shape[0],)](
        logits, labels, losses, logits.shape[1], 0.0 if grad_scale is None else grad_scale, IGNORE_INDEX=IGNORE,
        WANT_GRAD=grad_scale is not None, BLOCK_V=block(logits.shape[1], 256 if interpreting() else 4096),
    )  # fmt: skip
    return losses, logits if grad_scale is not None else None


def linear_cross_entropy(
    hidden, weight, labels, *, reduction: str = "mean", rows_per_chunk: int | None = None, softcap=None
):
    """``kvlab.kernels.cross_entropy.linear_cross_entropy``' contract, each chunk reduced by the kernel above."""
    return _chunked_linear_cross_entropy(
        hidden, weight, labels, reduction=reduction, rows_per_chunk=rows_per_chunk, rows_fn=cross_entropy_rows,
        softcap=softcap,
    )  # fmt: skip
