"""Causal attention in Triton, FlashAttention-2 style (Dao 2023): never a [T, S] score matrix in memory.

Forward: one program per block of BLOCK_M queries of one head walks the key
blocks it can see (causal: up to its last query; window: from its first
query's window start), keeps the running max m and sum l of an online
softmax, and writes the output and the log-sum-exp per query. Grouped K/V
heads (GQA/MQA) are read in place: query head h reads K/V head h // group.
Masks are computed, not loaded: causal, window (p - window < k <= p) and
packed documents (equal ``doc_ids``), and only on the blocks that need one:
under a plain causal mask the blocks below the diagonal are wholly visible
and skip it (as do whole tiles' bound checks), the FlashAttention-2 paper's
split of masked and unmasked blocks. Exponentials are base 2 (exp2 is the
hardware instruction): scores are scaled by scale * log2 e, and the
log-sum-exp kept for the backward (LSE2) is base 2 too.

Backward (recomputing probabilities from the LSE, P = exp(S - LSE) = 2^(S log2 e - LSE2)):
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
    dK = scale dS^T Q,  dQ = scale dS K
one kernel per key block for dK/dV (walking the query blocks that see it)
and one per query block for dQ, so nothing is accumulated atomically. K/V
gradients are computed per query head and summed over each group after.

With a soft cap c (Gemma 2's), each score becomes c tanh(q.k scale / c)
before the softmax, recomputed so in the backward, where dS is carried back
through the tanh (times 1 - tanh^2) before dK and dQ.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvlab.kernels.triton_common import block, dot_precision, interpreting, length_bucket, tune_configs

_LOG2E = 1.4426950408889634
_TWO_LOG2E: tl.constexpr = tl.constexpr(2 * _LOG2E)  # (a kernel reads only constexpr globals)
_KERNEL_LOG2E: tl.constexpr = tl.constexpr(_LOG2E)


@triton.jit
def _tile(PTR, first_row, rows, n_rows, cols, n_cols, UPCAST: tl.constexpr, CHECK_ROWS: tl.constexpr,
          CHECK_COLS: tl.constexpr):  # fmt: skip
    """Rows ``first_row + rows`` of a row-major [*, n_cols] tensor, channels ``cols``; zeros outside. The
    bounds are checked only where a CHECK says a tile can cross them (unmasked loads pipeline best)."""
    ptrs = PTR + (first_row + rows[:, None]) * n_cols + cols[None, :]
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _visible(offs_m, offs_n, T, S, DOCS, b, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_DOCS: tl.constexpr):  # fmt: skip
    """Which keys each query sees. Query rows past T are padding: never stored, their loads are zeros (so
    they add nothing to any gradient), and they see key 0 unless documents hide it (MASK_ALL's guard then keeps
    their running max finite)."""
    valid = offs_n[None, :] < S
    if CAUSAL:
        valid &= offs_m[:, None] >= offs_n[None, :]
    if HAS_WINDOW:
        valid &= offs_m[:, None] - offs_n[None, :] < WINDOW
    if HAS_DOCS:
        doc_q = tl.load(DOCS + b * T + offs_m, mask=offs_m < T, other=-1)
        doc_k = tl.load(DOCS + b * T + offs_n, mask=offs_n < S, other=-2)
        valid &= doc_q[:, None] == doc_k[None, :]
    return valid


@triton.jit
def _heads(H, GROUP):
    """This program's query head row (batch * H + head), its batch, and the K/V head row it reads (GQA)."""
    bh = tl.program_id(1)
    b = bh // H
    return bh, b, b * (H // GROUP) + (bh % H) // GROUP


@triton.jit
def _scores(q, k, qk_scale, cap2, SOFTCAP: tl.constexpr, DOT: tl.constexpr):
    """A query block x key block's scores in base 2, q k^T qk_scale (qk_scale = scale log2 e); with SOFTCAP,
    cap2 tanh(q k^T qk_scale) (qk_scale = scale / c, cap2 = c log2 e). Also the tanh, whose 1 - tanh^2 the
    backward multiplies by (without a cap: the scores again, unused)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.math.exp2(s * _TWO_LOG2E) + 1.0)  # tanh x = 1 - 2 / (e^2x + 1): +-1 at the ends
        s = t * cap2
    else:
        t = s
    return s, t


@triton.jit
def _probabilities(q, k, lse2, qk_scale, cap2, offs_m, offs_n, T, S, DOCS, b, WINDOW, MASKED: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
                   DOT: tl.constexpr):  # fmt: skip
    """The backward's recomputed P = 2^(scores - LSE2) of a query block x key block (0 where not visible;
    blocks that are not MASKED are wholly visible), and the scores' tanh (``_scores``)."""
    s, t = _scores(q, k, qk_scale, cap2, SOFTCAP, DOT)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m, offs_n, T, S, DOCS, b, WINDOW, CAUSAL, HAS_WINDOW, HAS_DOCS), p, 0.0)
    return p, t


