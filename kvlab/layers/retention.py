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

``kind: lightning`` is MiniMax-01's lightning attention (MiniMax 2025, "Scaling
Foundation Models with Lightning Attention"; its released code and
`transformers`' MiniMaxLightningAttention), the same recurrence with other
parts around it: no positions, no key scaling, SiLU on the queries, keys and
values (one projection, each head's q, k and v side by side), fixed decays
``gamma_h = exp(-s_h)`` with ALiBi's slopes shrunk with depth,

    s_h = 2^(-8 (h + 1) / H) * (1 - l / (L - 1 + 1e-5) + 1e-5)     (layer l of L)

so the top layer barely decays, then an RMSNorm over all heads' outputs
together (not per head) and a sigmoid output gate:

    out = W_o (sigmoid(x W_g) * RMSNorm(o))
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
from kvlab.layers.norm import RMSNorm
from kvlab.layers.rope import ConstantBuffers, Rotary

DECAYS = ("fixed", "gated")
# MiniMax-01's offsets in its decays' depth schedule (its released code's and transformers' constants)
_LIGHTNING_EPS = 1e-5


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


@dataclass
class LightningConfig(MixerConfig):
    kind = "lightning"
    takes_depth = True  # its decays depend on the layer's depth in the model (n_layers given to the mixer)
    n_heads: int = 4
    head_dim: int | None = None  # channels per head of queries, keys and values; None: d_model // n_heads
    chunk_size: int = 64  # tokens per chunk of the chunked form (speed only: any size gives the same outputs)
    norm_eps: float = 1e-6  # the RMSNorm over the heads' outputs (MiniMax's: 1e-6, whatever the model's norms)

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.n_heads, f"{path}.n_heads", minimum=1)
        check_int(self.head_dim, f"{path}.head_dim", minimum=1, optional=True)
        check_int(self.chunk_size, f"{path}.chunk_size", minimum=1)
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        self.head_dim = default_head_dim(self.head_dim, d_model, self.n_heads, path)


def lightning_log_decays(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """log gamma per head, in float64: minus MiniMax's slope for head h of layer ``layer_idx`` of ``n_layers``."""
    heads = torch.arange(1, n_heads + 1, dtype=torch.float64)
    depth = 1 - layer_idx / (n_layers - 1 + _LIGHTNING_EPS) + _LIGHTNING_EPS
    return -((2.0 ** (-8.0 / n_heads)) ** heads) * depth


@register_mixer
class LightningAttention(ConstantBuffers):
    Config = LightningConfig
    output_projection = "out_proj"

    def __init__(self, cfg: LightningConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int,
                 n_layers: int | None = None):  # fmt: skip
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        n_layers = 1 if n_layers is None else n_layers  # (built alone: a model of one layer)
        if not 0 <= layer_idx < n_layers:
            raise ValueError(f"layer {layer_idx}: mixer kind 'lightning' places its decays by the model's depth, "
                             f"which must exceed it (n_layers={n_layers})")  # fmt: skip
        self.cfg, self.layer_idx, self.n_layers = cfg, layer_idx, n_layers
        H, D = cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim = H, D
        self.in_proj = nn.Linear(d_model, 3 * H * D, bias=False)  # per head: its q, k and v rows side by side
        self.output_gate = nn.Linear(d_model, H * D, bias=False)
        self.norm = RMSNorm(H * D, cfg.norm_eps)
        self.out_proj = nn.Linear(H * D, d_model, bias=False)
        self.register_buffer("log_gamma", torch.empty(H), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if not self.log_gamma.is_meta:
            self.log_gamma.copy_(lightning_log_decays(self.n_heads, self.layer_idx, self.n_layers))

    def forward(self, x, *, cache=None, state: StepState | None = None):
        state = StepState() if state is None else state
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q, k, v = F.silu(self.in_proj(x)).view(B, T, H, 3 * D).transpose(1, 2).split(D, dim=-1)
        log_decay = upcast(self.log_gamma)[None, :, None].expand(B, H, T)
        if state.real is not None:  # a pad writes nothing and does not decay: the state passes it unchanged
            k, log_decay = k * state.real[:, None, :, None], log_decay * state.real[:, None]
        held = cache.state if cache is not None else None
        o, new_state = linear_attention(
            q, k, v, log_decay, state=held, doc_ids=state.doc_ids, chunk_size=self.cfg.chunk_size
        )
        if cache is not None:
            cache.state.copy_(new_state)
        y = self.norm(o.transpose(1, 2).reshape(B, T, H * D))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * y)

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        return StateSlot(
            batch_size, {"state": (self.n_heads, self.head_dim, self.head_dim)}, dtype=dtype, device=device
        )

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        return LayerFootprint(fixed_bytes=self.n_heads * self.head_dim**2 * dtype.itemsize)
