"""Linear attention with decay in Triton, in its recurrent form (fused: the state never leaves the chip).

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t   (exclusive: o_t = q_t S_{t-1})

One program per (batch, head, block of value channels) carries its
[Dk, BLOCK_V] slice of the state through the tokens in registers; at decode
and at the moderate lengths of decoding-heavy use this is what fused
recurrent kernels (fla's ``fused_recurrent``) do. Scalar ([B, H, T]) or
per-key-channel ([B, H, T, Dk]) log decays, initial and final states,
packed documents (the state empties where one starts); inclusive reads, or
RWKV-6's exclusive ones (before the token's own write).

With a scalar decay and more tokens than a chunk, the kernels walk chunks
of CHUNK tokens instead (fla's "fused chunk" form): still one program per
(batch, head, value block) carrying the state, but each step is a chunk's
matrix products on tensor cores, T / CHUNK sequential steps instead of T:
    o = (Q K^T * D) V + (Q * exp(b_read)) S,   S' = exp(b_C) S + (K * exp(b_C - b))^T V
with b the cumulative log decay within the chunk, D[t, s] = exp(b_read_t - b_s)
where t sees s (every exponent <= 0), and documents as segments of the chunk
(only its first reads the carried state, only its last writes the next).
A per-key-channel decay would need D per channel, so it stays recurrent.

Backward (either form): a forward pass recomputes the state each token read for
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
backward's passes are the same with a chunk per step: dA = dO V^T * D,
    dQ = dA K + (dO S^T) * exp(b_read),  dK = dA^T Q + (V G^T) * exp(b_C - b),
    dV = (Q K^T * D)^T dO + (K * exp(b_C - b)) G,  G <- exp(b_C) G + (Q * exp(b_read))^T dO.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.attention import document_starts
from kvlab.kernels.triton_common import block, dot_precision, interpreting, load_state, state_slice


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
def _rows(PTR, bh, T, rows, cols, n_cols):
    """Rows ``rows`` of a [B*H, T, n_cols] tensor's slice ``bh``, channels ``cols``, in float32 (zeros outside)."""
    return tl.load(PTR + (bh * T + rows[:, None]) * n_cols + cols[None, :],
                   mask=(rows[:, None] < T) & (cols[None, :] < n_cols), other=0.0).to(tl.float32)  # fmt: skip


