"""Griffin's diagonal recurrence in Triton (``kvlab.kernels.diagonal_scan``'s op on GPUs).

Each program holds a block of one row's channels in registers and walks the tokens, h_t = a_t h_{t-1} + x_t
(each element of a and x read once, h written once: Hillis and Steele's passes read the whole sequence log2 T
times). Its backward walks them back, g_t = dh_t + a_{t+1} g_{t+1}, dx_t = g_t, da_t = g_t h_{t-1}, from the
decays and the outputs. The decays (zero at a document's first token) and the carried state folded into the first
input come from ``decays_and_inputs`` in torch, so both kernels start from zero and know nothing of documents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.diagonal_scan import decays_and_inputs
from kvlab.kernels.triton_common import block


@triton.jit
def _forward(A, X, H, T, W, BLOCK: tl.constexpr):
    channels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = channels < W
    row = tl.program_id(1).to(tl.int64) * T * W
    h = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(T):
        at = row + t * W + channels
        h = tl.load(A + at, mask=ok, other=0.0) * h + tl.load(X + at, mask=ok, other=0.0)
        tl.store(H + at, h, mask=ok)


@triton.jit
def _backward(A, H, DH, DA, DX, T, W, BLOCK: tl.constexpr):
    channels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = channels < W
    row = tl.program_id(1).to(tl.int64) * T * W
    g = tl.zeros([BLOCK], dtype=tl.float32)
    decay_after = tl.zeros([BLOCK], dtype=tl.float32)  # a_{t+1}: none after the last token
    for i in range(T):
        t = T - 1 - i
        at = row + t * W + channels
        g = tl.load(DH + at, mask=ok, other=0.0) + decay_after * g
        after_first = (tl.zeros([BLOCK], dtype=tl.int32) + t) > 0  # (a tensor: a scalar mask is refused)
        before = tl.load(H + at - W, mask=ok & after_first, other=0.0)  # h_{t-1} (zero before the first token)
        tl.store(DX + at, g, mask=ok)
        tl.store(DA + at, g * before, mask=ok)
        decay_after = tl.load(A + at, mask=ok, other=0.0)


def _launch(kernel, W, B, *args):
    BLOCK = block(W, 256)
    kernel[(triton.cdiv(W, BLOCK), B)](*args, BLOCK=BLOCK)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x):
        a, x = a.contiguous(), x.contiguous()
        B, T, W = x.shape
        h = torch.empty_like(x)
        _launch(_forward, W, B, a, x, h, T, W)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        B, T, W = h.shape
        grad_a, grad_x = torch.empty_like(a), torch.empty_like(h)
        _launch(_backward, W, B, a, h, grad_h.float().contiguous(), grad_a, grad_x, T, W)
        return grad_a, grad_x


def diagonal_scan(x, log_decay, *, state=None, doc_ids=None):
    """``kvlab.kernels.diagonal_scan.diagonal_scan``'s contract; the scan in float32 (float64 inputs too)."""
    a, u = decays_and_inputs(x, log_decay, state, doc_ids)
    h = _Scan.apply(a.float(), u.float()).to(a.dtype)
    return h.to(x.dtype), h[:, -1]
