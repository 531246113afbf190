"""Mixers side by side in one layer: Hymba's hybrid heads (Dong et al. 2024, §2.1).

Every branch (e.g. attention heads and SSM heads) reads the same normalised
input; their outputs are each normalised and scaled by a learned vector
beta, then averaged. Two forms:

- ``shared_output: true``, Hymba's: the branches' outputs before any output
  projection (the attention heads' concatenated values, the SSM's gated
  output; equally wide) are normalised, averaged and projected by one
  output projection, ``y = W_out mean_i(beta_i * RMSNorm(branch_i(x)))``, as
  its paper (Eq. 3) and code (``pre_avg_layernorm1/2``, one ``out_proj``)
  do. A branch kind names its own output projection (``output_projection``),
  which the layer replaces by the identity.
- ``shared_output: false``: each branch keeps its own output projection and
  the normalisation follows it, ``y = mean_i(beta_i * RMSNorm(branch_i(x)))``,
  so any registered mixer can be a branch unchanged.

- ``combine: concat``, RecurFormer's (Yan et al. 2024): the branches are
  one layer's heads split by kind. The attention heads the paper calls
  recency-aware (their weights sit on the last few tokens) are replaced by
  Mamba, whose channels take those heads' place before the layer's one
  output projection, the others stay attention:
  ``y = W_out [attention heads(x); mamba(x)]``, no norms, no betas, widths
  free. ``kvlab.archs.convert`` makes it from a trained attention layer
  (``to: recurformer``), keeping every weight of the heads that stay.
- ``combine: sum``, Falcon-H1's (TII 2025): the branches' outputs added,
  ``y = sum_i branch_i(x)``, no norms, no betas (its multipliers on each
  branch's input and output are linear: its weights hold them here).

Attention recalls exactly from its cache, the SSM summarises the context in
a fixed state; Hymba runs both on every token. The layer reads another
layer's K/V through its one branch that has K/V (Hymba shares K/V between
consecutive layers): that branch attends to the source layer's attention
branch and keeps no cache, the others keep theirs.

The cache slot holds one slot per branch; the footprint is their sum (at
most one branch may keep a per-token cache, or all the same window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvlab._config import check_bool, check_float
from kvlab.layers.base import (
    MIXERS,
    LayerFootprint,
    MixerConfig,
    StepState,
    mixer_config,
    register_mixer,
)
from kvlab.layers.kv_cache import SlotGroup
from kvlab.layers.norm import RMSNorm

COMBINES = ("mean", "concat", "sum")  # how the outputs meet: Hymba's normalised average, RecurFormer's heads, a sum


@dataclass
class ParallelConfig(MixerConfig):
    kind = "parallel"
    publishes = frozenset({"kv"})  # its attention branch's K/V (kv_compatible checks there is one)
    reads = frozenset({"kv", "values"})  # K/V through its attention branch; a branch's value residual
    mixers: list = field(default_factory=list)  # two or more mixer specs, run side by side
    shared_output: bool = False  # Hymba: one output projection after the normalised, averaged branches
    combine: str = "mean"  # mean: Hymba's normalised average; concat: RecurFormer's heads side by side; sum
    norm_eps: float = 1e-5

    def validate(self, d_model: int, path: str) -> None:
        if not isinstance(self.mixers, (list, tuple)) or len(self.mixers) < 2:
            raise ValueError(f"{path}.mixers={self.mixers!r} must list two or more mixer specs to run side by side")
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        check_bool(self.shared_output, f"{path}.shared_output")
        if self.combine not in COMBINES:
            raise ValueError(f"{path}.combine={self.combine!r} is not one of {', '.join(COMBINES)}")
        if self.combine == "concat" and not self.shared_output:
            raise ValueError(f"{path}.combine=concat places the branches' outputs side by side before one output "
                             "projection: it needs shared_output: true")  # fmt: skip
        branches = [mixer_config(m, f"{path}.mixers[{i}]") for i, m in enumerate(self.mixers)]
        for i, m in enumerate(branches):
            if isinstance(m, ParallelConfig):
                raise ValueError(f"{path}.mixers[{i}] is itself parallel; list its branches here instead")
        self.mixers = [m.resolved(d_model, f"{path}.mixers[{i}]") for i, m in enumerate(branches)]
        if self.shared_output:
            self._check_shared_output(d_model, path)

    def _check_shared_output(self, d_model: int, path: str) -> None:
        """One projection for every branch: each must end in one, without a bias, all equally wide (read off
        the branches built on the meta device, so nothing here restates a family's widths)."""
        widths = []
        for i, m in enumerate(self.mixers):
            cls = MIXERS[m.kind]
            name = getattr(cls, "output_projection", None)
            if name is None:
                raise ValueError(f"{path}.mixers[{i}]: mixer kind {m.kind!r} has no output projection to share "
                                 "(shared_output: false keeps each branch's own)")  # fmt: skip
            with torch.device("meta"):
                proj = getattr(cls(m, d_model=d_model, layer_idx=0, kv_source=0, max_seq_len=1), name)
            if proj.bias is not None:
                raise ValueError(f"{path}.mixers[{i}]: a shared output projection has no bias; this branch's {name} "
                                 "has one (e.g. attention's o_bias)")  # fmt: skip
            widths.append(proj.in_features)
        if len(set(widths)) > 1 and self.combine != "concat":
            raise ValueError(
                f"{path}.shared_output: the branches' outputs are {widths} wide; one projection needs "
                "them equal (e.g. attention's n_heads * v_head_dim = the SSM's expand * d_model)"
            )

    @property
    def takes_pads(self) -> bool:  # every branch must (an instance's: the branches are its own)
        return all(m.takes_pads for m in self.mixers if isinstance(m, MixerConfig))

    @property
    def takes_depth(self) -> bool:  # any branch (given to those that do)
        return any(m.takes_depth for m in self.mixers if isinstance(m, MixerConfig))

    def kv_branch(self) -> MixerConfig | None:
        """The one branch that has K/V to give or take (attention); None if there is none."""
        found = [m for m in self.mixers if "kv" in m.publishes]
        return found[0] if len(found) == 1 else None

    def own_reads(self, layer_idx: int) -> tuple[tuple[str, int], ...]:
        return tuple(dict.fromkeys(r for m in self.mixers for r in m.own_reads(layer_idx)))

    def context_problem(self, max_seq_len: int) -> str | None:
        return next((p for m in self.mixers if (p := m.context_problem(max_seq_len)) is not None), None)

    def first_layer_problem(self, first: MixerConfig) -> str | None:
        return next((p for m in self.mixers if (p := m.first_layer_problem(first)) is not None), None)

    def kv_compatible(self, source: MixerConfig) -> str | None:
        mine = self.kv_branch()
        if mine is None:
            return "a parallel layer reads K/V through one branch with K/V (attention); this one has none or several"
        theirs = source.kv_branch() if isinstance(source, ParallelConfig) else None
        if theirs is None:
            return "the source must be a parallel layer with one attention branch, whose K/V this one reads"
        return mine.kv_compatible(theirs)


@register_mixer
class Parallel(nn.Module):
    Config = ParallelConfig

    def __init__(self, cfg: ParallelConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int,
                 n_layers: int | None = None):  # fmt: skip
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        self.cfg = cfg
        kv_branch = cfg.kv_branch()
        if kv_source != layer_idx and kv_branch is None:
            raise ValueError(f"layer {layer_idx}: a parallel layer reads another layer's K/V through one attention "
                             "branch; it has none or several")  # fmt: skip
        self.branches = nn.ModuleList(
            MIXERS[m.kind](
                m,
                d_model=d_model,
                layer_idx=layer_idx,
                max_seq_len=max_seq_len,
                kv_source=kv_source if m is kv_branch else layer_idx,
                **({"n_layers": n_layers} if m.takes_depth else {}),
            )  # fmt: skip
            for m in cfg.mixers
        )
        width = d_model
        if cfg.shared_output:  # each branch's output projection gives way to the layer's one (widths checked)
            names = [type(b).output_projection for b in self.branches]
            widths = [getattr(b, name).in_features for b, name in zip(self.branches, names, strict=True)]
            width = sum(widths) if cfg.combine == "concat" else widths[0]
            for branch, name in zip(self.branches, names, strict=True):
                setattr(branch, name, nn.Identity())
            self.out_proj = nn.Linear(width, d_model, bias=False)
        if cfg.combine == "mean":
            self.betas = nn.ModuleList(RMSNorm(width, cfg.norm_eps) for _ in cfg.mixers)  # weight = beta_i
        self.kv_footprint(torch.float32)  # refuse branch caches that one footprint row cannot describe

    def forward(self, x, *, cache=None, state: StepState | None = None):
        state = StepState() if state is None else state
        outs = [branch(x, cache=cache.slots[i] if cache is not None else None, state=state)
                for i, branch in enumerate(self.branches)]  # fmt: skip
        if self.cfg.combine == "concat":
            return self.out_proj(torch.cat(outs, dim=-1))
        if self.cfg.combine == "sum":
            out = sum(outs)
        else:
            out = sum(norm(o) for o, norm in zip(outs, self.betas, strict=True)) / len(outs)
        return self.out_proj(out) if self.cfg.shared_output else out

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
