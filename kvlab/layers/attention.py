"""Softmax attention with grouped K/V heads: MHA, GQA and MQA.

- MHA (Vaswani et al. 2017): ``n_kv_heads == n_heads``.
- GQA (Ainslie et al. 2023): ``n_heads`` query heads share ``n_kv_heads`` K/V
  heads in equal consecutive groups, shrinking the cache by n_heads/n_kv_heads.
- MQA (Shazeer 2019): ``n_kv_heads == 1``.

Options: RoPE on all or the first ``rope_dims`` channels of each head,
a sliding ``window`` (a query sees itself and the ``window - 1`` tokens
before it; its cache is a ring buffer of ``window`` positions) with
``sinks``, the first positions every query sees as well, held beside the
ring (Hymba's meta tokens, Dong et al. 2024), value heads wider than the
key heads (``v_head_dim``: Hymba's are ``expand`` times wider, to match its
SSM heads), q/k/v biases (Qwen2), an output bias (Llama's
``attention_bias``) and ``qk_norm`` (Qwen3: every query and key head
RMS-normalised before RoPE, so the cache holds normalised keys; OLMo 2:
the whole query and key projections normalised, ``qk_norm_over:
projection``). A layer whose
``kv_source`` is another layer has no K/V projections and attends with its
own queries to that layer's keys and values (cross-layer sharing, Brandon
et al. 2024); it owns no cache slot.

Weighted GQA (Chinnakonduru & Mohapatra 2024): with ``kv_merge: m > 1`` the
K/V projections keep ``n_kv_heads * m`` heads and each cached head is a
learned weighted sum of ``m`` of them (weights start at 1/m, mean pooling).
It is a training-time form: ``kvlab.archs.convert.fold_kv_merge`` folds the
weights into plain projections, the same function with ``kv_merge: 1``.

GQKVA (Javadi et al. 2023): with ``n_q_heads`` set, the layer has
``n_q_heads`` query projections and ``n_kv_heads`` K/V heads, and every
query head attends with every K/V head: ``n_heads = n_q_heads *
n_kv_heads`` attention heads, so fewer query parameters (and, with MQA-like
``n_kv_heads``, the same small cache). Attention head ``j * n_q_heads + i``
pairs query ``i`` with K/V head ``j``: the query heads are tiled, which is
GQA's consecutive grouping, so nothing is gathered.

Uneven groups (after AsymGQA, Chen et al. 2024): ``kv_groups`` lists, for
each query head, the K/V head it reads, so groups may differ in size and
need not be contiguous (a conversion that groups heads by similarity writes
it). The K/V heads are gathered to the query heads at attention time; the
cache keeps ``n_kv_heads``.

Decoupled key and value heads (after DHA, Chen et al. 2024): ``n_v_heads``
value heads apart from the ``n_kv_heads`` key heads, each query head reading
key head ``kv_groups[h]`` and value head ``v_groups[h]`` (default equal
consecutive groups of each). The cache holds ``n_kv_heads`` keys and
``n_v_heads`` values per token; layers reading another's K/V need its head
counts.

Key-driven query allocation (KDGQA and DGQA, Khan et al. 2024): with
``query_allocation`` set, the query heads are split among the K/V heads in
contiguous runs whose lengths follow the K/V heads' key norms, rather than
in equal groups. ``kdgqa``: per query, from the norms of the keys that query
attends to (the paper's per-forward ratios, made causal: a query never sees
later keys' norms); ``dgqa``: from a running average of the key norms,
updated by every training forward and fixed at inference, when the layer is
uneven GQA. The cache is plain GQA (``n_kv_heads`` heads); KDGQA reads the
norms back from it (RoPE keeps a key's norm). ``key_driven_allocation`` and
``kv_head_of_query`` are the paper's rule, written once for both.

MatryoshkaKV (Lin et al. 2024): with ``kv_ranks`` set, each K/V head has an
orthogonal basis for its keys and one for its values (trainable, through the
Cayley map of a free matrix, so they stay orthogonal) and a mean of each;
the cache holds only the leading ``r`` coordinates, ``(k - mu_k) U_k[:, :r_k]``
and ``(v - mu_v) U_v[:, :r_v]``. Queries are projected on the same key basis
(the dropped ``q . mu_k`` is the same for every key, which softmax ignores),
and the attention output is taken back to the head's space, ``y U_v[:, :r_v]^T
+ mu_v``. At full rank this is exactly attention. Training cycles through
every (key rank, value rank) pair of ``kv_ranks``, one pair per training
forward (the official code's Matryoshka schedule), so one model serves every
rank; outside training the layer uses ``kv_rank`` ([key rank, value rank],
default full), which sizes its cache. Either rank may be a list, one per K/V
head (the paper's heterogeneous ranks): each head keeps its own leading
coordinates (its basis columns past its rank are zeroed) and the cache holds
them packed, ``sum of the heads' ranks`` channels per token, no padding.

Value residual (Zhou et al. 2024): with ``value_residual: resformer`` every
layer above the first attends to ``(1 - value_mix) V_n + value_mix V_1``,
its own values mixed with layer 0's; with ``svformer`` it uses V_1 alone and
has no V projection, so its cache holds keys only (K per layer plus one V).
Layer 0 provides V_1 and is unaffected.

Shared Attention (SA, Liao & Vargas 2024): a layer whose plan reads
another layer's attention weights (``attention_source``) has no query or
key projection: it applies that layer's softmax probabilities, per query
head, to its own values (``n_heads`` must match; its own ``n_kv_heads``
value heads, grouped as in GQA), so it caches values only. A layer that
gives its weights to others forms them explicitly (``attention_weights``,
reference and torch backends); every other layer keeps the fused kernels.

Learned attention sinks (gpt-oss, OpenAI 2025): with ``learned_sinks`` each
query head h has one trained logit b_h (``sink_logits``) in every softmax's
denominator, exp(b_h) + sum_i exp(s_i), as a key it may attend to that adds
no value; a head's weights then sum to less than 1 (and to 0 where it sees no
key). The logits start at 0 and take no weight decay. Unlike ``sinks`` (kept
positions) it adds nothing to the cache.

Cache per token and layer: n_kv_heads * (head_dim + v_head_dim) elements (keys only
for SVFormer layers above the first; values only for layers applying
another's attention weights).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvlab._config import check_bool, check_choice, check_float, check_int
from kvlab.kernels.attention import (
    apply_attention_weights,
    document_mask,
    position_mask,
    windowed_attention_with_sinks,
)
from kvlab.kernels.ops import apply_rope, attention, attention_weights
from kvlab.kernels.precision import compute_dtype, upcast
from kvlab.kernels.rope import check_rope_scaling
from kvlab.layers.base import LayerFootprint, MixerConfig, StepState, default_head_dim, register_mixer
from kvlab.layers.kv_cache import KVView, RingKV, SinkRingKV, StaticKV
from kvlab.layers.norm import RMSNorm
from kvlab.layers.rope import Rotary

log = logging.getLogger("kvlab")

VALUE_RESIDUALS = ("resformer", "svformer")
QK_NORM_SPANS = ("head", "projection")
QUERY_ALLOCATIONS = ("kdgqa", "dgqa")


def pads_refused_by_window(window: int | None, sinks: int, meta_tokens: int) -> str | None:
    """Why a window (with ``sinks``) cannot give left-padded rows what they get alone; None if it can. A padded row
    holds its pads between the meta tokens and its tokens: sinks beyond the meta tokens would be pads, and meta
    tokens the window does not keep as sinks would leave it (and a ring buffer) sooner than alone."""
    if sinks and sinks > meta_tokens:
        return (f"sinks={sinks} are a row's first positions, which in a padded row are pads (only meta tokens can be "
                f"sinks there: meta_tokens={meta_tokens})")  # fmt: skip
    if window is not None and meta_tokens and (sinks or 0) < meta_tokens:
        return (
            f"window={window} keeps {sinks or 0} of the meta_tokens={meta_tokens} as sinks: in a padded row the "
            "pads stand between the rest and the row's tokens, which would see them leave the window sooner"
        )
    return None


@dataclass
class AttentionConfig(MixerConfig):
    kind = "attention"
    publishes = frozenset({"kv", "values", "attention"})
    reads = frozenset({"kv", "values", "attention"})
    reads_later = True
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads (MHA)
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    rope_dims: int | None = None  # channels of each head that RoPE rotates; None: all
    # context extension of the frequencies: {kind: linear, factor} or {kind: llama3, factor, low_freq_factor,
    # high_freq_factor, original_max_seq_len} (kvlab.kernels.rope.scaled_frequencies); None: plain RoPE
    rope_scaling: dict[str, Any] | None = None
    window: int | None = None  # sliding window in tokens; None: full causal attention
    sinks: int = 0  # with a window: the first positions every query also sees, cached for good (Hymba's meta tokens)
    v_head_dim: int | None = None  # channels of each value head; None: head_dim (Hymba: expand * head_dim)
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias puts a bias on the output projection too
    # Qwen3's: each query and key head RMS-normalised (one weight over head_dim, shared by the heads) before RoPE
    qk_norm: bool = False
    qk_norm_eps: float = 1e-5  # (import sets Qwen3's rms_norm_eps; export needs the model's norm eps)
    qk_norm_unit_offset: bool = False  # Gemma 3's: the norms weigh by 1 + w (kvlab.layers.norm.RMSNorm)
    qk_norm_over: str = "head"  # head: each head over head_dim (Qwen3, Gemma 3) | projection: all heads (OLMo 2)
    # the scores' scale; None: 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar s gives s**-0.5: 27B's 168 for 128)
    softmax_scale: float | None = None
    softcap: float | None = None  # scores s become softcap * tanh(s / softcap) (Gemma 2's attn_logit_softcapping)
    learned_sinks: bool = False  # a trained logit per query head in every softmax's denominator (gpt-oss's sinks)
    # gated attention (Qiu et al. 2025; Qwen3-Next): each head's output times sigmoid of a projection of the layer's
    # input, channel by channel, before the output projection
    output_gate: bool = False
    kv_merge: int = 1  # > 1: each K/V head is a learned weighted sum of this many projection heads (WGQA)
    kv_groups: list[int] | None = None  # per query head, the K/V head it reads; None: equal consecutive groups
    n_v_heads: int | None = None  # DHA: value heads apart from the key heads (n_kv_heads); None: as many
    v_groups: list[int] | None = None  # DHA: per query head, the value head it reads; None: equal consecutive groups
    n_q_heads: int | None = None  # GQKVA: query projections, each paired with every K/V head; None: n_heads
    value_residual: str | None = None  # None | resformer | svformer: layers above 0 use layer 0's values
    value_mix: float = 0.5  # resformer: the weight of layer 0's values
    query_allocation: str | None = None  # None | kdgqa | dgqa: query heads per K/V head from key norms
    allocation_beta: float = 0.9  # dgqa: the weight of the newest key norms in their running average
    kv_ranks: list[int] | None = None  # MatryoshkaKV: the ranks training cycles through; None: no projections
    # MatryoshkaKV: [key rank, value rank] outside training, each a rank or one per K/V head; None: full
    kv_rank: list[int | list[int]] | None = None

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.n_heads, f"{path}.n_heads", minimum=1)
        check_int(self.n_kv_heads, f"{path}.n_kv_heads", minimum=1, optional=True)
        check_int(self.head_dim, f"{path}.head_dim", minimum=1, optional=True)
        check_int(self.rope_dims, f"{path}.rope_dims", minimum=0, optional=True)
        check_int(self.window, f"{path}.window", minimum=1, optional=True)
        check_int(self.sinks, f"{path}.sinks", minimum=0)
        if self.sinks and self.window is None:
            raise ValueError(f"{path}.sinks={self.sinks} keeps the first positions beside a sliding window; "
                             "without a window every position is kept already (set window, or sinks: 0)")  # fmt: skip
        check_int(self.v_head_dim, f"{path}.v_head_dim", minimum=1, optional=True)
        check_float(self.rope_theta, f"{path}.rope_theta", positive=True)
        check_bool(self.qkv_bias, f"{path}.qkv_bias")
        check_bool(self.o_bias, f"{path}.o_bias")
        check_bool(self.qk_norm, f"{path}.qk_norm")
        check_float(self.qk_norm_eps, f"{path}.qk_norm_eps", positive=True)
        check_bool(self.qk_norm_unit_offset, f"{path}.qk_norm_unit_offset")
        if self.softmax_scale is not None:
            check_float(self.softmax_scale, f"{path}.softmax_scale", positive=True)
        if self.softcap is not None:
            check_float(self.softcap, f"{path}.softcap", positive=True)
        check_bool(self.learned_sinks, f"{path}.learned_sinks")
        check_bool(self.output_gate, f"{path}.output_gate")
        check_choice(self.qk_norm_over, f"{path}.qk_norm_over", QK_NORM_SPANS)
        if self.qk_norm_over != "head" and not self.qk_norm:
            raise ValueError(f"{path}.qk_norm_over={self.qk_norm_over!r} without {path}.qk_norm: there are no norms")
        if self.qk_norm_over == "projection" and self.kv_merge > 1:
            raise ValueError(f"{path}.qk_norm_over='projection' normalises the key projection as the heads read it; "
                             f"kv_merge={self.kv_merge} (WGQA) projects more heads than it caches")  # fmt: skip
        if self.qk_norm_unit_offset and not self.qk_norm:
            raise ValueError(f"{path}.qk_norm_unit_offset=true without {path}.qk_norm: there are no norms to offset")
        check_int(self.kv_merge, f"{path}.kv_merge", minimum=1)
        if self.value_residual is not None:
            check_choice(self.value_residual, f"{path}.value_residual", VALUE_RESIDUALS)
            if self.value_residual == "svformer" and self.kv_merge > 1:
                raise ValueError(f"{path}.value_residual=svformer has no V projection to merge; use kv_merge: 1")
        check_float(self.value_mix, f"{path}.value_mix")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_int(self.n_q_heads, f"{path}.n_q_heads", minimum=1, optional=True)
        if self.n_q_heads is not None:
            if self.n_heads != self.n_q_heads * self.n_kv_heads:
                raise ValueError(
                    f"{path}.n_heads={self.n_heads} must be n_q_heads * n_kv_heads = {self.n_q_heads} * "
                    f"{self.n_kv_heads} (GQKVA pairs every query head with every K/V head)"
                )
            if self.kv_groups is not None:
                raise ValueError(f"{path}: kv_groups and n_q_heads cannot be combined (n_q_heads fixes the pairing)")
        if self.kv_groups is not None:
            self._check_kv_groups(path)
        elif self.n_heads % self.n_kv_heads and self.query_allocation is None:
            raise ValueError(
                f"{path}.n_heads={self.n_heads} is not divisible by {path}.n_kv_heads={self.n_kv_heads}; "
                f"n_kv_heads must divide n_heads (or give kv_groups for uneven groups)"
            )
        if self.query_allocation is not None:
            self._check_query_allocation(path)
        if self.n_v_heads is not None or self.v_groups is not None:
            self._check_value_heads(path)
        self.head_dim = default_head_dim(self.head_dim, d_model, self.n_heads, path)
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.v_head_dim != self.head_dim and self.kv_ranks is not None:
            raise ValueError(f"{path}.v_head_dim={self.v_head_dim}: MatryoshkaKV (kv_ranks) keeps one basis per head "
                             f"for keys and values alike; use v_head_dim = head_dim ({self.head_dim})")  # fmt: skip
        if self.kv_ranks is not None or self.kv_rank is not None:
            self._check_kv_ranks(path)
        if self.rope_dims is None:
            self.rope_dims = self.head_dim
        if self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise ValueError(
                f"{path}.rope_dims={self.rope_dims} must be even and at most {path}.head_dim={self.head_dim}"
            )
        check_rope_scaling(self.rope_scaling, f"{path}.rope_scaling", self.rope_dims)  # (its rope_dims: LongRoPE's)

    def _checked_groups(self, field: str, n_targets: int, target: str, path: str) -> list[int]:
        """``kv_groups`` / ``v_groups``: one head index per query head, every one of the ``n_targets`` read."""
        groups = getattr(self, field)
        if not isinstance(groups, (list, tuple)) or len(groups) != self.n_heads:
            raise ValueError(f"{path}.{field}={groups!r} must list one {target} head per query head ({self.n_heads})")
        for h, g in enumerate(groups):
            check_int(g, f"{path}.{field}[{h}]", minimum=0)
            if g >= n_targets:
                raise ValueError(f"{path}.{field}[{h}]={g} must be below the {n_targets} {target} heads")
        unread = sorted(set(range(n_targets)) - set(groups))
        if unread:
            raise ValueError(f"{path}.{field} leaves {target} heads {unread} unread; every one needs a query head")
        return list(groups)

    def _check_kv_groups(self, path: str) -> None:
        self.kv_groups = self._checked_groups("kv_groups", self.n_kv_heads, "K/V", path)

    def _check_value_heads(self, path: str) -> None:
        check_int(self.n_v_heads, f"{path}.n_v_heads", minimum=1, optional=True)
        if self.n_v_heads is None:
            self.n_v_heads = self.n_kv_heads
        if self.v_groups is not None:
            self.v_groups = self._checked_groups("v_groups", self.n_v_heads, "value", path)
        elif self.n_heads % self.n_v_heads:
            raise ValueError(
                f"{path}.n_heads={self.n_heads} is not divisible by {path}.n_v_heads={self.n_v_heads}; "
                "give v_groups for uneven value groups"
            )
        clashes = {
            "kv_merge": self.kv_merge > 1,
            "value_residual": self.value_residual is not None,
            "query_allocation": self.query_allocation is not None,
            "kv_ranks": self.kv_ranks is not None,
            "n_q_heads": self.n_q_heads is not None,
        }
        for name, clash in clashes.items():
            if clash:
                raise ValueError(
                    f"{path}: decoupled value heads (n_v_heads, v_groups) cannot be combined with "
                    f"{name}={getattr(self, name)}"
                )

    def _check_query_allocation(self, path: str) -> None:
        check_choice(self.query_allocation, f"{path}.query_allocation", QUERY_ALLOCATIONS)
        check_float(self.allocation_beta, f"{path}.allocation_beta", positive=True)
        if self.allocation_beta > 1:
            raise ValueError(f"{path}.allocation_beta={self.allocation_beta} must be in (0, 1]")
        if self.n_kv_heads < 2:
            raise ValueError(
                f"{path}.query_allocation={self.query_allocation} needs n_kv_heads >= 2 (got {self.n_kv_heads}): "
                "with one K/V head there is nothing to allocate"
            )
        clashes = {
            "kv_groups": self.kv_groups is not None,
            "n_q_heads": self.n_q_heads is not None,
            "kv_merge": self.kv_merge > 1,
            "window": self.window is not None and self.query_allocation == "kdgqa",
        }
        for name, clash in clashes.items():
            if clash:
                raise ValueError(
                    f"{path}.query_allocation={self.query_allocation} cannot be combined with {name}="
                    f"{getattr(self, name)} (the allocation decides which K/V head each query head reads"
                    + ("; KDGQA's key norms span every earlier token)" if name == "window" else ")")
                )

    def _check_kv_ranks(self, path: str) -> None:
        if self.kv_ranks is None:
            raise ValueError(f"{path}.kv_rank={self.kv_rank} needs kv_ranks (the MatryoshkaKV rank schedule)")
        ranks = self.kv_ranks
        if not isinstance(ranks, (list, tuple)) or not ranks:
            raise ValueError(f"{path}.kv_ranks={ranks!r} must be a non-empty list of ranks")
        for n, r in enumerate(ranks):
            check_int(r, f"{path}.kv_ranks[{n}]", minimum=1)
            if r > self.head_dim:
                raise ValueError(f"{path}.kv_ranks[{n}]={r} exceeds head_dim={self.head_dim}")
        if list(ranks) != sorted(set(ranks)):
            raise ValueError(f"{path}.kv_ranks={list(ranks)} must be increasing, without repeats")
        self.kv_ranks = list(ranks)
        if self.kv_rank is not None:
            if not isinstance(self.kv_rank, (list, tuple)) or len(self.kv_rank) != 2:
                raise ValueError(f"{path}.kv_rank={self.kv_rank!r} must be [key rank, value rank]")
            for n, r in enumerate(self.kv_rank):
                if isinstance(r, (list, tuple)) and len(r) != self.n_kv_heads:
                    raise ValueError(f"{path}.kv_rank[{n}]={list(r)} must be one rank, or one per K/V head "
                                     f"({self.n_kv_heads})")  # fmt: skip
                for h, x in enumerate(r if isinstance(r, (list, tuple)) else [r]):
                    name = f"{path}.kv_rank[{n}]" + (f"[{h}]" if isinstance(r, (list, tuple)) else "")
                    check_int(x, name, minimum=1)
                    if x > self.head_dim:
                        raise ValueError(f"{name}={x} exceeds head_dim={self.head_dim}")
            self.kv_rank = [list(r) if isinstance(r, (list, tuple)) else r for r in self.kv_rank]
        clashes = {
            "kv_merge": self.kv_merge > 1,
            "value_residual": self.value_residual is not None,
            "query_allocation": self.query_allocation is not None,
            "n_q_heads": self.n_q_heads is not None,
        }
        for name, clash in clashes.items():
            if clash:
                raise ValueError(f"{path}.kv_ranks (MatryoshkaKV) cannot be combined with {name}={getattr(self, name)}")

    def own_reads(self, layer_idx: int) -> tuple[tuple[str, int], ...]:
        return (("values", 0),) if self.value_residual is not None and layer_idx > 0 else ()

    def context_problem(self, max_seq_len: int) -> str | None:
        if self.window is not None and self.window > max_seq_len:
            return (
                f"window={self.window} exceeds max_seq_len={max_seq_len}; "
                f"a window of max_seq_len or more is full attention (window: null)"
            )
        return None

    def cache_rewritable(self) -> bool:
        return self.window is None  # a ring buffer's slots move on: writing a step twice would lose positions

    def read_problem(self, what: str, source: MixerConfig, later: bool) -> str | None:
        if later and what == "kv" and self.window is not None:
            return f"window={self.window}: a sliding window over a later layer's keys/values is not supported"
        if later and what == "kv" and self.query_allocation is not None:
            return f"query_allocation={self.query_allocation} over a later layer's keys/values is not supported"
        if what == "attention" and isinstance(source, AttentionConfig):
            return self._weights_problem(source)
        return super().read_problem(what, source, later)

    def _weights_problem(self, source: AttentionConfig) -> str | None:
        """Why this layer cannot apply ``source``'s attention probabilities to its own values (None: it can)."""
        if source.query_allocation == "kdgqa":
            return "its query_allocation=kdgqa mixes each query head's keys per query: it forms no single weights"
        for name in ("n_heads", "window", "sinks"):  # one probability row per query head, over the same positions
            if getattr(self, name) != getattr(source, name):
                return f"{name}={getattr(self, name)} differs from the source's {name}={getattr(source, name)}"
        own = {
            "kv_merge": self.kv_merge > 1,
            "kv_groups": self.kv_groups is not None,
            "n_v_heads": self.n_v_heads is not None or self.v_groups is not None,
            "n_q_heads": self.n_q_heads is not None,
            "value_residual": self.value_residual is not None,
            "query_allocation": self.query_allocation is not None,
            "kv_ranks": self.kv_ranks is not None,
        }
        for name, clash in own.items():
            if clash:
                return f"a layer applying another's weights has values alone; {name}={getattr(self, name)} needs keys"
        return None

    def first_layer_problem(self, first: MixerConfig) -> str | None:
        if self.value_residual is None:
            return None
        if not isinstance(first, AttentionConfig):
            return f"value_residual={self.value_residual} needs attention in layer 0, which is {first.kind!r}"
        for name in ("n_kv_heads", "head_dim", "v_head_dim", "window", "sinks"):
            if getattr(self, name) != getattr(first, name):
                mine, theirs = getattr(self, name), getattr(first, name)
                return f"value_residual needs layer 0's {name}={theirs}, this layer has {name}={mine}"
        return None

    def kv_compatible(self, source: MixerConfig) -> str | None:
        if not isinstance(source, AttentionConfig):
            return f"source mixer kind {source.kind!r} has no attention K/V"
        if self.kv_ranks is not None or source.kv_ranks is not None:
            return "MatryoshkaKV projections (kv_ranks) are a layer's own; its compressed K/V cannot be shared"
        for name in ("n_kv_heads", "head_dim", "v_head_dim", "rope_dims", "rope_theta", "rope_scaling", "window",
                     "sinks", "value_residual", "value_mix"):  # fmt: skip
            if getattr(self, name) != getattr(source, name):
                return f"{name}={getattr(self, name)} differs from the source's {name}={getattr(source, name)}"
        mine, theirs = self.n_v_heads or self.n_kv_heads, source.n_v_heads or source.n_kv_heads
        if mine != theirs:
            return f"n_v_heads={mine} differs from the source's n_v_heads={theirs} (value heads)"
        return None


