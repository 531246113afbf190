"""Infini-attention: Munkhdalai, Faruqui & Gopal 2024, "Leave No Context Behind".

The sequence is cut into segments of ``segment_len`` tokens. Within a
segment, queries attend causally to the segment's own keys (softmax,
"local" attention, with RoPE). Everything before the segment lives in a
compressive memory per K/V head, M (d_k x d_v) and z (d_k), read with the
segment's queries and updated with its keys and values once it ends
(sigma = ELU + 1, eqs. 3-6):

    A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})
    linear:     M_s = M_{s-1} + sigma(K)^T V
    delta:      M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
                z_s = z_{s-1} + sum_t sigma(K_t)
    A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_local          (beta: one per head)

Memory reads and writes use the keys and queries before RoPE; local
attention rotates them by their positions within the segment, so the
context is not bounded by a RoPE table. The cache is fixed: the memory plus
one segment of local K/V, whatever the context length. Training, prefill and decoding run the same segment loop,
so any split of a sequence into calls gives the same outputs; packed
documents each start their own segments and memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_choice, check_float, check_int
from kvlab.kernels.attention import position_mask
from kvlab.kernels.ops import apply_rope, attention
from kvlab.kernels.precision import compute_dtype, upcast
from kvlab.layers.base import (
    LayerFootprint,
    MixerConfig,
    StepState,
    check_reads_own_state,
    default_head_dim,
    per_document,
    register_mixer,
)
from kvlab.layers.kv_cache import reorder_rows
from kvlab.layers.rope import Rotary

UPDATES = ("delta", "linear")
EPS = 1e-6  # keeps the first segment's read of the empty memory at 0 rather than 0/0


@dataclass
class InfiniConfig(MixerConfig):
    kind = "infini"
    takes_pads = False  # segments count from a row's first token
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads; memories are per K/V head
    head_dim: int | None = None  # None: d_model // n_heads
    segment_len: int = 64
    update: str = "delta"  # delta | linear memory update
    rope_theta: float = 10000.0

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.n_heads, f"{path}.n_heads", minimum=1)
        check_int(self.n_kv_heads, f"{path}.n_kv_heads", minimum=1, optional=True)
        check_int(self.head_dim, f"{path}.head_dim", minimum=2, optional=True)
        check_int(self.segment_len, f"{path}.segment_len", minimum=1)
        check_choice(self.update, f"{path}.update", UPDATES)
        check_float(self.rope_theta, f"{path}.rope_theta", positive=True)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{path}.n_heads={self.n_heads} is not divisible by {path}.n_kv_heads={self.n_kv_heads}")
        self.head_dim = default_head_dim(self.head_dim, d_model, self.n_heads, path)
        if self.head_dim % 2:
            raise ValueError(f"{path}.head_dim={self.head_dim} must be even (RoPE rotates pairs)")


class InfiniState:
    """One sequence batch's memory (M, z) and the K/V of its current, unfinished segment."""

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, segment_len: int, *, dtype, device):
        self.memory = torch.zeros(batch_size, n_kv_heads, head_dim, head_dim, dtype=dtype, device=device)
        self.norm = torch.zeros(batch_size, n_kv_heads, head_dim, dtype=dtype, device=device)
        # keys (before RoPE) and values of the current segment
        self.k = torch.zeros(batch_size, n_kv_heads, segment_len, head_dim, dtype=dtype, device=device)
        # the current segment's tokens sit in its first position % segment_len places (the step's start says)
        self.v = torch.zeros_like(self.k)

    def tensors(self) -> list[torch.Tensor]:
        return [self.memory, self.norm, self.k, self.v]

    def nbytes(self, seen: int = 0) -> int:
        return sum(t.nbytes for t in self.tensors())  # fixed: allocated once for the sequence

    def allocated_bytes(self) -> int:
        return self.nbytes()

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows(self.tensors(), batch_idx)

    def reset(self) -> None:
        self.memory.zero_()
        self.norm.zero_()


