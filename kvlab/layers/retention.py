"""Retention: RetNet's multi-scale retention (Sun et al. 2023) and YOCO's gated retention (Sun et al. 2024).

Per head, with queries and keys rotated by their positions (RetNet's
Theta, the same rotation as RoPE) and keys scaled by 1/sqrt(head_dim):

    S_n = gamma_n S_{n-1} + k_n^T v_n,        o_n = q_n S_n
    Y   = GroupNorm(o)                        (one group per head)
    out = W_o (swish(x W_g) * Y)

``decay: fixed`` is RetNet: gamma = 1 - 2^(-5 - h) for head h, a fixed set
of time scales. ``decay: gated`` is YOCO's gated retention:
gamma_n = sigmoid(x_n W_gamma)^(1/gate_temperature), per head and token,
data-dependent. RetNet's extra normalisations of the parallel form (of the
decay matrix and of the retention scores) are left out, as in the chunkwise
and recurrent forms: the group norm after them cancels their scale.

Training and prefill run the chunked kernel, decoding the recurrence; the
cache is the state S, [n_heads, head_dim, v_head_dim] per sequence, whatever
the context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_choice, check_float, check_int
from kvlab.kernels.ops import apply_rope, linear_attention
from kvlab.kernels.precision import upcast
from kvlab.layers.base import (
    LayerFootprint,
    MixerConfig,
    StepState,
    check_reads_own_state,
    default_head_dim,
    register_mixer,
)
from kvlab.layers.kv_cache import StateSlot
from kvlab.layers.rope import ConstantBuffers, Rotary

DECAYS = ("fixed", "gated")


@dataclass
class RetentionConfig(MixerConfig):
    kind = "retention"
    n_heads: int = 4
    head_dim: int | None = None  # query/key channels per head; None: d_model // n_heads
    v_head_dim: int | None = None  # value channels per head; None: head_dim
    decay: str = "fixed"  # fixed (RetNet) | gated (YOCO's gated retention)
    gate_temperature: float = 16.0  # gated: gamma = sigmoid(.)^(1 / gate_temperature), near 1 at init
    rope_theta: float = 10000.0
    chunk_size: int = 64  # tokens per chunk of the chunked form (speed only: any size gives the same outputs)
    norm_eps: float = 1e-5

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.n_heads, f"{path}.n_heads", minimum=1)
        check_int(self.head_dim, f"{path}.head_dim", minimum=2, optional=True)
        check_int(self.v_head_dim, f"{path}.v_head_dim", minimum=1, optional=True)
        check_choice(self.decay, f"{path}.decay", DECAYS)
        check_float(self.gate_temperature, f"{path}.gate_temperature", positive=True)
        check_float(self.rope_theta, f"{path}.rope_theta", positive=True)
        check_int(self.chunk_size, f"{path}.chunk_size", minimum=1)
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        self.head_dim = default_head_dim(self.head_dim, d_model, self.n_heads, path)
        if self.head_dim % 2:
            raise ValueError(f"{path}.head_dim={self.head_dim} must be even (the rotation turns pairs)")
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim


@register_mixer
class Retention(ConstantBuffers):
    Config = RetentionConfig

    def __init__(self, cfg: RetentionConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        H, D, Dv = cfg.n_heads, cfg.head_dim, cfg.v_head_dim
        self.n_heads, self.head_dim, self.v_head_dim = H, D, Dv
        self.q_proj = nn.Linear(d_model, H * D, bias=False)
        self.k_proj = nn.Linear(d_model, H * D, bias=False)
        self.v_proj = nn.Linear(d_model, H * Dv, bias=False)
        self.g_proj = nn.Linear(d_model, H * Dv, bias=False)  # the swish output gate
        self.o_proj = nn.Linear(H * Dv, d_model, bias=False)
        if cfg.decay == "gated":
            self.gamma_proj = nn.Linear(d_model, H, bias=True)
        else:  # RetNet's time scales, not learned
            self.register_buffer("log_gamma", torch.empty(H), persistent=False)
        self.group_norm = nn.GroupNorm(H, H * Dv, eps=cfg.norm_eps)
        self.rotary = Rotary(D, cfg.rope_theta, max_seq_len)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if hasattr(self, "log_gamma") and not self.log_gamma.is_meta:
            heads = torch.arange(self.n_heads, dtype=torch.float64, device=self.log_gamma.device)
            self.log_gamma.copy_(torch.log1p(-(2.0 ** (-5.0 - heads))))

    def forward(self, x, *, cache=None, state: StepState | None = None):
        state = StepState() if state is None else state
        doc_ids = state.doc_ids
        B, T, _ = x.shape
        H, D, Dv = self.n_heads, self.head_dim, self.v_head_dim
        cos, sin = self.rotary(state.start, T, state.positions)
        q = apply_rope(self.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin) / math.sqrt(D)
        v = self.v_proj(x).view(B, T, H, Dv).transpose(1, 2)
        if self.cfg.decay == "gated":
            log_decay = F.logsigmoid(upcast(self.gamma_proj(x))).transpose(1, 2) / self.cfg.gate_temperature
        else:
            log_decay = upcast(self.log_gamma)[None, :, None].expand(B, H, T)
        if state.real is not None:  # a pad writes nothing and does not decay: the state passes it unchanged
            k, log_decay = k * state.real[:, None, :, None], log_decay * state.real[:, None]
        held = cache.state if cache is not None else None  # the recurrent state so far
        chunk = self.cfg.chunk_size
        o, new_state = linear_attention(q, k, v, log_decay, state=held, doc_ids=doc_ids, chunk_size=chunk)
        if cache is not None:
            cache.state.copy_(new_state)
        y = self.group_norm(o.transpose(1, 2).reshape(B * T, H * Dv)).view(B, T, H * Dv)
        return self.o_proj(F.silu(self.g_proj(x)) * y)

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shapes = {"state": (self.n_heads, self.head_dim, self.v_head_dim)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        return LayerFootprint(fixed_bytes=self.n_heads * self.head_dim * self.v_head_dim * dtype.itemsize)
