"""Mamba's scans in the layouts of mamba-ssm's kernels, computed as linear attention.

- ``ssd`` (Mamba-2's state-space duality): per head h, with a scalar decay
  exp(dt_t A_h) and a state [N, P]:
      S_t = exp(dt_t A_h) S_{t-1} + B_t^T (dt_t x_t),   y_t = C_t S_t
  x [B, T, H, P], dt [B, T, H] (after softplus), A [H] (negative),
  B and C [B, T, G, N] shared by the H / G heads of each group.
- ``selective_scan`` (Mamba-1): every channel d has its own state [N] and
  a decay per state element, exp(delta_t A_d):
      s_t = exp(delta_t A_d) * s_{t-1} + delta_t B_t u_t,   y_t = C_t . s_t
  u and delta [B, D, T], A [D, N], B and C [B, N, T].

Both are linear attention with decay (``kvlab.kernels.linear_attention``):
q = C, k = B (times dt for Mamba-1), v = dt x (x for Mamba-1), log decay
dt A. ``state`` and the returned final state use linear attention's layout
([B, H, N, P]; [B, D, N, 1]), so caches are the same whichever backend ran.
The skip term D x and the gate are the layer's. The ``torch`` forms call
linear attention through the registry (its chunked form, or its Triton
kernel where that is chosen); the ``_reference`` variants run the
token-by-token recurrence; mamba-ssm's fused kernels are the external
backends (``kvlab.kernels.external``).
"""

from __future__ import annotations

from kvlab.kernels.linear_attention import linear_attention_reference


def _ssd(x, dt, A, B, C, state, doc_ids, scan, **kwargs):
    H, G = x.shape[2], B.shape[2]
    log_decay = (dt * A).transpose(1, 2)  # [B, H, T]
    v = (x * dt[..., None].to(x.dtype)).transpose(1, 2)
    k, q = (t.transpose(1, 2).repeat_interleave(H // G, dim=1) for t in (B, C))
    y, final = scan(q, k, v, log_decay, state=state, doc_ids=doc_ids, **kwargs)
    return y.transpose(1, 2), final


def _dispatched_linear_attention(*args, **kwargs):
    """The registry's linear attention (so a Triton kernel there serves the scans too)."""
    from kvlab.kernels.ops import linear_attention as dispatched  # ops imports this module

    return dispatched(*args, **kwargs)


def ssd(x, dt, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    """y [B, T, H, P] (without the D skip) and the final state [B, H, N, P]."""
    return _ssd(x, dt, A, B, C, state, doc_ids, _dispatched_linear_attention, chunk_size=chunk_size)


def ssd_reference(x, dt, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    return _ssd(x, dt, A, B, C, state, doc_ids, linear_attention_reference)


def _selective_scan(u, delta, A, B, C, state, doc_ids, scan, **kwargs):
    batch, D, T = u.shape
    N = A.shape[1]
    log_decay = delta[..., None] * A[:, None, :]  # [B, D, T, N]
    k = delta[..., None] * B.transpose(1, 2)[:, None]  # [B, D, T, N]
    q = C.transpose(1, 2)[:, None].expand(batch, D, T, N)
    y, final = scan(q, k, u[..., None], log_decay, state=state, doc_ids=doc_ids, **kwargs)
    return y[..., 0], final


def selective_scan(u, delta, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    """y [B, D, T] (without the D skip) and the final state [B, D, N, 1]; float32 inputs."""
    return _selective_scan(u, delta, A, B, C, state, doc_ids, _dispatched_linear_attention, chunk_size=chunk_size)


def selective_scan_reference(u, delta, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    return _selective_scan(u, delta, A, B, C, state, doc_ids, linear_attention_reference)
