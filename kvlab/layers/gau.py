"""Gated attention unit with FLASH's mixed chunk attention (Hua et al. 2022, "Transformer Quality in
Linear Time", §2-3).

One projection of x, through SiLU, gives the gate U and the values V
(``expand * d_model`` wide each) and a shared base Z (``qk_dim``); four cheap
per-dimension scale-and-offset transforms of Z, rotated by position (RoPE),
give the queries and keys of the two attention parts:

    U, V, Z = split(silu(x W))
    quad_q, quad_k, lin_q, lin_k = Z * gamma_i + beta_i, then RoPE
    local  (inside each chunk of C tokens):   relu(quad_q quad_k^T)^2 / C  V      (causal)
    global (over the chunks before):          lin_q  sum_{earlier chunks} lin_k^T V / C
    out = W_o (U * (local + global))

The gate replaces softmax's normalisation and the MLP: a GAU layer carries
an MLP's weight, so GAU models stack about twice as many layers with
``mlp: {kind: none}``. With one chunk covering the whole context it is the
plain GAU. Scales are constants (1/C, not the paper's 1/n over the whole
sequence), so a token's output never depends on how long the sequence will
be, which decoding needs.

The cache is fixed: the base Z and the values of the current chunk, and the
state sum lin_k^T V of every token so far, whatever the context. A token's
global part reads only the chunks before its own, so the terms of its
chunk's earlier tokens, which the state holds, come off its linear scores:
a decode step adds its own token's outer product to the state, rather than
folding in a whole chunk when it completes (which a static-shape step
would compute at every token, and weight by whether the chunk is complete).
Training, prefill and decoding cut the same chunks from each document's
start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_float, check_int
from kvlab.kernels.ops import apply_rope
from kvlab.layers.base import (
    LayerFootprint,
    MixerConfig,
    StepState,
    check_reads_own_state,
    per_document,
    register_mixer,
)
from kvlab.layers.kv_cache import StateSlot
from kvlab.layers.rope import Rotary

PARTS = ("quad_q", "quad_k", "lin_q", "lin_k")


@dataclass
class GAUConfig(MixerConfig):
    kind = "gau"
    takes_pads = False  # chunks count from a row's first token
    expand: int = 2  # e = expand * d_model: the width of U and V
    qk_dim: int = 128  # s: the width of the shared base Z, queries and keys
    chunk_size: int = 256  # FLASH's chunk: quadratic inside, linear across
    rope_theta: float = 10000.0

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.expand, f"{path}.expand", minimum=1)
        check_int(self.qk_dim, f"{path}.qk_dim", minimum=2)
        check_int(self.chunk_size, f"{path}.chunk_size", minimum=1)
        check_float(self.rope_theta, f"{path}.rope_theta", positive=True)
        if self.qk_dim % 2:
            raise ValueError(f"{path}.qk_dim={self.qk_dim} must be even (RoPE rotates pairs)")


@register_mixer
class GAU(nn.Module):
    Config = GAUConfig

    def __init__(self, cfg: GAUConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        self.e, self.s, self.C = cfg.expand * d_model, cfg.qk_dim, cfg.chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.e + self.s, bias=True)  # U, V, Z
        self.scale = nn.Parameter(torch.empty(len(PARTS), self.s))  # gamma per part
        self.offset = nn.Parameter(torch.empty(len(PARTS), self.s))  # beta per part
        self.o_proj = nn.Linear(self.e, d_model, bias=True)
        self.rotary = Rotary(self.s, cfg.rope_theta, max_seq_len)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if not self.scale.is_meta:
            nn.init.normal_(self.scale, mean=1.0, std=0.02)  # each part starts as Z, slightly apart
            nn.init.zeros_(self.offset)

    def _project(self, x):
        u, v, z = F.silu(self.in_proj(x)).split([self.e, self.e, self.s], dim=-1)
        return u, v, z

    def _parts(self, z, cos, sin):
        """quad_q, quad_k, lin_q, lin_k of the base z [B, T, s], rotated at the angles cos/sin."""
        parts = z[:, None] * self.scale[None, :, None] + self.offset[None, :, None]  # [B, 4, T, s]
        return apply_rope(parts, cos, sin).unbind(1)

    def forward(self, x, *, cache=None, state: StepState | None = None):
        """``positions`` are not used: chunks and RoPE count from each document's start."""
        state = StepState() if state is None else state
        doc_ids = state.doc_ids
        if doc_ids is not None:  # each document cuts its own chunks from its start
            return per_document(self, x, doc_ids)
        if cache is not None and isinstance(state.start, torch.Tensor):
            return self._decoded(x, cache, state.start)
        if cache is not None:
            return self._cached(x, cache, state.start)
        B, T, _ = x.shape
        C, N = self.C, -(-T // self.C)
        u, v, z = self._project(x)
        cos, sin = self.rotary(0, T)
        quad_q, quad_k, lin_q, lin_k = (F.pad(p, (0, 0, 0, N * C - T)).view(B, N, C, self.s)
                                        for p in self._parts(z, cos, sin))  # fmt: skip
        v = F.pad(v, (0, 0, 0, N * C - T)).view(B, N, C, self.e)
        causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
        local = (F.relu(quad_q @ quad_k.transpose(-1, -2)).square() * causal / C) @ v
        per_chunk = lin_k.transpose(-1, -2) @ v  # [B, N, s, e]
        before = per_chunk.cumsum(dim=1) - per_chunk  # the chunks before each
        y = (local + lin_q @ before / C).reshape(B, N * C, self.e)[:, :T]
        return self.o_proj(u * y)

    def _cached(self, x, cache, start: int):
        """Chunk by chunk through the cache from position ``start``: the current chunk's Z and V, and the
        state of every token before."""
        B, T, _ = x.shape
        C = self.C
        u, v, z = self._project(x)
        outputs, t = [], 0
        while t < T:  # the tokens up to the end of the current chunk, then the next ...
            position = start + t
            held, n = position % C, min(T - t, C - position % C)
            cache.z[:, held : held + n] = z[:, t : t + n].to(cache.z.dtype)
            cache.v[:, held : held + n] = v[:, t : t + n].to(cache.v.dtype)
            cos, sin = self.rotary(position - held, held + n)  # from the chunk's first position
            chunk_z, chunk_v = cache.z[:, : held + n].to(z.dtype), cache.v[:, : held + n].to(v.dtype)
            quad_q, quad_k, lin_q, lin_k = self._parts(chunk_z, cos, sin)
            causal = torch.ones(held + n, held + n, dtype=torch.bool, device=x.device).tril()[held:]
            scores = F.relu(quad_q[:, held:] @ quad_k.transpose(-1, -2)).square() * causal
            if held:  # the state holds this chunk's tokens before ``held``: their linear terms come off
                before = torch.arange(held + n, device=x.device) < held
                scores = scores - (lin_q[:, held:] @ lin_k.transpose(-1, -2)) * before
            outputs.append((scores @ chunk_v + lin_q[:, held:] @ cache.state.to(z.dtype)) / C)
            new_k, new_v = lin_k[:, held:], chunk_v[:, held:]
            cache.state.add_((new_k.transpose(-1, -2) @ new_v).to(cache.state.dtype))
            t += n
        return self.o_proj(u * torch.cat(outputs, dim=1))

    def _decoded(self, x, cache, start: torch.Tensor):
        """``_cached`` for one token at a tensor ``start`` (the compiled decode step): the whole chunk buffer,
        its unwritten places masked, so no shape or branch depends on the position."""
        if x.shape[1] != 1:
            raise ValueError(f"a tensor start decodes one token at a time, got {x.shape[1]}")
        C = self.C
        u, v, z = self._project(x)
        held = start % C  # the token's place in its chunk
        cache.z.index_copy_(1, held.view(1), z.to(cache.z.dtype))
        cache.v.index_copy_(1, held.view(1), v.to(cache.v.dtype))
        places = torch.arange(C, device=x.device)
        # the chunk's positions; past the table only where nothing is written yet (masked below)
        positions = (start - held + places).clamp(max=self.rotary.max_seq_len - 1)
        cos, sin = self.rotary(0, C, positions)
        chunk_z, chunk_v = cache.z.to(z.dtype), cache.v.to(v.dtype)
        quad_q, quad_k, lin_q, lin_k = self._parts(chunk_z, cos, sin)
        quad_q, lin_q = quad_q.index_select(1, held.view(1)), lin_q.index_select(1, held.view(1))
        scores = F.relu(quad_q @ quad_k.transpose(-1, -2)).square() * (places <= held)
        scores = scores - (lin_q @ lin_k.transpose(-1, -2)) * (places < held)  # the chunk's terms in the state
        out = (scores @ chunk_v + lin_q @ cache.state.to(z.dtype)) / C
        new_k, new_v = (part.index_select(1, held.view(1)) for part in (lin_k, chunk_v))  # as the cache holds it
        cache.state.add_((new_k.transpose(-1, -2) * new_v).to(cache.state.dtype))  # this token's outer product
        return self.o_proj(u * out)

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shapes = {"z": (self.C, self.s), "v": (self.C, self.e), "state": (self.s, self.e)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        return LayerFootprint(fixed_bytes=(self.C * (self.s + self.e) + self.s * self.e) * dtype.itemsize)
