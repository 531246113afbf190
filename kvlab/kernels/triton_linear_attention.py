"""Linear attention with decay in Triton, in its recurrent form (fused: the state never leaves the chip).

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t   (exclusive: o_t = q_t S_{t-1})

One program per (batch, head, block of value channels) carries its
[Dk, BLOCK_V] slice of the state through the tokens in registers; at decode
and at the moderate lengths of decoding-heavy use this is what fused
recurrent kernels (fla's ``fused_recurrent``) do. Scalar ([B, H, T]) or
per-key-channel ([B, H, T, Dk]) log decays, initial and final states,
packed documents (the state empties where one starts); inclusive reads, or
RWKV-6's exclusive ones (before the token's own write).

With a scalar decay and more tokens than a chunk, the kernels work on chunks
of CHUNK tokens instead (fla's "chunk" form), in matrix products on tensor
cores:
    o = (Q K^T * D) V + (Q * exp(b_read)) S_c,   S_{c+1} = exp(b_C) S_c + (K * exp(b_C - b))^T V
with b the cumulative log decay within the chunk, D[t, s] = exp(b_read_t - b_s)
where t sees s (every exponent <= 0), and documents as segments of the chunk
(only its first reads the carried state, only its last writes the next).
Two passes: one program per (batch, head, value block) walks the chunks and
writes the state entering each (one product a chunk, T / CHUNK sequential
steps), then one program per (chunk, batch, head, value block) computes its
outputs, all at once. Carrying the state and computing the outputs in one
sequential walk (fla's "fused chunk") leaves a GPU's cores idle below a few
hundred (batch, head, value block) programs, and ran 1.5x fla's time here
(RESULTS, "GPU kernels"). The per-chunk states cost memory: B H (T / CHUNK)
Dk Dv in the inputs' dtype, kept for the backward.

A decay per key channel (GLA, RWKV-6) has no D common to the channels:
A[t, s] = sum_k q_t k_s exp(b_read_t - b_s), and q exp(b_read), k exp(-b)
alone would overflow over a chunk. Its chunks (VECTOR_CHUNK tokens, b
summed within each in torch first) go in sub-chunks of 16 (fla's
chunk_gla): for the queries of sub-chunk i, the keys before it through one
product, q scaled by exp(b_read - r) and k by exp(r - b) with r the b of the
token before the sub-chunk (every exponent <= 0); the sub-chunk's own keys
one at a time, elementwise; the state passes as for a scalar decay with the
factors per channel. Its backward the same way round (dV from the later
queries against b at the sub-chunk's last token; dQ and dK per sub-chunk
from dA's rows and columns), and the decay's gradient from q * dq - k * dk
per channel.

The recurrent backward: a forward pass recomputes the state each token read for
dq_t = do_t S_read^T (per value block, summed after); a reverse pass carries
G_t = dL/dS_t,
    G_t = q_t^T do_t + diag(exp g_{t+1}) G_{t+1}   (G_T starts at dL/dS_final)
    dk_t = G_t v_t^T,  dv_t = k_t G_t,  dL/dS_0 = diag(exp g_1) G_1;
an exclusive read adds q_t^T do_t to G_{t-1} instead. The decay's gradient
needs no pass of its own: with b the cumulative log decay, o and the final
state depend on b_t through q_t exp(b_t) (exclusive: q_{t+1} exp(b_t)),
k_t exp(-b_t) and exp(b_T) S_final's factor, so
    dL/db_t = q_t * dq_t - k_t * dk_t  (+ sum_j S_T dS_T at t = T)
(exclusive: q_{t+1} * dq_{t+1}, which is 0 where t+1 starts a document,
read from an empty state), and dL/dg_t is its reverse cumulative sum within
t's document (summed over channels for a scalar decay). The chunked
backward has the same two passes: G_c, the gradient of the state leaving
chunk c, from the last chunk back, G_{c-1} = exp(b_C) G_c + (Q * exp(b_read))^T dO;
then every chunk at once, with dA = dO V^T * D,
    dQ = dA K + (dO S_c^T) * exp(b_read),  dK = dA^T Q + (V G_c^T) * exp(b_C - b),
    dV = (Q K^T * D)^T dO + (K * exp(b_C - b)) G_c,
and the sums q_t . dq_t and k_t . dk_t per token for the decay's gradient,
which is skipped when the decay is a constant (RetNet's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.attention import document_starts
from kvlab.kernels.triton_common import (
    block,
    dot_precision,
    interpreting,
    length_bucket,
    load_state,
    state_slice,
    tune_configs,
)


@triton.jit
def _step(state, K, V, G, STARTS, bh, H, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR: tl.constexpr,
          HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr):  # fmt: skip
    """(S_t, the state token t reads) from S_{t-1}: empty where a document starts, decay (per key channel or
    scalar), add k_t^T v_t; an exclusive read sees the state before the decay and the write."""
    if HAS_DOCS:
        state = state * (1.0 - tl.load(STARTS + (bh // H) * T + t).to(tl.float32))
    read = state
    state = _decay_and_write(state, K, V, G, bh, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR)
    if not EXCLUSIVE:
        read = state
    return state, read


@triton.jit
def _decay_and_write(state, K, V, G, bh, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR: tl.constexpr):
    k = tl.load(K + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32)
    v = tl.load(V + (bh * T + t) * DV + iv, mask=in_v, other=0.0).to(tl.float32)
    if VECTOR:
        decay = tl.exp(tl.load(G + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32))
        return state * decay[:, None] + k[:, None] * v[None, :]
    return state * tl.exp(tl.load(G + bh * T + t).to(tl.float32)) + k[:, None] * v[None, :]


@triton.jit
def _forward(Q, K, V, G, S0, STARTS, OUT, S_FINAL, T, H, DK, DV, HAS_STATE: tl.constexpr, VECTOR: tl.constexpr,
             HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_V: tl.constexpr):  # fmt: skip
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    in_s = in_k[:, None] & in_v[None, :]
    state = load_state(S0, bh, DK, DV, ik, iv, in_k, in_v, HAS_STATE, BLOCK_K, BLOCK_V)
    for t in range(T):
        state, read = _step(state, K, V, G, STARTS, bh, H, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR, HAS_DOCS,
                            EXCLUSIVE)  # fmt: skip
        q = tl.load(Q + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32)
        tl.store(OUT + (bh * T + t) * DV + iv, tl.sum(q[:, None] * read, axis=0).to(OUT.dtype.element_ty), mask=in_v)
    tl.store(S_FINAL + (bh * DK + ik[:, None]) * DV + iv[None, :], state, mask=in_s)


@triton.jit
def _backward_dq(K, V, G, S0, STARTS, DO, DQ_PARTIAL, T, H, DK, DV, BH, HAS_STATE: tl.constexpr,
                 VECTOR: tl.constexpr, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    state = load_state(S0, bh, DK, DV, ik, iv, in_k, in_v, HAS_STATE, BLOCK_K, BLOCK_V)
    partial = DQ_PARTIAL + tl.program_id(0) * BH * T * DK
    for t in range(T):
        state, read = _step(state, K, V, G, STARTS, bh, H, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR, HAS_DOCS,
                            EXCLUSIVE)  # fmt: skip
        do = tl.load(DO + (bh * T + t) * DV + iv, mask=in_v, other=0.0).to(tl.float32)
        tl.store(partial + (bh * T + t) * DK + ik, tl.sum(read * do[None, :], axis=1), mask=in_k)


@triton.jit
def _backward_reverse(Q, K, V, G, STARTS, DO, DS_FINAL, DK_PARTIAL, DV_OUT, DS0, T, H, DK, DV, BH,
                      HAS_DFINAL: tl.constexpr, VECTOR: tl.constexpr, HAS_DOCS: tl.constexpr,
                      EXCLUSIVE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    in_s = in_k[:, None] & in_v[None, :]
    grad = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)  # G_{t+1}, decayed as it is carried back
    if HAS_DFINAL:
        grad += tl.load(DS_FINAL + (bh * DK + ik[:, None]) * DV + iv[None, :], mask=in_s, other=0.0).to(tl.float32)
    partial = DK_PARTIAL + tl.program_id(0) * BH * T * DK
    for step in range(T):
        t = T - 1 - step
        q = tl.load(Q + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32)
        k = tl.load(K + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32)
        v = tl.load(V + (bh * T + t) * DV + iv, mask=in_v, other=0.0).to(tl.float32)
        do = tl.load(DO + (bh * T + t) * DV + iv, mask=in_v, other=0.0).to(tl.float32)
        if not EXCLUSIVE:
            grad += q[:, None] * do[None, :]  # G_t: token t read S_t
        tl.store(partial + (bh * T + t) * DK + ik, tl.sum(grad * v[None, :], axis=1), mask=in_k)
        tl.store(DV_OUT + (bh * T + t) * DV + iv, tl.sum(k[:, None] * grad, axis=0).to(DV_OUT.dtype.element_ty),
                 mask=in_v)  # fmt: skip
        if VECTOR:
            grad = grad * tl.exp(tl.load(G + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32))[:, None]
        else:
            grad = grad * tl.exp(tl.load(G + bh * T + t).to(tl.float32))
        if EXCLUSIVE:
            grad += q[:, None] * do[None, :]  # token t read S_{t-1}
        if HAS_DOCS:  # a document's first token read an empty state: nothing flows to the one before
            grad = grad * (1.0 - tl.load(STARTS + (bh // H) * T + t).to(tl.float32))
    tl.store(DS0 + (bh * DK + ik[:, None]) * DV + iv[None, :], grad, mask=in_s)


@triton.jit
def _rows(PTR, bh, T, rows, cols, n_cols, UPCAST: tl.constexpr):
    """Rows ``rows`` of a [B*H, T, n_cols] tensor's slice ``bh``, channels ``cols`` (zeros outside), in its
    own dtype for tensor-core dots, or float32 under UPCAST (the interpreter)."""
    tile = tl.load(PTR + (bh * T + rows[:, None]) * n_cols + cols[None, :],
                   mask=(rows[:, None] < T) & (cols[None, :] < n_cols), other=0.0)  # fmt: skip
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _chunk_decays(G, STARTS, bh, H, T, start, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr,
                  CHUNK: tl.constexpr):  # fmt: skip
    """The chunk at ``start``: D [C, C] (exp(b_read_t - b_s) where t sees s, else 0); each token's factor on
    the carried state it reads, exp(b_read_t) (0 once a document starts in the chunk); each token's factor
    into the state passed on, exp(b_C - b_s) (0 outside the chunk's last document); the carried state's
    decay over the chunk, exp(b_C) (0 if a document starts in it). Padding past T: g = 0, never read.
    (A kernel that uses only some of these leaves the rest to the compiler's dead-code elimination.)"""
    offs = start + tl.arange(0, CHUNK)
    g = tl.load(G + bh * T + offs, mask=offs < T, other=0.0).to(tl.float32)
    b = tl.cumsum(g, axis=0)
    b_chunk = tl.sum(g, axis=0)
    b_read = b
    if EXCLUSIVE:
        b_read = b - g
    i = tl.arange(0, CHUNK)
    visible = i[:, None] >= i[None, :]
    if EXCLUSIVE:
        visible = i[:, None] > i[None, :]
    read = tl.exp(b_read)
    write = tl.exp(b_chunk - b)
    carry = tl.exp(b_chunk)
    if HAS_DOCS:
        segment = tl.cumsum(tl.load(STARTS + (bh // H) * T + offs, mask=offs < T, other=0).to(tl.int32), axis=0)
        last = tl.max(segment, axis=0)
        visible = visible & (segment[:, None] == segment[None, :])
        read = tl.where(segment == 0, read, 0.0)
        write = tl.where(segment == last, write, 0.0)
        carry = tl.where(last > 0, 0.0, carry)
    decay = tl.where(visible, tl.exp(tl.where(visible, b_read[:, None] - b[None, :], 0.0)), 0.0)
    return decay, read, write, carry


@triton.jit
def _chunk_slice(PTR, bh, chunk, n_chunks, DK, DV, ik, iv, in_k, in_v, UPCAST: tl.constexpr):
    """Chunk ``chunk``'s [BLOCK_K, BLOCK_V] slice of a per-chunk state buffer [B*H, n_chunks, DK, DV]."""
    tile = tl.load(PTR + ((bh * n_chunks + chunk) * DK + ik[:, None]) * DV + iv[None, :],
                   mask=in_k[:, None] & in_v[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _chunk_states(A, X, G, STARTS, CUM, READ_CUM, SEG, S_IN, STATES, S_OUT, T, T_PAD, H, DK, DV, T_BUCKET,
                  HAS_IN: tl.constexpr, REVERSE: tl.constexpr, VECTOR: tl.constexpr, HAS_DOCS: tl.constexpr,
                  EXCLUSIVE: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """The one sequential pass, writing a state per chunk (grid: value blocks, B*H). Forward (A = K, X = V,
    S_IN the initial state): STATES[bh, c] = S_c, the state entering chunk c, S_{c+1} = exp(b_C) S_c +
    (K * exp(b_C - b))^T V, and S_OUT the final state. REVERSE (A = Q, X = dO, S_IN dL/dS_final), from the
    last chunk: STATES[bh, c] = G_c, the gradient of the state leaving chunk c, G_{c-1} = exp(b_C) G_c +
    (Q * exp(b_read))^T dO, and S_OUT dL/dS_0. A VECTOR decay's factors are per key channel (from CUM,
    READ_CUM and SEG, _vector_rows), a scalar one's per token (from G and STARTS)."""
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    in_s = in_k[:, None] & in_v[None, :]
    state = load_state(S_IN, bh, DK, DV, ik, iv, in_k, in_v, HAS_IN, BLOCK_K, BLOCK_V)
    n_chunks = tl.cdiv(T, CHUNK)
    for step in range(n_chunks):
        chunk = n_chunks - 1 - step if REVERSE else step
        tl.store(STATES + ((bh * n_chunks + chunk) * DK + ik[:, None]) * DV + iv[None, :],
                 state.to(STATES.dtype.element_ty), mask=in_s)  # fmt: skip
        rows = chunk * CHUNK + tl.arange(0, CHUNK)
        a, x = _rows(A, bh, T, rows, ik, DK, UPCAST), _rows(X, bh, T, rows, iv, DV, UPCAST)
        if VECTOR:
            b, b_read, seg = _vector_rows(CUM, READ_CUM, SEG, bh, H, T_PAD, DK, rows, ik, HAS_DOCS)
            read, write, carry = _vector_factors(CUM, SEG, bh, H, T_PAD, DK, b, b_read, seg, chunk * CHUNK + CHUNK - 1,
                                                 ik, HAS_DOCS)  # fmt: skip
            weighted = a * (read if REVERSE else write)
            state = state * carry[:, None]
        else:
            _, read, write, carry = _chunk_decays(G, STARTS, bh, H, T, chunk * CHUNK, HAS_DOCS, EXCLUSIVE, CHUNK)
            weighted = a * (read if REVERSE else write)[:, None]
            state = state * carry
        state += tl.dot(tl.trans(weighted.to(a.dtype)), x, input_precision=DOT)
    tl.store(S_OUT + (bh * DK + ik[:, None]) * DV + iv[None, :], state, mask=in_s)


@triton.jit
def _vector_rows(CUM, READ_CUM, SEG, bh, H, T_PAD, DK, rows, ik, HAS_DOCS: tl.constexpr):
    """For tokens ``rows`` of a chunk, per key channel: b, the cumulative log decay within the chunk (float32,
    padded past T with zero log decays), b_read (b before the token's own decay for exclusive reads, else b),
    and each token's document segment within the chunk (0 without documents)."""
    offs = (bh * T_PAD + rows[:, None]) * DK + ik[None, :]
    in_k = (ik < DK)[None, :]
    b = tl.load(CUM + offs, mask=in_k, other=0.0)
    b_read = tl.load(READ_CUM + offs, mask=in_k, other=0.0)
    seg = tl.zeros_like(rows)
    if HAS_DOCS:
        seg = tl.load(SEG + (bh // H) * T_PAD + rows)
    return b, b_read, seg


@triton.jit
def _vector_row(CUM, bh, T_PAD, DK, t, ik):
    """Token t's cumulative log decay within its chunk, per key channel."""
    return tl.load(CUM + (bh * T_PAD + t) * DK + ik, mask=ik < DK, other=0.0)


@triton.jit
def _vector_factors(CUM, SEG, bh, H, T_PAD, DK, b, b_read, seg, last, ik, HAS_DOCS: tl.constexpr):
    """_chunk_decays's factors per key channel, for tokens of the chunk whose last token is ``last`` (their b,
    b_read and segments from _vector_rows): on the carried state each reads, exp(b_read) (0 once a document
    starts in the chunk); into the state passed on, exp(b_C - b) (0 outside the chunk's last document); the
    carried state's decay over the chunk, exp(b_C) (0 if a document starts in it). Every exponent is <= 0."""
    b_chunk = _vector_row(CUM, bh, T_PAD, DK, last, ik)
    read, write, carry = tl.exp(b_read), tl.exp(b_chunk[None, :] - b), tl.exp(b_chunk)
    if HAS_DOCS:
        last_seg = tl.load(SEG + (bh // H) * T_PAD + last)
        read = tl.where(seg[:, None] == 0, read, 0.0)
        write = tl.where(seg[:, None] == last_seg, write, 0.0)
        carry = tl.where(last_seg > 0, 0.0, carry)
    return read, write, carry


@triton.jit
def _token(PTR, bh, T, t, cols, n_cols):
    """Token t's row (channels ``cols``) of a [B*H, T, n_cols] tensor in float32; zeros past T."""
    in_t = tl.full(cols.shape, t, tl.int32) < T
    return tl.load(PTR + (bh * T + t) * n_cols + cols, mask=(cols < n_cols) & in_t, other=0.0).to(tl.float32)


@triton.jit
def _across_sub_chunks(mine, OTHER, X, bh, T, DK, DV, cols, ik, iv, other, exponent, seg, other_seg,
                       HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    """A sub-chunk's rows ``mine`` (already scaled against the reference) against the chunk's tokens ``other``
    of OTHER (queries or keys), scaled by exp(``exponent``), through one product: (mine theirs^T) X."""
    theirs = _rows(OTHER, bh, T, cols, ik, DK, UPCAST)
    theirs = tl.where(other[:, None], theirs * tl.exp(tl.where(other[:, None], exponent, 0.0)), 0.0).to(mine.dtype)
    scores = tl.dot(mine, tl.trans(theirs), input_precision=DOT)
    if HAS_DOCS:
        scores = tl.where(seg[:, None] == other_seg[None, :], scores, 0.0)
    x = _rows(X, bh, T, cols, iv, DV, UPCAST)
    return tl.dot(scores.to(x.dtype), x, input_precision=DOT)


@triton.jit
def _vector_chunk_outputs(Q, K, X, CUM, READ_CUM, SEG, STATES, OUT, T, T_PAD, H, DK, DV, T_BUCKET,
                          VALUE_GRAD: tl.constexpr, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr,
                          CHUNK: tl.constexpr, SUB: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """_chunk_outputs for a decay per key channel (grid: value blocks, chunks, B*H): A[t, s] = sum_k q_t k_s
    exp(b_read_t - b_s) has no [C, C] factor common to every channel, and q exp(b_read) and k exp(-b) alone
    would overflow, so the chunk goes in sub-chunks of SUB tokens (fla's chunk_gla). Forward, for the queries
    of sub-chunk i: the keys before it through one product, both sides scaled against b at the token before
    the sub-chunk (every exponent <= 0); the sub-chunk's own keys one at a time, elementwise; the carried state
    through (Q * exp(b_read)) S_c. VALUE_GRAD (X = dO, STATES the gradients of the states leaving each chunk):
    dV for the keys of sub-chunk j, the later queries scaled against b at its last token."""
    chunk, bh = tl.program_id(1), tl.program_id(2)
    ik = tl.arange(0, BLOCK_K)
    iv = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_k, in_v = ik < DK, iv < DV
    start = chunk * CHUNK
    cols = start + tl.arange(0, CHUNK)
    jr = tl.arange(0, SUB)
    state = _chunk_slice(STATES, bh, chunk, tl.num_programs(1), DK, DV, ik, iv, in_k, in_v, UPCAST)
    for i in tl.static_range(CHUNK // SUB):
        rows = start + i * SUB + jr
        b, b_read, seg = _vector_rows(CUM, READ_CUM, SEG, bh, H, T_PAD, DK, rows, ik, HAS_DOCS)
        read, write, _ = _vector_factors(CUM, SEG, bh, H, T_PAD, DK, b, b_read, seg, start + CHUNK - 1, ik, HAS_DOCS)
        if VALUE_GRAD:  # rows: keys; the queries that read them: after the sub-chunk, then within it
            mine = _rows(K, bh, T, rows, ik, DK, UPCAST)
            out = tl.dot((mine * write).to(state.dtype), state, input_precision=DOT)
            if i < CHUNK // SUB - 1:
                ref = _vector_row(CUM, bh, T_PAD, DK, start + i * SUB + SUB - 1, ik)
                later = tl.arange(0, CHUNK) >= (i + 1) * SUB
                _, their_cum, their_seg = _vector_rows(CUM, READ_CUM, SEG, bh, H, T_PAD, DK, cols, ik, HAS_DOCS)
                out += _across_sub_chunks((mine * tl.exp(ref[None, :] - b)).to(mine.dtype), Q, X, bh, T, DK, DV,
                                          cols, ik, iv, later, their_cum - ref[None, :], seg, their_seg, HAS_DOCS,
                                          UPCAST, DOT)  # fmt: skip
        else:  # rows: queries; the keys they read: before the sub-chunk, then within it
            mine = _rows(Q, bh, T, rows, ik, DK, UPCAST)
            out = tl.dot((mine * read).to(state.dtype), state, input_precision=DOT)
            if i > 0:
                ref = _vector_row(CUM, bh, T_PAD, DK, start + i * SUB - 1, ik)
                earlier = tl.arange(0, CHUNK) < i * SUB
                their_cum, _, their_seg = _vector_rows(CUM, READ_CUM, SEG, bh, H, T_PAD, DK, cols, ik, HAS_DOCS)
                out += _across_sub_chunks((mine * tl.exp(b_read - ref[None, :])).to(mine.dtype), K, X, bh, T, DK, DV,
                                          cols, ik, iv, earlier, ref[None, :] - their_cum, seg, their_seg, HAS_DOCS,
                                          UPCAST, DOT)  # fmt: skip
        mine = mine.to(tl.float32)
        for j in range(SUB):  # the diagonal block, one token of the other side at a time
            t = start + i * SUB + j
            seen = jr >= j
            if VALUE_GRAD:  # token t's query reads keys jr <= j (< j exclusive)
                seen = jr <= j
            if EXCLUSIVE:
                seen = seen & (jr != j)
            if HAS_DOCS:
                seen = seen & (seg == tl.load(SEG + (bh // H) * T_PAD + t))
            x_t = _token(X, bh, T, t, iv, DV)
            if VALUE_GRAD:
                exponent = _vector_row(READ_CUM, bh, T_PAD, DK, t, ik)[None, :] - b
                other_t = _token(Q, bh, T, t, ik, DK)
            else:
                exponent = b_read - _vector_row(CUM, bh, T_PAD, DK, t, ik)[None, :]
                other_t = _token(K, bh, T, t, ik, DK)
            weight = tl.sum(mine * other_t[None, :] * tl.exp(tl.where(seen[:, None], exponent, 0.0)), axis=1)
            out += tl.where(seen, weight, 0.0)[:, None] * x_t[None, :]
        tl.store(OUT + (bh * T + rows[:, None]) * DV + iv[None, :], out.to(OUT.dtype.element_ty),
                 mask=(rows[:, None] < T) & in_v[None, :])  # fmt: skip


@triton.jit
def _chunk_outputs(Q, K, G, STARTS, X, STATES, OUT, T, H, DK, DV, T_BUCKET, HAS_DOCS: tl.constexpr,
                   EXCLUSIVE: tl.constexpr, VALUE_GRAD: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                   DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Every chunk at once (grid: value blocks, chunks, B*H), with A = Q K^T * D: the forward's outputs
    O = A V + (Q * exp(b_read)) S_c (X = V, STATES the states entering each chunk), or under VALUE_GRAD the
    backward's dV = A^T dO + (K * exp(b_C - b)) G_c (X = dO, STATES the gradients of those leaving each)."""
    chunk, bh = tl.program_id(1), tl.program_id(2)
    ik = tl.arange(0, BLOCK_K)
    iv = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    q, k = _rows(Q, bh, T, rows, ik, DK, UPCAST), _rows(K, bh, T, rows, ik, DK, UPCAST)
    x = _rows(X, bh, T, rows, iv, DV, UPCAST)
    state = _chunk_slice(STATES, bh, chunk, tl.num_programs(1), DK, DV, ik, iv, ik < DK, iv < DV, UPCAST)
    decay, read, write, _ = _chunk_decays(G, STARTS, bh, H, T, chunk * CHUNK, HAS_DOCS, EXCLUSIVE, CHUNK)
    scores = (tl.dot(q, tl.trans(k), input_precision=DOT) * decay).to(x.dtype)
    if VALUE_GRAD:
        out = tl.dot(tl.trans(scores), x, input_precision=DOT)
        out += tl.dot((k * write[:, None]).to(state.dtype), state, input_precision=DOT)
    else:
        out = tl.dot(scores, x, input_precision=DOT)
        out += tl.dot((q * read[:, None]).to(state.dtype), state, input_precision=DOT)
    tl.store(OUT + (bh * T + rows[:, None]) * DV + iv[None, :], out.to(OUT.dtype.element_ty),
             mask=(rows[:, None] < T) & (iv[None, :] < DV))  # fmt: skip


@triton.jit
def _chunk_query_key_grads(Q, K, V, G, STARTS, DO, STATES, DSTATES, DQ, DK_OUT, READ_GRAD, WRITE_GRAD, T, H, DK,
                           DV, T_BUCKET, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr, CHUNK: tl.constexpr,
                           UPCAST: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_V: tl.constexpr):  # fmt: skip
    """Every chunk at once (grid: chunks, B*H), summing over the value blocks first (only the sums stay live
    through that loop), then dA = dO V^T * D,
        dQ = dA K + (dO S_c^T) * exp(b_read),  dK = dA^T Q + (V G_c^T) * exp(b_C - b),
    and per token q.dq and k.dk, what the decay's gradient is made of (see the module's docstring)."""
    chunk, bh = tl.program_id(0), tl.program_id(1)
    n_chunks = tl.num_programs(0)
    ik = tl.arange(0, BLOCK_K)
    in_k = ik < DK
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    d_scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    dq = tl.zeros([CHUNK, BLOCK_K], dtype=tl.float32)
    dk = tl.zeros([CHUNK, BLOCK_K], dtype=tl.float32)
    for v_start in range(0, DV, BLOCK_V):
        iv = v_start + tl.arange(0, BLOCK_V)
        in_v = iv < DV
        v, do = _rows(V, bh, T, rows, iv, DV, UPCAST), _rows(DO, bh, T, rows, iv, DV, UPCAST)
        state = _chunk_slice(STATES, bh, chunk, n_chunks, DK, DV, ik, iv, in_k, in_v, UPCAST)
        d_state = _chunk_slice(DSTATES, bh, chunk, n_chunks, DK, DV, ik, iv, in_k, in_v, UPCAST)
        d_scores += tl.dot(do, tl.trans(v), input_precision=DOT)
        dq += tl.dot(do.to(state.dtype), tl.trans(state), input_precision=DOT)
        dk += tl.dot(v.to(d_state.dtype), tl.trans(d_state), input_precision=DOT)
    q, k = _rows(Q, bh, T, rows, ik, DK, UPCAST), _rows(K, bh, T, rows, ik, DK, UPCAST)
    decay, read, write, _ = _chunk_decays(G, STARTS, bh, H, T, chunk * CHUNK, HAS_DOCS, EXCLUSIVE, CHUNK)
    d_scores = (d_scores * decay).to(q.dtype)
    dq = tl.dot(d_scores, k, input_precision=DOT) + dq * read[:, None]
    dk = tl.dot(tl.trans(d_scores), q, input_precision=DOT) + dk * write[:, None]
    in_rows = rows < T
    tl.store(DQ + (bh * T + rows[:, None]) * DK + ik[None, :], dq.to(DQ.dtype.element_ty),
             mask=in_rows[:, None] & in_k[None, :])  # fmt: skip
    tl.store(DK_OUT + (bh * T + rows[:, None]) * DK + ik[None, :], dk.to(DK_OUT.dtype.element_ty),
             mask=in_rows[:, None] & in_k[None, :])  # fmt: skip
    tl.store(READ_GRAD + bh * T + rows, tl.sum(q.to(tl.float32) * dq, axis=1), mask=in_rows)
    tl.store(WRITE_GRAD + bh * T + rows, tl.sum(k.to(tl.float32) * dk, axis=1), mask=in_rows)


@triton.jit
def _vector_chunk_query_key_grads(Q, K, V, CUM, READ_CUM, SEG, DO, STATES, DSTATES, DQ, DK_OUT, READ_GRAD, WRITE_GRAD,
                                  T, T_PAD, H, DK, DV, T_BUCKET, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr,
                                  CHUNK: tl.constexpr, SUB: tl.constexpr, UPCAST: tl.constexpr, DOT: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """_chunk_query_key_grads for a decay per key channel (grid: sub-chunks, chunks, B*H): for the tokens of
    sub-chunk p, summed over the value blocks first, dA's rows dO_p V^T and columns V_p dO^T over the chunk,
    dO_p S_c^T and V_p G_c^T; then, as _vector_chunk_outputs scales them,
        dq_t = sum_(s seen) dA[t, s] k_s exp(b_read_t - b_s) + (dO S_c^T)_t exp(b_read_t),
        dk_s = sum_(t seeing s) dA[t, s] q_t exp(b_read_t - b_s) + (V G_c^T)_s exp(b_C - b_s),
    earlier keys and later queries through one product each, the sub-chunk's own one token at a time, and
    q * dq, k * dk per channel for the decay's gradient."""
    p, chunk, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_chunks = tl.num_programs(1)
    ik = tl.arange(0, BLOCK_K)
    in_k = ik < DK
    start = chunk * CHUNK
    cols = start + tl.arange(0, CHUNK)
    jr = tl.arange(0, SUB)
    rows = start + p * SUB + jr
    d_scores = tl.zeros([SUB, CHUNK], dtype=tl.float32)  # dA[rows, cols]
    d_scores_t = tl.zeros([SUB, CHUNK], dtype=tl.float32)  # dA[cols, rows]^T
    dq = tl.zeros([SUB, BLOCK_K], dtype=tl.float32)
    dk = tl.zeros([SUB, BLOCK_K], dtype=tl.float32)
    for v_start in range(0, DV, BLOCK_V):
        iv = v_start + tl.arange(0, BLOCK_V)
        in_v = iv < DV
        v, do = _rows(V, bh, T, rows, iv, DV, UPCAST), _rows(DO, bh, T, rows, iv, DV, UPCAST)
        v_all, do_all = _rows(V, bh, T, cols, iv, DV, UPCAST), _rows(DO, bh, T, cols, iv, DV, UPCAST)
        state = _chunk_slice(STATES, bh, chunk, n_chunks, DK, DV, ik, iv, in_k, in_v, UPCAST)
        d_state = _chunk_slice(DSTATES, bh, chunk, n_chunks, DK, DV, ik, iv, in_k, in_v, UPCAST)
        d_scores += tl.dot(do, tl.trans(v_all), input_precision=DOT)
        d_scores_t += tl.dot(v, tl.trans(do_all), input_precision=DOT)
        dq += tl.dot(do.to(state.dtype), tl.trans(state), input_precision=DOT)
        dk += tl.dot(v.to(d_state.dtype), tl.trans(d_state), input_precision=DOT)
    b, b_read, seg = _vector_rows(CUM, READ_CUM, SEG, bh, H, T_PAD, DK, rows, ik, HAS_DOCS)
    read, write, _ = _vector_factors(CUM, SEG, bh, H, T_PAD, DK, b, b_read, seg, start + CHUNK - 1, ik, HAS_DOCS)
    dq, dk = dq * read, dk * write
    b_all, b_read_all, seg_all = _vector_rows(CUM, READ_CUM, SEG, bh, H, T_PAD, DK, cols, ik, HAS_DOCS)
    if HAS_DOCS:
        same = seg[:, None] == seg_all[None, :]
        d_scores, d_scores_t = tl.where(same, d_scores, 0.0), tl.where(same, d_scores_t, 0.0)
    q, k = _rows(Q, bh, T, rows, ik, DK, UPCAST), _rows(K, bh, T, rows, ik, DK, UPCAST)
    # keys before the sub-chunk, against b at the token before it (none for the first: exponents kept at 0)
    earlier = tl.arange(0, CHUNK) < p * SUB
    ref = _vector_row(CUM, bh, T_PAD, DK, start + tl.maximum(p * SUB - 1, 0), ik)
    keys = _rows(K, bh, T, cols, ik, DK, UPCAST)  # products in the inputs' dtype (tensor cores), as the forward's
    keys = tl.where(earlier[:, None], keys * tl.exp(tl.where(earlier[:, None], ref[None, :] - b_all, 0.0)), 0.0)
    d_earlier = tl.where(earlier[None, :], d_scores, 0.0).to(q.dtype)
    dq += tl.dot(d_earlier, keys.to(q.dtype), input_precision=DOT) * tl.exp(tl.where(p > 0, b_read - ref[None, :], 0.0))
    # queries after the sub-chunk, against b at its last token
    later = tl.arange(0, CHUNK) >= p * SUB + SUB
    ref = _vector_row(CUM, bh, T_PAD, DK, start + p * SUB + SUB - 1, ik)
    queries = _rows(Q, bh, T, cols, ik, DK, UPCAST)
    queries = tl.where(later[:, None], queries * tl.exp(tl.where(later[:, None], b_read_all - ref[None, :], 0.0)), 0.0)
    d_later = tl.where(later[None, :], d_scores_t, 0.0).to(q.dtype)
    dk += tl.dot(d_later, queries.to(q.dtype), input_precision=DOT) * tl.exp(ref[None, :] - b)
    # the sub-chunk's own tokens, one at a time: as key for dq, as query for dk
    q32, k32 = q.to(tl.float32), k.to(tl.float32)
    index = tl.arange(0, CHUNK)
    for j in range(SUB):
        t = start + p * SUB + j
        seen_as_key = jr >= j  # query jr reads key j
        seen_as_query = jr <= j  # key jr is read by query j
        if EXCLUSIVE:
            seen_as_key, seen_as_query = seen_as_key & (jr != j), seen_as_query & (jr != j)
        if HAS_DOCS:
            same_doc = seg == tl.load(SEG + (bh // H) * T_PAD + t)
            seen_as_key, seen_as_query = seen_as_key & same_doc, seen_as_query & same_doc
        at = index == p * SUB + j
        d_key = tl.sum(tl.where(at[None, :], d_scores, 0.0), axis=1)  # dA[rows, t]
        d_query = tl.sum(tl.where(at[None, :], d_scores_t, 0.0), axis=1)  # dA[t, rows]
        k_t, q_t = _token(K, bh, T, t, ik, DK), _token(Q, bh, T, t, ik, DK)
        to_key = tl.exp(tl.where(seen_as_key[:, None], b_read - _vector_row(CUM, bh, T_PAD, DK, t, ik)[None, :], 0.0))
        to_query = tl.exp(
            tl.where(seen_as_query[:, None], _vector_row(READ_CUM, bh, T_PAD, DK, t, ik)[None, :] - b, 0.0)
        )
        dq += tl.where(seen_as_key, d_key, 0.0)[:, None] * k_t[None, :] * to_key
        dk += tl.where(seen_as_query, d_query, 0.0)[:, None] * q_t[None, :] * to_query
    in_rows = (rows < T)[:, None] & in_k[None, :]
    offs = (bh * T + rows[:, None]) * DK + ik[None, :]
    tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=in_rows)
    tl.store(DK_OUT + offs, dk.to(DK_OUT.dtype.element_ty), mask=in_rows)
    tl.store(READ_GRAD + offs, q32 * dq, mask=in_rows)
    tl.store(WRITE_GRAD + offs, k32 * dk, mask=in_rows)


CHUNK = 16 if interpreting() else 64
# A decay per key channel: chunks of VECTOR_CHUNK tokens in sub-chunks of SUB_CHUNK (two of them interpreted,
# so that the tests cross a sub-chunk boundary).
VECTOR_CHUNK, SUB_CHUNK = (32 if interpreting() else 64), 16

# Value blocks, warps and stages of the chunked passes, timed on a GPU's first call per (key dim, value dim,
# length bucket). The sequential passes run one program per (value block, batch*head), so narrow blocks buy
# them parallelism at small batches; the parallel passes favour wide ones. The first of each list is what runs
# untuned (KVLAB_TRITON_AUTOTUNE=0): 8 warps for the parallel passes, where 4 spill registers in the dQ/dK
# kernel (ptxas on sm_90, bf16, head dims 64).
_TUNE_KEY = ["DK", "DV", "T_BUCKET"]
_SEQUENTIAL = tune_configs([({"BLOCK_V": bv}, w, 1) for bv in (32, 16, 64) for w in (4, 2)], {"BLOCK_V": 16})
_PARALLEL = tune_configs(
    [({"BLOCK_V": bv}, w, st) for bv in (64, 32) for w in (8, 4) for st in (2, 1)], {"BLOCK_V": 16}
)
# A vector decay's parallel passes hold more per program (the dQ/dK pass dA's rows and columns for its sub-chunk
# besides dQ and dK): at value blocks of 64 both spilled registers (sm_90, bf16, head dims 64), at 32 neither.
_VECTOR_PARALLEL = tune_configs(
    [({"BLOCK_V": bv}, w, st) for bv in (32, 64) for w in (8, 4) for st in (2, 1)], {"BLOCK_V": 16}
)
_tuned = {
    name: triton.autotune(configs, key=_TUNE_KEY)(kernel)
    for name, kernel, configs in (
        ("states", _chunk_states, _SEQUENTIAL),
        ("outputs", _chunk_outputs, _PARALLEL),
        ("query_key_grads", _chunk_query_key_grads, _PARALLEL),
        ("vector_states", _chunk_states, _SEQUENTIAL),
        ("vector_outputs", _vector_chunk_outputs, _VECTOR_PARALLEL),
        ("vector_query_key_grads", _vector_chunk_query_key_grads, _VECTOR_PARALLEL),
    )
}


def _blocks(Dk: int, Dv: int) -> tuple[int, int]:
    """The recurrent kernels' blocks: the whole key dim and a block of value channels per program (>= 16
    each, as tl.dot needs)."""
    return block(Dk, 256), block(Dv, 16 if interpreting() else 32)


def reverse_cumsum_within_documents(x: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """y_t = sum of x_u over u >= t in t's document (x [B, H, T, ...], starts [B, T] bool or None)."""
    total = x.flip(2).cumsum(2).flip(2)
    if starts is None:
        return total
    B, T = starts.shape
    idx = torch.arange(T, device=x.device).expand(B, T)
    start_at = torch.where(starts, idx, T)
    # the next document's first position after each t (T if none): what to subtract
    after = torch.cat([start_at[:, 1:], start_at.new_full((B, 1), T)], dim=1).flip(1).cummin(1).values.flip(1)
    padded = torch.cat([total, torch.zeros_like(total[:, :, :1])], dim=2)
    index = after[:, None].expand(B, x.shape[1], T)
    index = index.view(*index.shape, *([1] * (x.dim() - 3))).expand_as(total)
    return total - padded.gather(2, index)


def _cumulative_decays(log_decay, starts, exclusive):
    """A decay per key channel's chunk-local sums for the chunked kernels, padded to whole chunks of
    VECTOR_CHUNK tokens with zero log decays: (b, b_read, segments, padded length), b and b_read [B, H,
    T_PAD, Dk] float32 (b_read = b - g for exclusive reads, else b itself), segments [B, T_PAD] int32, each
    token's document within its chunk (empty without documents). A scalar decay's are formed in the kernels."""
    if log_decay.dim() == 3:
        empty = log_decay.new_empty(0, dtype=torch.float32)
        return empty, empty, log_decay.new_empty(0, dtype=torch.int32), log_decay.shape[2]
    B, H, T, Dk = log_decay.shape
    n_chunks = triton.cdiv(T, VECTOR_CHUNK)
    padded = torch.nn.functional.pad(log_decay.float(), (0, 0, 0, n_chunks * VECTOR_CHUNK - T))
    b = padded.view(B, H, n_chunks, VECTOR_CHUNK, Dk).cumsum(3).view(padded.shape)
    b_read = b - padded if exclusive else b
    segments = starts.new_empty(0, dtype=torch.int32)
    if starts.numel():
        segments = torch.nn.functional.pad(starts.int(), (0, n_chunks * VECTOR_CHUNK - T))
        segments = segments.view(B, n_chunks, VECTOR_CHUNK).cumsum(2, dtype=torch.int32).view(B, -1).contiguous()
    return b, b_read, segments, n_chunks * VECTOR_CHUNK


def _chunked_forward(q, k, v, log_decay, s0, starts, meta, has_state):
    """Two passes: the state entering each chunk (sequential over chunks), then every chunk's outputs at once."""
    B, H, T, Dk = q.shape
    vector = log_decay.dim() == 4
    Dv, n_chunks = v.shape[-1], triton.cdiv(T, meta["CHUNK"])
    cum, read_cum, segments, t_pad = _cumulative_decays(log_decay, starts, meta["EXCLUSIVE"])
    sizes = (T, t_pad, H, Dk, Dv, length_bucket(T))
    # In the inputs' dtype, what tensor cores multiply; float32 for float16 inputs, whose range a state summing
    # thousands of tokens' k^T v can leave.
    states = torch.empty(B, H, n_chunks, Dk, Dv, dtype=torch.float32 if q.dtype == torch.float16 else q.dtype,
                         device=q.device)  # fmt: skip
    final = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    _tuned["vector_states" if vector else "states"][lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), B * H)](
        k, v, log_decay, starts, cum, read_cum, segments, s0, states, final, *sizes, HAS_IN=has_state, REVERSE=False,
        VECTOR=vector, **meta)  # fmt: skip
    grid = lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), n_chunks, B * H)  # noqa: E731
    if vector:
        _tuned["vector_outputs"][grid](q, k, v, cum, read_cum, segments, states, out, *sizes, VALUE_GRAD=False,
                                       SUB=SUB_CHUNK, **meta)  # fmt: skip
    else:
        _tuned["outputs"][grid](q, k, log_decay, starts, v, states, out, T, H, Dk, Dv, length_bucket(T),
                                VALUE_GRAD=False, **meta)  # fmt: skip
    return out, final, states


def _chunked_backward(q, k, v, log_decay, starts, states, d_out, d_final, meta):
    """The gradient of the state leaving each chunk (sequential, from the last), then every chunk's input
    gradients at once (dV; dQ and dK, with q.dq and k.dk per token, per key channel for a vector decay, for
    the decay's gradient)."""
    B, H, T, Dk = q.shape
    vector = log_decay.dim() == 4
    Dv, n_chunks = v.shape[-1], states.shape[2]
    # a vector decay's sums again rather than held from the forward: two cumulative sums, against two more
    # [B, H, T, Dk] float32 tensors per layer kept until the backward
    cum, read_cum, segments, t_pad = _cumulative_decays(log_decay, starts, meta["EXCLUSIVE"])
    sizes = (T, t_pad, H, Dk, Dv, length_bucket(T))
    d_states = torch.empty_like(states)
    ds0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    d_final_arg = d_final.float().contiguous() if d_final is not None else ds0
    _tuned["vector_states" if vector else "states"][lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), B * H)](
        q, d_out, log_decay, starts, cum, read_cum, segments, d_final_arg, d_states, ds0, *sizes,
        HAS_IN=d_final is not None, REVERSE=True, VECTOR=vector, **meta)  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # q.dq and k.dk per token, per key channel for a vector decay
    read_grad = torch.empty(B, H, T, *([Dk] if vector else []), dtype=torch.float32, device=q.device)
    write_grad = torch.empty_like(read_grad)
    grid = lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), n_chunks, B * H)  # noqa: E731
    if vector:
        _tuned["vector_outputs"][grid](q, k, d_out, cum, read_cum, segments, d_states, dv, *sizes, VALUE_GRAD=True,
                                       SUB=SUB_CHUNK, **meta)  # fmt: skip
        _tuned["vector_query_key_grads"][(meta["CHUNK"] // SUB_CHUNK, n_chunks, B * H)](
            q, k, v, cum, read_cum, segments, d_out, states, d_states, dq, dk, read_grad, write_grad, *sizes,
            SUB=SUB_CHUNK, **meta)  # fmt: skip
    else:
        scalar_sizes = (T, H, Dk, Dv, length_bucket(T))
        _tuned["outputs"][grid](q, k, log_decay, starts, d_out, d_states, dv, *scalar_sizes, VALUE_GRAD=True, **meta)
        _tuned["query_key_grads"][(n_chunks, B * H)](
            q, k, v, log_decay, starts, d_out, states, d_states, dq, dk, read_grad, write_grad, *scalar_sizes, **meta
        )
    return dq, dk, dv, ds0, read_grad, write_grad


def _recurrent_backward(q, k, v, log_decay, s0, starts, d_out, d_final, meta, grid, has_state):
    """A forward pass for dq and a reverse one for dk, dv and dL/dS_0, per value block (summed after)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    n_blocks = grid[0]
    dq = torch.empty(n_blocks, B, H, T, Dk, dtype=torch.float32, device=q.device)
    dk = torch.empty(n_blocks, B, H, T, Dk, dtype=torch.float32, device=q.device)
    dv = torch.empty(B, H, T, Dv, dtype=torch.float32, device=q.device)
    ds0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    _backward_dq[grid](k, v, log_decay, s0, starts, d_out, dq, T, H, Dk, Dv, B * H, HAS_STATE=has_state, **meta)
    d_final_arg = d_final.float().contiguous() if d_final is not None else ds0
    _backward_reverse[grid](q, k, v, log_decay, starts, d_out, d_final_arg, dk, dv, ds0, T, H, Dk, Dv, B * H,
                            HAS_DFINAL=d_final is not None, **meta)  # fmt: skip
    dq, dk = dq.sum(0), dk.sum(0)
    read, write = q.float() * dq, k.float() * dk
    if log_decay.dim() == 3:
        read, write = read.sum(-1), write.sum(-1)
    return dq, dk, dv, ds0, read, write


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, state, starts, exclusive, chunked):
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        q, k, v, log_decay = (t.contiguous() for t in (q, k, v, log_decay))
        s0 = state.float().contiguous() if state is not None else q.new_empty(0, dtype=torch.float32)
        starts_arg = starts.to(torch.int8).contiguous() if starts is not None else q.new_empty(0, dtype=torch.int8)
        meta = {"HAS_DOCS": starts is not None, "EXCLUSIVE": exclusive}
        ctx.has_state, ctx.chunked = state is not None, chunked
        if chunked:
            chunk = VECTOR_CHUNK if log_decay.dim() == 4 else CHUNK
            meta.update(CHUNK=chunk, UPCAST=interpreting(), DOT=dot_precision(q.dtype), BLOCK_K=block(Dk, 256))
            out, final, states = _chunked_forward(q, k, v, log_decay, s0, starts_arg, meta, state is not None)
            ctx.save_for_backward(q, k, v, log_decay, s0, starts_arg, final, states)
        else:
            block_k, block_v = _blocks(Dk, Dv)
            meta.update(VECTOR=log_decay.dim() == 4, BLOCK_K=block_k, BLOCK_V=block_v)
            ctx.grid = (triton.cdiv(Dv, block_v), B * H)
            out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
            final = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
            _forward[ctx.grid](q, k, v, log_decay, s0, starts_arg, out, final, T, H, Dk, Dv,
                               HAS_STATE=state is not None, **meta)  # fmt: skip
            ctx.save_for_backward(q, k, v, log_decay, s0, starts_arg, final)
        ctx.meta = meta
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, log_decay, s0, starts, final, *states = ctx.saved_tensors
        meta = ctx.meta
        d_out = d_out.contiguous()
        if ctx.chunked:
            dq, dk, dv, ds0, read, write = _chunked_backward(q, k, v, log_decay, starts, states[0], d_out, d_final,
                                                             meta)  # fmt: skip
        else:
            dq, dk, dv, ds0, read, write = _recurrent_backward(q, k, v, log_decay, s0, starts, d_out, d_final, meta,
                                                               ctx.grid, ctx.has_state)  # fmt: skip
        dg = None
        if ctx.needs_input_grad[3]:  # RetNet's decays are constants: then none of this is paid for
            if meta["EXCLUSIVE"]:  # token t+1 read the state decayed up to t
                read = torch.cat([read[:, :, 1:], torch.zeros_like(read[:, :, :1])], dim=2)
            db = read - write  # dL/d(cumulative log decay within the document)
            if d_final is not None:  # the final state is the last document's
                term = (final * d_final.float()).sum(-1)  # per key channel
                db[:, :, -1] += term if db.dim() == 4 else term.sum(-1)
            dg = reverse_cumsum_within_documents(db, starts.bool() if meta["HAS_DOCS"] else None)
            dg = dg.to(log_decay.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, ds0 if ctx.has_state else None, None, None,
                None)  # fmt: skip


def linear_attention(q, k, v, log_decay, *, state=None, doc_ids=None, exclusive=False, chunk_size=64, form="auto"):
    """``kvlab.kernels.linear_attention.linear_attention``'s contract (its ``chunk_size`` is unused: the kernel's
    is CHUNK, or VECTOR_CHUNK for a decay per key channel). ``form``: "chunked", "recurrent", or "auto": chunked
    over more than one chunk of tokens, recurrent otherwise (decoding)."""
    if form not in ("auto", "chunked", "recurrent"):
        raise ValueError(f"form={form!r}: valid are auto, chunked, recurrent")
    chunk = VECTOR_CHUNK if log_decay.dim() == 4 else CHUNK
    chunked = form == "chunked" or (form == "auto" and q.shape[2] > chunk)
    starts = document_starts(doc_ids) if doc_ids is not None else None
    if q.shape[1] != v.shape[1]:  # one q/k head read by every value head: the kernels index q and k per head
        q, k = q.expand(-1, v.shape[1], -1, -1), k.expand(-1, v.shape[1], -1, -1)
    return _LinearAttention.apply(q, k, v, log_decay, state, starts, exclusive, chunked)