@register_mixer
class InfiniAttention(nn.Module):
    Config = InfiniConfig

    def __init__(self, cfg: InfiniConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d_model, bias=False)
        self.beta = nn.Parameter(torch.zeros(cfg.n_heads))  # gate logits: start as an even mix
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.segment_len)  # positions within a segment

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.beta)

    # -- forward ------------------------------------------------------------

    def forward(self, x, *, cache=None, state: StepState | None = None):
        """``positions`` are not used: local attention needs only positions within segments."""
        state = StepState() if state is None else state
        doc_ids = state.doc_ids
        B, T, _ = x.shape
        if doc_ids is not None:  # each document starts its own segments and memory
            return per_document(self, x, doc_ids)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        N, outputs = self.cfg.segment_len, []
        if cache is None:  # training: whole segments, the memory carried as plain tensors (autograd sees it all)
            memory = k.new_zeros(B, self.n_kv_heads, self.head_dim, self.head_dim, dtype=compute_dtype(k.dtype))
            norm = k.new_zeros(B, self.n_kv_heads, self.head_dim, dtype=compute_dtype(k.dtype))
            for t in range(0, T, N):
                seg = slice(t, t + N)
                outputs.append(self._attend(q[:, :, seg], k[:, :, seg], v[:, :, seg], 0, memory, norm))
                if t + N <= T:
                    memory, norm = self._written(k[:, :, seg], v[:, :, seg], memory, norm)
        elif isinstance(state.start, torch.Tensor):  # the compiled decode step: by index and mask
            outputs.append(self._decoded(q, k, v, cache, state.start))
        else:  # inference: the current segment's K/V and the memory live in the cache slot
            t = 0
            while t < T:  # the tokens up to the end of the current segment, then the next ...
                held = (state.start + t) % N  # tokens of the current segment
                n = min(T - t, N - held)
                cache.k[:, :, held : held + n] = k[:, :, t : t + n].to(cache.k.dtype)
                cache.v[:, :, held : held + n] = v[:, :, t : t + n].to(cache.v.dtype)
                end = held + n
                seg_k, seg_v = cache.k[:, :, :end].to(q.dtype), cache.v[:, :, :end].to(q.dtype)
                outputs.append(self._attend(q[:, :, t : t + n], seg_k, seg_v, held, cache.memory, cache.norm))
                if end == N:
                    memory, norm = self._written(seg_k, seg_v, cache.memory, cache.norm)
                    cache.memory.copy_(memory)
                    cache.norm.copy_(norm)
                t += n
        y = torch.cat(outputs, dim=2)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _decoded(self, q, k, v, cache, start: torch.Tensor) -> torch.Tensor:
        """One token at a tensor ``start``: the whole segment buffer with its unwritten places masked, and the
        memory written when the segment completes, selected rather than branched on."""
        if q.shape[2] != 1:
            raise ValueError(f"a tensor start decodes one token at a time, got {q.shape[2]}")
        N = self.cfg.segment_len
        held = start % N
        cache.k.index_copy_(2, held.view(1), k.to(cache.k.dtype))
        cache.v.index_copy_(2, held.view(1), v.to(cache.v.dtype))
        seg_k, seg_v = cache.k.to(q.dtype), cache.v.to(q.dtype)
        out = self._attend(q, seg_k, seg_v, held, cache.memory, cache.norm)
        memory, norm = self._written(seg_k, seg_v, cache.memory, cache.norm)
        complete = held == N - 1
        cache.memory.copy_(torch.where(complete, memory.to(cache.memory.dtype), cache.memory))
        cache.norm.copy_(torch.where(complete, norm.to(cache.norm.dtype), cache.norm))
        return out

    def _attend(self, q, seg_k, seg_v, held: int | torch.Tensor, memory, norm) -> torch.Tensor:
        """Outputs of the queries at segment positions held.. over the segment's first keys
        (``seg_k`` before RoPE) and the memory of the segments before. A tensor ``held``: the keys are the
        whole segment buffer, those after the queries not yet written (masked)."""
        end = seg_k.shape[2]
        cos, sin = self.rotary(0, end)
        scale = 1 / math.sqrt(self.head_dim)
        pos = torch.arange(end, device=q.device)
        q_pos = held + pos[: q.shape[2]]  # the queries' places in the segment
        q_rot, k_rot = apply_rope(q, cos[q_pos], sin[q_pos]), apply_rope(seg_k, cos, sin)
        if isinstance(held, int) and held == 0:
            local = attention(q_rot, k_rot, seg_v, causal=True, scale=scale)
        else:
            local = attention(q_rot, k_rot, seg_v, mask=position_mask(q_pos, pos), scale=scale)
        groups = self.n_heads // self.n_kv_heads
        sq = (F.elu(upcast(q)) + 1).unflatten(1, (self.n_kv_heads, groups))  # [B, Hkv, groups, n, D]
        recalled = (sq @ upcast(memory)[:, :, None]) / (sq @ upcast(norm)[:, :, None, :, None] + EPS)
        gate = torch.sigmoid(self.beta).view(1, -1, 1, 1)
        return gate * recalled.flatten(1, 2).to(q.dtype) + (1 - gate) * local

    def _written(self, seg_k, seg_v, memory, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory (M, z) after a whole segment, from its keys (before RoPE) and values."""
        sk, v = F.elu(upcast(seg_k)) + 1, upcast(seg_v)  # [B, Hkv, N, D]
        memory, norm = upcast(memory), upcast(norm)
        if self.cfg.update == "delta":  # store only what the memory does not already return
            v = v - (sk @ memory) / (sk @ norm[..., None] + EPS)
        return memory + sk.transpose(-1, -2) @ v, norm + sk.sum(dim=2)

    # -- cache and footprint -------------------------------------------------

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        return InfiniState(batch_size, self.n_kv_heads, self.head_dim, self.cfg.segment_len, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        H, D, N = self.n_kv_heads, self.head_dim, self.cfg.segment_len
        elements = H * D * D + H * D + 2 * H * N * D  # memory, z, one segment of keys and values
        return LayerFootprint(fixed_bytes=elements * dtype.itemsize)
