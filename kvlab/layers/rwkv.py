"""RWKV time mixing: RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch", §4) and RWKV-7 "Goose"
(Peng et al. 2025).

RWKV-6
------

Each token is mixed with the one before it (token shift) by a
data-dependent interpolation, one per projection (ddlerp, eqs. 11-12):

    xx = x_{t-1} - x_t
    m_□ = lambda_□ + tanh((x_t + xx * mu_x) A) B_□            (□ in w, k, v, r, g; a shared LoRA)
    x_□ = x_t + xx * m_□
    r, k, v = x_r W_r, x_k W_k, x_v W_v;   g = silu(x_g W_g)
    d_t = d + tanh(x_w A_d) B_d;   w_t = exp(-exp(d_t))            (a decay per key channel, eq. 14)

and per head (key and value width ``head_dim``), a matrix state with a
bonus u for the token's own key (eqs. 15-16):

    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),     S_t = diag(w_t) S_{t-1} + k_t^T v_t

then a group norm per head, the gate, and the output projection. The state
recurrence is the linear-attention kernel with a vector decay and
exclusive reads (the chunked form trains, the recurrence decodes); the
bonus term is added here. The cache: S per head plus the previous token's
input, whatever the context. RWKV's channel mix is an MLP kind,
``mlp: {kind: rwkv_channel_mix}``.

RWKV-7
------
Static token-shift interpolations x_□ = x_t + (x_{t-1} - x_t) mu_□ for
□ in r, w, k, v, a, g; r, k, v projections; LoRAs for the decay, the
in-context learning rate, the value residual and the gate:

    w_t   = exp(-e^{-0.5} sigmoid(w0 + tanh(x_w W1) W2))        (per key channel, in (0.545, 1))
    a_t   = sigmoid(a0 + x_a A1 A2)                              (in-context learning rate)
    v_t   = v_t + (v_first - v_t) sigmoid(v0 + x_v V1 V2)        (layers above 0; v_first: layer 0's values)
    g_t   = sigmoid(x_g G1) G2
    kappa = normalize(k_t * k_k) per head,    k_t <- k_t * (1 + (a_t - 1) * k_a)

and per head the generalised delta rule, with a vector-valued decay and an
in-context learning rate:

    S_t = diag(w_t) S_{t-1} + (kappa a_t)^T (-kappa S_{t-1}) + k_t^T v_t,     o_t = r_t S_t

then a group norm per head, plus the token's own term ((r_t * k_t * r_k) summed
per head) v_t, times the gate, projected out. The chunked delta-rule kernel
trains it, the recurrence decodes it; the cache: S per head plus the
previous token's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_bool, check_float, check_int
from kvlab.kernels.causal_conv import skipping_pads, token_shift
from kvlab.kernels.ops import delta_rule, linear_attention
from kvlab.kernels.precision import upcast
from kvlab.layers.base import LayerFootprint, MixerConfig, StepState, check_reads_own_state, register_mixer
from kvlab.layers.kv_cache import StateSlot

MIXED = ("w", "k", "v", "r", "g")  # the five token-shift interpolations, in this order


@dataclass
class RWKV6Config(MixerConfig):
    kind = "rwkv6"
    head_dim: int = 64  # key and value width per head; n_heads = d_model / head_dim
    mix_lora_rank: int = 32  # rank of the shared LoRA that makes the interpolations data-dependent
    decay_lora_rank: int = 64  # rank of the LoRA that makes the decay data-dependent
    chunk_size: int = 32  # tokens per chunk of the chunked form (speed only)
    norm_eps: float = 64e-5  # the group norm's (RWKV: 1e-5 * head_size_divisor^2)

    def validate(self, d_model: int, path: str) -> None:
        for name in ("head_dim", "mix_lora_rank", "decay_lora_rank", "chunk_size"):
            check_int(getattr(self, name), f"{path}.{name}", minimum=1)
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        if d_model % self.head_dim:
            raise ValueError(f"d_model={d_model} is not divisible by {path}.head_dim={self.head_dim}")


@register_mixer
class RWKV6(nn.Module):
    Config = RWKV6Config

    def __init__(self, cfg: RWKV6Config, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        self.d_model, self.head_dim, self.n_heads = d_model, cfg.head_dim, d_model // cfg.head_dim
        self.mix_x = nn.Parameter(torch.empty(d_model))  # mu_x
        self.mix_base = nn.Parameter(torch.empty(len(MIXED), d_model))  # lambda_w .. lambda_g
        self.mix_lora_a = nn.Parameter(torch.empty(d_model, len(MIXED) * cfg.mix_lora_rank))
        self.mix_lora_b = nn.Parameter(torch.empty(len(MIXED), cfg.mix_lora_rank, d_model))
        self.decay_base = nn.Parameter(torch.empty(d_model))  # d
        self.decay_lora_a = nn.Parameter(torch.empty(d_model, cfg.decay_lora_rank))
        self.decay_lora_b = nn.Parameter(torch.empty(cfg.decay_lora_rank, d_model))
        self.bonus = nn.Parameter(torch.empty(self.n_heads, self.head_dim))  # u
        self.r_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.group_norm = nn.GroupNorm(self.n_heads, d_model, eps=cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """After RWKV-6's code: mixes at one half, the LoRAs starting near nothing (both factors small
        rather than one zero, so every parameter learns from the first step), decays spread from slow
        to fast over the channels (log w = -exp(d), d from -6 to -1), a bonus of 0.5."""
        if self.mix_x.is_meta:
            return
        nn.init.constant_(self.mix_x, 0.5)
        nn.init.constant_(self.mix_base, 0.5)
        nn.init.uniform_(self.mix_lora_a, -0.01, 0.01)
        nn.init.uniform_(self.mix_lora_b, -0.01, 0.01)
        channel = torch.arange(self.d_model, dtype=torch.float32) / max(self.d_model - 1, 1)
        self.decay_base.copy_(-6 + 5 * channel**0.7)
        nn.init.uniform_(self.decay_lora_a, -0.01, 0.01)
        nn.init.uniform_(self.decay_lora_b, -0.01, 0.01)
        nn.init.constant_(self.bonus, 0.5)

    def forward(self, x, *, cache=None, state: StepState | None = None):
        """``positions`` are not used: the token shift and the decay carry order."""
        state = StepState() if state is None else state
        doc_ids = state.doc_ids
        B, T, C = x.shape
        H, D = self.n_heads, self.head_dim
        prev = cache.prev if cache is not None else None
        before, last = skipping_pads(token_shift, x, prev, state.real, 1, doc_ids=doc_ids)
        xx = before - x
        lora = torch.tanh((x + xx * self.mix_x) @ self.mix_lora_a).view(B, T, len(MIXED), -1)
        mixes = self.mix_base + torch.einsum("btfr,frc->btfc", lora, self.mix_lora_b)  # [B, T, 5, C]
        xw, xk, xv, xr, xg = (x + xx * mixes[:, :, i] for i in range(len(MIXED)))
        r, k, v = (proj(h).view(B, T, H, D).transpose(1, 2) for proj, h in
                   ((self.r_proj, xr), (self.k_proj, xk), (self.v_proj, xv)))  # fmt: skip
        decay = self.decay_base + torch.tanh(xw @ self.decay_lora_a) @ self.decay_lora_b
        log_decay = -upcast(decay).exp().view(B, T, H, D).transpose(1, 2)  # log w_t, per key channel
        if state.real is not None:  # a pad writes nothing and does not decay: the state passes it unchanged
            k, log_decay = k * state.real[:, None, :, None], log_decay * state.real[:, None, :, None]
        held = cache.state if cache is not None else None  # the recurrent state so far
        o, new_state = linear_attention(
            r, k, v, log_decay, state=held, doc_ids=doc_ids, exclusive=True, chunk_size=self.cfg.chunk_size
        )
        o = o + ((r * self.bonus[:, None] * k).sum(-1, keepdim=True) * v)  # the token's own term, with u
        if cache is not None:
            cache.state.copy_(new_state)
            cache.prev.copy_(last)
        y = self.group_norm(o.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
        return self.o_proj(y * F.silu(self.g_proj(xg)))

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shapes = {"state": (self.n_heads, self.head_dim, self.head_dim), "prev": (self.d_model,)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        return LayerFootprint(fixed_bytes=(self.n_heads * self.head_dim**2 + self.d_model) * dtype.itemsize)


RWKV7_MIXED = ("r", "w", "k", "v", "a", "g")


@dataclass
class RWKV7Config(MixerConfig):
    kind = "rwkv7"
    publishes = frozenset({"values"})  # v_first, layer 0's values
    reads = frozenset({"values"})
    head_dim: int = 64  # key and value width per head; n_heads = d_model / head_dim
    decay_lora_rank: int = 64
    lr_lora_rank: int = 64  # the in-context learning rate's LoRA
    value_lora_rank: int = 32  # the value residual's LoRA
    gate_lora_rank: int = 128
    value_residual: bool = True  # layers above 0 mix in layer 0's values (RWKV-7 always does)
    chunk_size: int = 32  # decays >= exp(-0.61) per token: a chunk's total stays factorable (see kernels)
    norm_eps: float = 64e-5

    def validate(self, d_model: int, path: str) -> None:
        for name in ("head_dim", "decay_lora_rank", "lr_lora_rank", "value_lora_rank", "gate_lora_rank", "chunk_size"):
            check_int(getattr(self, name), f"{path}.{name}", minimum=1)
        check_bool(self.value_residual, f"{path}.value_residual")
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        if d_model % self.head_dim:
            raise ValueError(f"d_model={d_model} is not divisible by {path}.head_dim={self.head_dim}")

    def own_reads(self, layer_idx: int) -> tuple[tuple[str, int], ...]:
        return (("values", 0),) if self.value_residual and layer_idx > 0 else ()

    def first_layer_problem(self, first: MixerConfig) -> str | None:
        if not self.value_residual:
            return None
        if not isinstance(first, RWKV7Config) or first.head_dim != self.head_dim:
            got = f"{first.kind} with head_dim={getattr(first, 'head_dim', None)}"  # not the whole config's repr
            return f"rwkv7 with value_residual needs an rwkv7 layer 0 with head_dim={self.head_dim} (got {got})"
        return None


@register_mixer
class RWKV7(nn.Module):
    Config = RWKV7Config

    def __init__(self, cfg: RWKV7Config, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg, self.layer_idx = cfg, layer_idx
        self.d_model, self.head_dim, self.n_heads = d_model, cfg.head_dim, d_model // cfg.head_dim
        self.value_residual = cfg.value_residual and layer_idx > 0
        self.mix = nn.Parameter(torch.empty(len(RWKV7_MIXED), d_model))  # mu_r .. mu_g
        self.r_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.decay_base = nn.Parameter(torch.empty(d_model))  # w0
        self.decay_lora_a = nn.Parameter(torch.empty(d_model, cfg.decay_lora_rank))
        self.decay_lora_b = nn.Parameter(torch.empty(cfg.decay_lora_rank, d_model))
        self.lr_base = nn.Parameter(torch.empty(d_model))  # a0
        self.lr_lora_a = nn.Parameter(torch.empty(d_model, cfg.lr_lora_rank))
        self.lr_lora_b = nn.Parameter(torch.empty(cfg.lr_lora_rank, d_model))
        if self.value_residual:
            self.value_base = nn.Parameter(torch.empty(d_model))  # v0
            self.value_lora_a = nn.Parameter(torch.empty(d_model, cfg.value_lora_rank))
            self.value_lora_b = nn.Parameter(torch.empty(cfg.value_lora_rank, d_model))
        self.gate_lora_a = nn.Parameter(torch.empty(d_model, cfg.gate_lora_rank))
        self.gate_lora_b = nn.Parameter(torch.empty(cfg.gate_lora_rank, d_model))
        self.key_scale = nn.Parameter(torch.empty(d_model))  # k_k: kappa = k * k_k
        self.key_lr_mix = nn.Parameter(torch.empty(d_model))  # k_a
        self.bonus = nn.Parameter(torch.empty(self.n_heads, self.head_dim))  # r_k
        self.group_norm = nn.GroupNorm(self.n_heads, d_model, eps=cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """After RWKV-7's code, simplified: mixes at one half, small LoRAs, decays spread over the
        channels, learning rates and value mixes starting near sigmoid(0) and sigmoid(1)."""
        if self.mix.is_meta:
            return
        nn.init.constant_(self.mix, 0.5)
        channel = torch.arange(self.d_model, dtype=torch.float32) / max(self.d_model - 1, 1)
        self.decay_base.copy_(-7 + 5 * channel**0.85 + 0.5)  # sigmoid(.) from ~0 (slow) to ~0.4
        nn.init.zeros_(self.lr_base)
        if self.value_residual:
            nn.init.ones_(self.value_base)
        for name, param in self.named_parameters(recurse=False):
            if "lora" in name:
                nn.init.uniform_(param, -0.01, 0.01)
        nn.init.constant_(self.key_scale, 0.85)
        nn.init.ones_(self.key_lr_mix)
        nn.init.constant_(self.bonus, -0.04)

    def forward(self, x, *, cache=None, state: StepState | None = None):
        """``positions`` are not used: the token shift and the decay carry order."""
        state = StepState() if state is None else state
        doc_ids = state.doc_ids
        B, T, C = x.shape
        H, D = self.n_heads, self.head_dim
        prev = cache.prev if cache is not None else None
        before, last = skipping_pads(token_shift, x, prev, state.real, 1, doc_ids=doc_ids)
        xr, xw, xk, xv, xa, xg = (x + (before - x) * self.mix[i] for i in range(len(RWKV7_MIXED)))
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        decay = self.decay_base + torch.tanh(xw @ self.decay_lora_a) @ self.decay_lora_b
        log_decay = -math.exp(-0.5) * torch.sigmoid(upcast(decay))  # log w_t
        lr = torch.sigmoid(self.lr_base + (xa @ self.lr_lora_a) @ self.lr_lora_b)
        if self.layer_idx == 0:
            state.publish("values", 0, v)  # v_first, for the layers above
        elif self.value_residual:
            mix = torch.sigmoid(self.value_base + (xv @ self.value_lora_a) @ self.value_lora_b)
            v = v + (state.read("values", 0, self.layer_idx) - v) * mix
        g = torch.sigmoid(xg @ self.gate_lora_a) @ self.gate_lora_b
        kappa = F.normalize((k * self.key_scale).view(B, T, H, D), dim=-1)
        k = k * (1 + (lr - 1) * self.key_lr_mix)

        def heads(t):
            return t.reshape(B, T, H, D).transpose(1, 2)

        # v's heads copied, not a view of the v published above: under trainer.compile the delta rule runs between
        # graphs, so both leave one graph, and torch 2.13's AOT autograd cache rebuilt a view of the other one
        # wrongly (a crash at the first step of any run after the first, with a warm cache)
        r, k, v, lr, kappa = heads(r), heads(k), heads(v).contiguous(), heads(lr), kappa.transpose(1, 2)
        log_decay, a = heads(log_decay), kappa * lr
        if state.real is not None:  # a pad writes nothing, removes nothing, does not decay: the state passes it
            real = state.real[:, None, :, None]
            k, log_decay, a = k * real, log_decay * real, a * real
        held = cache.state if cache is not None else None  # the recurrent state so far
        o, new_state = delta_rule(
            r, k, v, log_decay, a, -kappa, state=held, doc_ids=doc_ids, chunk_size=self.cfg.chunk_size
        )
        if cache is not None:
            cache.state.copy_(new_state)
            cache.prev.copy_(last)
        y = self.group_norm(o.transpose(1, 2).reshape(B * T, C)).view(B, T, C)
        own = ((r * k * self.bonus[:, None]).sum(-1, keepdim=True) * v).transpose(1, 2).reshape(B, T, C)
        return self.o_proj((y + own) * g)

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shapes = {"state": (self.n_heads, self.head_dim, self.head_dim), "prev": (self.d_model,)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        return LayerFootprint(fixed_bytes=(self.n_heads * self.head_dim**2 + self.d_model) * dtype.itemsize)