@triton.jit
def _key_range(start_m, S, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, MASK_ALL: tl.constexpr):  # fmt: skip
    """The key blocks a query block reads: [lo, mid) wholly visible to every query of the block (no mask
    computed), [mid, hi) masked: the diagonal under a causal mask, the last partial block, and every block
    when a window or documents decide (MASK_ALL)."""
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (start_m + 1) * BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m * BLOCK_M - WINDOW + 1) // BLOCK_N * BLOCK_N
    if MASK_ALL:
        mid = lo
    elif CAUSAL:  # keys up to the block's first query
        mid = tl.minimum(start_m * BLOCK_M + 1, S) // BLOCK_N * BLOCK_N
    else:
        mid = S // BLOCK_N * BLOCK_N
    return lo, mid, hi


@triton.jit
def _query_range(start_n, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, MASK_ALL: tl.constexpr):  # fmt: skip
    """The query blocks that see a key block: [lo, mid) masked (the diagonal, or all under MASK_ALL), then
    [mid, hi) wholly visible."""
    lo = 0
    hi = T
    if CAUSAL:  # queries at or after the block's first key
        lo = start_n * BLOCK_N // BLOCK_M * BLOCK_M
    if HAS_WINDOW:  # and within the window of its last key
        hi = tl.minimum(T, start_n * BLOCK_N + BLOCK_N + WINDOW - 1)
    if MASK_ALL:
        mid = hi
    elif CAUSAL:  # query blocks starting at or after the block's last key see all of it
        mid = tl.minimum(tl.cdiv(start_n * BLOCK_N + BLOCK_N - 1, BLOCK_M) * BLOCK_M, hi)
    else:
        mid = lo
    return lo, mid, hi


# Tiles (BLOCK_M queries x BLOCK_N keys), warps and pipeline stages, timed on the first call for each head
# dims, mask kind, dtype and length bucket (T_BUCKET, S_BUCKET: keys only, unused in the kernels). Each kernel
# tunes its own from the list (the forward and dQ favour tall tiles, dK/dV wide ones). Any tile pair is valid:
# the key ranges are computed from both sizes (the unequal-tile test checks that).
_TUNE_KEY = ["D", "DV", "T_BUCKET", "S_BUCKET", "CAUSAL", "HAS_WINDOW", "HAS_DOCS"]
_TILES = tune_configs(
    [({"BLOCK_M": m, "BLOCK_N": n}, warps, stages) for m, n, warps, stages in
     [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
      (128, 32, 4, 3), (64, 128, 4, 3), (32, 128, 4, 3), (64, 32, 4, 4), (32, 64, 4, 4), (32, 32, 2, 3)]],
    {"BLOCK_M": 16, "BLOCK_N": 16},
)  # fmt: skip


