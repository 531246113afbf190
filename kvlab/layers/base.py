"""What every token mixer shares: its config base, the registry, the step state, footprint rows.

A mixer is an ``nn.Module`` registered under a ``kind`` with a config
dataclass. The generic decoder builds one per layer with
``MIXERS[kind](cfg, d_model=..., layer_idx=..., kv_source=..., max_seq_len=...)``
(``kv_source``: the layer whose keys/values it attends to, itself unless the
model's plan says otherwise; a config with ``takes_depth`` also gets
``n_layers``, the model's depth) and relies on this interface:

- ``forward(x, *, cache=None, state=None) -> y`` where ``cache`` is the slot
  the mixer allocated itself (``None`` when running without a cache or when
  the layer owns no state) and ``state`` is the forward's ``StepState``:
  where the step's tokens sit (``start``, the cache's one position counter;
  ``positions``; packed ``doc_ids``) and what layers published for their
  readers this step. A mixer called alone may omit it (a step at position 0);
- ``new_cache_slot(batch_size, max_len, dtype, device)`` -> a slot with
  ``nbytes(seen)``, ``allocated_bytes()``, ``reset()`` and
  ``reorder(batch_idx)`` (beam search), or ``None``;
- ``kv_footprint(dtype) -> LayerFootprint``, computed from the same shapes
  ``new_cache_slot`` allocates.

A mixer whose output ends in one ``nn.Linear`` names it in the class
attribute ``output_projection`` (e.g. ``"o_proj"``), so that a parallel
layer can share one projection among its branches (Hymba). One that can
give the last position's output alone, still writing its cache for every
position, sets ``takes_last_only = True`` and takes ``forward(...,
last_only=True)``: a prefill's top layer is called so (``Block``), and may
still return every position where it must compute them.

Its config declares what the layer can give other layers and take from
them (``publishes``, ``reads``, ``reads_later``), whether its cache may be
written twice for the same positions (``cache_rewritable()``: the parallel
passes of layers that read later layers do), and checks each read
(``read_problem``). The model's plan (``kvlab.archs.plan``) and the decoder
dispatch on these declarations alone, so a new mixer family registers
itself here and needs no change anywhere else.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


# What one layer can take from another (``Read.what``): its keys/values (cross-layer KV sharing), its values
# alone (value residuals), its attention weights, an encoder's states.
READ_KINDS = ("kv", "values", "attention", "encoder")


@dataclass
class MixerConfig:
    """Base of every mixer's config; subclasses set ``kind`` and add fields.

    The class variables declare the family's capabilities, which the plan
    checks and the decoder dispatches on (never on a family's attributes).
    """

    kind: ClassVar[str] = ""
    publishes: ClassVar[frozenset[str]] = frozenset()  # what of READ_KINDS a layer of this kind gives readers
    reads: ClassVar[frozenset[str]] = frozenset()  # what of READ_KINDS it can take from another layer
    reads_later: ClassVar[bool] = False  # it can read a later layer's keys/values (LCKV's parallel passes)
    takes_pads: ClassVar[bool] = True  # it gives left-padded rows their unpadded outputs (StepState.pads)
    takes_depth: ClassVar[bool] = False  # its mixer is built knowing the model's depth (n_layers=...)

    def validate(self, d_model: int, path: str) -> None:
        """Check values and fill defaults that depend on the model (e.g. head_dim), in place.

        Called by ``resolved`` on a copy; call ``resolved`` rather than this.
        """

    def resolved(self, d_model: int, path: str) -> MixerConfig:
        """A new, checked config with its defaults filled; this one is left as it is (resolving a
        resolved config gives an equal one). Mixers resolve the config they are built from."""
        new = copy.deepcopy(self)
        new.validate(d_model, path)
        return new

    def cache_rewritable(self) -> bool:
        """Whether a step may run twice over the same positions with a cache (the parallel passes of layers
        that read later layers do): true for caches written at explicit positions, false for recurrent states."""
        return False

    def own_reads(self, layer_idx: int) -> tuple[tuple[str, int], ...]:
        """What this mixer reads by its own settings at layer ``layer_idx``, as (what, layer) pairs
        (a value residual reads layer 0's values); keys/values of other layers come from the model's plan."""
        return ()

    def context_problem(self, max_seq_len: int) -> str | None:
        """Why this mixer does not fit a model of ``max_seq_len`` tokens; None if it does."""
        return None

    def read_problem(self, what: str, source: MixerConfig, later: bool) -> str | None:
        """Why this mixer cannot take ``what`` from a layer with mixer ``source`` (a later one when ``later``)."""
        specific = {"kv": self.kv_compatible, "values": self.first_layer_problem}.get(what)
        problem = specific(source) if specific is not None and what in self.reads else None
        if problem is not None:
            return problem
        if what not in self.reads:
            return f"mixer kind {self.kind!r} does not read another layer's {READ_NAMES[what]}"
        if what not in source.publishes:
            return f"its mixer kind {source.kind!r} publishes no {READ_NAMES[what]}"
        if later and not self.reads_later:
            return f"mixer kind {self.kind!r} reads only earlier layers"
        return None

    def kv_compatible(self, source: MixerConfig) -> str | None:
        """Why this mixer cannot read ``source``'s K/V, or None if it can."""
        return f"mixer kind {self.kind!r} does not read another layer's K/V"

    def first_layer_problem(self, first: MixerConfig) -> str | None:
        """Why this mixer, above layer 0, cannot use the values of layer 0's mixer ``first``; None if fine."""
        return None


READ_NAMES = {"kv": "K/V", "values": "values", "attention": "attention weights", "encoder": "encoder states"}


@dataclass
class StepState:
    """What one forward carries through the layers, passed to every mixer.

    ``start`` is the absolute position of the step's first token: the
    model's cache counter (``Cache.seen``), 0 without a cache; slots never
    count. In the compiled decode step it is a 0-d tensor, so that one graph
    serves every position: mixers then write and read their slots by index
    and mask, never by a Python slice or branch on its value. ``positions``
    [B, T] overrides the positions (packed documents restart them);
    ``doc_ids`` [B, T] marks packed documents. ``published`` holds what
    layers gave their readers this pass, keyed ``(what, layer)``;
    ``earlier_pass`` what later layers gave in the pass before (or hold in
    the cache), which readers of later layers see.

    Left-padded rows: ``pads`` [B] counts each row's pad tokens, which sit at
    the absolute positions ``pad_from .. pad_from + pads - 1`` (after the meta
    tokens, if any), and ``real`` [B, T] marks the step's tokens that are not
    pads (None when the step holds none). Attention hides the pads' keys
    (``pad_mask``); recurrent mixers leave their state as it is at pad tokens
    and give their convolution or token shift only the real inputs; positions
    count real tokens (``positions``, set by the model).
    """

    start: int | torch.Tensor = 0
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    published: dict[tuple[str, int], Any] = field(default_factory=dict)
    earlier_pass: dict[tuple[str, int], Any] = field(default_factory=dict)
    context: torch.Tensor | None = None
    pads: torch.Tensor | None = None
    pad_from: int = 0
    real: torch.Tensor | None = None

    def pad_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, T, S]: which keys (absolute positions ``k_pos`` [S]) the queries (``q_pos`` [T]) may see as far
        as pads go: real keys, and a pad query its own key (so that no query sees nothing: its output is
        discarded, but a NaN would reach the real tokens through a zero weight). None without pads."""
        if self.pads is None:
            return None
        if k_pos.dim() == 3:  # positions per row and K/V head [B, H, S] (H2O, SnapKV): [B, H, T, S]
            return self.real_at(k_pos)[:, :, None, :] | (q_pos[:, None] == k_pos[..., None, :])
        return (self.real_at(k_pos)[:, None, :] | (q_pos[:, None] == k_pos[None, :])[None])[:, None]

    def real_at(self, pos: torch.Tensor) -> torch.Tensor:
        """[B, N]: whether each row holds a real token (not a pad) at the absolute positions ``pos`` [N] (or
        [B, ...]: each row's own positions, the same shape back)."""
        pads = self.pads.to(pos.device)
        pads, pos = (pads[:, None], pos[None]) if pos.dim() == 1 else (pads.view(-1, *[1] * (pos.dim() - 1)), pos)
        return (pos < self.pad_from) | (pos >= self.pad_from + pads)

    def real_tokens(self, length: int) -> torch.Tensor | None:
        """[B, length]: which of the step's tokens are not pads; None when all are."""
        real = self.real_at(self.start + torch.arange(length, device=self.pads.device))
        return None if bool(real.all()) else real

    def real_positions(self, length: int) -> torch.Tensor:
        """[B, length]: the positions of the step's tokens counted without the pads before them (a pad's own
        is clamped to 0: its output is discarded)."""
        absolute = self.start + torch.arange(length, device=self.pads.device)
        shifted = torch.where(absolute >= self.pad_from, absolute - self.pads[:, None], absolute)
        return shifted.clamp(min=0)

    def publish(self, what: str, layer: int, value: Any) -> None:
        self.published[(what, layer)] = value

    def read(self, what: str, layer: int, reader: int) -> Any:
        """What ``layer`` published for ``reader``: from this pass, or for a later layer from the pass
        before (None when there was none: the first pass sees nothing of it)."""
        if layer > reader:
            return self.earlier_pass.get((what, layer))
        if (what, layer) not in self.published:
            raise RuntimeError(
                f"layer {reader} reads the {READ_NAMES[what]} of layer {layer}, which published none this step"
            )
        return self.published[(what, layer)]

    def tail(self, t: int) -> StepState:
        """The same step for its last token only (the ``t``-th): the top layers of a prefill that keep no
        state need nothing else. What lower layers published stays visible."""
        positions = self.positions[..., -1:] if self.positions is not None else None
        return StepState(self.start + t - 1, positions, None, self.published, self.earlier_pass, self.context,
                         self.pads, self.pad_from)  # fmt: skip


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
