"""Short causal depthwise convolution (Mamba's conv1d before the scan) and RWKV's token shift.

    y_t = bias + sum_{j=0}^{K-1} w[:, j] * x_{t - (K - 1) + j}

over channels independently. ``prev`` [B, K - 1, C] holds the inputs before
the first token (zeros when None), so a sequence split into calls gives the
outputs of one call; the new ``prev`` (the last K - 1 inputs) is returned
for the next. With ``doc_ids`` [B, T] an output sees only inputs of its own
document (packed sequences), and position 0 continues ``prev``.

Written as K shifted multiply-adds: K is 4 or so, and this form takes the
state and the document masks directly. Tests compare it with
``torch.nn.functional.conv1d``.
"""

from __future__ import annotations

import torch

from kvlab.kernels.attention import document_starts


def causal_conv1d(x, weight, bias=None, *, prev=None, doc_ids=None):
    """x [B, T, C]; weight [C, K]; bias [C] or None -> (y [B, T, C], new prev [B, K - 1, C])."""
    if not torch.is_grad_enabled():
        return _taps_in_place(x, weight, bias, prev, doc_ids)
    B, T, C = x.shape
    K = weight.shape[1]
    if prev is None:
        prev = x.new_zeros(B, K - 1, C)
    padded = torch.cat([prev.to(x.dtype), x], dim=1)  # [B, K - 1 + T, C]
    # In x's dtype (as the bias already was): under bf16 autocast, float32 taps had made the output float32 and every
    # product a cast of x and back in the backward (mamba2's training step x1.08 without them, samba's x1.04)
    taps = _tap_rows(weight).to(x.dtype)
    # The taps accumulate in place into one output that starts from the bias: one pass per tap, where a
    # product and then a sum had taken two, each into a new tensor (x1.4 on the forward at mamba2's prefill).
    last = padded[:, K - 1 :]
    y = last * taps[K - 1] if bias is None else torch.addcmul(bias.to(x.dtype), last, taps[K - 1])
    for j in range(K - 1):
        shift = K - 1 - j  # how far back this tap reaches
        tap = padded[:, j : j + T]
        if doc_ids is not None:  # the input ``shift`` tokens back counts if it is of the same document;
            # inputs before position 0 (``prev``) belong to position 0's document
            back = torch.cat([doc_ids[:, :1].expand(B, shift), doc_ids], dim=1)[:, :T]
            tap = tap * (back == doc_ids)[..., None]
        y = y.addcmul_(tap, taps[j])
    return y, padded[:, -(K - 1) :] if K > 1 else padded[:, :0]


def _taps_in_place(x, weight, bias, prev, doc_ids):
    """``causal_conv1d`` without a gradient: each tap added in place to the slice of outputs it reaches, from
    ``x`` and ``prev`` as they are, where the form above first copies both into one padded tensor. That copy
    (``x`` is a strided slice of Mamba's input projection) took as long as the taps: the forward x1.9 at
    mamba2's prefill of 8 x 128 tokens. Under autograd the padded form stays: a tap in place on a slice
    (a view) costs its backward more than the copy (forward and backward x0.8)."""
    B, T, C = x.shape
    K = weight.shape[1]
    taps = _tap_rows(weight).to(x.dtype)
    y = x * taps[K - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x, taps[K - 1])
    for j in range(K - 1):
        shift = K - 1 - j  # how far back this tap reaches: outputs t >= shift read x, the first ones prev
        if T > shift:
            tap = x[:, : T - shift]
            if doc_ids is not None:  # the input ``shift`` tokens back counts if it is of the same document
                tap = tap * (doc_ids[:, : T - shift] == doc_ids[:, shift:])[..., None]
            y[:, shift:].addcmul_(tap, taps[j])
        if prev is not None:  # inputs before position 0 belong to position 0's document
            n = min(shift, T)
            tap = prev[:, j : j + n].to(x.dtype)
            if doc_ids is not None:
                tap = tap * (doc_ids[:, :1] == doc_ids[:, :n])[..., None]
            y[:, :n].addcmul_(tap, taps[j])
    if T >= K - 1:
        return y, x[:, T - (K - 1) :]
    before = x.new_zeros(B, K - 1, C) if prev is None else prev.to(x.dtype)
    return y, torch.cat([before, x], dim=1)[:, T:]


