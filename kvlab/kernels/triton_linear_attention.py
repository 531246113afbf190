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
Dk Dv in the inputs' dtype, kept for the backward. A per-key-channel decay
would need D per channel, so it stays recurrent.

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
def _chunk_states(A, X, G, STARTS, S_IN, STATES, S_OUT, T, H, DK, DV, T_BUCKET, HAS_IN: tl.constexpr,
                  REVERSE: tl.constexpr, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr, CHUNK: tl.constexpr,
                  UPCAST: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_V: tl.constexpr):  # fmt: skip
    """The one sequential pass, writing a state per chunk (grid: value blocks, B*H). Forward (A = K, X = V,
    S_IN the initial state): STATES[bh, c] = S_c, the state entering chunk c, S_{c+1} = exp(b_C) S_c +
    (K * exp(b_C - b))^T V, and S_OUT the final state. REVERSE (A = Q, X = dO, S_IN dL/dS_final), from the
    last chunk: STATES[bh, c] = G_c, the gradient of the state leaving chunk c, G_{c-1} = exp(b_C) G_c +
    (Q * exp(b_read))^T dO, and S_OUT dL/dS_0."""
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
        _, read, write, carry = _chunk_decays(G, STARTS, bh, H, T, chunk * CHUNK, HAS_DOCS, EXCLUSIVE, CHUNK)
        weighted = a * (read if REVERSE else write)[:, None]
        state = state * carry + tl.dot(tl.trans(weighted.to(a.dtype)), x, input_precision=DOT)
    tl.store(S_OUT + (bh * DK + ik[:, None]) * DV + iv[None, :], state, mask=in_s)


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


CHUNK = 16 if interpreting() else 64

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
_tuned = {
    name: triton.autotune(configs, key=_TUNE_KEY)(kernel)
    for name, kernel, configs in (
        ("states", _chunk_states, _SEQUENTIAL),
        ("outputs", _chunk_outputs, _PARALLEL),
        ("query_key_grads", _chunk_query_key_grads, _PARALLEL),
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


def _chunked_forward(q, k, v, log_decay, s0, starts, meta, has_state):
    """Two passes: the state entering each chunk (sequential over chunks), then every chunk's outputs at once."""
    B, H, T, Dk = q.shape
    Dv, n_chunks = v.shape[-1], triton.cdiv(T, CHUNK)
    sizes = (T, H, Dk, Dv, length_bucket(T))
    # In the inputs' dtype, what tensor cores multiply; float32 for float16 inputs, whose range a state summing
    # thousands of tokens' k^T v can leave.
    states = torch.empty(B, H, n_chunks, Dk, Dv, dtype=torch.float32 if q.dtype == torch.float16 else q.dtype,
                         device=q.device)  # fmt: skip
    final = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    _tuned["states"][lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), B * H)](
        k, v, log_decay, starts, s0, states, final, *sizes, HAS_IN=has_state, REVERSE=False, **meta
    )
    _tuned["outputs"][lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), n_chunks, B * H)](
        q, k, log_decay, starts, v, states, out, *sizes, VALUE_GRAD=False, **meta
    )
    return out, final, states


def _chunked_backward(q, k, v, log_decay, starts, states, d_out, d_final, meta):
    """The gradient of the state leaving each chunk (sequential, from the last), then every chunk's input
    gradients at once (dV; dQ and dK, with q.dq and k.dk per token for the decay's gradient)."""
    B, H, T, Dk = q.shape
    Dv, n_chunks = v.shape[-1], states.shape[2]
    sizes = (T, H, Dk, Dv, length_bucket(T))
    d_states = torch.empty_like(states)
    ds0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    d_final_arg = d_final.float().contiguous() if d_final is not None else ds0
    _tuned["states"][lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), B * H)](
        q, d_out, log_decay, starts, d_final_arg, d_states, ds0, *sizes, HAS_IN=d_final is not None, REVERSE=True,
        **meta)  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _tuned["outputs"][lambda m: (triton.cdiv(Dv, m["BLOCK_V"]), n_chunks, B * H)](
        q, k, log_decay, starts, d_out, d_states, dv, *sizes, VALUE_GRAD=True, **meta
    )
    read_grad = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    write_grad = torch.empty_like(read_grad)
    _tuned["query_key_grads"][(n_chunks, B * H)](
        q, k, v, log_decay, starts, d_out, states, d_states, dq, dk, read_grad, write_grad, *sizes, **meta
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
            meta.update(CHUNK=CHUNK, UPCAST=interpreting(), DOT=dot_precision(q.dtype), BLOCK_K=block(Dk, 256))
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
    is CHUNK). ``form``: "chunked" (scalar decays only), "recurrent", or "auto": chunked for a scalar decay over
    more than one chunk of tokens, recurrent otherwise (decoding, per-channel decays)."""
    if form not in ("auto", "chunked", "recurrent"):
        raise ValueError(f"form={form!r}: valid are auto, chunked, recurrent")
    if form == "chunked" and log_decay.dim() == 4:
        raise ValueError("form='chunked' takes a scalar decay per head and token (log_decay [B, H, T])")
    chunked = form == "chunked" or (form == "auto" and log_decay.dim() == 3 and q.shape[2] > CHUNK)
    starts = document_starts(doc_ids) if doc_ids is not None else None
    if q.shape[1] != v.shape[1]:  # one q/k head read by every value head: the kernels index q and k per head
        q, k = q.expand(-1, v.shape[1], -1, -1), k.expand(-1, v.shape[1], -1, -1)
    return _LinearAttention.apply(q, k, v, log_decay, state, starts, exclusive, chunked)
