"""The generalised delta rule (diagonal plus low-rank transition): RWKV-7's state update.

Per batch row and head, with a state S of [Dk, Dv]:

    S_t = diag(exp(g_t)) S_{t-1} + a_t^T (b_t S_{t-1}) + k_t^T v_t,      o_t = q_t S_t

g_t <= 0 is a log decay per key channel, or one per head (log_decay [.., 1]);
a_t, b_t [Dk] make the rank-one correction (RWKV-7: a = kappa * lr, b = -kappa,
the delta rule's "replace what the state holds for kappa"; DeltaNet is g = 0,
a = beta k, b = -k, and beta k writes; gated DeltaNet adds one decay per head,
a = exp(g) beta k).
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

    q, k, a, b [B, H, T, Dk]; log_decay [B, H, T, Dk] or [B, H, T, 1]; v [B, H, T, Dv]; state [B, H, Dk, Dv] or
    None (zeros).
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
    # One decay per head (log_decay [.., 1]: gated DeltaNet) may be strong enough to reach exp's slow paths on a CPU
    # (flushed_exp); RWKV-7's per-channel decays stay above -0.61 a token, and plain exp serves them
    exp = flushed_exp if g.shape[-1] == 1 else torch.exp
    if doc_ids is not None:
        starts = F.pad(document_starts(doc_ids), (0, pad)).view(B, 1, N, C)
        segment = starts.cumsum(dim=-1)
        same = segment[..., :, None] == segment[..., None, :]
        inclusive, strict = inclusive & same, strict & same
        carries = (segment == 0)[..., None]  # tokens whose document is the one the carried state belongs to
        in_last = (segment == segment[..., -1:])[..., None]  # only the chunk's last document passes state on
        # exp(-inf) takes a slow path on a CPU (flushed_exp)
        end_weight = flushed_exp((end - cum).add_(minus_inf_where_hidden(in_last, cum.dtype)))
        carry_out = (segment[..., -1:] == 0)[..., None]  # [B, 1, N, 1, 1]
    else:
        end_weight = exp(end - cum)
        carry_out = None
    P_ba = decayed_products(b, a, before, cum, strict)  # exponents B_{t-1} - B_s
    P_bk = decayed_products(b, k, before, cum, strict)
    P_qa = decayed_products(q, a, cum, cum, inclusive)  # exponents B_t - B_s
    P_qk = decayed_products(q, k, cum, cum, inclusive)
    eye = torch.eye(C, dtype=dt, device=q.device)
    # (I - P_ba) u = b Gamma_{t-1} S_0 + P_bk v: solved once for both right-hand sides
    b_start, q_start = b * exp(before), q * exp(cum)
    if carries is not None:
        b_start, q_start = b_start * carries, q_start * carries
    solved = torch.linalg.solve_triangular(eye - P_ba, torch.cat([b_start, P_bk @ v], dim=-1), upper=False)
    u_from_state, u_from_chunk = solved.split([Dk, Dv], dim=-1)  # u = u_from_state @ S_0 + u_from_chunk
    out_chunk = P_qa @ u_from_chunk + P_qk @ v
    out_state = q_start + P_qa @ u_from_state  # times S_0
    # Gamma_C Gamma_s^{-1} applied to a_s and k_s: what each token leaves in the chunk's final state
    a_to_end = (a * end_weight).transpose(-1, -2)
    written = (k * end_weight).transpose(-1, -2) @ v  # [B, H, N, Dk, Dv]
    decay_end = exp(end).transpose(-1, -2)  # [B, H, N, Dk or 1, 1]
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