def _tap_rows(weight: torch.Tensor) -> torch.Tensor:
    """weight [C, K] as [K, C], each tap's weights one contiguous row. A column ``weight[:, j]`` has stride K, and
    an elementwise op broadcasting a strided vector over [B, T, C] leaves TensorIterator's vectorized loop: one tap
    took 82 against 21 us at 1 x 128 x 640 (mamba2's prefill), the whole convolution 391 against 185 us."""
    return weight.t().contiguous()


def token_shift(x, *, prev=None, doc_ids=None):
    """RWKV's token shift: each token's predecessor, x_{t-1} (x [B, T, C] -> [B, T, C]), and the new ``prev``.

    ``prev`` [B, C] is the token before the first (zeros when None, as at a
    sequence's start); with ``doc_ids`` a document's first token gets zeros.
    """
    before = x.new_zeros(x.shape[0], 1, x.shape[2]) if prev is None else prev[:, None].to(x.dtype)
    shifted = torch.cat([before, x[:, :-1]], dim=1)
    if doc_ids is not None:
        shifted = shifted.masked_fill(document_starts(doc_ids)[..., None], 0.0)
    return shifted, x[:, -1]


def skipping_pads(op, x, prev, real, width: int, **kwargs):
    """``op(x, prev=prev, **kwargs) -> (y, new prev)`` (``causal_conv1d``, ``token_shift``) over the real tokens
    of ``x`` alone, as if its pads (``real`` [B, T] False) were not there: per row, ``[prev, x]`` is reordered
    with the pads first, as zeros, the op runs on that, and each token's output is taken back to its place
    (a pad's is meaningless). So a real token sees the real inputs before it (and ``prev``, ``width`` [B,
    width, C] or a token shift's [B, C]; None: zeros), and the new prev holds the last real inputs.
    ``real`` None: the op as it is."""
    if real is None:
        return op(x, prev=prev, **kwargs)
    B, T, C = x.shape
    flat = op is token_shift  # its prev is one token, [B, C]
    before = x.new_zeros(B, width, C) if prev is None else (prev[:, None] if flat else prev).to(x.dtype)
    keep = torch.cat([real.new_ones(B, width), real], dim=1)
    order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices  # pads first, both parts in order
    moved = torch.cat([before, x], dim=1).gather(1, order[..., None].expand(-1, -1, C))
    moved = moved * keep.gather(1, order)[..., None].to(x.dtype)
    y, new_prev = op(moved[:, width:], prev=moved[:, 0] if flat else moved[:, :width], **kwargs)
    where = (torch.argsort(order, dim=1)[:, width:] - width).clamp(min=0)  # each token's place in the op's input
    return y.gather(1, where[..., None].expand(-1, -1, y.shape[-1])), new_prev


def causal_conv1d_reference(x, weight, bias=None, *, prev=None, doc_ids=None):
    """``causal_conv1d`` output by output: y_t sums the K inputs ending at t that share t's document."""
    B, T, C = x.shape
    K = weight.shape[1]
    padded = torch.cat([x.new_zeros(B, K - 1, C) if prev is None else prev.to(x.dtype), x], dim=1)
    docs = None if doc_ids is None else torch.cat([doc_ids[:, :1].expand(B, K - 1), doc_ids], dim=1)
    ys = []
    for t in range(T):
        y = x.new_zeros(B, C) if bias is None else bias.expand(B, C).to(x.dtype)
        for j in range(K):  # input at padded index t + j, i.e. K - 1 - j tokens back
            term = padded[:, t + j] * weight[:, j]
            if docs is not None:
                term = term * (docs[:, t + j] == doc_ids[:, t])[:, None]
            y = y + term
        ys.append(y)
    return torch.stack(ys, dim=1), padded[:, T:] if K > 1 else padded[:, :0]