@triton.jit
def _key_block(K, V, kv_head, start_n, S, offs_d, offs_dv, D, DV, UPCAST: tl.constexpr, MASKED: tl.constexpr,
               CHECK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The key positions from ``start_n`` and their keys and values (rows checked only in MASKED blocks: the
    unmasked ones lie wholly below S)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _tile(K, kv_head * S, offs_n, S, offs_d, D, UPCAST, MASKED, CHECK_D)
    v = _tile(V, kv_head * S, offs_n, S, offs_dv, DV, UPCAST, MASKED, CHECK_D)
    return offs_n, k, v


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, K, V, DOCS, kv_head, b, offs_m, offs_d, offs_dv, lo, hi, qk_scale, cap2, T, S,
                    D, DV, WINDOW, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_DOCS: tl.constexpr, MASK_ALL: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    CHECK_D: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The online softmax over key blocks [lo, hi), in base 2 (``_scores``)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, k, v = _key_block(K, V, kv_head, start_n, S, offs_d, offs_dv, D, DV, UPCAST, MASKED, CHECK_D, BLOCK_N)
        s, _ = _scores(q, k, qk_scale, cap2, SOFTCAP, DOT)
        if MASKED:
            s = tl.where(
                _visible(offs_m, offs_n, T, S, DOCS, b, WINDOW, CAUSAL, HAS_WINDOW, HAS_DOCS), s, float("-inf")
            )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if MASK_ALL:  # under a window or documents a row may have seen nothing yet: keep its max finite
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_TILES, key=_TUNE_KEY)
@triton.jit
def _forward(Q, K, V, OUT, LSE2, DOCS, SINKS, qk_scale, cap2, T, S, H, GROUP, D, DV, WINDOW, T_BUCKET, S_BUCKET,
             HAS_SINKS: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
             MASK_ALL: tl.constexpr,
             SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, CHECK_D: tl.constexpr, CHECK_LEN: tl.constexpr,
             DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0)
    bh, b, kv_head = _heads(H, GROUP)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _tile(Q, bh * T, offs_m, T, offs_d, D, UPCAST, CHECK_LEN, CHECK_D)
    if HAS_SINKS:  # gpt-oss's sink logit b_h: a key seen first, its score b_h (log2 e b_h here), its value zero
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.load(SINKS + bh % H).to(tl.float32) * _KERNEL_LOG2E
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, mid, hi = _key_range(start_m, S, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, MASK_ALL)
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, K, V, DOCS, kv_head, b, offs_m, offs_d, offs_dv, lo, mid,
                                    qk_scale, cap2, T, S, D, DV, WINDOW, False, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                    MASK_ALL, SOFTCAP, UPCAST, CHECK_D, DOT, BLOCK_N)  # fmt: skip
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, K, V, DOCS, kv_head, b, offs_m, offs_d, offs_dv, mid, hi,
                                    qk_scale, cap2, T, S, D, DV, WINDOW, True, CAUSAL, HAS_WINDOW, HAS_DOCS,
                                    MASK_ALL, SOFTCAP, UPCAST, CHECK_D, DOT, BLOCK_N)  # fmt: skip
    in_rows = offs_m < T
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw nothing (padding, under documents)
    tl.store(OUT + (bh * T + offs_m[:, None]) * DV + offs_dv[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
             mask=in_rows[:, None] & (offs_dv[None, :] < DV))  # fmt: skip
    tl.store(LSE2 + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=in_rows)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE2, DELTA, DOCS, bh, b, offs_n, offs_d, offs_dv, lo, hi, qk_scale, cap2, T, S,
                 D, DV, WINDOW, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, CHECK_D: tl.constexpr,
                 CHECK_LEN: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _tile(Q, bh * T, offs_m, T, offs_d, D, UPCAST, CHECK_LEN, CHECK_D)
        do = _tile(DO, bh * T, offs_m, T, offs_dv, DV, UPCAST, CHECK_LEN, CHECK_D)
        if CHECK_LEN:
            lse2 = tl.load(LSE2 + bh * T + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse2 = tl.load(LSE2 + bh * T + offs_m)
            delta = tl.load(DELTA + bh * T + offs_m)
        p, t = _probabilities(q, k, lse2, qk_scale, cap2, offs_m, offs_n, T, S, DOCS, b, WINDOW, MASKED, CAUSAL,
                              HAS_WINDOW, HAS_DOCS, SOFTCAP, DOT)  # fmt: skip
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT)
    return dk, dv


@triton.autotune(configs=_TILES, key=_TUNE_KEY)
@triton.jit
def _backward_dkdv(Q, K, V, DO, LSE2, DELTA, DK, DV_OUT, DOCS, qk_scale, cap2, scale, T, S, H, GROUP, D, DV, WINDOW,
                   T_BUCKET, S_BUCKET, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                   MASK_ALL: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, CHECK_D: tl.constexpr,
                   CHECK_LEN: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):  # fmt: skip
    start_n = tl.program_id(0)
    bh, b, kv_head = _heads(H, GROUP)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _tile(K, kv_head * S, offs_n, S, offs_d, D, UPCAST, CHECK_LEN, CHECK_D)
    v = _tile(V, kv_head * S, offs_n, S, offs_dv, DV, UPCAST, CHECK_LEN, CHECK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # keys past S (a last partial block) are zeros and never stored: unmasked blocks may include them
    lo, mid, hi = _query_range(start_n, T, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, MASK_ALL)
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE2, DELTA, DOCS, bh, b, offs_n, offs_d, offs_dv, lo, mid, qk_scale,
                          cap2, T, S, D, DV, WINDOW, True, CAUSAL, HAS_WINDOW, HAS_DOCS, SOFTCAP, UPCAST, CHECK_D,
                          CHECK_LEN, DOT, BLOCK_M)  # fmt: skip
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE2, DELTA, DOCS, bh, b, offs_n, offs_d, offs_dv, mid, hi, qk_scale,
                          cap2, T, S, D, DV, WINDOW, False, CAUSAL, HAS_WINDOW, HAS_DOCS, SOFTCAP, UPCAST, CHECK_D,
                          CHECK_LEN, DOT, BLOCK_M)  # fmt: skip
    in_keys = offs_n < S
    tl.store(DK + (bh * S + offs_n[:, None]) * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=in_keys[:, None] & (offs_d[None, :] < D))  # fmt: skip
    tl.store(DV_OUT + (bh * S + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=in_keys[:, None] & (offs_dv[None, :] < DV))  # fmt: skip


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, K, V, DOCS, kv_head, b, offs_m, offs_d, offs_dv, lo, hi, qk_scale, cap2, T, S,
               D, DV, WINDOW, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, CHECK_D: tl.constexpr,
               DOT: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        offs_n, k, v = _key_block(K, V, kv_head, start_n, S, offs_d, offs_dv, D, DV, UPCAST, MASKED, CHECK_D, BLOCK_N)
        p, t = _probabilities(q, k, lse2, qk_scale, cap2, offs_m, offs_n, T, S, DOCS, b, WINDOW, MASKED, CAUSAL,
                              HAS_WINDOW, HAS_DOCS, SOFTCAP, DOT)  # fmt: skip
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    return dq


@triton.autotune(configs=_TILES, key=_TUNE_KEY)
@triton.jit
def _backward_dq(Q, K, V, DO, LSE2, DELTA, DQ, DOCS, qk_scale, cap2, scale, T, S, H, GROUP, D, DV, WINDOW, T_BUCKET,
                 S_BUCKET, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                 MASK_ALL: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, CHECK_D: tl.constexpr,
                 CHECK_LEN: tl.constexpr,
                 DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0)
    bh, b, kv_head = _heads(H, GROUP)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_rows = offs_m < T
    q = _tile(Q, bh * T, offs_m, T, offs_d, D, UPCAST, CHECK_LEN, CHECK_D)
    do = _tile(DO, bh * T, offs_m, T, offs_dv, DV, UPCAST, CHECK_LEN, CHECK_D)
    lse2 = tl.load(LSE2 + bh * T + offs_m, mask=in_rows, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=in_rows, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid, hi = _key_range(start_m, S, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, MASK_ALL)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, DOCS, kv_head, b, offs_m, offs_d, offs_dv, lo, mid, qk_scale, cap2,
                    T, S, D, DV, WINDOW, False, CAUSAL, HAS_WINDOW, HAS_DOCS, SOFTCAP, UPCAST, CHECK_D, DOT,
                    BLOCK_N)  # fmt: skip
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, DOCS, kv_head, b, offs_m, offs_d, offs_dv, mid, hi, qk_scale, cap2,
                    T, S, D, DV, WINDOW, True, CAUSAL, HAS_WINDOW, HAS_DOCS, SOFTCAP, UPCAST, CHECK_D, DOT,
                    BLOCK_N)  # fmt: skip
    tl.store(DQ + (bh * T + offs_m[:, None]) * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_rows[:, None] & (offs_d[None, :] < D))  # fmt: skip


