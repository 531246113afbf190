"""A diagonal linear recurrence: each channel's state is one number,

    h_t = exp(g_t) h_{t-1} + x_t          (g_t = log decay <= 0)

Griffin's RG-LRU (De et al. 2024) runs on it: its decay is per channel and token, so neither linear attention's
chunks (a [C, C] decay mask per channel: 1.2x slower than a token loop at chunks of 8, 16x at 64, Griffin's
widths) nor Mamba's scan (which scales its input by the step) fit it (benchmarks/kernel_ops.py --diagonal-scan).

- ``diagonal_scan_reference``: token by token, for tests.
- ``diagonal_scan``: Hillis & Steele's scan over the whole sequence at once. Step k combines each token with the
  one 2^k before it, (a, x) after (a', x') giving (a a', a x' + x), so after step k every token holds the
  decay product and the decayed sum of the 2^(k+1) tokens ending at it: log2 T elementwise passes, and only
  products of decays <= 1 (no exponential of a sum of them: exact at any decay). Its backward is the same
  scan run in reverse over the gradients (dx_t = dh_t + a_{t+1} dx_{t+1}, da_t = dx_t h_{t-1}), keeping
  only the decays and the outputs. A decode step (T = 1) is the recurrence's one update.

Packed documents (``doc_ids`` [B, T]) start from an empty state where the id changes (their first token's
decay is zero); position 0 continues ``state`` [B, W] (zeros when None). Inputs x, log_decay [B, T, W];
computed in float32 (float64 stays float64); the outputs come back in x's dtype, the final state in float32
or float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.kernels.attention import document_starts
from kvlab.kernels.precision import compute_dtype


def _decays(log_decay, doc_ids, dt):
    a = log_decay.to(dt).exp()
    if doc_ids is not None:
        a = a.masked_fill(document_starts(doc_ids)[..., None], 0.0)
    return a


def decays_and_inputs(x, log_decay, state, doc_ids):
    """The scan's a and x in the compute dtype: a zero at a document's first token, and the carried state entering
    as part of the first input (h_0 = a_0 h_{-1} + x_0), so the scans themselves start from zero (the Triton
    kernel's too: ``kvlab.kernels.triton_diagonal_scan``)."""
    dt = compute_dtype(x.dtype)
    a, u = _decays(log_decay, doc_ids, dt), x.to(dt)
    if state is not None:
        u = torch.cat([u[:, :1] + a[:, :1] * state.to(dt)[:, None], u[:, 1:]], dim=1)
    return a, u


def diagonal_scan_reference(x, log_decay, *, state=None, doc_ids=None):
    """h [B, T, W] and the final state [B, W], token by token."""
    dt = compute_dtype(x.dtype)
    a = _decays(log_decay, doc_ids, dt)
    h = x.new_zeros(x.shape[0], x.shape[-1], dtype=dt) if state is None else state.to(dt)
    outputs = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t].to(dt)
        outputs.append(h)
    return torch.stack(outputs, dim=1).to(x.dtype), h


def _scan(a, x):
    """Hillis & Steele over dim 1: every h_t = a_t h_{t-1} + x_t from h_{-1} = 0."""
    d, T = 1, x.shape[1]
    while d < T:
        x = x + a * F.pad(x[:, :-d], (0, 0, d, 0))
        if 2 * d < T:  # (the last step's products are not read)
            a = a * F.pad(a[:, :-d], (0, 0, d, 0), value=1.0)
        d *= 2
    return x


class _DiagonalScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x):
        h = _scan(a, x)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        # dx_t = dh_t + a_{t+1} dx_{t+1}: the scan from the end, each token decayed by the next one's decay
        after = F.pad(a[:, 1:], (0, 0, 0, 1))
        grad_x = _scan(after.flip(1), grad_h.flip(1)).flip(1)
        grad_a = grad_x * F.pad(h[:, :-1], (0, 0, 1, 0))
        return grad_a, grad_x


def diagonal_scan(x, log_decay, *, state=None, doc_ids=None):
    """``diagonal_scan_reference``'s contract, in log2 T passes (see the module's docstring)."""
    a, u = decays_and_inputs(x, log_decay, state, doc_ids)
    if x.shape[1] == 1:
        h = u
    elif torch.is_grad_enabled() and (a.requires_grad or u.requires_grad):
        h = _DiagonalScan.apply(a, u)
    else:
        h = _scan(a, u)
    return h.to(x.dtype), h[:, -1]
