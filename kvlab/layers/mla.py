"""Multi-head latent attention (MLA): DeepSeek-V2 (DeepSeek-AI 2024), section 2.1.

Keys and values of every head are decompressed from one small latent per
token, and only the latent is cached (eqs. 9-18, per token t, head i):

    c_t     = RMSNorm(W_DKV h_t)                     kv_lora_rank channels  (9)
    k^C_t,i = W_UK,i c_t,   v_t,i = W_UV,i c_t       head_dim each          (10, 11)
    k^R_t   = RoPE(W_KR h_t)                         rope_head_dim, shared by all heads (14)
    c^Q_t   = RMSNorm(W_DQ h_t) if q_lora_rank else h_t                     (12)
    q^C_t,i = W_UQ,i c^Q_t,   q^R_t,i = RoPE(W_QR,i c^Q_t)                  (13, 15)
    o_t,i   = sum_j softmax_j([q^C; q^R]_t,i . [k^C; k^R]_j / sqrt(head_dim + rope_head_dim)) v_j,i

The cache holds ``[c_t; k^R_t]``: ``kv_lora_rank + rope_head_dim`` elements
per token and layer, whatever the number of heads (DeepSeek-V2: 512 + 64).

Two ways to compute the same attention:
- expanded (training, the first prefill): K/V of every head are
  decompressed and attended to as in MHA;
- absorbed (decoding from a cache): W_UK,i is folded into the query side,
  q_i^T W_UK,i c_j = (W_UK,i^T q_i)^T c_j, and W_UV,i into the output,
  sum_j p_j W_UV,i c_j = W_UV,i sum_j p_j c_j, so every head attends
  straight over the cached latents, one shared K/V head of width
  ``kv_lora_rank + rope_head_dim`` whose values are its first
  ``kv_lora_rank`` channels. Nothing is decompressed per step.

Generalisations, for models converted from MHA/GQA (MHA2MLA, Ji et al.
2025), which keeps a RoPE key per K/V head of the parent: ``rope_kv_heads``
RoPE keys instead of one (query head i uses key i // (n_heads /
rope_kv_heads)); ``rope_spectrum``: each RoPE key head rotates at its own
frequencies, picked from a ``rope_spectrum``-wide rotary's (the parent's
head_dim; see ``HeadwiseRotary``); ``v_head_dim`` apart from ``head_dim``
(the parent's values keep every channel while its keys lose the rotary
ones); ``latent_norm: false`` (the SVD factors reproduce the parent only
without a norm between them). The cache then holds ``kv_lora_rank +
rope_kv_heads * rope_head_dim`` elements per token.

Cross-layer latent sharing (CLA/YOCO over MLA, and the GoldFinch-like
layout: one compressed key cache for every upper layer): a layer whose
``kv_source`` is an earlier MLA layer has no down-projection and no cache;
it reads that layer's latents and decompresses them with its own
up-projections (``kv_b_proj``), attending with its own queries, expanded or
absorbed like the owner. The latent is cached once for all its readers.

Quantized latents (CLLA-quant, Yang et al. 2024, "Lossless KV Cache
Compression to 2%"): with ``latent_bits`` (2, 4 or 8) the cache holds the
compressed latent c_t as integer codes with a scale and a zero point per
``latent_group`` channels (default the whole latent: one pair per token),
asymmetric min-max quantization (``kvlab.kernels.quant``); the RoPE keys stay
in the cache's dtype. The forward pass quantizes and dequantizes c_t the same
way (straight-through gradients), so training sees what decoding reads and
decode equals forward. With cross-layer sharing (``kv_sharing``) this is
CLLA: latents shared across layers, quantized.

Parameter names and layouts are `transformers`' DeepseekV3Attention (with
``rope_interleave: false``): ``q_proj`` (or ``q_a_proj``, ``q_a_layernorm``,
``q_b_proj``) giving per head ``[q^C; q^R]``; ``kv_a_proj_with_mqa`` giving
``[c; k^R]`` before the norm; ``kv_a_layernorm``; ``kv_b_proj`` giving per
head ``[k^C; v]``; ``o_proj``. Export to DeepseekV3 is a renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvlab._config import check_bool, check_choice, check_float, check_int
from kvlab.kernels.attention import position_mask
from kvlab.kernels.ops import absorbed_attention, apply_rope, attention
from kvlab.kernels.quant import BITS, fake_quantize
from kvlab.kernels.rope import check_rope_scaling, yarn_mscale
from kvlab.layers.base import LayerFootprint, MixerConfig, StepState, default_head_dim, register_mixer
from kvlab.layers.kv_cache import KVView, LatentKV, QuantizedLatentKV
from kvlab.layers.norm import RMSNorm
from kvlab.layers.rope import HeadwiseRotary, Rotary

# From this many queries over a filled cache (a chunked prefill, a prompt after earlier turns), keys and values are
# decompressed and attended as in a first prefill: the absorbed form's work grows with queries x positions x
# the latent's width, and it holds every [T, S] score (set by benchmarks/RESULTS.md, "chunked prefill").
EXPANDED_FROM = 64

# In a compiled CPU decode step of a few rows, the absorbed form's two per-head products with W_UK and W_UV are
# elementwise products and sums, which Inductor fuses into one loop each, not batched matrix products: MKL's bmm
# costs 8-12 us at these shapes whatever the work (one row per head). mla's greedy generation at batch 1: x1.018
# to x1.026; at batch 8 x1.002, so no further (benchmarks/RESULTS.md, "The greedy pick inside the graph").
FUSED_ABSORPTION_ROWS = 8


def _fused_absorption(q_nope: torch.Tensor) -> bool:
    """Whether ``_absorbed`` writes its up-projection products as elementwise products and sums."""
    return (
        q_nope.device.type == "cpu"
        and torch.compiler.is_compiling()
        and q_nope.shape[0] * q_nope.shape[2] <= FUSED_ABSORPTION_ROWS
    )


@dataclass
class MLAConfig(MixerConfig):
    kind = "mla"
    publishes = frozenset({"kv"})  # the latents (and RoPE keys) every head decompresses
    reads = frozenset({"kv"})
    n_heads: int = 8
    head_dim: int | None = None  # per head: no-RoPE query/key channels; None: d_model // n_heads
    v_head_dim: int | None = None  # per head: value channels; None: head_dim
    rope_head_dim: int | None = None  # decoupled RoPE channels of queries and the shared key; None: head_dim // 2
    kv_lora_rank: int | None = None  # latent width; None: 4 * head_dim (DeepSeek-V2's 512 for 128)
    q_lora_rank: int | None = None  # None: queries are not compressed
    rope_theta: float = 10000.0
    rope: bool = True  # false: the decoupled channels are not rotated (Kimi Linear's MLA: no positions anywhere)
    # context-extended RoPE of the decoupled channels (kvlab.kernels.rope.scaled_frequencies: DeepSeek-V2/V3's yarn)
    rope_scaling: dict[str, Any] | None = None
    # DeepSeek's fold of YaRN into the softmax scale, times mscale(factor, mscale_all_dim)^2 = (0.1 m ln factor + 1)^2
    # over every channel (its reference code's, and `transformers`'); 0: none
    mscale_all_dim: float = 0.0
    rope_kv_heads: int = 1  # RoPE keys per token; 1: shared by all heads (DeepSeek)
    rope_spectrum: int | None = None  # set: per-RoPE-head frequencies picked from a rotary this wide
    latent_norm: bool = True  # RMSNorm on the latent (DeepSeek); the MHA2MLA conversion has none
    norm_eps: float = 1e-6  # of the latent RMSNorms: DeepSeek-V2/V3's, whatever eps the block norms have
    latent_bits: int | None = None  # CLLA-quant: the cached latent as 2/4/8-bit codes; None: the cache's dtype
    latent_group: int | None = None  # channels per scale and zero point; None: the whole latent

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.n_heads, f"{path}.n_heads", minimum=1)
        check_int(self.head_dim, f"{path}.head_dim", minimum=0, optional=True)
        check_int(self.v_head_dim, f"{path}.v_head_dim", minimum=1, optional=True)
        check_int(self.rope_kv_heads, f"{path}.rope_kv_heads", minimum=1)
        check_int(self.rope_spectrum, f"{path}.rope_spectrum", minimum=2, optional=True)
        check_bool(self.latent_norm, f"{path}.latent_norm")
        check_bool(self.rope, f"{path}.rope")
        check_int(self.rope_head_dim, f"{path}.rope_head_dim", minimum=2, optional=True)
        check_int(self.kv_lora_rank, f"{path}.kv_lora_rank", minimum=1, optional=True)
        check_int(self.q_lora_rank, f"{path}.q_lora_rank", minimum=1, optional=True)
        check_float(self.rope_theta, f"{path}.rope_theta", positive=True)
        check_rope_scaling(self.rope_scaling, f"{path}.rope_scaling")
        check_float(self.mscale_all_dim, f"{path}.mscale_all_dim")
        if self.mscale_all_dim and (self.rope_scaling or {}).get("kind") != "yarn":
            raise ValueError(f"{path}.mscale_all_dim={self.mscale_all_dim} folds YaRN into the softmax scale; it "
                             f"needs rope_scaling of kind yarn (got {self.rope_scaling})")  # fmt: skip
        if self.mscale_all_dim < 0:
            raise ValueError(f"{path}.mscale_all_dim={self.mscale_all_dim} must be at least 0")
        if (self.rope_scaling or {}).get("kind") == "longrope":
            raise ValueError(f"{path}.rope_scaling: longrope (Phi-3's) is not supported on MLA (linear, llama3 "
                             "and yarn are)")  # fmt: skip
        if self.rope_scaling is not None and self.rope_spectrum is not None:
            raise ValueError(f"{path}: rope_scaling with rope_spectrum (per-head frequencies) is not supported")
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        self.head_dim = default_head_dim(self.head_dim, d_model, self.n_heads, path)
        if self.rope_head_dim is None:
            self.rope_head_dim = max(2, self.head_dim // 4 * 2)
        if self.rope_head_dim % 2:
            raise ValueError(f"{path}.rope_head_dim={self.rope_head_dim} must be even (RoPE rotates pairs)")
        check_rope_scaling(self.rope_scaling, f"{path}.rope_scaling", self.rope_head_dim)  # (LongRoPE's factors)
        if self.kv_lora_rank is None:
            self.kv_lora_rank = 4 * self.head_dim
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.n_heads % self.rope_kv_heads:
            raise ValueError(
                f"{path}.n_heads={self.n_heads} is not divisible by {path}.rope_kv_heads={self.rope_kv_heads}"
            )
        if self.latent_bits is not None:
            self._check_latent_quantization(path)
        if self.rope_spectrum is not None and self.rope_spectrum < self.rope_head_dim:
            raise ValueError(
                f"{path}.rope_spectrum={self.rope_spectrum} must be at least rope_head_dim={self.rope_head_dim}"
            )

    def _check_latent_quantization(self, path: str) -> None:
        check_choice(self.latent_bits, f"{path}.latent_bits", BITS)
        check_int(self.latent_group, f"{path}.latent_group", minimum=1, optional=True)
        if self.latent_group is None:
            self.latent_group = self.kv_lora_rank
        if self.kv_lora_rank % self.latent_group:
            raise ValueError(
                f"{path}.latent_group={self.latent_group} must divide kv_lora_rank={self.kv_lora_rank} "
                "(each group of channels has its own scale and zero point)"
            )
        if self.kv_lora_rank * self.latent_bits % 8:
            raise ValueError(
                f"{path}.kv_lora_rank={self.kv_lora_rank} x latent_bits={self.latent_bits} must fill whole bytes "
                "(codes are packed 8 / latent_bits to a byte)"
            )

    def cache_rewritable(self) -> bool:
        return True

    def kv_compatible(self, source: MixerConfig) -> str | None:
        if not isinstance(source, MLAConfig):
            return f"source mixer kind {source.kind!r} has no MLA latent"
        if self.rope_spectrum is not None or source.rope_spectrum is not None:
            return "per-head RoPE frequencies (rope_spectrum) are a layer's own; readers cannot share them"
        for name in ("kv_lora_rank", "rope_head_dim", "rope_kv_heads", "rope_theta", "rope", "rope_scaling",
                     "latent_norm", "latent_bits", "latent_group"):  # fmt: skip
            if getattr(self, name) != getattr(source, name):
                return f"{name}={getattr(self, name)} differs from the source's {name}={getattr(source, name)}"
        return None


@register_mixer
class MLA(nn.Module):
    Config = MLAConfig
    takes_last_only = True  # forward's ``last_only``: the last position's output alone (``Block``)

    def __init__(self, cfg: MLAConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        if kv_source > layer_idx:
            raise ValueError(f"layer {layer_idx}: MLA reads the latents of an earlier layer, not of layer {kv_source}")
        self.cfg = cfg = cfg.resolved(d_model, "mixer")
        self.layer_idx, self.kv_source = layer_idx, kv_source
        self.owns_kv = kv_source == layer_idx
        self.n_heads, self.head_dim, self.v_head_dim = cfg.n_heads, cfg.head_dim, cfg.v_head_dim
        self.rope_head_dim, self.rope_kv_heads = cfg.rope_head_dim, cfg.rope_kv_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = 1.0 / math.sqrt(cfg.head_dim + cfg.rope_head_dim)
        if cfg.mscale_all_dim:  # DeepSeek's YaRN fold (mscale_all_dim's comment)
            self.scale *= yarn_mscale(cfg.rope_scaling["factor"], cfg.mscale_all_dim) ** 2
        q_width = cfg.n_heads * (cfg.head_dim + cfg.rope_head_dim)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_width, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        if self.owns_kv:  # readers take the owner's latents as they are
            self.kv_a_proj_with_mqa = nn.Linear(d_model, cfg.kv_lora_rank + self.latent_rope_width, bias=False)
            self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps) if cfg.latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.v_head_dim, d_model, bias=False)
        if cfg.rope_spectrum is None:
            self.rotary = Rotary(cfg.rope_head_dim, cfg.rope_theta, max_seq_len, cfg.rope_scaling)
        else:
            self.rotary = HeadwiseRotary(cfg.rope_kv_heads, cfg.rope_head_dim, cfg.rope_spectrum, cfg.rope_theta,
                                         max_seq_len)  # fmt: skip

    @property
    def latent_rope_width(self) -> int:
        return self.rope_kv_heads * self.rope_head_dim

    # -- forward ------------------------------------------------------------

    def forward(self, x, *, cache=None, state: StepState | None = None, last_only: bool = False):
        """``last_only``: the output of the last position alone (a prefill's top layer), its query absorbed as
        a decode step's; the latents are still made, cached and published for every position."""
        state = StepState() if state is None else state
        B, T, _ = x.shape
        start = state.start
        H, D, R, G = self.n_heads, self.head_dim, self.rope_head_dim, self.rope_kv_heads
        cos, sin = self.rotary(start, T, state.positions)
        if self.owns_kv:
            c, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, G * R], dim=-1)
            k_rope = k_rope.view(B, T, G, R).transpose(1, 2)
            k_rope = apply_rope(k_rope, cos, sin) if self.cfg.rope else k_rope
            # what is cached: [B, T, kv_lora_rank + G * R]
            latent = torch.cat([self.kv_a_layernorm(c), k_rope.transpose(1, 2).reshape(B, T, G * R)], dim=-1)
            if cache is not None:  # every position so far (a quantized cache gives its latents back dequantized)
                held = cache.update(latent, start)
            elif self.cfg.latent_bits is not None:  # what a quantized cache would give back
                held = self._quantized(latent)
            else:
                held = latent
            state.publish("kv", self.layer_idx, KVView(held, held, start + T))  # for the layers that read them
        else:
            held = state.read("kv", self.kv_source, self.layer_idx).k
        if last_only and not (self.training and torch.is_grad_enabled()):  # (a training forward: all queries)
            x, cos, sin, state = x[:, -1:], cos[..., -1:, :], sin[..., -1:, :], state.tail(T)
            start, T = state.start, 1
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, H, D + R).transpose(1, 2).split([D, R], dim=-1)
        if cos.dim() == 4 and G < H:  # per-head frequencies: each query head turns as its RoPE key
            cos, sin = cos.repeat_interleave(H // G, dim=1), sin.repeat_interleave(H // G, dim=1)
        q_rope = apply_rope(q_rope, cos, sin) if self.cfg.rope else q_rope
        static = isinstance(start, torch.Tensor)  # the compiled decode step: the whole buffer is held
        pads = None  # left-padded rows: the pads' keys hidden, row by row
        if state.pads is not None:
            q_pos = start + torch.arange(T, device=x.device)
            pads = state.pad_mask(q_pos, torch.arange(held.shape[1], device=x.device))
        if not static and (held.shape[1] == T or T >= EXPANDED_FROM):
            # training, a first prefill (the latents are this step's own), or a prompt on a filled cache, whose
            # queries are the last T positions (the attention op's causal)
            y = self._expanded(q_nope, q_rope, held, doc_ids=state.doc_ids, mask=pads)
        else:
            mask = pads
            if T > 1 or static:
                q_pos = start + torch.arange(T, device=x.device)
                mask = position_mask(q_pos, torch.arange(held.shape[1], device=x.device))
                mask = mask if pads is None else mask & pads
            y = self._absorbed(q_nope, q_rope, held, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_head_dim))

    def _quantized(self, latent: torch.Tensor) -> torch.Tensor:
        """CLLA-quant: the compressed latent through its codes and back (straight-through); RoPE keys as they are."""
        c, k_rope = latent.split([self.kv_lora_rank, self.latent_rope_width], dim=-1)
        c = fake_quantize(c, self.cfg.latent_bits, self.cfg.latent_group, c.dtype)
        return torch.cat([c, k_rope], dim=-1)

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [n_heads, head_dim, kv_lora_rank] and W_UV [n_heads, v_head_dim, kv_lora_rank]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.head_dim], w[:, self.head_dim :]

    def _split_latent(self, latent: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, width] -> c [B, S, kv_lora_rank], RoPE keys [B, rope_kv_heads, S, rope_head_dim]."""
        B, S, _ = latent.shape
        c, k_rope = latent.to(dtype).split([self.kv_lora_rank, self.latent_rope_width], dim=-1)
        return c, k_rope.view(B, S, self.rope_kv_heads, self.rope_head_dim).transpose(1, 2)

    def _expanded(self, q_nope, q_rope, latent, doc_ids=None, mask=None) -> torch.Tensor:
        """Decompress K/V of every head from ``latent`` [B, S, width] and attend as MHA, causally (the queries
        being the last of the S positions)."""
        B, S, _ = latent.shape
        H, D, R = self.n_heads, self.head_dim, self.rope_head_dim
        c, k_rope = self._split_latent(latent, q_nope.dtype)
        kv = self.kv_b_proj(c).view(B, S, H, D + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([D, self.v_head_dim], dim=-1)
        k_rope = (
            k_rope.expand(B, H, S, R)
            if self.rope_kv_heads == 1
            else k_rope.repeat_interleave(H // self.rope_kv_heads, 1)
        )
        q, k = torch.cat([q_nope, q_rope], dim=-1), torch.cat([k_nope, k_rope], dim=-1)
        return attention(q, k, v, causal=True, doc_ids=doc_ids, mask=mask, scale=self.scale)

    def _absorbed(self, q_nope, q_rope, latent, mask=None) -> torch.Tensor:
        """Attend over the cached ``latent`` [B, S, width] directly, up-projections folded in."""
        B, S, _ = latent.shape
        G, r = self.rope_kv_heads, self.kv_lora_rank
        w_uk, w_uv = self._up_projections()
        fused = _fused_absorption(q_nope)  # [B, H, T, D, 1] * [H, 1, D, r] summed over D
        q_latent = (
            (q_nope[..., None] * w_uk[:, None]).sum(-2) if fused else torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        )
        q = torch.cat([q_latent, q_rope], dim=-1)
        if G == 1:  # one K/V head for all query heads: [c; k^R], values its first kv_lora_rank channels
            y = absorbed_attention(q, latent, r, mask=mask, scale=self.scale)
        else:  # a K/V head per RoPE key: [c; k^R_g], values c (the latent is repeated, not cached per head)
            c, k_rope = self._split_latent(latent, q.dtype)
            v = c[:, None].expand(B, G, S, r)
            k = torch.cat([v, k_rope], dim=-1)
            y = attention(q, k, v, mask=mask, scale=self.scale)
        if fused:  # [B, H, T, 1, r] * [H, 1, Dv, r] summed over r
            return (y[..., None, :] * w_uv[:, None]).sum(-1)
        return torch.einsum("bhtr,hdr->bhtd", y, w_uv)

    # -- cache and footprint -------------------------------------------------

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        if not self.owns_kv:
            return None
        if self.cfg.latent_bits is not None:
            bits, group = self.cfg.latent_bits, self.cfg.latent_group
            return QuantizedLatentKV(batch_size, max_len, self.kv_lora_rank, self.latent_rope_width, bits, group,
                                     dtype=dtype, device=device)  # fmt: skip
        return LatentKV(batch_size, max_len, self.kv_lora_rank + self.latent_rope_width, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        if not self.owns_kv:
            return LayerFootprint()
        if self.cfg.latent_bits is not None:  # packed codes, a scale and a zero point per group, RoPE keys
            codes = self.kv_lora_rank * self.cfg.latent_bits // 8
            scales = 2 * (self.kv_lora_rank // self.cfg.latent_group) * dtype.itemsize
            return LayerFootprint(bytes_per_token=codes + scales + self.latent_rope_width * dtype.itemsize)
        return LayerFootprint(bytes_per_token=(self.kv_lora_rank + self.latent_rope_width) * dtype.itemsize)
