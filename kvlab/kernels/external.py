"""Backends from optional packages, used on CUDA when they are installed (the ``cuda`` extra).

- flash-attn 2 (Dao 2023): ``flash_attn_func`` for causal/windowed/full
  attention with grouped K/V heads, ``flash_attn_varlen_func`` for packed
  documents (each document a sequence of its own, cut where ``doc_ids``
  changes), so no mask is ever built.
- mamba-ssm (Gu & Dao): ``mamba_chunk_scan_combined`` for Mamba-2's SSD
  (packed documents through ``seq_idx``, initial and final states) and
  ``selective_scan_fn`` for Mamba-1 (no initial state or documents, so
  prefill/training from empty states only).

They take kvlab's layouts (``kvlab.kernels.attention``/``ssm``) and
convert. What each can run is declared next to its registration in
``kvlab.kernels.ops``.
"""

from __future__ import annotations

import torch

from kvlab.kernels.attention import document_starts


def flash_window(window: int | None) -> tuple[int, int]:
    """kvlab's window counts the query's own token (p - window < k <= p); flash-attn's left size does not."""
    return (-1, -1) if window is None else (window - 1, 0)


def document_boundaries(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, every document of every row, rows flattened) and the longest document."""
    starts = document_starts(doc_ids)
    starts[:, 0] = True
    first = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([doc_ids.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_attention(
    q, k, v, *, mask=None, causal=False, window=None, doc_ids=None, scale=None, softcap=None, sink_logits=None
):
    if sink_logits is not None:  # (the registry checks)
        raise ValueError("flash-attn takes no sink logits")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, H, T, _ = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn: [B, T, heads, D]
    capped = {} if softcap is None else {"softcap": softcap}  # (flash-attn >= 2.6; the registry checks)
    if doc_ids is None:
        out = flash_attn_func(
            q, k, v, softmax_scale=scale, causal=causal or window is not None, window_size=flash_window(window),
            **capped,
        )  # fmt: skip
        return out.transpose(1, 2)
    cu, longest = document_boundaries(doc_ids)
    out = flash_attn_varlen_func(
        *(t.reshape(B * T, *t.shape[2:]) for t in (q, k, v)), cu, cu, longest, longest,
        softmax_scale=scale, causal=True, window_size=flash_window(window), **capped,
    )  # fmt: skip
    return out.view(B, T, H, -1).transpose(1, 2)


def mamba_ssd(x, dt, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    seq_idx = document_starts(doc_ids).cumsum(-1).to(torch.int32) if doc_ids is not None else None
    initial = state.transpose(-1, -2).contiguous() if state is not None else None  # mamba-ssm: [B, H, P, N]
    y, final = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, initial_states=initial, seq_idx=seq_idx, return_final_states=True
    )
    return y, final.transpose(-1, -2).float()


def mamba_selective_scan(u, delta, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    y, final = selective_scan_fn(u, delta, A, B, C, return_last_state=True)
    return y, final.float()[..., None]
