"""The generalised delta rule (diagonal plus low-rank transition): RWKV-7's state update.

Per batch row and head, with a state S of [Dk, Dv]:

    S_t = diag(exp(g_t)) S_{t-1} + a_t^T (b_t S_{t-1}) + k_t^T v_t,      o_t = q_t S_t

g_t <= 0 is a log decay per key channel; a_t, b_t [Dk] make the rank-one
correction (RWKV-7: a = kappa * lr, b = -kappa, the delta rule's "replace
what the state holds for kappa"; DeltaNet is g = 0, a = beta k, b = -k, beta k
writing; gated DeltaNet's rule, one decay per head, has its own chunked form
below: ``gated_delta_rule``).
Packed documents (``doc_ids``) start from an empty state; position 0
continues ``state``.

- ``delta_rule_reference``: the recurrence token by token, for tests and decoding.
- ``delta_rule_chunked``: chunks of C tokens. Inside a chunk, with
  Gamma_t = prod_{j<=t} diag(exp(g_j)) and u_t = b_t S_{t-1} (what the
  correction reads), the state is

      S_t = Gamma_t S_0 + sum_{s<=t} Gamma_t Gamma_s^{-1} (a_s^T u_s + k_s^T v_s)

  so the reads solve one unit lower-triangular system per chunk (the UT
  transform of DeltaNet's chunked form, with decay):

      u_t - sum_{s<t} P_ba[t, s] u_s = (b_t Gamma_{t-1}) S_0 + sum_{s<t} P_bk[t, s] v_s
      o_t = (q_t Gamma_t) S_0 + sum_{s<=t} (P_qa[t, s] u_s + P_qk[t, s] v_s)

  where P_xy[t, s] = sum_d x_td y_sd exp(B_td - B_sd) with B the cumulative
  log decay at the reading step (t - 1 for b, t for q): every exponent is
  <= 0 (``decayed_products`` computes them without overflow). Only the
  carry of S from chunk to chunk is sequential.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.kernels.attention import document_starts
from kvlab.kernels.flushed_exp import flushed_exp
from kvlab.kernels.linear_attention import between_graphs, decayed_products, minus_inf_where_hidden
from kvlab.kernels.precision import compute_dtype


def delta_rule_reference(q, k, v, log_decay, a, b, *, state=None, doc_ids=None, chunk_size=None):
    """o [B, H, T, Dv] and the final state [B, H, Dk, Dv], token by token.

    q, k, a, b [B, H, T, Dk]; log_decay [B, H, T, Dk] (or [B, H, T, 1]: one per head, broadcast); v [B, H, T, Dv];
    state [B, H, Dk, Dv] or None (zeros).
    """
    dt, out_dtype = compute_dtype(q.dtype), q.dtype
    B, H, T, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=dt) if state is None else state.to(dt)
    starts = document_starts(doc_ids) if doc_ids is not None else None
    q, k, v, g, a, b = (x.to(dt) for x in (q, k, v, log_decay, a, b))
    outputs = []
    for t in range(T):
        if starts is not None:
            S = S.masked_fill(starts[:, t, None, None, None], 0.0)
        read = b[:, :, t, None, :] @ S  # [B, H, 1, Dv]
        S = g[:, :, t, :, None].exp() * S + a[:, :, t, :, None] * read + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(q[:, :, t, None, :] @ S)
    return torch.cat(outputs, dim=2).to(out_dtype), S


def delta_rule_chunked(q, k, v, log_decay, a, b, *, state=None, doc_ids=None, chunk_size: int = 16):
    """Same contract as ``delta_rule_reference``, in chunks of ``chunk_size`` tokens."""
    dt = compute_dtype(q.dtype)
    out_dtype = q.dtype
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T  # padded tokens write nothing, read nothing and do not decay
    q, k, v, g, a, b = (F.pad(x.to(dt), (0, 0, 0, pad)).view(B, H, N, C, -1) for x in (q, k, v, log_decay, a, b))
    cum = g.cumsum(dim=3)  # B_t: log of Gamma_t, within each chunk
    before = cum - g  # B_{t-1}
    inclusive = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = inclusive.tril(-1)
    carries = None
    end = cum[:, :, :, -1:]  # [B, H, N, 1, Dk]
    if doc_ids is not None:
        starts = F.pad(document_starts(doc_ids), (0, pad)).view(B, 1, N, C)
        segment = starts.cumsum(dim=-1)
        same = segment[..., :, None] == segment[..., None, :]
        inclusive, strict = inclusive & same, strict & same
        carries = (segment == 0)[..., None]  # tokens whose document is the one the carried state belongs to
        in_last = (segment == segment[..., -1:])[..., None]  # only the chunk's last document passes state on
        # exp(-inf) takes a slow path on a CPU (flushed_exp); elsewhere plain exp serves, as RWKV-7's log decays
        # stay above -0.61 a token, and a chunk's far from where exp underflows
        end_weight = flushed_exp((end - cum).add_(minus_inf_where_hidden(in_last, cum.dtype)))
        carry_out = (segment[..., -1:] == 0)[..., None]  # [B, 1, N, 1, 1]
    else:
        end_weight = (end - cum).exp()
        carry_out = None
    P_ba = decayed_products(b, a, before, cum, strict)  # exponents B_{t-1} - B_s
    P_bk = decayed_products(b, k, before, cum, strict)
    P_qa = decayed_products(q, a, cum, cum, inclusive)  # exponents B_t - B_s
    P_qk = decayed_products(q, k, cum, cum, inclusive)
    eye = torch.eye(C, dtype=dt, device=q.device)
    # (I - P_ba) u = b Gamma_{t-1} S_0 + P_bk v: solved once for both right-hand sides
    b_start, q_start = b * before.exp(), q * cum.exp()
    if carries is not None:
        b_start, q_start = b_start * carries, q_start * carries
    solved = torch.linalg.solve_triangular(eye - P_ba, torch.cat([b_start, P_bk @ v], dim=-1), upper=False)
    u_from_state, u_from_chunk = solved.split([Dk, Dv], dim=-1)  # u = u_from_state @ S_0 + u_from_chunk
    out_chunk = P_qa @ u_from_chunk + P_qk @ v
    out_state = q_start + P_qa @ u_from_state  # times S_0
    # Gamma_C Gamma_s^{-1} applied to a_s and k_s: what each token leaves in the chunk's final state
    a_to_end = (a * end_weight).transpose(-1, -2)
    written = (k * end_weight).transpose(-1, -2) @ v  # [B, H, N, Dk, Dv]
    decay_end = end.exp().transpose(-1, -2)  # [B, H, N, Dk, 1]
    if carry_out is not None:
        decay_end = decay_end * carry_out
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state.to(dt)
    outputs = []
    # across chunks: T / C sequential steps (unbind: one backward for all chunks, not one per index)
    per_chunk = (out_chunk, out_state, u_from_state, u_from_chunk, decay_end, a_to_end, written)
    for o_chunk, o_state, u_state, u_chunk, decay, a_end, w in zip(*(t.unbind(2) for t in per_chunk), strict=True):
        outputs.append(o_chunk + o_state @ S)
        u = u_state @ S + u_chunk
        S = decay * S + a_end @ u + w
    out = torch.stack(outputs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return out.to(out_dtype), S


def delta_rule(q, k, v, log_decay, a, b, *, state=None, doc_ids=None, chunk_size: int = 16):
    """The recurrence for one or two tokens (decoding), the chunked form otherwise."""
    if q.shape[2] <= 2:
        return delta_rule_reference(q, k, v, log_decay, a, b, state=state, doc_ids=doc_ids)
    chunked = between_graphs(delta_rule_chunked)
    return chunked(q, k, v, log_decay, a, b, state=state, doc_ids=doc_ids, chunk_size=chunk_size)


# The gated delta rule (gated DeltaNet, Yang et al. 2024): one decay per head and token, the correction read and
# written along the key, a write strength beta:
#
#     S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = q_t S_t,      alpha_t = exp(g_t)
#
# the generalised rule with a = -beta k, b = k exp(g) and the write beta k; its own chunked form (the WY form of
# DeltaNet's chunkwise training, with decay) needs half the products. KDA's rule is the same with a decay per key
# channel, S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T (log_decay [.., Dk]: the products
# below then sum exp(gamma_td - gamma_sd) channel by channel, ``decayed_products``). Inside a chunk, with gamma_t the
# cumulative log decay and d_t = beta_t (v_t - S_{t-1}^T (alpha_t k_t)) what token t writes
# (S_t = Diag(alpha_t) S_{t-1} + k_t d_t^T):
#
#     (I + A) d = beta V - (beta exp(gamma) K) S_0,       A[t, s] = beta_t k_t . (exp(gamma_t - gamma_s) k_s)  (s < t)
#     O = (exp(gamma) Q) S_0 + P d,                        P[t, s] = q_t . (exp(gamma_t - gamma_s) k_s)  (s <= t)
#     S_C = exp(gamma_C) S_0 + (exp(gamma_C - gamma) K)^T d
#
# so d = U - W S_0 with U, W one triangular solve per chunk, and only S's carry is sequential.


def gated_delta_rule_reference(q, k, v, log_decay, beta, *, state=None, doc_ids=None, chunk_size=None):
    """o [B, H, T, Dv] and the final state [B, H, Dk, Dv]: the generalised rule's recurrence, token by token.

    q, k [B, H, T, Dk]; v [B, H, T, Dv]; beta [B, H, T]; log_decay [B, H, T] (one per head) or [B, H, T, Dk] (per key
    channel: KDA); state [B, H, Dk, Dv] or None (zeros)."""
    return delta_rule_reference(q, *as_generalised(k, v, log_decay, beta), state=state, doc_ids=doc_ids)


def as_generalised(k, v, log_decay, beta):
    """The gated rule's arguments as the generalised rule's (k, v, log_decay, a, b): the write beta k, the decay
    [.., 1 or Dk], the correction -beta k read along k exp(g)."""
    g, written = log_decay if log_decay.dim() == 4 else log_decay[..., None], beta[..., None] * k
    return written, v, g, -written, k * g.exp()


def gated_delta_rule_chunked(q, k, v, log_decay, beta, *, state=None, doc_ids=None, chunk_size: int = 64):
    """Same contract as ``gated_delta_rule_reference``, in chunks of ``chunk_size`` tokens (the WY form above)."""
    dt, out_dtype = compute_dtype(q.dtype), q.dtype
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T  # padded tokens write nothing (beta 0), read nothing and do not decay (g 0)

    def chunked(x):  # [B, H, T, D] -> [B, H, N, C, D]
        return F.pad(x.to(dt), (0, 0, 0, pad)).view(B, H, N, C, -1)

    vector = log_decay.dim() == 4  # a decay per key channel (KDA)
    g = chunked(log_decay if vector else log_decay[..., None])
    q, k, v, beta = chunked(q), chunked(k), chunked(v), chunked(beta[..., None])
    gamma = g.cumsum(dim=3)  # [B, H, N, C, 1 or Dk]
    end = gamma[:, :, :, -1:]  # [B, H, N, 1, 1 or Dk]
    inclusive = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    carries = carry_out = None
    to_end = end - gamma  # [B, H, N, C, 1 or Dk]: what the chunk's end keeps of each token's write, in log
    if doc_ids is not None:
        starts = F.pad(document_starts(doc_ids), (0, pad)).view(B, 1, N, C)
        segment = starts.cumsum(dim=-1)  # documents begun so far within the chunk
        inclusive = inclusive & (segment[..., :, None] == segment[..., None, :])
        carries = (segment == 0)[..., None]  # tokens whose document the carried state belongs to
        carry_out = (segment[..., -1:] == 0)[..., None]  # [B, 1, N, 1, 1]: the chunk is one document
        to_end = to_end + minus_inf_where_hidden((segment == segment[..., -1:])[..., None], dt)
    if vector:  # sum_d x_td k_sd exp(gamma_td - gamma_sd), the exponents factored (decayed_products)
        P_kk = decayed_products(k, k, gamma, gamma, inclusive.tril(-1))
        P = decayed_products(q, k, gamma, gamma, inclusive)
    else:  # exp(gamma_t - gamma_s) where s <= t in one document, else 0; every exponent <= 0 (flushed_exp: a
        # CPU's slow paths far below zero, which a hard-forgetting head reaches within a chunk)
        M = flushed_exp((gamma - gamma.transpose(-1, -2)).add_(minus_inf_where_hidden(inclusive, dt)))
        P_kk, P = (k @ k.transpose(-1, -2)) * M.tril(-1), (q @ k.transpose(-1, -2)) * M
    A = beta * P_kk
    decayed = flushed_exp(gamma)  # exp(gamma_t)
    k_state = beta * decayed * k  # what each token's correction reads of the carried state, before the solve
    q_state = q * decayed
    if carries is not None:
        k_state, q_state = k_state * carries, q_state * carries
    eye = torch.eye(C, dtype=dt, device=q.device)
    U, W = torch.linalg.solve_triangular(
        eye + A, torch.cat([beta * v, k_state], dim=-1), upper=False, unitriangular=True
    ).split([Dv, Dk], dim=-1)  # d = U - W S_0
    out_chunk = P @ U  # the chunk's own part
    reads = torch.cat([q_state - P @ W, W], dim=-2)  # [B, H, N, 2C, Dk]: times S_0, the outputs' and d's
    k_end = (k * flushed_exp(to_end)).transpose(-1, -2)  # [B, H, N, Dk, C]
    decay_end = flushed_exp(end).transpose(-1, -2)  # [B, H, N, 1 or Dk, 1]: what S keeps of itself, per key row
    if carry_out is not None:
        decay_end = decay_end * carry_out
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state.to(dt)
    outputs = []
    # across chunks: N sequential steps (unbind: one backward for all chunks, not one per index)
    for o_n, r_n, u_n, k_n, decay_n in zip(
        *(t.unbind(2) for t in (out_chunk, reads, U, k_end, decay_end)), strict=True
    ):
        read = r_n @ S  # [B, H, 2C, Dv]
        outputs.append(o_n + read[..., :C, :])
        S = decay_n * S + k_n @ (u_n - read[..., C:, :])
    out = torch.stack(outputs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return out.to(out_dtype), S


def gated_delta_rule(q, k, v, log_decay, beta, *, state=None, doc_ids=None, chunk_size: int = 64):
    """The recurrence for one or two tokens (decoding), the chunked form otherwise (between compiled graphs with a
    decay per channel: its products read the decays' values, ``decayed_products``)."""
    if q.shape[2] <= 2:
        return gated_delta_rule_reference(q, k, v, log_decay, beta, state=state, doc_ids=doc_ids)
    chunked = between_graphs(gated_delta_rule_chunked) if log_decay.dim() == 4 else gated_delta_rule_chunked
    return chunked(q, k, v, log_decay, beta, state=state, doc_ids=doc_ids, chunk_size=chunk_size)
