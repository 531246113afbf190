"""The language-model head and cross-entropy, fused so the full logits never exist at once.

    loss = mean over labelled rows i of  logsumexp(h_i W^T) - (h_i W^T)[y_i]

h [N, D] hidden states, W [V, D] the head's weight, y [N] labels (-100:
ignored). The plain path materialises logits [N, V] in float32, and its
backward another tensor as large: at vocab 32k and 16k tokens per step that
is 2 GiB each. ``linear_cross_entropy`` walks the rows in chunks: each
chunk's logits are made, reduced to its loss and, when gradients are
wanted, straight away to its gradients (softmax - one-hot, scaled), which
go into grad_h (that chunk's rows) and grad_W (accumulated); then the
chunk's logits are dropped. Backward only scales the stored gradients by
the incoming one. Peak extra memory is one chunk's logits, not N x V.

With ``softcap`` c (Gemma 2's final_logit_softcapping) each chunk's logits z
become c * tanh(z / c) in float32 first, and their gradient is carried back
through it (times 1 - tanh(z / c)^2).

``linear_cross_entropy_reference`` is the plain path (the ground truth).
Logits are computed in the inputs' dtype and reduced in float32, as the
plain path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.kernels.flushed_exp import flushed_exp
from kvlab.kernels.precision import compute_dtype, upcast

IGNORE = -100


def linear_cross_entropy_reference(hidden, weight, labels, *, reduction: str = "mean", softcap=None):
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(upcast(logits) / softcap)
    loss = F.cross_entropy(upcast(logits.flatten(0, -2)), labels.flatten(), ignore_index=IGNORE, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def _rows_per_chunk(vocab: int, device: torch.device | None = None) -> int:
    """Rows per chunk: float32 logits of about 64 MiB on an accelerator, 4 MiB (and at least 128 rows) on a CPU.

    On a CPU a large chunk costs twice over: glibc's allocator hands out a
    block of 32 MiB or more as fresh pages every time (mmap; faulting them in
    took as long as the softmax's exp), and each chunk's logits are passed
    over several times (the matrix product, logsumexp, the gradient), which
    is cheap only while they stay in cache. At gqa's shapes (2,048 rows,
    vocab 4,096) 256-row chunks made the loss x1.3 and the whole training
    step x1.02 to x1.05 faster than one 2,048-row chunk (benchmarks/RESULTS.md,
    "Training step"). Below about 128 rows the gradient of W, accumulated
    over every chunk, costs more than the chunks save.
    """
    if device is not None and device.type == "cpu":
        return max(128, 4 * 2**20 // (4 * vocab))
    return max(1, 64 * 2**20 // (4 * vocab))


def cross_entropy_rows(logits, labels, grad_scale: float | None):
    """Per-row losses of a chunk of logits [n, V]; with ``grad_scale``, also their gradient, in place.

    Returns (losses [n] float32, gradient or None): the gradient (softmax -
    one-hot) * grad_scale, zero on ignored rows, overwrites ``logits`` (it is
    float32 here; the Triton kernel keeps the logits' own dtype).
    """
    logits = upcast(logits)
    valid = labels != IGNORE
    target = labels.clamp(min=0)
    picked = logits.gather(1, target[:, None])[:, 0]
    top = logits.amax(-1, keepdim=True)
    # One exp over the chunk: e = exp(z - max) gives both the loss (log sum e + max) and the gradient
    # (e / sum e), where logsumexp and then exp(z - lse) took two (the loss and its backward x1.05 faster
    # at gqa's shapes). Through flushed_exp: a trained model's logits spread past exp's range on a CPU,
    # where plain exp made the loss x6 to x13 slower (benchmarks/RESULTS.md, "Exponentials far below zero")
    e = flushed_exp(logits.sub_(top), inplace=True)  # over the logits: one chunk's worth of memory, as before
    total = e.sum(-1)
    losses = (total.log() + top[:, 0] - picked) * valid
    if grad_scale is None:
        return losses, None
    weight = valid.to(logits.dtype) * grad_scale  # (a bool tensor times a float is float32: a float64 scale
    # would have been rounded)
    grad = e.mul_((weight / total)[:, None])
    grad[torch.arange(len(labels), device=logits.device), target] -= weight
    return losses, grad


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, reduction, rows, rows_fn, softcap):
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        n_valid = int((y != IGNORE).sum())
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        wide = compute_dtype(weight.dtype)  # the losses and the weight's gradient: float32, or float64's
        losses = torch.zeros(h.shape[0], dtype=wide, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if ctx.needs_input_grad[1] else None
        # Under autocast the gradients' products run in its dtype, as a linear's backward does there (the
        # logits' gradient cast once, not by each product; the weight's accumulated in float32 chunk by chunk)
        autocast = torch.is_autocast_enabled(h.device.type)
        work = torch.get_autocast_dtype(h.device.type) if autocast else weight.dtype
        for start in range(0, h.shape[0], rows):
            h_c, y_c = h[start : start + rows], y[start : start + rows]
            # d loss_i / d logits_i = softmax_i - onehot(y_i), for labelled rows; written over the logits
            logits = h_c @ weight.t()
            if softcap is not None:
                tanh = torch.tanh(upcast(logits) / softcap)
                logits = tanh * softcap
            losses[start : start + rows], grad = rows_fn(logits, y_c, scale if want_grad else None)
            if grad is not None and softcap is not None:
                grad = grad * (1 - tanh * tanh)
            if grad is not None:
                grad = grad.to(work)
                if grad_h is not None:
                    grad_h[start : start + rows] = grad @ weight
                if grad_w is not None and autocast:
                    grad_w += grad.t() @ h_c
                elif grad_w is not None:
                    grad_w.addmm_(upcast(grad.t()), upcast(h_c))  # (autocast passes over in-place ops: float32)
            del grad
        ctx.reduction = reduction
        ctx.shape = hidden.shape
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        if reduction == "none":
            return losses.view(labels.shape)
        total = losses.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad_out.to(grad_h.dtype)).view(ctx.shape)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    reduction: str = "mean",
    rows_per_chunk: int | None = None,
    rows_fn=cross_entropy_rows,
    softcap: float | None = None,
):
    """Cross-entropy of ``hidden @ weight.T`` (capped at ``softcap`` if given) against ``labels`` (-100 ignored),
    chunked over rows.

    hidden [..., D], weight [V, D], labels [...]; reduction "mean" (over labelled rows; 0, not NaN, when
    there are none) or "sum";
    "none" (a loss per row) only without gradients, as gradients are computed during the forward.
    ``rows_fn`` reduces one chunk's logits (``cross_entropy_rows``' contract; the Triton backend passes its kernel).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: valid are mean, sum, none")
    if reduction == "none" and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise ValueError("linear_cross_entropy: reduction='none' computes no gradients; use mean or sum to train")
    rows = rows_per_chunk or _rows_per_chunk(weight.shape[0], weight.device)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, reduction, rows, rows_fn, softcap)
