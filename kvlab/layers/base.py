"""What every token mixer shares: its config base, the registry, footprint rows.

A mixer is an ``nn.Module`` registered under a ``kind`` with a config
dataclass. The generic decoder builds one per layer with
``MIXERS[kind](cfg, d_model=..., layer_idx=..., kv_source=..., max_seq_len=...)``
and relies on this interface:

- ``forward(x, *, cache=None, positions=None, shared_kv=None, doc_ids=None) -> y``
  where ``cache`` is the slot the mixer allocated itself (``None`` when
  running without a cache or when the layer owns no state), ``positions``
  are absolute token positions (None: continue from the cache), ``shared_kv``
  is a per-forward dict through which a layer publishes the K/V it produced
  for layers that read it (cross-layer sharing), and ``doc_ids`` [B, T]
  marks packed documents, which must not see each other;
- ``new_cache_slot(batch_size, max_len, dtype, device)`` -> a slot with
  ``nbytes()``, ``allocated_bytes()``, ``reset()`` and ``reorder(batch_idx)``
  (beam search), or ``None``;
- ``kv_footprint(dtype) -> LayerFootprint``, computed from the same shapes
  ``new_cache_slot`` allocates.

A new mixer family registers itself here and needs no change to the decoder.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlab._config import from_dict

MIXERS: dict[str, type] = {}


def register_mixer(cls: type) -> type:
    """Class decorator: make ``cls`` buildable as ``{kind: cls.Config.kind, ...}``."""
    kind = cls.Config.kind
    if kind in MIXERS:
        raise ValueError(f"mixer kind {kind!r} is registered twice ({MIXERS[kind].__name__}, {cls.__name__})")
    MIXERS[kind] = cls
    return cls


@dataclass
class MixerConfig:
    """Base of every mixer's config; subclasses set ``kind`` and add fields."""

    kind: ClassVar[str] = ""

    def validate(self, d_model: int, path: str) -> None:
        """Check values and fill defaults that depend on the model (e.g. head_dim)."""

    def kv_compatible(self, source: MixerConfig) -> str | None:
        """Why this mixer cannot read ``source``'s K/V, or None if it can."""
        return f"mixer kind {self.kind!r} does not read another layer's K/V"

    def first_layer_problem(self, first: MixerConfig) -> str | None:
        """Why this mixer, above layer 0, cannot use what it needs from layer 0's mixer ``first``; None if fine."""
        return None


def check_reads_own_state(kind: str, layer_idx: int, kv_source: int) -> None:
    """Mixers with no cross-layer reading: ``kv_source`` must be the layer itself.

    Config validation refuses such layouts first (``kv_compatible``); this guards direct construction.
    """
    if kv_source != layer_idx:
        raise ValueError(f"layer {layer_idx}: mixer kind {kind!r} does not read another layer's K/V")


def default_head_dim(head_dim: int | None, d_model: int, n_heads: int, path: str) -> int:
    """``head_dim``, or d_model / n_heads when it is None (which must divide)."""
    if head_dim is not None:
        return head_dim
    if d_model % n_heads:
        raise ValueError(
            f"d_model={d_model} is not divisible by {path}.n_heads={n_heads}; "
            f"set {path}.head_dim explicitly or choose n_heads dividing d_model"
        )
    return d_model // n_heads


def mixer_config(spec: Mapping[str, Any] | MixerConfig, path: str) -> MixerConfig:
    """Parse ``{kind: ..., **settings}`` into the registered mixer's config."""
    if isinstance(spec, MixerConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: expected a mapping with a 'kind' key, got {spec!r}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in MIXERS:
        raise ValueError(f"{path}.kind={kind!r} is not a known mixer kind; known kinds are {', '.join(sorted(MIXERS))}")
    settings = {k: v for k, v in spec.items() if k != "kind"}
    return from_dict(MIXERS[kind].Config, settings, path)


@dataclass(frozen=True)
class LayerFootprint:
    """Cache bytes one layer holds for one sequence.

    ``bytes_per_token`` is paid for each token seen, for at most
    ``max_tokens`` tokens (a sliding window) or without limit (None);
    ``fixed_bytes`` is paid once (recurrent states, memories).
    """

    bytes_per_token: int = 0
    fixed_bytes: int = 0
    max_tokens: int | None = None

    def total_bytes(self, seq_len: int) -> int:
        tokens = seq_len if self.max_tokens is None else min(seq_len, self.max_tokens)
        return self.bytes_per_token * tokens + self.fixed_bytes


def per_document(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, doc_ids: torch.Tensor):
    """``forward`` run on each packed document of ``x`` [B, T, D] alone, as its own sequence.

    For mixers whose segments or chunks count from a document's start (Infini-attention, FLASH),
    where masking alone cannot give a document the outputs it has on its own.
    """
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        starts = [0, *(torch.nonzero(doc_ids[b, 1:] != doc_ids[b, :-1]).flatten() + 1).tolist(), x.shape[1]]
        for s, e in itertools.pairwise(starts):
            out[b : b + 1, s:e] = forward(x[b : b + 1, s:e])
    return out