@triton.jit
def _chunk_decays(G, STARTS, bh, H, T, start, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr,
                  CHUNK: tl.constexpr):  # fmt: skip
    """The chunk at ``start``: D [C, C] (exp(b_read_t - b_s) where t sees s, else 0); each token's factor on
    the carried state it reads, exp(b_read_t) (0 once a document starts in the chunk); each token's factor
    into the state passed on, exp(b_C - b_s) (0 outside the chunk's last document); the carried state's
    decay over the chunk, exp(b_C) (0 if a document starts in it). Padding past T: g = 0, never read."""
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
def _chunk_forward(Q, K, V, G, S0, STARTS, OUT, S_FINAL, T, H, DK, DV, HAS_STATE: tl.constexpr,
                   HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr, CHUNK: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    state = load_state(S0, bh, DK, DV, ik, iv, in_k, in_v, HAS_STATE, BLOCK_K, BLOCK_V)
    for start in range(0, T, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        q, k = _rows(Q, bh, T, rows, ik, DK), _rows(K, bh, T, rows, ik, DK)
        v = _rows(V, bh, T, rows, iv, DV)
        decay, read, write, carry = _chunk_decays(G, STARTS, bh, H, T, start, HAS_DOCS, EXCLUSIVE, CHUNK)
        out = tl.dot(tl.dot(q, tl.trans(k), input_precision=DOT) * decay, v, input_precision=DOT) + tl.dot(
            q * read[:, None], state, input_precision=DOT
        )
        tl.store(OUT + (bh * T + rows[:, None]) * DV + iv[None, :], out.to(OUT.dtype.element_ty),
                 mask=(rows[:, None] < T) & in_v[None, :])  # fmt: skip
        state = state * carry + tl.dot(tl.trans(k * write[:, None]), v, input_precision=DOT)
    tl.store(S_FINAL + (bh * DK + ik[:, None]) * DV + iv[None, :], state, mask=in_k[:, None] & in_v[None, :])


@triton.jit
def _chunk_backward_dq(K, V, G, S0, STARTS, DO, DQ_PARTIAL, T, H, DK, DV, BH, HAS_STATE: tl.constexpr,
                       HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr, CHUNK: tl.constexpr,
                       DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    state = load_state(S0, bh, DK, DV, ik, iv, in_k, in_v, HAS_STATE, BLOCK_K, BLOCK_V)
    partial = DQ_PARTIAL + tl.program_id(0) * BH * T * DK
    for start in range(0, T, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        k = _rows(K, bh, T, rows, ik, DK)
        v, do = _rows(V, bh, T, rows, iv, DV), _rows(DO, bh, T, rows, iv, DV)
        decay, read, write, carry = _chunk_decays(G, STARTS, bh, H, T, start, HAS_DOCS, EXCLUSIVE, CHUNK)
        dq = (
            tl.dot(tl.dot(do, tl.trans(v), input_precision=DOT) * decay, k, input_precision=DOT)
            + tl.dot(do, tl.trans(state), input_precision=DOT) * read[:, None]
        )
        tl.store(partial + (bh * T + rows[:, None]) * DK + ik[None, :], dq, mask=(rows[:, None] < T) & in_k[None, :])
        state = state * carry + tl.dot(tl.trans(k * write[:, None]), v, input_precision=DOT)


@triton.jit
def _chunk_backward_reverse(Q, K, V, G, STARTS, DO, DS_FINAL, DK_PARTIAL, DV_OUT, DS0, T, H, DK, DV, BH,
                            HAS_DFINAL: tl.constexpr, HAS_DOCS: tl.constexpr, EXCLUSIVE: tl.constexpr,
                            CHUNK: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_V: tl.constexpr):  # fmt: skip
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    in_s = in_k[:, None] & in_v[None, :]
    grad = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)  # dL/d(the state leaving the chunk)
    if HAS_DFINAL:
        grad += tl.load(DS_FINAL + (bh * DK + ik[:, None]) * DV + iv[None, :], mask=in_s, other=0.0).to(tl.float32)
    partial = DK_PARTIAL + tl.program_id(0) * BH * T * DK
    n_chunks = tl.cdiv(T, CHUNK)
    for step in range(n_chunks):
        start = (n_chunks - 1 - step) * CHUNK
        rows = start + tl.arange(0, CHUNK)
        q, k = _rows(Q, bh, T, rows, ik, DK), _rows(K, bh, T, rows, ik, DK)
        v, do = _rows(V, bh, T, rows, iv, DV), _rows(DO, bh, T, rows, iv, DV)
        decay, read, write, carry = _chunk_decays(G, STARTS, bh, H, T, start, HAS_DOCS, EXCLUSIVE, CHUNK)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT) * decay
        d_scores = tl.dot(do, tl.trans(v), input_precision=DOT) * decay
        dk = (
            tl.dot(tl.trans(d_scores), q, input_precision=DOT)
            + tl.dot(v, tl.trans(grad), input_precision=DOT) * write[:, None]
        )
        dv = tl.dot(tl.trans(scores), do, input_precision=DOT) + tl.dot(k * write[:, None], grad, input_precision=DOT)
        in_rows = rows[:, None] < T
        tl.store(partial + (bh * T + rows[:, None]) * DK + ik[None, :], dk, mask=in_rows & in_k[None, :])
        tl.store(DV_OUT + (bh * T + rows[:, None]) * DV + iv[None, :], dv.to(DV_OUT.dtype.element_ty),
                 mask=in_rows & in_v[None, :])  # fmt: skip
        grad = grad * carry + tl.dot(tl.trans(q * read[:, None]), do, input_precision=DOT)
    tl.store(DS0 + (bh * DK + ik[:, None]) * DV + iv[None, :], grad, mask=in_s)


CHUNK = 16 if interpreting() else 64


def _blocks(Dk: int, Dv: int) -> tuple[int, int]:
    """The whole key dim and a block of value channels per program (>= 16 each, as tl.dot needs)."""
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


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, state, starts, exclusive, chunked):
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        q, k, v, log_decay = (t.contiguous() for t in (q, k, v, log_decay))
        s0 = state.float().contiguous() if state is not None else q.new_empty(0, dtype=torch.float32)
        starts_arg = starts.to(torch.int8).contiguous() if starts is not None else q.new_empty(0, dtype=torch.int8)
        block_k, block_v = _blocks(Dk, Dv)
        meta = {"HAS_DOCS": starts is not None, "EXCLUSIVE": exclusive, "BLOCK_K": block_k, "BLOCK_V": block_v}
        meta.update({"CHUNK": CHUNK, "DOT": dot_precision(q.dtype)} if chunked else {"VECTOR": log_decay.dim() == 4})
        grid = (triton.cdiv(Dv, block_v), B * H)
        out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
        final = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
        kernel = _chunk_forward if chunked else _forward
        kernel[grid](q, k, v, log_decay, s0, starts_arg, out, final, T, H, Dk, Dv, HAS_STATE=state is not None,
                     **meta)  # fmt: skip
        ctx.save_for_backward(q, k, v, log_decay, s0, starts_arg, final)
        ctx.meta, ctx.grid, ctx.has_state, ctx.chunked = meta, grid, state is not None, chunked
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, log_decay, s0, starts, final = ctx.saved_tensors
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        meta, grid = ctx.meta, ctx.grid
        d_out = d_out.contiguous()
        n_blocks = grid[0]
        dq = torch.empty(n_blocks, B, H, T, Dk, dtype=torch.float32, device=q.device)
        dk = torch.empty(n_blocks, B, H, T, Dk, dtype=torch.float32, device=q.device)
        dv = torch.empty(B, H, T, Dv, dtype=torch.float32, device=q.device)
        ds0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
        backward_dq, backward_reverse = (
            (_chunk_backward_dq, _chunk_backward_reverse) if ctx.chunked else (_backward_dq, _backward_reverse)
        )
        backward_dq[grid](k, v, log_decay, s0, starts, d_out, dq, T, H, Dk, Dv, B * H, HAS_STATE=ctx.has_state,
                           **meta)  # fmt: skip
        d_final_arg = d_final.float().contiguous() if d_final is not None else ds0
        backward_reverse[grid](q, k, v, log_decay, starts, d_out, d_final_arg, dk, dv, ds0, T, H, Dk, Dv, B * H,
                               HAS_DFINAL=d_final is not None, **meta)  # fmt: skip
        dq, dk = dq.sum(0), dk.sum(0)
        read = q.float() * dq  # how the loss moves with the decay factor of the state each token read
        if meta["EXCLUSIVE"]:  # token t+1 read the state decayed up to t
            read = torch.cat([read[:, :, 1:], torch.zeros_like(read[:, :, :1])], dim=2)
        db = read - k.float() * dk  # dL/d(cumulative log decay within the document)
        if d_final is not None:  # the final state is the last document's
            db[:, :, -1] += (final * d_final.float()).sum(-1)
        dg = reverse_cumsum_within_documents(db, starts.bool() if meta["HAS_DOCS"] else None)
        if log_decay.dim() == 3:
            dg = dg.sum(-1)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(log_decay.dtype),
                ds0 if ctx.has_state else None, None, None, None)  # fmt: skip


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
    return _LinearAttention.apply(q, k, v, log_decay, state, starts, exclusive, chunked)
