"""Linear attention with decay in Triton, in its recurrent form (fused: the state never leaves the chip).

    S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t

One program per (batch, head, block of value channels) carries its
[Dk, BLOCK_V] slice of the state through the tokens in registers; at decode
and at the moderate lengths of decoding-heavy use this is what fused
recurrent kernels (fla's ``fused_recurrent``) do. Scalar ([B, H, T]) or
per-key-channel ([B, H, T, Dk]) log decays, initial and final states;
inclusive reads, no packed documents (the registry sends those to the
chunked torch path).

Backward: a forward pass recomputes S_t for dq_t = do_t S_t^T (per value
block, summed after); a reverse pass carries G_t = dL/dS_t,
    G_t = q_t^T do_t + diag(exp g_{t+1}) G_{t+1}   (G_T starts at dL/dS_final)
    dk_t = G_t v_t^T,  dv_t = k_t G_t,  dL/dS_0 = diag(exp g_1) G_1.
The decay's gradient needs no pass of its own: with b the cumulative log
decay, o and the final state depend on b_t through q_t exp(b_t), k_t exp(-b_t)
and exp(b_T) S_final's factor, so
    dL/db_t = q_t * dq_t - k_t * dk_t  (+ sum_j S_T dS_T at t = T),
and dL/dg_t is its reverse cumulative sum (summed over channels for a
scalar decay).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.triton_common import interpreting


@triton.jit
def _step(state, K, V, G, bh, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR: tl.constexpr):
    """S_t from S_{t-1}: decay (per key channel or scalar), then add k_t^T v_t."""
    k = tl.load(K + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32)
    v = tl.load(V + (bh * T + t) * DV + iv, mask=in_v, other=0.0).to(tl.float32)
    if VECTOR:
        decay = tl.exp(tl.load(G + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32))
        return state * decay[:, None] + k[:, None] * v[None, :]
    return state * tl.exp(tl.load(G + bh * T + t).to(tl.float32)) + k[:, None] * v[None, :]


@triton.jit
def _forward(Q, K, V, G, S0, OUT, S_FINAL, T, DK, DV, HAS_STATE: tl.constexpr, VECTOR: tl.constexpr,
             BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    ik = tl.arange(0, BLOCK_K)
    iv = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_k, in_v = ik < DK, iv < DV
    in_s = in_k[:, None] & in_v[None, :]
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_STATE:
        state += tl.load(S0 + (bh * DK + ik[:, None]) * DV + iv[None, :], mask=in_s, other=0.0).to(tl.float32)
    for t in range(T):
        state = _step(state, K, V, G, bh, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR)
        q = tl.load(Q + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32)
        tl.store(OUT + (bh * T + t) * DV + iv, tl.sum(q[:, None] * state, axis=0).to(OUT.dtype.element_ty), mask=in_v)
    tl.store(S_FINAL + (bh * DK + ik[:, None]) * DV + iv[None, :], state, mask=in_s)


@triton.jit
def _backward_dq(K, V, G, S0, DO, DQ_PARTIAL, T, DK, DV, BH, HAS_STATE: tl.constexpr, VECTOR: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    ik = tl.arange(0, BLOCK_K)
    iv = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_k, in_v = ik < DK, iv < DV
    state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_STATE:
        state += tl.load(S0 + (bh * DK + ik[:, None]) * DV + iv[None, :], mask=in_k[:, None] & in_v[None, :],
                         other=0.0).to(tl.float32)  # fmt: skip
    partial = DQ_PARTIAL + tl.program_id(0) * BH * T * DK
    for t in range(T):
        state = _step(state, K, V, G, bh, t, T, DK, DV, ik, iv, in_k, in_v, VECTOR)
        do = tl.load(DO + (bh * T + t) * DV + iv, mask=in_v, other=0.0).to(tl.float32)
        tl.store(partial + (bh * T + t) * DK + ik, tl.sum(state * do[None, :], axis=1), mask=in_k)


@triton.jit
def _backward_reverse(Q, K, V, G, DO, DS_FINAL, DK_PARTIAL, DV_OUT, DS0, T, DK, DV, BH, HAS_DFINAL: tl.constexpr,
                      VECTOR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    ik = tl.arange(0, BLOCK_K)
    iv = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_k, in_v = ik < DK, iv < DV
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
        grad += q[:, None] * do[None, :]  # G_t
        tl.store(partial + (bh * T + t) * DK + ik, tl.sum(grad * v[None, :], axis=1), mask=in_k)
        tl.store(DV_OUT + (bh * T + t) * DV + iv, tl.sum(k[:, None] * grad, axis=0).to(DV_OUT.dtype.element_ty),
                 mask=in_v)  # fmt: skip
        if VECTOR:
            grad = grad * tl.exp(tl.load(G + (bh * T + t) * DK + ik, mask=in_k, other=0.0).to(tl.float32))[:, None]
        else:
            grad = grad * tl.exp(tl.load(G + bh * T + t).to(tl.float32))
    tl.store(DS0 + (bh * DK + ik[:, None]) * DV + iv[None, :], grad, mask=in_s)


def _blocks(Dk: int, Dv: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(Dk)
    return block_k, min(triton.next_power_of_2(Dv), 16 if interpreting() else 32)


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, state):
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        q, k, v, log_decay = (t.contiguous() for t in (q, k, v, log_decay))
        s0 = state.float().contiguous() if state is not None else q.new_empty(0, dtype=torch.float32)
        block_k, block_v = _blocks(Dk, Dv)
        meta = {"HAS_STATE": state is not None, "VECTOR": log_decay.dim() == 4, "BLOCK_K": block_k, "BLOCK_V": block_v}
        grid = (triton.cdiv(Dv, block_v), B * H)
        out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
        final = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
        _forward[grid](q, k, v, log_decay, s0, out, final, T, Dk, Dv, **meta)
        ctx.save_for_backward(q, k, v, log_decay, s0, final)
        ctx.meta, ctx.grid, ctx.has_state = meta, grid, state is not None
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, log_decay, s0, final = ctx.saved_tensors
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        meta, grid = ctx.meta, ctx.grid
        d_out = d_out.contiguous()
        n_blocks = grid[0]
        dq = torch.empty(n_blocks, B, H, T, Dk, dtype=torch.float32, device=q.device)
        dk = torch.empty(n_blocks, B, H, T, Dk, dtype=torch.float32, device=q.device)
        dv = torch.empty(B, H, T, Dv, dtype=torch.float32, device=q.device)
        ds0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
        _backward_dq[grid](k, v, log_decay, s0, d_out, dq, T, Dk, Dv, B * H, **meta)
        d_final_arg = d_final.float().contiguous() if d_final is not None else ds0
        _backward_reverse[grid](q, k, v, log_decay, d_out, d_final_arg, dk, dv, ds0, T, Dk, Dv, B * H,
                                HAS_DFINAL=d_final is not None, VECTOR=meta["VECTOR"], BLOCK_K=meta["BLOCK_K"],
                                BLOCK_V=meta["BLOCK_V"])  # fmt: skip
        dq, dk = dq.sum(0), dk.sum(0)
        db = q.float() * dq - k.float() * dk  # dL/d(cumulative log decay), per token and key channel
        if d_final is not None:
            db[:, :, -1] += (final * d_final.float()).sum(-1)
        dg = db.flip(2).cumsum(2).flip(2)
        if not meta["VECTOR"]:
            dg = dg.sum(-1)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(log_decay.dtype),
                ds0 if ctx.has_state else None)  # fmt: skip


def linear_attention(q, k, v, log_decay, *, state=None, doc_ids=None, exclusive=False, chunk_size=64):
    """``kvlab.kernels.linear_attention.linear_attention``'s contract, inclusive reads, no packed documents."""
    if exclusive or doc_ids is not None:
        raise ValueError("the Triton linear attention kernel takes inclusive reads without packed documents")
    return _LinearAttention.apply(q, k, v, log_decay, state)
