"""The generalised delta rule (RWKV-7) in Triton, recurrent: the state stays on chip going forward.

    u_t = b_t S_{t-1},   S_t = diag(exp g_t) S_{t-1} + a_t^T u_t + k_t^T v_t,   o_t = q_t S_t

One program per (batch, head, block of value channels): every column of S
is independent given the key-side vectors, and u_t needs a column's whole
key dimension, which the program holds. The forward pass also writes the
state at every chunk boundary (each ``chunk`` tokens).

Backward walks the chunks from last to first: it recomputes the chunk's
states from its checkpoint into a scratch buffer, then walks the chunk's
tokens backwards carrying G_t = dL/dS_t (G_T = dL/dS_final):
    G_t += q_t^T do_t;  dq_t = do_t S_t^T;  dv_t = k_t G_t;  dk_t = G_t v_t^T;
    du_t = a_t G_t;  da_t = G_t u_t^T;  db_t = S_{t-1} du_t^T;
    dg_t = exp(g_t) * rowsum(G_t * S_{t-1});
    G_{t-1} = diag(exp g_t) G_t + b_t^T du_t
Key-side gradients are per value block and summed after; dL/dS_0 is the
last G. Packed documents: the state empties where one starts, and G does
not flow back past a document's first token. Memory beyond the inputs: T / chunk checkpoints and one chunk of
states per program, not a state per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.attention import document_starts
from kvlab.kernels.delta_rule import as_generalised
from kvlab.kernels.triton_common import interpreting, load_state, state_slice


@triton.jit
def _row(PTR, bh, t, T, n, idx, mask):
    return tl.load(PTR + (bh * T + t) * n + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _step(state, K, V, G, A, B, STARTS, bh, H, t, T, DK, DV, ik, iv, in_k, in_v, HAS_DOCS: tl.constexpr):
    """(S_t, u_t) from S_{t-1} (an empty one where a document starts)."""
    if HAS_DOCS:
        state = state * (1.0 - tl.load(STARTS + (bh // H) * T + t).to(tl.float32))
    b = _row(B, bh, t, T, DK, ik, in_k)
    u = tl.sum(b[:, None] * state, axis=0)
    decay = tl.exp(_row(G, bh, t, T, DK, ik, in_k))
    a, k = _row(A, bh, t, T, DK, ik, in_k), _row(K, bh, t, T, DK, ik, in_k)
    state = state * decay[:, None] + a[:, None] * u[None, :] + k[:, None] * _row(V, bh, t, T, DV, iv, in_v)[None, :]
    return state, u


@triton.jit
def _forward(Q, K, V, G, A, B, S0, STARTS, OUT, S_FINAL, CHECKPOINTS, T, H, DK, DV, BH, HAS_DOCS: tl.constexpr,
             CHUNK: tl.constexpr,
             HAS_STATE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh, ik, iv, in_k, in_v = state_slice(DK, DV, BLOCK_K, BLOCK_V)
    in_s = in_k[:, None] & in_v[None, :]
    state = load_state(S0, bh, DK, DV, ik, iv, in_k, in_v, HAS_STATE, BLOCK_K, BLOCK_V)
    for t in range(T):
        if t % CHUNK == 0:  # the state before the chunk's first token
            tl.store(CHECKPOINTS + ((t // CHUNK * BH + bh) * DK + ik[:, None]) * DV + iv[None, :], state, mask=in_s)
        state, u = _step(state, K, V, G, A, B, STARTS, bh, H, t, T, DK, DV, ik, iv, in_k, in_v, HAS_DOCS)
        q = _row(Q, bh, t, T, DK, ik, in_k)
        tl.store(OUT + (bh * T + t) * DV + iv, tl.sum(q[:, None] * state, axis=0).to(OUT.dtype.element_ty), mask=in_v)
    tl.store(S_FINAL + (bh * DK + ik[:, None]) * DV + iv[None, :], state, mask=in_s)


@triton.jit
def _backward(Q, K, V, G, A, B, STARTS, DO, DS_FINAL, CHECKPOINTS, SCRATCH, DQ, DK_, DV_, DG, DA, DB, DS0, T, H, DK,
              DV, BH, HAS_DOCS: tl.constexpr,
              CHUNK: tl.constexpr, HAS_DFINAL: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_V: tl.constexpr):  # fmt: skip
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    ik = tl.arange(0, BLOCK_K)
    jv = tl.arange(0, BLOCK_V)
    iv = pid_v * BLOCK_V + jv
    in_k, in_v = ik < DK, iv < DV
    in_s = in_k[:, None] & in_v[None, :]
    scratch = SCRATCH + (pid_v * BH + bh) * (CHUNK + 1) * BLOCK_K * BLOCK_V
    tile = ik[:, None] * BLOCK_V + jv[None, :]
    partial = (pid_v * BH + bh) * T * DK  # offset of this program's key-side gradient rows
    grad = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_DFINAL:
        grad += tl.load(DS_FINAL + (bh * DK + ik[:, None]) * DV + iv[None, :], mask=in_s, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(T, CHUNK)
    for c in range(n_chunks):
        chunk = n_chunks - 1 - c
        first = chunk * CHUNK
        last = tl.minimum(first + CHUNK, T)
        # the chunk's states: scratch[i] = S_{first + i - 1} (scratch[0]: the checkpoint)
        state = tl.load(CHECKPOINTS + ((chunk * BH + bh) * DK + ik[:, None]) * DV + iv[None, :], mask=in_s, other=0.0)
        tl.store(scratch + tile, state)
        for t in range(first, last):
            state, u = _step(state, K, V, G, A, B, STARTS, bh, H, t, T, DK, DV, ik, iv, in_k, in_v, HAS_DOCS)
            tl.store(scratch + (t - first + 1) * BLOCK_K * BLOCK_V + tile, state)
        for step in range(first, last):
            t = last - 1 + first - step
            s_t = tl.load(scratch + (t - first + 1) * BLOCK_K * BLOCK_V + tile)
            s_prev = tl.load(scratch + (t - first) * BLOCK_K * BLOCK_V + tile)
            kept = 1.0  # 0 where t starts a document: it read an empty state, and nothing flows back past it
            if HAS_DOCS:
                kept = 1.0 - tl.load(STARTS + (bh // H) * T + t).to(tl.float32)
            s_prev = s_prev * kept
            q, k = _row(Q, bh, t, T, DK, ik, in_k), _row(K, bh, t, T, DK, ik, in_k)
            a, b = _row(A, bh, t, T, DK, ik, in_k), _row(B, bh, t, T, DK, ik, in_k)
            v, do = _row(V, bh, t, T, DV, iv, in_v), _row(DO, bh, t, T, DV, iv, in_v)
            decay = tl.exp(_row(G, bh, t, T, DK, ik, in_k))
            grad += q[:, None] * do[None, :]
            u = tl.sum(b[:, None] * s_prev, axis=0)
            du = tl.sum(a[:, None] * grad, axis=0)
            row = partial + t * DK + ik
            tl.store(DQ + row, tl.sum(s_t * do[None, :], axis=1), mask=in_k)
            tl.store(DK_ + row, tl.sum(grad * v[None, :], axis=1), mask=in_k)
            tl.store(DA + row, tl.sum(grad * u[None, :], axis=1), mask=in_k)
            tl.store(DB + row, tl.sum(s_prev * du[None, :], axis=1), mask=in_k)
            tl.store(DG + row, decay * tl.sum(grad * s_prev, axis=1), mask=in_k)
            tl.store(DV_ + (bh * T + t) * DV + iv, tl.sum(k[:, None] * grad, axis=0), mask=in_v)
            grad = (grad * decay[:, None] + b[:, None] * du[None, :]) * kept
    tl.store(DS0 + (bh * DK + ik[:, None]) * DV + iv[None, :], grad, mask=in_s)


def _blocks(Dk: int, Dv: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_V, chunk)."""
    return triton.next_power_of_2(Dk), min(triton.next_power_of_2(Dv), 16 if interpreting() else 32), 16