_KERNELS = (_forward, _backward_dkdv, _backward_dq)


def _largest_tile() -> int:
    return max(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for kernel in _KERNELS for c in kernel.configs)


def _meta(q, k, v, window, doc_ids, causal, softcap) -> dict:
    """The constexprs the call fixes (the tiles are autotuned). CHECK_LEN: a length is not a multiple of every
    tile the kernels may pick, so row bounds are checked on every load; CHECK_D: a head dim is not a power of
    two, so channel bounds are."""
    T, S, D, DV = q.shape[2], k.shape[2], q.shape[-1], v.shape[-1]
    largest = _largest_tile()
    block_d, block_dv = block(D, 256), block(DV, 256)
    return {
        "CAUSAL": bool(causal or window is not None or doc_ids is not None),
        "HAS_WINDOW": window is not None,
        "HAS_DOCS": doc_ids is not None,
        "MASK_ALL": window is not None or doc_ids is not None,
        "SOFTCAP": softcap is not None,
        "UPCAST": interpreting(),
        "CHECK_D": block_d != D or block_dv != DV,
        "CHECK_LEN": T % largest != 0 or S % largest != 0,
        "DOT": dot_precision(q.dtype),
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
    }


class _Attention(torch.autograd.Function):
    """The kernels' forward and backward. Sink logits need nothing of the backward kernels: the log-sum-exp the
    forward stores counts the sink, so the probabilities they form are the sink's softmax's; the logits' own gradient
    is -sum over rows of p_sink * rowsum(dO * O), formed here from that log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, doc_ids, scale, softcap, sink_logits):
        B, H, T, D = q.shape
        S, DV = k.shape[2], v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        docs = doc_ids.contiguous() if doc_ids is not None else q.new_empty(0, dtype=torch.long)
        meta = _meta(q, k, v, window, doc_ids, causal, softcap)
        out = torch.empty(B, H, T, DV, dtype=q.dtype, device=q.device)
        lse2 = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # log2-sum-exp2 of the scaled scores
        sizes = (T, S, H, H // k.shape[1], D, DV, window or 0, length_bucket(T), length_bucket(S))
        # the kernels exponentiate in base 2; a cap c: scores c log2 e tanh(q.k scale / c) (``_scores``)
        qk_scale, cap2 = (scale * _LOG2E, 0.0) if softcap is None else (scale / softcap, softcap * _LOG2E)
        sinks = sink_logits.contiguous() if sink_logits is not None else q.new_empty(0)
        _forward[lambda tile: (triton.cdiv(T, tile["BLOCK_M"]), B * H)](
            q, k, v, out, lse2, docs, sinks, qk_scale, cap2, *sizes, sink_logits is not None, **meta
        )
        ctx.save_for_backward(q, k, v, out, lse2, docs, sinks)
        ctx.sizes, ctx.meta, ctx.scales = sizes, meta, (qk_scale, cap2, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse2, docs, sinks = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O) = rowsum(dP * P)
        dq = torch.empty_like(q)
        dk = torch.empty(B, H, S, D, dtype=k.dtype, device=k.device)  # per query head, summed below
        dv = torch.empty(B, H, S, v.shape[-1], dtype=v.dtype, device=v.device)
        meta = ctx.meta
        _backward_dkdv[lambda tile: (triton.cdiv(S, tile["BLOCK_N"]), B * H)](
            q, k, v, grad_out, lse2, delta, dk, dv, docs, *ctx.scales, *ctx.sizes, **meta
        )
        _backward_dq[lambda tile: (triton.cdiv(T, tile["BLOCK_M"]), B * H)](
            q, k, v, grad_out, lse2, delta, dq, docs, *ctx.scales, *ctx.sizes, **meta
        )
        if Hkv != H:
            dk = dk.view(B, Hkv, H // Hkv, S, D).sum(2)
            dv = dv.view(B, Hkv, H // Hkv, S, -1).sum(2)
        d_sinks = None
        if sinks.numel():  # p_sink = 2^(log2 e b_h - lse2) per row
            p_sink = torch.exp2(sinks.float().view(1, H, 1) * _LOG2E - lse2)
            d_sinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
        return dq, dk, dv, None, None, None, None, None, d_sinks


def attention(
    q, k, v, *, mask=None, causal=False, window=None, doc_ids=None, scale=None, softcap=None, sink_logits=None
):
    """``kvlab.kernels.attention.attention``'s contract, without ``mask`` (the registry checks)."""
    if mask is not None:
        raise ValueError("the Triton attention kernel takes causal/window/doc_ids, not a mask")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _Attention.apply(q, k, v, causal, window, doc_ids, scale, softcap, sink_logits)


def absorbed_attention(q, latent, value_dim: int, *, mask=None, scale=None):
    """MLA's absorbed attention (``kvlab.kernels.attention.absorbed_attention``) on this kernel: the
    latent is the one K/V head every query head reads, its first ``value_dim`` channels the values."""
    kv = latent.to(q.dtype)[:, None]
    return attention(q, kv, kv[..., :value_dim].contiguous(), mask=mask, scale=scale)
