"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

Per value head h, with a state S [Dk, Dv] (the paper's S^T), the gated delta rule:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

alpha_t = exp(g_t) in (0, 1] forgets (Mamba-2's gate: g_t = -exp(A_log) softplus(a_t + dt_bias), one per head
and token), beta_t = sigmoid(b_t) in (0, 1) writes: the state's answer for k_t moves a fraction beta_t of the
way to v_t. q, k, v and z come from one projection (b and a from another); q, k and v each pass a short
causal depthwise convolution and SiLU (no bias, as the paper's code and Qwen3-Next have it); q and k are
L2-normalised per head, q scaled by Dk^-1/2. ``n_qk_heads`` < ``n_heads`` shares each query/key head among
n_heads / n_qk_heads consecutive value heads (Qwen3-Next's 16 key heads for 32 value heads). The output
is RMS-normalised per head, weighted, gated by silu(z) with z a projection of the input (``output_gate``;
the norm alone without it), and projected back.
Initialisation as the paper's code: A uniform in [0.01, 16] (its lower bound 0 is kept off log 0, as
`transformers` does; KDA's [1, 16]), dt log-uniform in [dt_min, dt_max] through dt_bias.

Kimi Delta Attention (KDA; Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture") is
the same layer with a decay per key channel, ``decay: channel``:

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T

alpha_t = exp(-exp(A_log_h) softplus(W_b W_a x_t + dt_bias)) [Dk] from a low-rank projection (``decay_rank``,
its head_dim; one dt_bias per channel, one A_log per head), and its output gate low-rank too (``gate_rank``)
and a sigmoid (``gate_activation: sigmoid``) where gated DeltaNet's is silu.

Both rules run on ``kvlab.kernels.ops.gated_delta_rule``: chunked in its WY form (training, prefill; a decay per
channel through ``decayed_products``), the recurrence decoding (the generalised delta rule's, RWKV-7's: correction
-beta k read along k exp(g), write beta k). A left pad's beta and g are zero, so the state passes it
unchanged; packed documents start from an empty state. The cache is fixed: per sequence the states
(n_heads x Dk x Dv) and the convolution's last ``conv_kernel - 1`` inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_bool, check_choice, check_float, check_int
from kvlab.kernels.causal_conv import skipping_pads
from kvlab.kernels.ops import causal_conv1d, gated_delta_rule
from kvlab.kernels.precision import upcast
from kvlab.layers.base import LayerFootprint, MixerConfig, StepState, check_reads_own_state, register_mixer
from kvlab.layers.kv_cache import StateSlot
from kvlab.layers.mamba import init_depthwise_conv, init_step_bias

L2_NORM_EPS = 1e-6  # inside the square root, as the paper's code (fla's l2norm) and transformers' Qwen3-Next
DECAYS = ("head", "channel")  # one decay per head and token (gated DeltaNet), or per key channel (KDA)
GATE_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}


@dataclass
class GatedDeltaNetConfig(MixerConfig):
    kind = "gated_deltanet"
    n_heads: int = 4  # value heads: one state each
    n_qk_heads: int | None = None  # query/key heads, each read by n_heads / n_qk_heads value heads; None: n_heads
    head_dim: int | None = None  # Dk, query and key width per head; None: d_model // n_heads
    value_head_dim: int | None = None  # Dv; None: head_dim (the paper's expand_v 2: twice head_dim)
    conv_kernel: int = 4
    output_gate: bool = True  # the output's silu(z) gate (the paper's code: use_gate)
    gate_activation: str = "silu"  # silu | sigmoid (KDA's)
    gate_rank: int | None = None  # the gate's projection through this rank (KDA's: its head_dim); None: full
    decay: str = "head"  # head: one per head and token (gated DeltaNet) | channel: per key channel (KDA)
    decay_rank: int | None = None  # decay channel: the decay's projection through this rank; None: head_dim
    chunk_size: int = 32  # tokens per chunk of the chunked form (speed only: on a CPU 32 ran x1.1-1.2 faster than 64)
    dt_min: float = 0.001
    dt_max: float = 0.1
    norm_eps: float = 1e-5
    # beta = 2 sigmoid(b): I - beta k k^T's eigenvalue along k in (-1, 1), not (0, 1) (Grazzi et al. 2025, "Unlocking
    # State-Tracking in Linear RNNs Through Negative Eigenvalues"; OLMo Hybrid's allow_neg_eigval)
    negative_eigenvalues: bool = False

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.n_heads, f"{path}.n_heads", minimum=1)
        check_bool(self.negative_eigenvalues, f"{path}.negative_eigenvalues")
        for name in ("n_qk_heads", "head_dim", "value_head_dim"):
            check_int(getattr(self, name), f"{path}.{name}", minimum=1, optional=True)
        check_int(self.conv_kernel, f"{path}.conv_kernel", minimum=1)
        check_int(self.chunk_size, f"{path}.chunk_size", minimum=1)
        check_bool(self.output_gate, f"{path}.output_gate")
        check_choice(self.gate_activation, f"{path}.gate_activation", GATE_ACTIVATIONS)
        check_choice(self.decay, f"{path}.decay", DECAYS)
        for name in ("gate_rank", "decay_rank"):
            check_int(getattr(self, name), f"{path}.{name}", minimum=1, optional=True)
        if self.gate_rank is not None and not self.output_gate:
            raise ValueError(f"{path}.gate_rank={self.gate_rank} without {path}.output_gate: there is no gate")
        if self.decay_rank is not None and self.decay != "channel":
            raise ValueError(f"{path}.decay_rank={self.decay_rank} projects a decay per channel: set "
                             f"{path}.decay: channel, or decay_rank: null")  # fmt: skip
        check_float(self.dt_min, f"{path}.dt_min", positive=True)
        check_float(self.dt_max, f"{path}.dt_max", positive=True)
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        if self.dt_min > self.dt_max:
            raise ValueError(f"{path}.dt_min={self.dt_min} must be at most {path}.dt_max={self.dt_max}")
        if self.n_qk_heads is None:
            self.n_qk_heads = self.n_heads
        if self.n_heads % self.n_qk_heads:
            raise ValueError(f"{path}.n_heads={self.n_heads} is not divisible by {path}.n_qk_heads={self.n_qk_heads}: "
                             "each query/key head serves an equal group of value heads")  # fmt: skip
        if self.head_dim is None:
            if d_model % self.n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by {path}.n_heads={self.n_heads}; "
                                 f"set {path}.head_dim")  # fmt: skip
            self.head_dim = d_model // self.n_heads
        if self.value_head_dim is None:
            self.value_head_dim = self.head_dim
        if self.decay == "channel" and self.decay_rank is None:
            self.decay_rank = self.head_dim


@register_mixer
class GatedDeltaNet(nn.Module):
    Config = GatedDeltaNetConfig
    output_projection = "out_proj"
    takes_last_only = True  # forward's ``last_only``: the last position's output alone (``Block``)

    def __init__(self, cfg: GatedDeltaNetConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        self.key_dim = cfg.n_qk_heads * cfg.head_dim
        self.value_dim = cfg.n_heads * cfg.value_head_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim  # q, k, v
        self.gate_width = self.value_dim if cfg.output_gate and cfg.gate_rank is None else 0  # z in in_proj
        self.in_proj = nn.Linear(d_model, self.conv_dim + self.gate_width, bias=False)  # q, k, v, z
        # per value head, b (beta's logit) and, one decay per head, a (the decay's step): apart, as Qwen3-Next's
        per_head = 2 if cfg.decay == "head" else 1
        self.beta_decay_proj = nn.Linear(d_model, per_head * cfg.n_heads, bias=False)
        if cfg.decay == "channel":  # KDA's: the steps of every key channel through a low rank
            self.decay_down = nn.Linear(d_model, cfg.decay_rank, bias=False)
            self.decay_up = nn.Linear(cfg.decay_rank, self.key_dim, bias=False)
        if cfg.gate_rank is not None:
            self.gate_down = nn.Linear(d_model, cfg.gate_rank, bias=False)
            self.gate_up = nn.Linear(cfg.gate_rank, self.value_dim, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.conv_kernel))
        self.dt_bias = nn.Parameter(torch.empty(cfg.n_heads if cfg.decay == "head" else self.key_dim))
        self.A_log = nn.Parameter(torch.empty(cfg.n_heads))
        self.norm_weight = nn.Parameter(torch.empty(cfg.value_head_dim))
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.A_log.is_meta:
            return
        init_depthwise_conv(self.conv_weight)
        init_step_bias(self.dt_bias, self.cfg.dt_min, self.cfg.dt_max)
        low = 0.01 if self.cfg.decay == "head" else 1.0  # KDA's code (fla's): A in [1, 16]
        self.A_log.copy_(torch.empty(self.cfg.n_heads).uniform_(low, 16).log())
        self.norm_weight.fill_(1.0)

    def forward(self, x, *, cache=None, state: StepState | None = None, last_only: bool = False):
        """``positions`` are not used: the convolution and the decay carry order."""
        state = StepState() if state is None else state
        c = self.cfg
        B, T, _ = x.shape
        H, Hqk, Dk, Dv = c.n_heads, c.n_qk_heads, c.head_dim, c.value_head_dim
        qkv, z = self.in_proj(x).split([self.conv_dim, self.gate_width], dim=-1)
        if c.decay == "head":
            b, a = self.beta_decay_proj(x).split([H, H], dim=-1)
        else:  # [B, T, H * Dk]
            b, a = self.beta_decay_proj(x), self.decay_up(self.decay_down(x))
        qkv, conv_state = skipping_pads(
            causal_conv1d, qkv, cache.conv if cache is not None else None, state.real, c.conv_kernel - 1,
            weight=self.conv_weight, doc_ids=state.doc_ids,
        )  # fmt: skip
        q, k, v = F.silu(qkv).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)

        def heads(t, n):  # [B, T, n * D] -> [B, H, T, D], a query/key head repeated for each of its value heads
            t = t.unflatten(-1, (n, -1)).transpose(1, 2)
            return t.repeat_interleave(H // n, dim=1) if n != H else t

        q, k = (upcast(heads(t, Hqk)) for t in (q, k))
        q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + L2_NORM_EPS) * Dk**-0.5
        k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + L2_NORM_EPS)
        beta = torch.sigmoid(upcast(b)).transpose(1, 2)  # [B, H, T]
        if c.negative_eigenvalues:
            beta = beta * 2
        step = F.softplus(upcast(a) + upcast(self.dt_bias))  # [B, T, H] or [B, T, H * Dk]
        if c.decay == "head":
            g = (-upcast(self.A_log).exp() * step).transpose(1, 2)  # [B, H, T]
        else:
            g = (-upcast(self.A_log).exp()[:, None] * step.unflatten(-1, (H, Dk))).transpose(1, 2)  # [B, H, T, Dk]
        if state.real is not None:  # a pad writes nothing, removes nothing, does not decay: the state passes it
            real = state.real[:, None, :]
            beta, g = beta * real, g * (real if c.decay == "head" else real[..., None])
        o, new_state = gated_delta_rule(
            q, k, upcast(heads(v, H)), g, beta,
            state=cache.state if cache is not None else None, doc_ids=state.doc_ids, chunk_size=c.chunk_size,
        )  # fmt: skip
        if cache is not None:
            cache.state.copy_(new_state)
            cache.conv.copy_(conv_state)
        o = o.transpose(1, 2)  # [B, T, H, Dv]
        if last_only:
            o, z, x, T = o[:, -1:], z[:, -1:], x[:, -1:], 1
        if c.gate_rank is not None:  # (after last_only: a prefill's top layer projects its last position alone)
            z = self.gate_up(self.gate_down(x))
        o = F.rms_norm(o, (Dv,), eps=c.norm_eps) * upcast(self.norm_weight)
        if c.output_gate:
            o = o * GATE_ACTIVATIONS[c.gate_activation](upcast(z)).unflatten(-1, (H, Dv))
        return self.out_proj(o.reshape(B, T, self.value_dim).to(x.dtype))

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        c = self.cfg
        shapes = {"state": (c.n_heads, c.head_dim, c.value_head_dim), "conv": (c.conv_kernel - 1, self.conv_dim)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        c = self.cfg
        elements = c.n_heads * c.head_dim * c.value_head_dim + (c.conv_kernel - 1) * self.conv_dim
        return LayerFootprint(fixed_bytes=elements * dtype.itemsize)
