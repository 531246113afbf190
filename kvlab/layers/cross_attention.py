"""Attention from one sequence's queries to another's states, and the small bidirectional encoder made of it.

``CrossAttention``: queries from ``x`` [B, T, d], keys and values projected from ``states`` [B, S, d_states]
(an encoder's output: CEPE and XC-Cache's cross-attention, whose K/V projections map the encoder's width up
to the decoder's), every query seeing every state (no causal mask: the states are a context given whole).
With ``rotary``, queries turn at their positions in the decoder and keys at the states' positions 0..S-1, as
XC-Llama's cross-attention does; CEPE's has no positions. ``CrossBlock`` is XC-Llama's cross-attention
block (cross-attention and an MLP, each pre-norm with a residual). ``ContextEncoder`` stacks pre-norm blocks
of this attention over a sequence's own states (bidirectional self-attention) and a SwiGLU MLP: CEPE's
encoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvlab.kernels.ops import apply_rope, attention
from kvlab.layers.mlp import SwiGLU
from kvlab.layers.norm import NormConfig, build_norm
from kvlab.layers.rope import Rotary


class CrossAttention(nn.Module):
    def __init__(
        self, d_model: int, d_states: int, n_heads: int, n_kv_heads: int, head_dim: int, rotary: Rotary | None = None
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_states, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_states, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, states: torch.Tensor, start=0, positions=None) -> torch.Tensor:
        """``x`` [B, T, d_model] (at positions ``start``.. or ``positions`` [B, T], for the rotary) attending to
        ``states`` [B, S, d_states]."""
        B, T, _ = x.shape
        S = states.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(states).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q = apply_rope(q, *self.rotary(start, T, positions))
            k = apply_rope(k, *self.rotary(0, S))
        y = attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class CrossBlock(nn.Module):
    """x + cross(norm(x), states), then x + mlp(norm(x)), the MLP a SwiGLU of 4 x d_model (XC-Llama's)."""

    def __init__(self, d_model: int, d_states: int, n_heads: int, norm: NormConfig, rotary: Rotary | None):
        super().__init__()
        self.cross_norm = build_norm(norm, d_model)
        self.cross = CrossAttention(d_model, d_states, n_heads, n_heads, d_model // n_heads, rotary)
        self.mlp_norm = build_norm(norm, d_model)
        self.mlp = SwiGLU(d_model, 4 * d_model)

    def forward(self, x: torch.Tensor, states: torch.Tensor, start=0, positions=None) -> torch.Tensor:
        x = x + self.cross(self.cross_norm(x), states, start, positions)
        return x + self.mlp(self.mlp_norm(x))


class EncoderLayer(nn.Module):
    """x + attn(norm(x), norm(x)) (bidirectional, RoPE), then x + mlp(norm(x))."""

    def __init__(self, d: int, n_heads: int, hidden: int, norm: NormConfig, rotary: Rotary):
        super().__init__()
        self.attn_norm = build_norm(norm, d)
        self.attn = CrossAttention(d, d, n_heads, n_heads, d // n_heads, rotary)
        self.mlp_norm = build_norm(norm, d)
        self.mlp = SwiGLU(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.mlp_norm(x))


class ContextEncoder(nn.Module):
    """CEPE's encoder: its own token embeddings, ``n_layers`` bidirectional pre-norm layers (positions from 0 in
    every sequence it is given, a chunk), a final norm; its output, [B, T, d], is what decoders cross-attend to."""

    def __init__(self, vocab_size: int, d: int, n_layers: int, n_heads: int, hidden: int, norm: NormConfig,
                 max_len: int):  # fmt: skip
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d)
        rotary = Rotary(d // n_heads, 10000.0, max_len)
        self.layers = nn.ModuleList(EncoderLayer(d, n_heads, hidden, norm, rotary) for _ in range(n_layers))
        self.norm = build_norm(norm, d)

    def forward(self, ids: torch.Tensor, checkpointed: bool = False, compiled=None) -> torch.Tensor:
        """``checkpointed``: each layer's activations recomputed in the backward (the trainer's
        ``activation_checkpointing``; a context is often longer than the rows it serves). ``compiled``: a
        function giving a layer's compiled form (the trainer's ``compile``, as the decoder's blocks)."""
        x = self.embed_tokens(ids)
        for layer in self.layers:
            layer = layer if compiled is None else compiled(layer)
            x = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        return self.norm(x)