class _DeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, a, b, state, doc_ids):
        Bsz, H, T, Dk = q.shape
        Dv = v.shape[-1]
        q, k, v, log_decay, a, b = (t.contiguous() for t in (q, k, v, log_decay, a, b))
        s0 = state.float().contiguous() if state is not None else q.new_empty(0, dtype=torch.float32)
        starts = document_starts(doc_ids).to(torch.int8) if doc_ids is not None else q.new_empty(0, dtype=torch.int8)
        block_k, block_v, chunk = _blocks(Dk, Dv)
        grid = (triton.cdiv(Dv, block_v), Bsz * H)
        out = torch.empty(Bsz, H, T, Dv, dtype=q.dtype, device=q.device)
        final = torch.empty(Bsz, H, Dk, Dv, dtype=torch.float32, device=q.device)
        checkpoints = torch.empty(triton.cdiv(T, chunk), Bsz, H, Dk, Dv, dtype=torch.float32, device=q.device)
        _forward[grid](q, k, v, log_decay, a, b, s0, starts, out, final, checkpoints, T, H, Dk, Dv, Bsz * H,
                       HAS_DOCS=doc_ids is not None, CHUNK=chunk, HAS_STATE=state is not None, BLOCK_K=block_k,
                       BLOCK_V=block_v)  # fmt: skip
        ctx.save_for_backward(q, k, v, log_decay, a, b, starts, checkpoints)
        ctx.blocks, ctx.grid, ctx.has_state = (block_k, block_v, chunk), grid, state is not None
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, log_decay, a, b, starts, checkpoints = ctx.saved_tensors
        Bsz, H, T, Dk = q.shape
        Dv = v.shape[-1]
        block_k, block_v, chunk = ctx.blocks
        grid = ctx.grid
        f32 = {"dtype": torch.float32, "device": q.device}
        scratch = torch.empty(grid[0] * Bsz * H * (chunk + 1) * block_k * block_v, **f32)
        key_side = [torch.empty(grid[0], Bsz, H, T, Dk, **f32) for _ in range(5)]  # dq, dk, dg, da, db partials
        dv = torch.empty(Bsz, H, T, Dv, **f32)
        ds0 = torch.empty(Bsz, H, Dk, Dv, **f32)
        d_final_arg = d_final.float().contiguous() if d_final is not None else ds0
        dq, dk, dg, da, db = key_side
        _backward[grid](q, k, v, log_decay, a, b, starts, d_out.contiguous(), d_final_arg, checkpoints, scratch, dq, dk,
                        dv, dg, da, db, ds0, T, H, Dk, Dv, Bsz * H, HAS_DOCS=starts.numel() > 0, CHUNK=chunk,
                        HAS_DFINAL=d_final is not None,
                        BLOCK_K=block_k, BLOCK_V=block_v)  # fmt: skip
        dq, dk, dg, da, db = (x.sum(0) for x in key_side)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(log_decay.dtype), da.to(a.dtype),
                db.to(b.dtype), ds0 if ctx.has_state else None, None)  # fmt: skip


def delta_rule(q, k, v, log_decay, a, b, *, state=None, doc_ids=None, chunk_size=16):
    """``kvlab.kernels.delta_rule.delta_rule``'s contract."""
    return _DeltaRule.apply(q, k, v, log_decay, a, b, state, doc_ids)


def gated_delta_rule(q, k, v, log_decay, beta, *, state=None, doc_ids=None, chunk_size=64):
    """``kvlab.kernels.delta_rule.gated_delta_rule``'s contract, as the generalised rule: the decay on every key
    channel (one per head broadcast, its gradient summed back), the correction -beta k read along k exp(g), the
    write beta k."""
    written, v, g, a, b = as_generalised(k, v, log_decay, beta)
    return _DeltaRule.apply(q, written, v, g.expand_as(q), a, b, state, doc_ids)