def cayley(free: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrices ``(I - A/2)^-1 (I + A/2)`` of the skew-symmetric ``A = X - X^T`` ([..., n, n])."""
    a = free - free.transpose(-1, -2)
    eye = torch.eye(free.shape[-1], dtype=free.dtype, device=free.device)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def inverse_cayley(q: torch.Tensor) -> torch.Tensor:
    """A free matrix whose ``cayley`` is ``q`` (orthogonal, determinant +1, no eigenvalue -1): the strictly
    lower triangle of ``A = 2 (Q - I)(Q + I)^-1``."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    a = 2 * torch.linalg.solve((q + eye).transpose(-1, -2), (q - eye).transpose(-1, -2)).transpose(-1, -2)
    return a.tril(-1)


def key_driven_allocation(norms: torch.Tensor, n_heads: int, min_max: bool = True) -> torch.Tensor:
    """Query heads per K/V head ([..., G] integers summing to ``n_heads``) from the K/V heads' key norms [..., G].

    KDGQA first scales the norms to [0, 1] by their minimum and maximum (``min_max``); DGQA takes its running
    averages as they are. Shares of ``n_heads`` are rounded, then the total is mended one head at a time:
    while it is too large the largest allocation gives one up, while too small the smallest gains one (the
    official code's rule; its DGQA picks at random, here the same deterministic rule serves both).
    """
    G = norms.shape[-1]
    tiny = torch.finfo(norms.dtype).tiny
    if min_max:
        lo, hi = norms.amin(-1, keepdim=True), norms.amax(-1, keepdim=True)
        norms = torch.where(hi > lo, (norms - lo) / (hi - lo).clamp_min(tiny), 1.0)  # all equal: equal shares
    total = norms.sum(-1, keepdim=True)
    share = torch.where(total > 0, norms / total.clamp_min(tiny), 1.0 / G) * n_heads
    allocation = share.round().long()
    for _ in range(G):  # each share is within 1/2 of its rounding: the total is off by at most G/2
        excess = allocation.sum(-1, keepdim=True) - n_heads
        give = nn.functional.one_hot(allocation.argmax(-1), G) * (excess > 0)
        take = nn.functional.one_hot(allocation.argmin(-1), G) * (excess < 0)
        allocation = allocation - give + take
    return allocation


def kv_head_of_query(allocation: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., G] query heads per K/V head -> [..., n_heads]: the K/V head each query head reads, the query
    heads taken in order (the first ``allocation[0]`` read K/V head 0, and so on)."""
    ends = allocation.cumsum(-1)
    heads = torch.arange(n_heads, device=allocation.device)
    return (ends.unsqueeze(-2) <= heads[:, None]).sum(-1)


@register_mixer
class Attention(nn.Module):
    Config = AttentionConfig
    output_projection = "o_proj"  # what a parallel layer with shared_output replaces by its own
    takes_last_only = True  # forward's ``last_only``: the last position's output alone (``Block``)
    # the buffers a training forward moves (``_advance_training_state``), which activation checkpointing's
    # recomputation must read as the forward did (``kvlab.archs.model._checkpointed``)
    moved_by_forward = ("allocation", "key_norm_average", "rank_step")

    def __init__(
        self,
        cfg: AttentionConfig,
        *,
        d_model: int,
        layer_idx: int,
        kv_source: int,
        max_seq_len: int,
        attention_source: int | None = None,
        shares_attention: bool = False,
    ):
        """``attention_source``: the layer whose attention probabilities this one applies to its own values
        (None: its own, computed here); ``shares_attention``: later layers apply this layer's (SA)."""
        super().__init__()
        self.cfg = cfg = cfg.resolved(d_model, "mixer")
        self.layer_idx, self.kv_source = layer_idx, kv_source
        self.owns_kv = kv_source == layer_idx
        self.attention_source = layer_idx if attention_source is None else attention_source
        self.reads_weights = self.attention_source != layer_idx
        self.shares_attention = shares_attention
        if self.reads_weights and (not self.owns_kv or shares_attention):
            raise ValueError(f"layer {layer_idx}: a layer applying another's attention weights caches its own values "
                             "and computes no weights to share")  # fmt: skip
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.v_head_dim = cfg.v_head_dim
        self.n_v_heads = cfg.n_v_heads or cfg.n_kv_heads
        # DHA: values grouped their own way, so keys and values are gathered to the query heads apart
        self.values_apart = cfg.v_groups is not None or self.n_v_heads != self.n_kv_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.softmax_scale is None else cfg.softmax_scale
        self.softcap = cfg.softcap
        # gpt-oss's sinks: one logit per attention head, in the softmax of every query of that head
        self.sink_logits = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.learned_sinks else None
        self.n_q_heads = cfg.n_heads if cfg.n_q_heads is None else cfg.n_q_heads  # query projections
        self.norm_heads = cfg.qk_norm and cfg.qk_norm_over == "head"
        self.norm_projections = cfg.qk_norm and cfg.qk_norm_over == "projection"
        if not self.reads_weights:  # SA: the weights come from another layer, so no queries or keys here
            self.q_proj = nn.Linear(d_model, self.n_q_heads * cfg.head_dim, bias=cfg.qkv_bias)
            if cfg.qk_norm:  # over each head, or over the whole projection (qk_norm_over)
                width = cfg.head_dim * (self.n_q_heads if self.norm_projections else 1)
                self.q_norm = RMSNorm(width, cfg.qk_norm_eps, cfg.qk_norm_unit_offset)
        # layers above the first with a value residual take V_1 from layer 0 (SVFormer: only it)
        self.value_residual = cfg.value_residual if layer_idx > 0 else None
        if self.owns_kv:
            kv_width = cfg.n_kv_heads * cfg.kv_merge * cfg.head_dim
            if not self.reads_weights:
                self.k_proj = nn.Linear(d_model, kv_width, bias=cfg.qkv_bias)
                if cfg.qk_norm:
                    width = cfg.head_dim * (cfg.n_kv_heads if self.norm_projections else 1)
                    self.k_norm = RMSNorm(width, cfg.qk_norm_eps, cfg.qk_norm_unit_offset)
            if self.value_residual != "svformer":
                v_width = self.n_v_heads * cfg.kv_merge * cfg.v_head_dim
                self.v_proj = nn.Linear(d_model, v_width, bias=cfg.qkv_bias)
            if cfg.kv_merge > 1:  # one weight per projection head; 1-D, so no weight decay
                self.k_merge = nn.Parameter(torch.empty(cfg.n_kv_heads * cfg.kv_merge))
                self.v_merge = nn.Parameter(torch.empty(cfg.n_kv_heads * cfg.kv_merge))
                self.reset_parameters()
            if cfg.kv_ranks is not None:  # MatryoshkaKV: per K/V head, Cayley parameters of the bases and means
                G, d = cfg.n_kv_heads, cfg.head_dim
                self.k_rotation, self.v_rotation = (nn.Parameter(torch.empty(G, d, d)) for _ in range(2))
                self.v_mean = nn.Parameter(torch.empty(G, d))
                # the key mean only centres what is cached: q . mu_k is the same for every key, which softmax
                # ignores, so it has no gradient; a buffer, set by the PCA conversion
                self.register_buffer("k_mean", torch.zeros(G, d))
                # the (key rank, value rank) pair the next training forward uses: saved, so a resumed run goes on
                self.register_buffer("rank_step", torch.zeros((), dtype=torch.long))
                self.reset_parameters()
                self.kv_rank = tuple(cfg.kv_rank or (d, d))  # outside training: ranks, or per-head lists
        self.o_proj = nn.Linear(cfg.n_heads * cfg.v_head_dim, d_model, bias=cfg.o_bias)
        # (with the queries' bias setting: Qwen3-Next's gate is the second half of each head's query projection)
        self.gate_proj = (
            nn.Linear(d_model, cfg.n_heads * cfg.v_head_dim, bias=cfg.qkv_bias) if cfg.output_gate else None
        )
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_theta, max_seq_len, cfg.rope_scaling)
        if cfg.kv_groups is not None:
            self.register_buffer("kv_index", torch.empty(cfg.n_heads, dtype=torch.long), persistent=False)
        else:
            self.kv_index = None
        if self.values_apart:
            self.register_buffer("v_index", torch.empty(cfg.n_heads, dtype=torch.long), persistent=False)
        if cfg.query_allocation == "dgqa":  # learned in training, saved with the weights, fixed at inference
            self.register_buffer("allocation", torch.empty(cfg.n_kv_heads, dtype=torch.long))
            self.register_buffer("key_norm_average", torch.empty(cfg.n_kv_heads))
        if cfg.kv_groups is not None or cfg.query_allocation == "dgqa" or hasattr(self, "k_mean") or self.values_apart:
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """The query head -> K/V head map, from the config (also after building on the meta device);
        DGQA starts from equal groups and no key norms seen; MatryoshkaKV's key mean and rank step at zero."""
        if self.kv_index is not None and not self.kv_index.is_meta:
            self.kv_index.copy_(torch.tensor(self.cfg.kv_groups))
        if self.values_apart and not self.v_index.is_meta:
            groups = self.cfg.v_groups or [h // (self.n_heads // self.n_v_heads) for h in range(self.n_heads)]
            self.v_index.copy_(torch.tensor(groups))
        if hasattr(self, "k_mean") and not self.k_mean.is_meta:
            self.k_mean.zero_()
            self.rank_step.zero_()
        if self.cfg.query_allocation == "dgqa" and not self.allocation.is_meta:
            H, G = self.n_heads, self.n_kv_heads
            self.allocation.copy_(torch.tensor([H // G + (g < H % G) for g in range(G)]))
            self.key_norm_average.zero_()

    def reset_parameters(self) -> None:
        """WGQA merge weights start as mean pooling; MatryoshkaKV's bases as the identity, means at zero; sink logits
        at zero (exp(0): a sink worth one key of score 0)."""
        if self.sink_logits is not None and not self.sink_logits.is_meta:
            with torch.no_grad():
                self.sink_logits.zero_()
        if hasattr(self, "k_merge") and not self.k_merge.is_meta:
            with torch.no_grad():
                self.k_merge.fill_(1.0 / self.cfg.kv_merge)
                self.v_merge.fill_(1.0 / self.cfg.kv_merge)
        if hasattr(self, "k_rotation") and not self.k_rotation.is_meta:
            with torch.no_grad():
                for p in (self.k_rotation, self.v_rotation, self.v_mean):
                    p.zero_()

    # -- forward ------------------------------------------------------------

    def forward(self, x, *, cache=None, state: StepState | None = None, last_only: bool = False):
        """``last_only``: the output of the last position alone (a prefill's top layer); keys and values are
        still made, cached and published for every position."""
        if self.cfg.kv_ranks is not None and self.training and torch.compiler.is_compiling():
            return self._forward_between_graphs(x, cache=cache, state=state, last_only=last_only)
        state = StepState() if state is None else state
        if self.reads_weights:
            return self._apply_shared_weights(x, cache, state)
        B, T, _ = x.shape
        start = state.start
        cos, sin = self.rotary(start, T, state.positions)
        bases = self._matryoshka_bases(state) if self.cfg.kv_ranks is not None else None
        if self.owns_kv:
            k = self.k_proj(x)
            k = self._kv_heads(self.k_norm(k) if self.norm_projections else k, "k")
            k = apply_rope(self.k_norm(k) if self.norm_heads else k, cos, sin)
            if self.value_residual == "svformer":  # keys only; the values are layer 0's
                v = k.new_empty(*k.shape[:-1], 0)
            else:
                v = self._kv_heads(self.v_proj(x), "v")
            if bases is not None:  # MatryoshkaKV: what is cached is the leading principal coordinates
                k = torch.einsum("bgtd,gdr->bgtr", k - self.k_mean[None, :, None].to(k.dtype), bases[0])
                v = torch.einsum("bgtd,gdr->bgtr", v - self.v_mean[None, :, None].to(v.dtype), bases[1])
            if cache is None:
                view = KVView(k, v, start + T)
            elif bases is not None and self._ranks_now()[2]:  # per-head ranks: the cache holds them packed
                view = self._unpacked(cache.update(*self._packed(k, v), start))
            else:
                view = cache.update(k, v, start)
            if self.value_residual is not None:
                first = state.read("values", 0, self.layer_idx).to(view.k.dtype)
                v = first if self.value_residual == "svformer" else torch.lerp(view.v, first, self.cfg.value_mix)
                view = dataclasses.replace(view, v=v)
            state.publish("kv", self.layer_idx, view)
            if self.layer_idx == 0:
                state.publish("values", 0, view.v)
        else:
            view = state.read("kv", self.kv_source, self.layer_idx)
        last_only = last_only and self._queries_can_be_trimmed(cache)  # (after the update: it may score this step)
        Tq = 1 if last_only else T
        q = self.q_proj(x[:, -Tq:])
        q = (self.q_norm(q) if self.norm_projections else q).view(B, Tq, self.n_q_heads, self.head_dim).transpose(1, 2)
        if last_only:  # the last position's query, asking as the top layers of a prefill that keep no state do
            cos, sin, state = cos[..., -1:, :], sin[..., -1:, :], state.tail(T)
        q = apply_rope(self.q_norm(q) if self.norm_heads else q, cos, sin)
        if bases is not None:  # queries on their K/V head's key basis
            heads = self._kv_head_of_query()
            q = torch.einsum("bhtd,hdr->bhtr", q, bases[0][heads])
        if self.n_q_heads != self.n_heads:  # GQKVA: every query head once per K/V head
            q = q.repeat(1, self.n_heads // self.n_q_heads, 1, 1)
        if self.kv_source > self.layer_idx:  # LCKV: a later layer's K/V of the tokens before each query
            y = self._attend_before(q, view, state)
        elif self.cfg.query_allocation == "kdgqa":
            y = self._attend_key_driven(q, view, state)
        elif self.shares_attention:  # SA: the probabilities formed, applied here and by the layers reading them
            k, v = self._kv_for(q, view)
            weights = attention_weights(q, k, **self._mask_options(q, view, state), **self.score_options())
            state.publish("attention", self.layer_idx, weights)
            y = apply_attention_weights(weights, v)
        elif cache is not None and getattr(cache, "scored_rows", 0):  # H2O, SnapKV: the cache keeps by attention
            y = self._attend_scored(q, view, state, cache)
        else:
            y = self._attend(q, view, state)
        if bases is not None:  # back from the value coordinates to the head's space
            y = torch.einsum("bhtr,hdr->bhtd", y, bases[1][heads]) + self.v_mean[heads][None, :, None].to(y.dtype)
        if self.training and (self.cfg.query_allocation == "dgqa" or bases is not None):
            self._advance_training_state(view.k)
        return self._output(x[:, -Tq:], y)

    def _output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs y [B, H, T, Dv] for the inputs x [B, T, D] they answer, gated (output_gate), projected."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim)
        if self.gate_proj is not None:
            y = y * torch.sigmoid(self.gate_proj(x)).to(y.dtype)
        return self.o_proj(y)

    def _queries_can_be_trimmed(self, cache) -> bool:
        """Whether ``last_only`` may drop the other positions' queries: nothing else reads their attention (SA's
        readers, an H2O or SnapKV cache, KDGQA's allocation by what each query sees), they read no later layer
        (LCKV) and no training forward counts them."""
        return not (
            self.shares_attention or self.kv_source > self.layer_idx or self.cfg.query_allocation == "kdgqa"
            or getattr(cache, "scored_rows", 0) or (self.training and torch.is_grad_enabled())
        )  # fmt: skip

    def _apply_shared_weights(self, x: torch.Tensor, cache, state: StepState) -> torch.Tensor:
        """SA: the source layer's probabilities over the step's positions, applied to this layer's values
        (cached, so they cover the same positions as the source's keys)."""
        B, T, _ = x.shape
        v = self._kv_heads(self.v_proj(x), "v")
        if cache is not None:
            v = cache.update(v.new_empty(B, self.n_kv_heads, T, 0), v, state.start).v
        weights = state.read("attention", self.attention_source, self.layer_idx)
        y = apply_attention_weights(weights, v.to(weights.dtype))
        return self._output(x, y)

    # MatryoshkaKV's training forward under trainer.compile's blocks: each step takes the next pair of ranks, and
    # so other shapes, which traced would be a graph per pair and layer (16 x 6 at the preset: 10 s a step while
    # they compiled, then Dynamo's limit and eager anyway).
    @torch.compiler.disable
    def _forward_between_graphs(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _advance_training_state(self, k: torch.Tensor) -> None:
        """After a training forward: DGQA's allocation, MatryoshkaKV's place in its rank schedule. Not while
        non-reentrant activation checkpointing recomputes the forward inside backward (asked only here: the
        question is not traceable, and the compiled decode step never trains)."""
        if torch._C._current_graph_task_id() != -1:
            return
        if self.cfg.query_allocation == "dgqa":
            self._update_allocation(k)
        if self.cfg.kv_ranks is not None and torch.is_grad_enabled():
            self.rank_step.add_(1)

    def _ranks_now(self) -> tuple[int | list[int], int | list[int], bool]:
        """MatryoshkaKV's (key rank, value rank) for this forward, each a rank or one per K/V head, and whether
        they differ between heads. Training takes the next pair of ``kv_ranks`` x ``kv_ranks`` in turn;
        otherwise the ranks are ``kv_rank``."""
        if self.training and torch.is_grad_enabled():
            pairs = [(a, b) for a in self.cfg.kv_ranks for b in self.cfg.kv_ranks]
            r_k, r_v = pairs[int(self.rank_step) % len(pairs)]
            return r_k, r_v, False
        return *self.kv_rank, self._heads_differ()

    def _head_ranks(self) -> tuple[list[int], list[int]]:
        """``kv_rank`` as one key rank and one value rank per K/V head."""
        return tuple(r if isinstance(r, list) else [r] * self.n_kv_heads for r in self.kv_rank)

    def _heads_differ(self) -> bool:
        """Whether ``kv_rank`` gives the K/V heads different ranks (then the cache holds them packed)."""
        return any(len(set(r)) > 1 for r in self._head_ranks())

    def _matryoshka_bases(self, state: StepState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MatryoshkaKV: the key and value bases' leading columns for this forward, [G, d, r_k] and [G, d, r_v]
        (per-head ranks: as many columns as the largest, each head's past its own rank zeroed).

        The compiled decode step reads them held (``hold_for_inference``), not solved again for every token:
        the twelve Cayley solves of the preset were 60% of its step. Every other forward solves them."""
        if not torch.is_grad_enabled() and torch.compiler.is_compiling() and state is not None:
            held = getattr(self, "_held_bases", None)
            if isinstance(state.start, torch.Tensor) and held is not None:
                return held  # the decode step, whose caller holds them up to date before each step
        return self._solved_bases()

    def hold_for_inference(self, again: bool) -> bool:
        """MatryoshkaKV, for the compiled decode step (``kvlab.archs.decode``): solve the bases of the parameters
        as they are now if ``again`` (a generation's first step: whatever changed the weights before it, a
        load, a move, a write through ``.data``, is seen) or if the rotations were written in place since
        (their versions: training between two steps of one generation). True when solved (new tensors)."""
        if self.cfg.kv_ranks is None:
            return False
        rotations = (self.k_rotation, self.v_rotation)
        versions = None if any(p.is_inference() for p in rotations) else tuple(p._version for p in rotations)
        if not again and versions is not None and getattr(self, "_held_versions", None) == versions:
            return False
        with torch.no_grad():
            self._held_bases, self._held_versions = self._solved_bases(), versions
        return True

    def _solved_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        r_k, r_v, _ = self._ranks_now()
        dtype = self.k_proj.weight.dtype
        work = compute_dtype(dtype)  # the solve in at least fp32

        def leading(rotation: torch.Tensor, r: int | list[int]) -> torch.Tensor:
            basis = cayley(rotation.to(work))
            if isinstance(r, int):
                return basis[..., :r].to(dtype)
            width = max(r)
            keep = torch.arange(width, device=basis.device) < torch.tensor(r, device=basis.device)[:, None]
            return (basis[..., :width] * keep[:, None, :]).to(dtype)

        return leading(self.k_rotation, r_k), leading(self.v_rotation, r_v)

    def _packed(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head ranks: [B, G, T, max rank] keys/values -> [B, 1, T, sum of ranks], each head's own."""
        r_k, r_v = self._head_ranks()

        def pack(x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
            return torch.cat([x[:, h, :, :r] for h, r in enumerate(ranks)], dim=-1)[:, None]

        return pack(k, r_k), pack(v, r_v)

    def _unpacked(self, view: KVView) -> KVView:
        """The inverse of ``_packed`` on a cache view: each head's coordinates, zero-padded to the widest."""
        r_k, r_v = self._head_ranks()

        def unpack(x: torch.Tensor, ranks: list[int]) -> torch.Tensor:
            width = max(ranks)
            heads = x[:, 0].split(ranks, dim=-1)
            return torch.stack([torch.nn.functional.pad(h, (0, width - h.shape[-1])) for h in heads], dim=1)

        return dataclasses.replace(view, k=unpack(view.k, r_k), v=unpack(view.v, r_v))

    def _kv_head_of_query(self) -> torch.Tensor:
        """Per query head, the K/V head it reads (KDGQA's differ per query: see ``_attend_key_driven``)."""
        if self.cfg.query_allocation == "dgqa":
            return kv_head_of_query(self.allocation, self.n_heads)
        if self.kv_index is not None:
            return self.kv_index
        return torch.arange(self.n_heads, device=self.q_proj.weight.device) // (self.n_heads // self.n_kv_heads)

    def _kv_heads(self, projected: torch.Tensor, which: str) -> torch.Tensor:
        """[B, T, width] -> [B, heads, T, head_dim] (n_kv_heads keys, n_v_heads values), merging WGQA's
        weighted heads."""
        B, T, _ = projected.shape
        dim = self.v_head_dim if which == "v" else self.head_dim
        if self.cfg.kv_merge == 1:
            heads = self.n_v_heads if which == "v" else self.n_kv_heads
            return projected.view(B, T, heads, dim).transpose(1, 2)
        heads = projected.view(B, T, self.n_kv_heads, self.cfg.kv_merge, dim)
        weights = getattr(self, f"{which}_merge").view(self.n_kv_heads, self.cfg.kv_merge, 1)
        return (heads * weights).sum(dim=3).transpose(1, 2)

    def _kv_for(self, q: torch.Tensor, view: KVView) -> tuple[torch.Tensor, torch.Tensor]:
        """The view's K/V in the queries' dtype (a cache may keep another), one head per query head
        with uneven groups."""
        k, v = view.k, view.v
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.values_apart:  # DHA: each query head's key head and value head, gathered apart
            return k.index_select(1, self._kv_head_of_query()), v.index_select(1, self.v_index)
        if self.kv_index is not None or self.cfg.query_allocation == "dgqa":  # else attention groups them itself
            index = self._kv_head_of_query()
            k, v = k.index_select(1, index), v.index_select(1, index)
        return k, v

    def _attend_key_driven(self, q: torch.Tensor, view: KVView, state: StepState) -> torch.Tensor:
        """KDGQA: each query's heads split among the K/V heads by the norms of the keys that query sees."""
        T, S, start, doc_ids = q.shape[2], view.k.shape[2], state.start, state.doc_ids
        energy = upcast(view.k).square().sum(-1)  # [B, G, S]: squared key norms (RoPE keeps them)
        if doc_ids is None and state.pads is None and view.k_pos is None and view.end == start + T and T == S:
            energy = energy.cumsum(-1).transpose(1, 2)  # causal: every key up to the query's
        else:
            if doc_ids is not None:
                sees = document_mask(doc_ids)[:, 0]
            else:
                q_pos = start + torch.arange(T, device=q.device)
                k_pos = view.key_positions()
                sees = position_mask(q_pos, k_pos)[None]
                if state.pads is not None:
                    sees = sees & state.pad_mask(q_pos, k_pos)[:, 0]
            energy = torch.einsum("bts,bgs->btg", sees.to(energy.dtype), energy)
        allocation = key_driven_allocation(energy.sqrt(), self.n_heads)  # [B, T, G]
        reads = kv_head_of_query(allocation, self.n_heads).transpose(1, 2).unsqueeze(-1)  # [B, H, T, 1]
        y = None
        for g in range(self.n_kv_heads):  # every query head against K/V head g, kept where it reads g
            one = dataclasses.replace(view, k=view.k[:, g : g + 1], v=view.v[:, g : g + 1])
            part = self._attend(q, one, state) * (reads == g).to(q.dtype)
            y = part if y is None else y + part
        return y

    @torch.no_grad()
    def _update_allocation(self, k: torch.Tensor) -> None:
        """DGQA: fold this batch's key norms into their running average and re-allocate the query heads
        for the forwards that follow (this one used the allocation from before it)."""
        norms = upcast(k).norm(dim=(2, 3)).sum(0)  # each sequence's [T, D] norm per K/V head, summed over the batch
        beta = self.cfg.allocation_beta
        self.key_norm_average.copy_(beta * norms + (1 - beta) * upcast(self.key_norm_average))
        self.allocation.copy_(key_driven_allocation(upcast(self.key_norm_average), self.n_heads, min_max=False))

    def _attend(self, q: torch.Tensor, view: KVView, state: StepState) -> torch.Tensor:
        """Attention of the step's queries (positions ``state.start..``) over ``view``, with the cheapest correct
        mask."""
        k, v = self._kv_for(q, view)
        if self._sinks_block_by_block(q, view, state):
            k_pos = view.k_pos if view.k_pos is not None else view.end - k.shape[2]  # a run's first position
            return windowed_attention_with_sinks(
                attention, q, k, v, k_pos, self.cfg.window, self.cfg.sinks, **self.score_options()
            )
        return attention(q, k, v, **self._mask_options(q, view, state), **self.score_options())

    def score_options(self) -> dict[str, Any]:
        """How the attention ops turn scores into weights here: the scale, Gemma 2's cap, gpt-oss's sink logits
        (asked at each call: the parameter is the module's current one)."""
        return {"scale": self.scale, "softcap": self.softcap, "sink_logits": self.sink_logits}

    def _sinks_block_by_block(self, q: torch.Tensor, view: KVView, state: StepState) -> bool:
        """Whether a window with sinks over many queries goes block by block: the queries the last T of the
        view's keys, which are in the order of their positions (a first prefill, or a prompt's piece on a sink
        ring: the sinks, then the window's run). Its mask over every key made Hymba's windowed layers cost as
        much as its global ones (a 16K-token prefill, benchmarks/RESULTS.md)."""
        T, window = q.shape[2], self.cfg.window
        return (
            bool(self.cfg.sinks)
            and T > 2 * window
            and state.doc_ids is None
            and state.pads is None
            and not isinstance(state.start, torch.Tensor)
            and view.end == state.start + T
            and (view.k_pos is None or view.k_pos.dim() == 1)
        )

    def score_problem(self) -> str | None:
        """Why a cache policy that keeps positions by the attention they receive (H2O, SnapKV) cannot hold this
        layer's K/V; None if it can: the layer forms its own probabilities over its own keys and values."""
        cfg = self.cfg
        problems = [
            (self.reads_weights or self.shares_attention, "shares attention probabilities between layers (SA), "
             "whose layers' caches would have to keep the same positions"),
            (cfg.value_residual is not None, "mixes in layer 0's values "
             f"(value_residual={cfg.value_residual}), which layer 0 keeps at positions of its own"),
            (cfg.kv_ranks is not None, "caches MatryoshkaKV's coordinates"),
            (self.values_apart, "groups its values apart from its keys (DHA)"),
            (cfg.query_allocation == "kdgqa", "allocates query heads by the keys each query sees (KDGQA)"),
        ]  # fmt: skip
        return next((why for bad, why in problems if bad), None)

    def _attend_scored(self, q: torch.Tensor, view: KVView, state: StepState, slot) -> torch.Tensor:
        """Attention whose probabilities the cache keeps positions by (H2O, SnapKV): those of the step's last
        ``slot.scored_rows`` queries are formed explicitly (fused kernels never form them) and handed to the slot,
        summed over each K/V head's query heads; pads' queries hand none."""
        if not getattr(self, "_told_scores", False):
            log.info("cache policy: layer %d forms its attention probabilities explicitly for the cache to keep "
                     "positions by (fused attention kernels do not return them)", self.layer_idx)  # fmt: skip
            self._told_scores = True
        k, v = self._kv_for(q, view)
        B, _, T, _ = q.shape
        rows = slot.scored_rows
        if rows == T:
            weights = attention_weights(q, k, **self._mask_options(q, view, state), **self.score_options())
            y = apply_attention_weights(weights, v)
        else:  # SnapKV's observation window: the prompt's last queries
            y = attention(q, k, v, **self._mask_options(q, view, state), **self.score_options())
            last = dataclasses.replace(state, start=state.start + T - rows)
            q = q[:, :, T - rows :]
            weights = attention_weights(q, k, **self._mask_options(q, view, last), **self.score_options())
        real_keys = None
        if state.pads is not None:  # pads' queries give no attention, pads' keys are chosen last
            q_real = state.real_at(state.start + torch.arange(T - rows, T, device=q.device))  # [B, rows]
            weights = weights * q_real[:, None, :, None].to(weights.dtype)
            real_keys = state.real_at(view.key_positions())
        per_kv = weights.new_zeros(B, view.k.shape[1], rows, weights.shape[-1], dtype=compute_dtype(weights.dtype))
        slot.observe(per_kv.index_add_(1, self._kv_head_of_query(), upcast(weights)), real_keys)
        return y

    def _mask_options(self, q: torch.Tensor, view: KVView, state: StepState) -> dict:
        """Which keys of ``view`` the step's queries see, as the cheapest options of the attention ops."""
        T, S, window, sinks = q.shape[2], view.k.shape[2], self.cfg.window, self.cfg.sinks
        start, doc_ids = state.start, state.doc_ids
        if view.k_pos is not None and view.k_pos.dim() == 3:  # positions per row and K/V head (H2O, SnapKV)
            if T == 1 and state.pads is None and window is None and not isinstance(start, torch.Tensor):
                return {}  # such a cache holds no position after the step's: one query sees all
            q_pos = start + torch.arange(T, device=q.device)
            mask = position_mask(q_pos, view.k_pos, window, sinks)  # [B, Hkv, T, S]
            if state.pads is not None:
                mask = mask & state.pad_mask(q_pos, view.k_pos)
            return {"mask": mask.index_select(1, self._kv_head_of_query())}
        if doc_ids is not None:  # packed documents (training, no cache): T == S
            if sinks:
                raise ValueError(f"sinks={sinks} are a row's first positions: packed documents (doc_ids) have none")
            return {"doc_ids": doc_ids, "window": window}
        if state.pads is not None:  # left-padded rows: the pads' keys hidden, row by row
            why = pads_refused_by_window(window, sinks, state.pad_from)
            if why:
                raise ValueError(f"{why}; pass rows one at a time")
            q_pos = start + torch.arange(T, device=q.device)
            k_pos = view.key_positions()
            return {"mask": position_mask(q_pos, k_pos, window, sinks) & state.pad_mask(q_pos, k_pos)}
        if view.k_pos is None and view.end == start + T and (not sinks or S <= window):  # sinks within the window
            if T == 1 and (window is None or S <= window):  # one query after all its keys: nothing to mask
                return {}
            if T == S or (T > 1 and not isinstance(start, torch.Tensor)):
                # the queries are the last T of the S positions in a row: a first prefill, or a prompt on a
                # filled cache (the cached positions from 0, or a ring's held window)
                return {"causal": True, "window": window}
        q_pos = start + torch.arange(T, device=q.device)  # start may be a tensor (the compiled decode step)
        k_pos = view.key_positions()
        return {"mask": position_mask(q_pos, k_pos, window, sinks)}

    def _attend_before(self, q: torch.Tensor, view: KVView | None, state: StepState) -> torch.Tensor:
        """Attention to the keys strictly before each query (at the positions ``view`` gives: those of a cache
        policy's window once it evicts, not 0..S-1); none: output 0."""
        B, H, T, _ = q.shape
        if view is None or view.k.shape[2] == 0:  # the first pass: the later layer has given nothing yet
            return q.new_zeros(B, H, T, self.v_head_dim)
        doc_ids = state.doc_ids
        k, v = self._kv_for(q, view)
        q_pos = state.start + torch.arange(T, device=q.device)
        k_pos = view.key_positions()
        mask = k_pos[None, :] < q_pos[:, None]  # [T, S]
        if doc_ids is not None:  # training, S == T
            mask = (mask & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]
        elif state.pads is not None:
            mask = mask & state.pad_mask(q_pos, k_pos)
        sees_any = mask.any(dim=-1, keepdim=True)
        mask = mask | ~sees_any  # rows with nothing to see attend anywhere (no NaN), then count for nothing
        return attention(q, k, v, mask=mask, **self.score_options()) * sees_any

    # -- cache and footprint -------------------------------------------------

    def _cached_positions(self, max_len: int) -> int:
        """Positions a slot must hold: the window (and the sinks) when shorter than max_len."""
        w = self.cfg.window
        return max_len if w is None or w + self.cfg.sinks >= max_len else w + self.cfg.sinks

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        if not self.owns_kv:
            return None
        length = self._cached_positions(max_len)
        cls = StaticKV if length == max_len else RingKV
        if self.cfg.kv_ranks is not None and self._heads_differ():
            k_width, v_width = self._cached_elements()  # per-head ranks: one packed head
            return cls(batch_size, 1, length, k_width, v_width, dtype=dtype, device=device)
        k_dim, v_dim = self._cached_widths()
        if cls is RingKV and self.cfg.sinks:
            return SinkRingKV(batch_size, self.n_kv_heads, self.cfg.sinks, self.cfg.window, k_dim, v_dim,
                              v_heads=self.n_v_heads, dtype=dtype, device=device)  # fmt: skip
        return cls(batch_size, self.n_kv_heads, length, k_dim, v_dim, v_heads=self.n_v_heads, dtype=dtype,
                   device=device)  # fmt: skip

    def _cached_widths(self) -> tuple[int, int]:
        """Channels cached per K/V head for keys and for values (MatryoshkaKV: its ranks, the widest where they
        differ by head; SVFormer: no values)."""
        if self.cfg.kv_ranks is not None:
            return tuple(map(max, self._head_ranks()))
        if self.reads_weights:  # SA: values only
            return 0, self.v_head_dim
        return self.head_dim, 0 if self.value_residual == "svformer" else self.v_head_dim

    def _cached_elements(self) -> tuple[int, int]:
        """Key and value channels cached per token, all heads together."""
        if self.cfg.kv_ranks is not None:
            return tuple(map(sum, self._head_ranks()))
        k_dim, v_dim = self._cached_widths()
        return self.n_kv_heads * k_dim, self.n_v_heads * v_dim

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        if not self.owns_kv:
            return LayerFootprint()
        per_token = sum(self._cached_elements()) * dtype.itemsize
        window = self.cfg.window
        return LayerFootprint(bytes_per_token=per_token, max_tokens=None if window is None else window + self.cfg.sinks)
