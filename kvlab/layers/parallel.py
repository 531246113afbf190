"""Mixers side by side in one layer: Hymba's hybrid heads (Dong et al. 2024, §2.1).

Every branch (e.g. attention heads and SSM heads) reads the same normalised
input; their outputs are each normalised and scaled by a learned vector
beta, then averaged:

    y = mean_i( beta_i * RMSNorm(branch_i(x)) )

Attention recalls exactly from its cache, the SSM summarises the context in
a fixed state; Hymba runs both on every token. One difference from Hymba,
whose branches share one output projection after the normalisation: here
each branch keeps its own output projection and the normalisation follows
it, so any registered mixer can be a branch unchanged.

The cache slot holds one slot per branch; the footprint is their sum (at
most one branch may keep a per-token cache, or all the same window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvlab._config import check_float
from kvlab.layers.base import (
    MIXERS,
    LayerFootprint,
    MixerConfig,
    StepState,
    check_reads_own_state,
    mixer_config,
    register_mixer,
)
from kvlab.layers.kv_cache import SlotGroup
from kvlab.layers.norm import RMSNorm


@dataclass
class ParallelConfig(MixerConfig):
    kind = "parallel"
    reads = frozenset({"values"})  # a branch's value residual (each branch checks its own)
    mixers: list = field(default_factory=list)  # two or more mixer specs, run side by side
    norm_eps: float = 1e-5

    def validate(self, d_model: int, path: str) -> None:
        if not isinstance(self.mixers, (list, tuple)) or len(self.mixers) < 2:
            raise ValueError(f"{path}.mixers={self.mixers!r} must list two or more mixer specs to run side by side")
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        branches = [mixer_config(m, f"{path}.mixers[{i}]") for i, m in enumerate(self.mixers)]
        for i, m in enumerate(branches):
            if isinstance(m, ParallelConfig):
                raise ValueError(f"{path}.mixers[{i}] is itself parallel; list its branches here instead")
        self.mixers = [m.resolved(d_model, f"{path}.mixers[{i}]") for i, m in enumerate(branches)]

    def own_reads(self, layer_idx: int) -> tuple[tuple[str, int], ...]:
        return tuple(dict.fromkeys(r for m in self.mixers for r in m.own_reads(layer_idx)))

    def first_layer_problem(self, first: MixerConfig) -> str | None:
        return next((p for m in self.mixers if (p := m.first_layer_problem(first)) is not None), None)


@register_mixer
class Parallel(nn.Module):
    Config = ParallelConfig

    def __init__(self, cfg: ParallelConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        self.branches = nn.ModuleList(
            MIXERS[m.kind](m, d_model=d_model, layer_idx=layer_idx, kv_source=layer_idx, max_seq_len=max_seq_len)
            for m in cfg.mixers
        )
        self.betas = nn.ModuleList(RMSNorm(d_model, cfg.norm_eps) for _ in cfg.mixers)  # weight = beta_i
        self.kv_footprint(torch.float32)  # refuse branch caches that one footprint row cannot describe

    def forward(self, x, *, cache=None, state: StepState | None = None):
        state = StepState() if state is None else state
        out = 0
        for i, (branch, norm) in enumerate(zip(self.branches, self.betas, strict=True)):
            slot = cache.slots[i] if cache is not None else None
            out = out + norm(branch(x, cache=slot, state=state))
        return out / len(self.branches)

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        return SlotGroup([b.new_cache_slot(batch_size, max_len, dtype, device) for b in self.branches])

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        rows = [b.kv_footprint(dtype) for b in self.branches]
        growing = [r for r in rows if r.bytes_per_token]
        if len({r.max_tokens for r in growing}) > 1:
            raise ValueError("parallel: branches keep per-token caches with different windows; give them one window")
        return LayerFootprint(
            bytes_per_token=sum(r.bytes_per_token for r in growing),
            fixed_bytes=sum(r.fixed_bytes for r in rows),
            max_tokens=growing[0].max_tokens if growing else None,
        )
