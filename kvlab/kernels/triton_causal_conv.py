"""Short causal depthwise convolution in Triton: forward and backward, one tile of tokens x channels each.

``kvlab.kernels.causal_conv.causal_conv1d``'s math on the inputs with
``prev`` in front (p = [prev; x], T + K - 1 rows; document ids likewise, the
ones in front being position 0's):
    y_t = bias + sum_j w_j * p_{t+j} * [doc(t + j) == doc(t)]
Backward, with the same masks:
    dp_s = sum_j w_j * dy_{s-j} * [doc(s) == doc(s - j)]
    dw_j = sum_t dy_t * p_{t+j} * [...],   dbias = sum_t dy_t
and dp splits into the gradients of prev and x. Each program reads its K
shifted input tiles once and writes one tile; the weight and bias gradients
are summed per program and the partials added after. K (4 for Mamba) is a
compile-time constant, so the taps unroll.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.triton_common import block, interpreting


@triton.jit
def _tap(P, DOCS, b, rows, shift, ic, n_rows, C, doc_here, HAS_DOCS: tl.constexpr):
    """Rows ``rows + shift`` of p [B, n_rows, C] (float32), zero where out of range or of another document."""
    at = rows + shift
    ok = (at >= 0) & (at < n_rows)
    tile = tl.load(P + (b * n_rows + at[:, None]) * C + ic[None, :], mask=ok[:, None] & (ic[None, :] < C),
                   other=0.0).to(tl.float32)  # fmt: skip
    if HAS_DOCS:
        same = tl.load(DOCS + b * n_rows + at, mask=ok, other=-1) == doc_here
        tile = tl.where(same[:, None], tile, 0.0)
    return tile


@triton.jit
def _forward(P, W, BIAS, DOCS, Y, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOCS: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    b = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # output t reads p rows t .. t + K - 1
    ic = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_rows = T + K - 1
    doc_here = tl.load(DOCS + b * n_rows + rows + K - 1, mask=rows < T, other=-2) if HAS_DOCS else 0
    y = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + ic, mask=ic < C, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(K):
        w = tl.load(W + ic * K + j, mask=ic < C, other=0.0).to(tl.float32)
        y += w[None, :] * _tap(P, DOCS, b, rows, j, ic, n_rows, C, doc_here, HAS_DOCS)
    tl.store(Y + (b * T + rows[:, None]) * C + ic[None, :], y.to(Y.dtype.element_ty),
             mask=(rows[:, None] < T) & (ic[None, :] < C))  # fmt: skip


@triton.jit
def _backward(P, W, DOCS, DY, DP, DW_PARTIAL, DB_PARTIAL, T, C, K: tl.constexpr, HAS_DOCS: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    b = tl.program_id(2)
    n_rows = T + K - 1
    ic = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = ic < C
    row_block = b * tl.num_programs(0) + tl.program_id(0)  # this program's slot in the partial sums
    # dp over the p rows of this block: row s gets w_j dy_{s-j} from the outputs that read it
    rows_p = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    doc_p = tl.load(DOCS + b * n_rows + rows_p, mask=rows_p < n_rows, other=-2) if HAS_DOCS else 0
    dp = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(W + ic * K + j, mask=in_c, other=0.0).to(tl.float32)
        t = rows_p - j  # the output that read row s through tap j
        ok = (t >= 0) & (t < T)
        dy = tl.load(DY + (b * T + t[:, None]) * C + ic[None, :], mask=ok[:, None] & in_c[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        if HAS_DOCS:
            same = tl.load(DOCS + b * n_rows + t + K - 1, mask=ok, other=-1) == doc_p
            dy = tl.where(same[:, None], dy, 0.0)
        dp += w[None, :] * dy
    tl.store(DP + (b * n_rows + rows_p[:, None]) * C + ic[None, :], dp.to(DP.dtype.element_ty),
             mask=(rows_p[:, None] < n_rows) & in_c[None, :])  # fmt: skip
    # dw and dbias over the outputs of this block
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dy = tl.load(DY + (b * T + rows[:, None]) * C + ic[None, :], mask=(rows[:, None] < T) & in_c[None, :],
                 other=0.0).to(tl.float32)  # fmt: skip
    doc_here = tl.load(DOCS + b * n_rows + rows + K - 1, mask=rows < T, other=-2) if HAS_DOCS else 0
    tl.store(DB_PARTIAL + row_block * C + ic, tl.sum(dy, axis=0), mask=in_c)
    for j in tl.static_range(K):
        tap = _tap(P, DOCS, b, rows, j, ic, n_rows, C, doc_here, HAS_DOCS)
        tl.store(DW_PARTIAL + (row_block * K + j) * C + ic, tl.sum(dy * tap, axis=0), mask=in_c)


def _blocks(C: int) -> tuple[int, int]:
    return (16, block(C, 32)) if interpreting() else (64, block(C, 128))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded, weight, bias, docs):
        B, n_rows, C = padded.shape
        K = weight.shape[1]
        T = n_rows - K + 1
        padded, weight = padded.contiguous(), weight.contiguous()
        y = torch.empty(B, T, C, dtype=padded.dtype, device=padded.device)
        block_t, block_c = _blocks(C)
        docs_arg = docs if docs is not None else padded.new_empty(0, dtype=torch.long)
        _forward[(triton.cdiv(T, block_t), triton.cdiv(C, block_c), B)](
            padded, weight, bias if bias is not None else weight, docs_arg, y, T, C, K=K, HAS_BIAS=bias is not None,
            HAS_DOCS=docs is not None, BLOCK_T=block_t, BLOCK_C=block_c,
        )  # fmt: skip
        ctx.save_for_backward(padded, weight, docs_arg)
        ctx.has_bias, ctx.has_docs, ctx.bias_dtype = bias is not None, docs is not None, getattr(bias, "dtype", None)
        return y

    @staticmethod
    def backward(ctx, dy):
        padded, weight, docs = ctx.saved_tensors
        B, n_rows, C = padded.shape
        K = weight.shape[1]
        T = n_rows - K + 1
        block_t, block_c = _blocks(C)
        n_t = triton.cdiv(n_rows, block_t)  # row blocks cover p's rows (the outputs' are the first T)
        dp = torch.empty_like(padded)
        dw = torch.empty(B, n_t, K, C, dtype=torch.float32, device=padded.device)
        db = torch.empty(B, n_t, C, dtype=torch.float32, device=padded.device)
        _backward[(n_t, triton.cdiv(C, block_c), B)](
            padded, weight, docs, dy.contiguous(), dp, dw, db, T, C, K=K, HAS_DOCS=ctx.has_docs, BLOCK_T=block_t,
            BLOCK_C=block_c,
        )  # fmt: skip
        d_weight = dw.sum((0, 1)).t().to(weight.dtype)  # [K, C] -> [C, K]
        d_bias = db.sum((0, 1)).to(ctx.bias_dtype) if ctx.has_bias else None
        return dp, d_weight, d_bias, None


def causal_conv1d(x, weight, bias=None, *, prev=None, doc_ids=None):
    """``kvlab.kernels.causal_conv.causal_conv1d``'s contract."""
    B, T, C = x.shape
    K = weight.shape[1]
    padded = torch.cat([x.new_zeros(B, K - 1, C) if prev is None else prev.to(x.dtype), x], dim=1)
    docs = None
    if doc_ids is not None:  # the rows in front belong to position 0's document
        docs = torch.cat([doc_ids[:, :1].expand(B, K - 1), doc_ids], dim=1).contiguous()
    y = _CausalConv1d.apply(padded, weight, bias, docs)
    return y, padded[:, T:] if K > 1 else padded[:, :0]
