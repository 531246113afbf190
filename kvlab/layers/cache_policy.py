"""Cache policies: how a cache stores the keys and values attention caches per token.

A policy is chosen when the cache is made (``model.new_cache(policy=...)``,
``model.kv_footprint(dtype, policy=...)``) and changes nothing of the
mixers' math: it replaces the K/V slots (``StaticKV``, ``RingKV``,
``SinkRingKV``: every attention layer that owns a cache, whatever its
grouping, window, sinks or cross-layer readers, and the attention branches
of hybrids) by slots that hold the same positions as codes (``PolicyKV``,
``KiviKV``), or fewer of them (``sinks``, ``h2o``, ``snapkv``; the last two
are told the attention probabilities by the layer, one seam). Fixed
recurrent states are not per-token caches and stay as they are.

Policies (``POLICIES``):

- ``int8``, ``int4``: every cached key and value vector quantized on its own
  (per token and head): asymmetric min-max codes with a scale and a zero point
  per ``group`` channels (``kvlab.kernels.quant``; ``group`` None: one pair per
  vector), the scales in the cache's dtype. Bytes per vector:
  ``width * bits / 8 + 2 * width / group * itemsize``.
  MLA's latent (``PolicyLatentKV``): its compressed part so, per token, as
  CLLA-quant's cache holds it; its RoPE keys as computed.
- ``fp8``: every element cast to float8 (e4m3, no scales), 1 byte; values
  beyond e4m3's range (+-448) saturate to it.
- ``kivi`` (Liu et al. 2024, KIVI), ``bits`` 2 or 4: keys quantized per
  channel, each channel's codes in groups of ``group`` tokens with a scale
  and a zero point, values per token in groups of ``group`` channels; the
  last ``residual`` tokens stay as computed. As the paper's code does it:
  keys wait in a full-precision residual until ``residual`` of them are
  there, then are quantized together (so ``n % residual`` keys are full
  precision after n tokens), while values leave their residual one at a
  time, oldest first (the last ``min(n, residual)`` are full precision).
  Only for layers that cache every token (``StaticKV``): a window evicts
  tokens one at a time, which key groups of ``group`` tokens cannot follow.
  The compiled decode step takes it too: its static step quantizes the
  residual's keys at every step and keeps the codes only where they fill it
  (``KiviKV._static_update``), so no shape or branch depends on the fill.
- ``sinks`` (Xiao et al. 2024, StreamingLLM): a layer that caches every
  token keeps the first ``sinks`` (4) and the last ``window`` (1020); the
  others are evicted. As the paper does, positions are those within the
  cache, not in the text: the keys are cached after RoPE, at their
  positions in the text, and RoPE's angles add up, so turning the sinks' keys
  by the number of tokens evicted puts them just before the window, where
  the paper's cache positions put them (relative distances are all RoPE
  sees); the window's keys are where they are. Layers with a window of their
  own keep theirs. Not for MatryoshkaKV's layers, whose cached keys are
  projections of the rotated ones. A deviation: queries and keys keep their
  positions in the text, so a stream is bounded by ``max_seq_len`` (the
  paper's streams are unbounded, its positions never exceeding the cache's).
  With ``codec`` (int8, int4 with its ``group``, or fp8) the kept positions
  are held as that codec holds them: eviction and quantization together, the
  bytes of both (layers with a window of their own keep their window, coded).
- ``h2o`` (Zhang et al. 2023, H2O) and ``snapkv`` (Li et al. 2024): each K/V
  head of a layer that caches every token keeps ``budget`` positions of its
  own, chosen by the attention they receive (``EvictingKV``): H2O by all the
  attention received so far, at every step, keeping the last ``window`` too;
  SnapKV by the attention of a prompt's last ``window`` queries, pooled, once
  per prompt (decoded tokens are all kept). The layer forms those
  probabilities explicitly and hands them over (``Attention._attend_scored``:
  fused kernels never form them), so only attention layers that own their
  K/V and compute their own probabilities take these policies; SA, value
  residuals, MatryoshkaKV, DHA, KDGQA and layers reading a later layer's K/V
  are refused, by name. Keys keep their positions in the text (each view
  carries them per row and head). Both decode eagerly.
- ``minicache`` (Liu et al. 2024, MiniCache): from ``start_layer`` (None: the
  middle layer) on, consecutive layers that cache every token's K/V alike
  form pairs (lower, upper) whose K/V are held once (``MergedPair``): per
  position and K/V head, the two vectors' directions interpolated by SLERP
  (``interpolation``: t, toward the upper's) and each layer's magnitude, so
  a layer's vector reads back as its magnitude times the shared direction;
  the ``retain`` fraction of positions whose two vectors are furthest apart
  (angular distance) per row and head are kept unmerged, both layers' as
  computed. The paper stores it all at the upper layer, so the lower's slot
  counts nothing. The merge, retention by angular distance and the start
  from the middle layer follow the paper's abstract and figure; the
  retention rule's exact form, t's default and pairs across layers that
  cannot merge are kvlab's (the paper's text was out of reach): see
  ``MergedPair``.

StreamingLLM's sinks, KIVI and MiniCache count from the cache's first
position, which in a left-padded row is a pad: their slots refuse padded rows
(``pads_refused_because``; ``generate`` then goes row by row).

What a step attends to: what was cached before it, read back from the codes,
and its own tokens' keys and values as computed. A prompt prefilled in one
step therefore attends exactly as the uncompressed model does, and the
codes' error reaches the tokens after it (as KIVI's and vLLM's quantized
caches prefill in full precision). ``PolicyKV.nbytes`` counts the codes,
scales and zero points it holds, which is what the footprint counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction

import torch
import torch.nn.functional as F

from kvlab.kernels.ops import dequantize
from kvlab.kernels.precision import compute_dtype, upcast
from kvlab.kernels.quant import quantize
from kvlab.kernels.rope import apply_rope
from kvlab.layers.kv_cache import (
    KVView,
    LatentKV,
    QuantizedLatentKV,
    RingKV,
    SinkRingKV,
    SlotGroup,
    StaticKV,
    reorder_rows,
    sink_ring_held,
    sink_ring_in_order,
    sink_ring_slot,
)
from kvlab.layers.rope import Rotary

POLICIES = ("int8", "int4", "fp8", "kivi", "sinks", "h2o", "snapkv", "minicache")
_CODECS = ("int8", "int4", "fp8")  # the policies that hold each vector as codes
EVICTING = ("h2o", "snapkv")  # the policies that keep each head's positions by the attention they receive
POOLINGS = ("avgpool", "maxpool")
_BITS = {"int8": 8, "int4": 4, "fp8": 8}
KIVI_BITS = (2, 4)
FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


@dataclass(frozen=True)
class CachePolicy:
    kind: str
    # int8/int4: channels per scale and zero point (None: a whole head's vector); kivi: the keys' tokens and the
    # values' channels per scale and zero point (None: 32, the paper's)
    group: int | None = None
    bits: int | None = None  # kivi: 2 or 4 (None: 2); the others' bits are their names'
    residual: int | None = None  # kivi: the recent tokens kept as computed, a multiple of group (None: 128)
    sinks: int | None = None  # sinks: the first tokens kept (None: 4, the paper's)
    # sinks: the last tokens kept (None: 1020: a cache of 1,024, the paper's); h2o: the recent tokens among the
    # budget (None: half of it); snapkv: the observation window, the prompt's last queries (None: 32, the paper's)
    window: int | None = None
    budget: int | None = None  # h2o, snapkv: the positions each K/V head of a layer keeps (None: 1024 / 2048)
    kernel: int | None = None  # snapkv: the pooling's width over positions (None: 5, the paper's code)
    pooling: str | None = None  # snapkv: avgpool or maxpool (None: avgpool, the paper's code)
    # sinks: how the kept positions' vectors are held, int8, int4 or fp8 (with int8/int4's ``group``; None: as
    # computed): StreamingLLM's eviction and a codec's compression together
    codec: str | None = None
    start_layer: int | None = None  # minicache: the first layer of the first pair (None: the middle, n_layers // 2)
    interpolation: float | None = None  # minicache: SLERP's t, 0 the lower layer's direction, 1 the upper's (0.6)
    retain: float | None = None  # minicache: the fraction of positions per K/V head kept unmerged (None: 0.05)

    def __post_init__(self) -> None:
        defaults = {"kivi": {"bits": 2, "group": 32, "residual": 128}, "sinks": {"sinks": 4, "window": 1020},
                    "h2o": {"budget": 1024}, "snapkv": {"budget": 2048, "window": 32, "kernel": 5,
                                                         "pooling": "avgpool"},
                    "minicache": {"interpolation": 0.6, "retain": 0.05},
                    **{kind: {"bits": bits} for kind, bits in _BITS.items()}}  # fmt: skip
        for name, value in defaults.get(self.kind, {}).items():
            if getattr(self, name) is None or name == "bits" and self.kind in _BITS:
                object.__setattr__(self, name, value)
        if self.kind == "h2o" and self.window is None and _positive(self.budget):  # heavy hitters and recent alike
            object.__setattr__(self, "window", self.budget // 2)

    @property
    def static_steps(self) -> bool:
        """Whether a decode step's shapes and branches are the same at every position (a compiled step can run
        it): not an eviction's, whose positions held differ by head and step, nor MiniCache's, whose positions
        kept unmerged do. (KIVI's step quantizes the residual's keys at every step and keeps the codes only when
        it is full: ``KiviKV._static_update``.)"""
        return self.kind not in (*EVICTING, "minicache")

    @classmethod
    def from_spec(cls, spec) -> CachePolicy | None:
        """A policy from its name (``"int8"``), a mapping (``{kind: int4, group: 32}``) or itself; None or
        ``"none"``: the full-precision cache."""
        if spec is None or spec == "none" or isinstance(spec, CachePolicy):
            return None if spec == "none" else spec
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict):
            raise ValueError(f"cache policy {spec!r}: give a name ({', '.join(POLICIES)}) or a mapping with kind")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise ValueError(f"cache policy: unknown key {unknown[0]!r}; valid keys are {', '.join(names)}")
        kind = spec.get("kind")
        if kind not in POLICIES:
            raise ValueError(f"cache policy kind={kind!r} is not one of none, {', '.join(POLICIES)}")
        owners = {"group": ("int8", "int4", "kivi", "sinks"), "bits": ("kivi",), "residual": ("kivi",),
                  "sinks": ("sinks",), "window": ("sinks", *EVICTING), "budget": EVICTING,
                  "kernel": ("snapkv",), "pooling": ("snapkv",), "codec": ("sinks",),
                  **dict.fromkeys(("start_layer", "interpolation", "retain"), ("minicache",))}  # fmt: skip
        for name, kinds in owners.items():
            if spec.get(name) is not None and kind not in kinds:
                raise ValueError(f"cache policy {kind}: {name} is a setting of {', '.join(kinds)}, not of {kind}")
        codec = spec.get("codec")
        if codec is not None and codec not in _CODECS:
            raise ValueError(f"cache policy sinks: codec={codec!r} is not one of {', '.join(_CODECS)} (or null)")
        group = spec.get("group")
        if kind == "sinks" and group is not None and codec not in ("int8", "int4"):
            raise ValueError(f"cache policy sinks: group is a setting of its codec int8 or int4, not of "
                             f"codec={codec!r}")  # fmt: skip
        if group is not None and not _positive(group):
            raise ValueError(f"cache policy {kind}: group={group!r} is not valid (a positive number, or null)")
        policy = cls(kind, group, *(spec.get(n) for n in names[2:]))
        if kind == "sinks" and not (_positive(policy.window) and (policy.sinks == 0 or _positive(policy.sinks))):
            raise ValueError(f"cache policy sinks: sinks={policy.sinks!r} and window={policy.window!r} must be "
                             "counts of tokens (sinks >= 0, window >= 1)")  # fmt: skip
        if kind in EVICTING:
            _check_eviction(policy)
        if kind == "minicache":
            _check_merging(policy)
        if kind == "kivi":
            if policy.bits not in KIVI_BITS:
                raise ValueError(f"cache policy kivi: bits={policy.bits!r} is not one of 2, 4")
            if not _positive(policy.residual) or policy.residual % policy.group:
                raise ValueError(f"cache policy kivi: residual={policy.residual!r} must be a positive multiple of "
                                 f"group={policy.group} (keys are quantized a residual at a time, in whole groups "
                                 "of tokens)")  # fmt: skip
            if policy.group * policy.bits % 8:
                raise ValueError(f"cache policy kivi: group={policy.group} tokens of {policy.bits}-bit codes do not "
                                 "fill whole bytes")  # fmt: skip
        return policy

    @property
    def codec_policy(self) -> CachePolicy | None:
        """The policy each held vector is coded by: int8/int4/fp8 themselves, sinks' ``codec``; None: as computed."""
        if self.kind in _CODECS:
            return self
        if self.kind == "sinks" and self.codec is not None:
            return CachePolicy(self.codec, self.group)
        return None

    def check_width(self, width: int, where: str) -> None:
        """Raise unless vectors of ``width`` channels split into this policy's groups and whole bytes."""
        if self.kind == "sinks" and self.codec is not None:
            return self.codec_policy.check_width(width, where)
        if width == 0 or self.kind in ("fp8", "sinks"):
            return
        group = self.group or width
        if width % group or group * self.bits % 8:
            raise ValueError(f"cache policy {self.kind} with group={self.group}: {where} caches vectors of "
                             f"{width} channels, which do not split into groups of {group} channels of whole "
                             "bytes")  # fmt: skip

    def bytes_per_vector(self, width: int, dtype: torch.dtype) -> int:
        """Bytes one cached vector of ``width`` channels takes: its codes, and its scales and zero points in
        ``dtype`` (per token and head: int8, int4, fp8)."""
        if width == 0 or self.kind == "fp8":
            return width
        return width * self.bits // 8 + 2 * (width // (self.group or width)) * dtype.itemsize

    def describe(self) -> str:
        if self.kind == "kivi":
            return f"kivi-{self.bits} (group {self.group}, residual {self.residual})"
        if self.kind == "sinks":
            coded = "" if self.codec is None else f", {self.codec_policy.describe()}"
            return f"sinks {self.sinks} + window {self.window}{coded}"
        if self.kind == "h2o":
            return f"h2o {self.budget} ({self.budget - self.window} heavy + {self.window} recent)"
        if self.kind == "snapkv":
            return f"snapkv {self.budget} (window {self.window}, {self.pooling} {self.kernel})"
        if self.kind == "minicache":
            start = "the middle layer" if self.start_layer is None else f"layer {self.start_layer}"
            return f"minicache from {start} (t {self.interpolation}, retain {self.retain})"
        return self.kind + (f" (group {self.group})" if self.group else "")


def policy_option(text: str | None, option: str):
    """A command line's cache policy option: a name as given, or a JSON mapping (``'{"kind": "kivi"}'``) as a
    dict, for ``CachePolicy.from_spec``; ``option`` names the flag in the error for a mapping that is not JSON."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} {text!r} is not a JSON mapping: {e}") from None


def _positive(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def _check_merging(policy: CachePolicy) -> None:
    def number(x) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    t, retain, start = policy.interpolation, policy.retain, policy.start_layer
    if not (number(t) and 0 <= t <= 1):
        raise ValueError(f"cache policy minicache: interpolation={t!r} must be a number from 0 to 1 (SLERP's t: 0 "
                         "the lower layer's direction, 1 the upper's)")  # fmt: skip
    if not (number(retain) and 0 <= retain < 1):
        raise ValueError(f"cache policy minicache: retain={retain!r} must be a fraction from 0 up to 1 (not "
                         "included): the positions per K/V head kept unmerged")  # fmt: skip
    if start is not None and not (isinstance(start, int) and not isinstance(start, bool) and start >= 0):
        raise ValueError(f"cache policy minicache: start_layer={start!r} must be a layer index (>= 0), or null for "
                         "the middle layer")  # fmt: skip


def _check_eviction(policy: CachePolicy) -> None:
    kind, budget, window = policy.kind, policy.budget, policy.window
    if not _positive(budget):
        raise ValueError(f"cache policy {kind}: budget={budget!r} must be a count of positions (>= 1)")
    low = 0 if kind == "h2o" else 1  # h2o: a window of 0 keeps heavy hitters alone; snapkv observes >= 1 query
    if not (isinstance(window, int) and not isinstance(window, bool) and low <= window <= budget - (kind != "h2o")):
        what = "recent tokens" if kind == "h2o" else "observation window (its queries choose the rest)"
        raise ValueError(f"cache policy {kind}: window={window!r} ({what}) must be from {low} to "
                         f"{budget if kind == 'h2o' else budget - 1} within budget={budget}")  # fmt: skip
    if kind == "snapkv":
        if not (_positive(policy.kernel) and policy.kernel % 2):
            raise ValueError(f"cache policy snapkv: kernel={policy.kernel!r} must be an odd width (>= 1), so the "
                             "pooling keeps each position's place")  # fmt: skip
        if policy.pooling not in POOLINGS:
            raise ValueError(f"cache policy snapkv: pooling={policy.pooling!r} is not one of {', '.join(POOLINGS)}")


class _Vectors:
    """[B, H, L, D] vectors held through a codec policy (int8, int4, fp8): codes (and scales and zero points),
    read back in ``dtype``; with none, as they are."""

    def __init__(self, shape: tuple[int, ...], policy: CachePolicy | None, dtype: torch.dtype, device):
        B, H, L, D = shape
        self.policy, self.dtype, self.width = policy, dtype, D
        if policy is None or D == 0:
            self.tensors = [torch.zeros(B, H, L, D, dtype=dtype, device=device)]
        elif policy.kind == "fp8":  # fp8 bytes held as uint8 (torch's CPU index ops take no float8)
            self.tensors = [torch.zeros(B, H, L, D, dtype=torch.uint8, device=device)]
        else:
            groups = D // (policy.group or D)
            self.tensors = [torch.zeros(B, H, L, D * policy.bits // 8, dtype=torch.uint8, device=device),
                            torch.zeros(B, H, L, groups, dtype=dtype, device=device),
                            torch.zeros(B, H, L, groups, dtype=dtype, device=device)]  # fmt: skip

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.policy is None or self.width == 0:
            return [x.to(self.dtype)]
        if self.policy.kind == "fp8":
            return [x.clamp(-_FP8_MAX, _FP8_MAX).to(FP8).view(torch.uint8)]
        return list(quantize(x, self.policy.bits, self.policy.group or self.width, self.dtype))

    def put(self, index: torch.Tensor, x: torch.Tensor) -> None:
        """Hold ``x`` [B, H, t, D] at positions ``index`` [t] of dim 2."""
        for held, part in zip(self.tensors, self._encode(x), strict=True):
            held.index_copy_(2, index, part)

    def get(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The vectors at ``index`` (None: all), decoded, [B, H, S, D]."""
        parts = self.tensors if index is None else [t.index_select(2, index) for t in self.tensors]
        if self.policy is None or self.width == 0:
            return parts[0]
        if self.policy.kind == "fp8":
            return parts[0].view(FP8).to(self.dtype)
        return dequantize(*parts, self.policy.bits, self.dtype)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class PolicyKV:
    """A K/V slot held through a policy: the positions a ``StaticKV`` (``sinks = length``, no window), a
    ``RingKV`` (no sinks, ``window = length``), a ``SinkRingKV`` or StreamingLLM's cache holds, position
    p < sinks in slot p, a later one in slot ``sinks + (p - sinks) % window``; each vector as codes
    (``codec``: int8, int4, fp8) or as computed (None). With ``rotary`` (StreamingLLM), a view turns the sinks'
    keys, cached after RoPE at their positions, by the tokens evicted between them and the window, and says
    they sit there. Every view carries the keys' positions where they are not one run from 0."""

    def __init__(self, batch_size, k_heads, v_heads, sinks, window, k_dim, v_dim, *, codec, dtype, device,
                 rotary=None, streaming=False):  # fmt: skip
        self.sinks, self.window, self.length = sinks, window, sinks + window
        # StreamingLLM's sinks are the cache's first positions, which in a left-padded row are pads (a layer's
        # own sinks, Hymba's meta tokens, come before every row's pads and are the same for all)
        self.pads_refused_because = (
            "its sinks are the cache's first positions, a padded row's pads" if streaming and sinks else None
        )
        self.dtype, self.rotary = dtype, rotary
        self.k = _Vectors((batch_size, k_heads, self.length, k_dim), codec, dtype, device)
        self.v = _Vectors((batch_size, v_heads, self.length, v_dim), codec, dtype, device)
        self.bytes_per_position = (self.k.nbytes() + self.v.nbytes()) // self.length  # whole batch
        self.slot_index = torch.arange(self.length, device=device)

    @classmethod
    def like(cls, slot, policy: CachePolicy, device, rotary=None) -> PolicyKV:
        """The form of a full-precision K/V slot (built on the meta device: only its shapes are read) that
        ``policy`` holds: the same positions as codes; StreamingLLM's sinks and window in a layer that caches
        every token (``rotary``: the layer's, for the sinks' keys)."""
        moved, streaming = None, False  # only StreamingLLM's own sinks move: a layer's sinks (Hymba's) keep theirs
        if isinstance(slot, SinkRingKV):
            sinks, window = slot.sinks, slot.window
        elif isinstance(slot, RingKV):
            sinks, window = 0, slot.length
        elif policy.kind == "sinks" and policy.sinks + policy.window < slot.length:
            # (SA's readers cache values alone: no keys to turn)
            moved = rotary if policy.sinks and slot.k.shape[-1] else None
            sinks, window, streaming = policy.sinks, policy.window, True
        else:
            sinks, window = slot.length, 0  # every position kept
        B, Hk, _, Dk = slot.k.shape
        _, Hv, _, Dv = slot.v.shape
        codec = policy.codec_policy
        return cls(B, Hk, Hv, sinks, window, Dk, Dv, codec=codec, dtype=slot.k.dtype, device=device, rotary=moved,
                   streaming=streaming)  # fmt: skip

    def _slot(self, pos: torch.Tensor) -> torch.Tensor:
        return sink_ring_slot(pos, self.sinks, self.window)

    def _held(self, end) -> tuple[torch.Tensor, torch.Tensor]:
        return sink_ring_held(self.slot_index, self.sinks, self.window, end)

    def _moved_sinks(self, k: torch.Tensor, pos: torch.Tensor, first_window) -> tuple[torch.Tensor, torch.Tensor]:
        """StreamingLLM: the keys ``k`` [B, H, S, D] at ``pos`` [S] with the sinks' (the first ``sinks`` of
        them) turned by the positions evicted before ``first_window``, the earliest window position the view
        holds, and their positions moved by as many, so the sinks sit just before the window."""
        evicted = (first_window - self.sinks).clamp(min=0) if isinstance(first_window, torch.Tensor) else max(
            first_window - self.sinks, 0)  # fmt: skip
        cos, sin = self.rotary(evicted, 1)
        s = self.sinks
        sinks = apply_rope(k[:, :, :s], cos, sin)
        return torch.cat([sinks, k[:, :, s:]], dim=2), torch.cat([pos[:s] + evicted, pos[s:]])

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int | torch.Tensor) -> KVView:
        t = k_new.shape[2]
        new_pos = start + torch.arange(t, device=self.slot_index.device)
        if isinstance(start, torch.Tensor):  # static shapes: every slot, at its position (unwritten: after the query)
            slots = self._slot(new_pos)
            self.k.put(slots, k_new)
            self.v.put(slots, v_new)
            k, v = self.k.get(), self.v.get()
            k.index_copy_(2, slots, k_new.to(self.dtype))  # the step's own, as computed
            v.index_copy_(2, slots, v_new.to(self.dtype))
            return self._every_slot(k, v, start + t)
        if not self.window and start + t > self.length:
            raise ValueError(f"cache is full: {start} tokens held + {t} new > max_len={self.length}")
        view = self._with_new(start, k_new, v_new)
        keep = (new_pos < self.sinks) | (new_pos >= start + t - self.window)  # what the slot holds after
        self.k.put(self._slot(new_pos[keep]), k_new[:, :, keep])
        self.v.put(self._slot(new_pos[keep]), v_new[:, :, keep])
        return view

    def _with_new(self, start: int, k_new: torch.Tensor, v_new: torch.Tensor) -> KVView:
        """The positions held before ``start``, decoded, then the new ones as computed."""
        end = start + k_new.shape[2]
        if start == 0:
            return KVView(k_new.to(self.dtype), v_new.to(self.dtype), end)
        pos, held = self._held(start)
        if self.window:  # not what no query of the step reaches: a window's positions before start + 1 - window
            held &= (pos < self.sinks) | (pos > start - self.window)
        return self._in_order(pos, held, end, k_new.to(self.dtype), v_new.to(self.dtype))

    def view(self, end: int | torch.Tensor) -> KVView:
        """What the slot holds of the positions before ``end``, decoded, in order; StreamingLLM's sinks turned
        and moved to just before the window, as a step's own view has them (what a layer reading a later
        layer's K/V, LCKV's, sees when decoding)."""
        if isinstance(end, torch.Tensor):
            return self._every_slot(self.k.get(), self.v.get(), end)
        return self._in_order(*self._held(end), end)

    def _every_slot(self, k: torch.Tensor, v: torch.Tensor, end: torch.Tensor) -> KVView:
        """Static shapes: every slot's ``k``/``v`` at its position once those before ``end`` are written (a slot
        not yet written at ``end``, which no query before it sees), StreamingLLM's sinks moved to just before
        the window."""
        pos, held = self._held(end)
        k_pos = torch.where(held, pos, end)
        if self.rotary is not None:  # the window's earliest position once full (slots hold positions in order)
            k, k_pos = self._moved_sinks(k, k_pos, end - self.window)
        return KVView(k, v, end, k_pos)

    def _in_order(self, pos, held, end: int, k_new=None, v_new=None) -> KVView:
        """The slots ``held`` (``pos``: their positions), decoded, in order of position, then the step's own
        ``k_new``/``v_new`` as computed, up to ``end``; StreamingLLM's sinks moved to just before the window."""
        idx = sink_ring_in_order(pos, held)  # (without a window the slots are the positions, in order already)
        k, v, k_pos = self.k.get(idx), self.v.get(idx), pos[idx]
        if k_new is not None:
            k, v = torch.cat([k, k_new], dim=2), torch.cat([v, v_new], dim=2)
            k_pos = torch.cat([k_pos, torch.arange(end - k_new.shape[2], end, device=idx.device)])
        if not self.window:  # positions 0..end-1 in order
            return KVView(k, v, end)
        if self.rotary is not None and len(idx) >= self.sinks and len(k_pos) > self.sinks:
            k, k_pos = self._moved_sinks(k, k_pos, int(k_pos[self.sinks]))  # the window's earliest held position
        return KVView(k, v, end, k_pos)

    def nbytes(self, seen: int) -> int:
        positions = min(seen, self.sinks) + min(max(seen - self.sinks, 0), self.window)
        return self.bytes_per_position * positions

    def allocated_bytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows(self.k.tensors + self.v.tensors, batch_idx)

    def reset(self) -> None:
        """Nothing to clear: positions are overwritten before they are read."""


class KiviKV:
    """A ``StaticKV``'s positions held the KIVI way (``CachePolicy`` kind ``kivi``): keys as per-channel codes in
    groups of ``group`` tokens once ``residual`` of them have gathered (``n % residual`` wait as computed), values
    as per-token codes in groups of ``group`` channels once they are older than the last ``residual`` (a ring of
    ``residual`` slots holds those). Every view is the positions 0..end in order."""

    # groups and the residual count from the cache's first position: a left-padded row's would hold its pads
    pads_refused_because = "its key groups and residual count tokens from the cache's first position, pads included"

    def __init__(self, batch_size, k_heads, v_heads, length, k_dim, v_dim, *, policy, dtype, device):
        self.policy, self.dtype, self.length = policy, dtype, length
        self.bits, self.group, self.residual = policy.bits, policy.group, policy.residual
        B, R, G = batch_size, self.residual, self.group
        keys = length // R * R  # at most this many keys are ever quantized
        values = max(length - R, 0)
        z = dict(device=device)
        self.k_codes = torch.zeros(B, k_heads, k_dim, keys * self.bits // 8, dtype=torch.uint8, **z)
        self.k_scale, self.k_zero = (torch.zeros(B, k_heads, k_dim, keys // G, dtype=dtype, **z) for _ in range(2))
        self.k_residual = torch.zeros(B, k_heads, min(R, length), k_dim, dtype=dtype, **z)
        self.v_codes = torch.zeros(B, v_heads, values, v_dim * self.bits // 8, dtype=torch.uint8, **z)
        self.v_scale, self.v_zero = (torch.zeros(B, v_heads, values, v_dim // G if v_dim else 0, dtype=dtype, **z)
                                     for _ in range(2))  # fmt: skip
        self.v_residual = torch.zeros(B, v_heads, min(R, length), v_dim, dtype=dtype, **z)  # position p: slot p % R
        self.shapes = (batch_size, k_heads, v_heads, k_dim, v_dim)
        self.positions = torch.arange(length, device=device)

    @classmethod
    def like(cls, slot: StaticKV, policy: CachePolicy, device) -> KiviKV:
        B, Hk, _, Dk = slot.k.shape
        _, Hv, _, Dv = slot.v.shape
        return cls(B, Hk, Hv, slot.length, Dk, Dv, policy=policy, dtype=slot.k.dtype, device=device)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.k_scale, self.k_zero, self.k_residual, self.v_codes, self.v_scale, self.v_zero,
                self.v_residual]  # fmt: skip

    # positions before n: keys quantized / as computed, values quantized / as computed
    def _quantized_keys(self, n: int) -> int:
        return n // self.residual * self.residual

    def _quantized_values(self, n: int) -> int:
        return max(n - self.residual, 0)

    def _keys(self, n: int) -> torch.Tensor:
        """Keys of positions 0..n-1, [B, H, n, D]: the codes, then the residual."""
        q = self._quantized_keys(n)
        held = [self.k_residual[:, :, : n - q]]
        if q:
            codes = self.k_codes[..., : q * self.bits // 8]
            groups = slice(0, q // self.group)
            held.insert(0, dequantize(codes, self.k_scale[..., groups], self.k_zero[..., groups], self.bits,
                                      self.dtype).transpose(2, 3))  # fmt: skip
        return torch.cat(held, dim=2) if len(held) > 1 else held[0]

    def _values(self, n: int) -> torch.Tensor:
        """Values of positions 0..n-1, [B, H, n, D]: the codes, then the residual ring in order of position."""
        q = self._quantized_values(n)
        held = [self._residual_values(q, n)]
        if q:
            held.insert(0, self._decode_values(slice(0, q)))
        return torch.cat(held, dim=2) if len(held) > 1 else held[0]

    def _residual_values(self, first: int, end: int) -> torch.Tensor:
        """The ring's values of positions first..end-1 (those not yet quantized), in order."""
        return self.v_residual.index_select(2, torch.arange(first, end, device=self.v_residual.device) % self.residual)

    def _decode_values(self, positions: slice) -> torch.Tensor:
        if not self.v_codes.shape[-1]:  # no values (SVFormer's layers, SA's): width 0
            return self.v_codes[:, :, positions].to(self.dtype)
        return dequantize(self.v_codes[:, :, positions], self.v_scale[:, :, positions], self.v_zero[:, :, positions],
                          self.bits, self.dtype)  # fmt: skip

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int | torch.Tensor) -> KVView:
        if isinstance(start, torch.Tensor):
            return self._static_update(k_new.to(self.dtype), v_new.to(self.dtype), start)
        t = k_new.shape[2]
        end = start + t
        if end > self.length:
            raise ValueError(f"cache is full: {start} tokens held + {t} new > max_len={self.length}")
        k_new, v_new = k_new.to(self.dtype), v_new.to(self.dtype)
        view = KVView(torch.cat([self._keys(start), k_new], dim=2), torch.cat([self._values(start), v_new], dim=2),
                      end)  # fmt: skip
        self._write_keys(start, k_new)
        self._write_values(start, v_new)
        return view

    def _write_keys(self, start: int, k_new: torch.Tensor) -> None:
        """The residual's keys and the new ones: every whole residual of them quantized, the rest kept."""
        q = self._quantized_keys(start)
        pending = torch.cat([self.k_residual[:, :, : start - q], k_new], dim=2)
        whole = pending.shape[2] // self.residual * self.residual
        if whole:
            codes, scale, zero = quantize(pending[:, :, :whole].transpose(2, 3), self.bits, self.group, self.dtype)
            self.k_codes[..., q * self.bits // 8 : (q + whole) * self.bits // 8] = codes
            self.k_scale[..., q // self.group : (q + whole) // self.group] = scale
            self.k_zero[..., q // self.group : (q + whole) // self.group] = zero
        rest = pending[:, :, whole:]
        self.k_residual[:, :, : rest.shape[2]] = rest

    def _write_values(self, start: int, v_new: torch.Tensor) -> None:
        """Values older than the last ``residual`` positions quantized, those into the ring."""
        end = start + v_new.shape[2]
        first = self._quantized_values(start)  # positions first..end-1 are the ring's and the new ones
        pending = torch.cat([self._residual_values(first, start), v_new], dim=2)
        q = self._quantized_values(end) - first  # of them, the first q leave the residual
        if q and pending.shape[-1]:
            codes, scale, zero = quantize(pending[:, :, :q], self.bits, self.group, self.dtype)
            self.v_codes[:, :, first : first + q] = codes
            self.v_scale[:, :, first : first + q] = scale
            self.v_zero[:, :, first : first + q] = zero
        kept = torch.arange(first + q, end, device=self.v_residual.device)
        self.v_residual.index_copy_(2, kept % self.residual, pending[:, :, q:])

    def view(self, end: int | torch.Tensor) -> KVView:
        """Positions 0..end-1 in order (what a layer reading a later layer's K/V, LCKV's, sees when decoding); in
        the compiled step's form (``end`` a tensor), every position, those from ``end`` on for the reader to mask."""
        if isinstance(end, torch.Tensor):
            return KVView(*self._static_held(end), end, self.positions)
        return KVView(self._keys(end), self._values(end), end)

    def _static_held(self, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position's key and value [B, H, length, D] as held once positions before ``end`` (a 0-d tensor)
        are written, read from the codes or the residuals by position, with shapes that do not depend on ``end``."""
        R, pos = self.residual, self.positions
        first_residual_key = end // R * R
        in_residual = (pos - first_residual_key).clamp(0, self.k_residual.shape[2] - 1)
        k = torch.where((pos < first_residual_key)[:, None], self._padded(self._decode_all_keys()),
                        self.k_residual.index_select(2, in_residual))  # fmt: skip
        v = torch.where((pos < end - R)[:, None], self._padded(self._decode_values(slice(None))),
                        self.v_residual.index_select(2, pos % self.v_residual.shape[2]))  # fmt: skip
        return k, v

    def _static_update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: torch.Tensor) -> KVView:
        """The compiled decode step's update (``start`` a 0-d tensor): what ``update`` does for one token, with
        shapes and branches that do not depend on ``start``. The view is every position, read from the codes or
        the residuals by position (the reader masks those from ``start + 1`` on). The writes: the token's key into
        the residual, whose keys are quantized at every step and their codes kept only where that fills it; the
        value leaving the residual ring (position ``start - residual``), quantized and kept where there is one."""
        if k_new.shape[2] != 1:
            raise ValueError(f"cache policy kivi: a static step takes one token, not {k_new.shape[2]}")
        R, G, bits, pos = self.residual, self.group, self.bits, self.positions
        first_residual_key = start // R * R
        k, v_held = self._static_held(start)
        at = start.view(1)
        view = KVView(k.index_copy(2, at, k_new), v_held.index_copy(2, at, v_new), start + 1, pos)
        self.k_residual.index_copy_(2, at - first_residual_key, k_new)
        if self.k_codes.shape[-1]:  # a whole residual fits in the codes: quantized now, kept if full
            full = start - first_residual_key == R - 1
            first = first_residual_key.clamp(max=self.k_codes.shape[-1] * 8 // bits - R)  # in range when not full
            codes, scale, zero = quantize(self.k_residual.transpose(2, 3), bits, G, self.dtype)
            for held, new, index, n in ((self.k_codes, codes, first * bits // 8, R * bits // 8),
                                        (self.k_scale, scale, first // G, R // G),
                                        (self.k_zero, zero, first // G, R // G)):  # fmt: skip
                index = index + torch.arange(n, device=held.device)
                held.index_copy_(3, index, torch.where(full, new, held.index_select(3, index)))
        ring_slot = (start % R).view(1)
        if self.v_codes.shape[2] and self.v_codes.shape[-1]:  # the value leaving the ring, where one does
            leaving = start - R
            at_code = leaving.clamp(0, self.v_codes.shape[2] - 1).view(1)
            codes, scale, zero = quantize(self.v_residual.index_select(2, ring_slot), bits, G, self.dtype)
            for held, new in ((self.v_codes, codes), (self.v_scale, scale), (self.v_zero, zero)):
                held.index_copy_(2, at_code, torch.where(leaving >= 0, new, held.index_select(2, at_code)))
        self.v_residual.index_copy_(2, ring_slot, v_new)
        return view

    def _decode_all_keys(self) -> torch.Tensor:
        """Every quantized key place, decoded, [B, H, places, D] (those not yet written are garbage)."""
        return dequantize(self.k_codes, self.k_scale, self.k_zero, self.bits, self.dtype).transpose(2, 3)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, H, n, D] padded with zeros to the cache's length along positions."""
        return F.pad(x, (0, 0, 0, self.length - x.shape[2]))

    def nbytes(self, seen: int) -> int:
        B, Hk, Hv, Dk, Dv = self.shapes
        return B * kivi_bytes(seen, Hk, Hv, Dk, Dv, self.policy, self.dtype)

    def allocated_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows(self._tensors(), batch_idx)

    def reset(self) -> None:
        """Nothing to clear: positions are overwritten before they are read."""


class EvictingKV:
    """A ``StaticKV``'s keys and values kept by the attention they receive (``CachePolicy`` kinds ``h2o`` and
    ``snapkv``): each K/V head of each row holds its own ``budget`` positions, the keys and values as computed,
    in order of position, with the position of each (``pos``) and, for H2O, the attention it has received.

    A step's ``update`` returns what the step attends to: the positions held and its own, with their positions
    per head (``KVView.k_pos`` [B, H, S]; None while the held ones are still every position from 0 in order).
    Where the policy decides by this step's attention, ``scored_rows`` says how many of the step's last
    queries it needs the probabilities of, and the layer hands them over (``observe``) before the next step;
    the slot then keeps what the policy chooses of the view. Otherwise the new positions are simply added.

    - H2O (Zhang et al. 2023, its code's ``H2OKVCache_LayerWise``): every key's score is the attention it has
      received from every query since it was cached, summed; once more than ``budget`` positions are held,
      the last ``window`` (recent) stay, and of the others the ``budget - window`` with the highest scores
      (the heavy hitters). Every step is scored, the prompt's too.
    - SnapKV (Li et al. 2024, its code's ``SnapKVCluster``): a step of several tokens that brings the held
      positions to ``budget`` or more keeps its last ``window`` positions (the observation window) and the
      ``budget - window`` earlier ones whose attention from the window's queries, summed over those queries
      and pooled over ``kernel`` neighbouring positions (avg or max, zero-padded), is highest. Decoded tokens
      are then added without eviction: after a prompt of n >= budget tokens and g new ones it holds
      budget + g.

    Grouped K/V heads: a K/V head's score sums those of the query heads that read it (the papers' models
    have one query head per K/V head; SnapKV's code repeats K/V to the query heads, which multiplies the
    cache by the group size, so kvlab keeps one selection per K/V head instead). Pads' queries score
    nothing. Positions are kept as int32 and H2O's scores as float32 (float64 in a float64 cache): both are counted
    in ``nbytes``."""

    def __init__(self, batch_size, heads, length, k_dim, v_dim, *, policy, dtype, device):
        self.policy, self.dtype, self.length = policy, dtype, length
        self.h2o = policy.kind == "h2o"
        # H2O never holds more than its budget between steps; SnapKV adds every decoded token after the prompt
        self.capacity = min(policy.budget, length) if self.h2o else length
        z = dict(device=device)
        self.k = torch.zeros(batch_size, heads, self.capacity, k_dim, dtype=dtype, **z)
        self.v = torch.zeros(batch_size, heads, self.capacity, v_dim, dtype=dtype, **z)
        self.pos = torch.zeros(batch_size, heads, self.capacity, dtype=torch.int32, **z)
        self.score = (
            torch.zeros(batch_size, heads, self.capacity, dtype=compute_dtype(dtype), **z) if self.h2o else None
        )
        self.count = 0  # positions each head holds
        self.pending = None  # (k, v, pos) of the step's view, until observe chooses what stays
        self.scored_rows = 0

    @classmethod
    def like(cls, slot: StaticKV, policy: CachePolicy, device) -> EvictingKV:
        B, Hk, _, Dk = slot.k.shape
        return cls(B, Hk, slot.length, Dk, slot.v.shape[-1], policy=policy, dtype=slot.k.dtype, device=device)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.pos, self.score) if t is not None]

    def bytes_per_position(self) -> int:
        """One position of every head of every row: its key, value and position (and H2O's score)."""
        return sum(t[:, :, :1].nbytes for t in self._tensors())

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int | torch.Tensor) -> KVView:
        if isinstance(start, torch.Tensor):
            raise ValueError(f"cache policy {self.policy.kind}: its positions held differ by head and step, so it "
                             "decodes eagerly (generate does; decode_step does not take it)")  # fmt: skip
        if self.pending is not None:
            raise ValueError(f"cache policy {self.policy.kind}: the step before was not scored (observe); only "
                             "attention layers that hand the cache their probabilities take this policy")  # fmt: skip
        B, H, t, _ = k_new.shape
        end = start + t
        if end > self.length:
            raise ValueError(f"cache is full: {start} tokens held + {t} new > max_len={self.length}")
        k_new, v_new = k_new.to(self.dtype), v_new.to(self.dtype)
        n = self.count + t
        in_order = self.count == start  # nothing evicted yet: the held positions are 0..start-1
        if self.h2o:
            self.scored_rows = t if self.capacity < self.length else 0  # a budget it can reach: every step scored
        else:  # a prompt (or a chunk of one) that fills the budget
            self.scored_rows = min(t, self.policy.window) if t > 1 and n >= self.policy.budget else 0
        new_pos = torch.arange(start, end, device=k_new.device, dtype=torch.int32).expand(B, H, t)
        if not self.scored_rows:  # nothing to choose (SnapKV's decoding): written in place, the view the buffers'
            self._keep(k_new, v_new, new_pos, at=self.count)
            c = self.count
            k, v, pos = self.k[:, :, :c], self.v[:, :, :c], self.pos[:, :, :c]
        elif self.count == 0:
            k, v, pos = k_new, v_new, new_pos
        else:  # the held and the new apart from the buffers, which observe then rewrites
            c = self.count
            k = torch.cat([self.k[:, :, :c], k_new], dim=2)
            v = torch.cat([self.v[:, :, :c], v_new], dim=2)
            pos = torch.cat([self.pos[:, :, :c], new_pos], dim=2)
        if self.scored_rows:
            self.pending = (k, v, pos)
        # while every position from 0 is held in order, the view is positions 0..end-1, as a plain cache's
        return KVView(k, v, end, None if in_order else pos.long())

    def _keep(self, k, v, pos, at: int = 0, score=None) -> None:
        n = k.shape[2]
        self.k[:, :, at : at + n] = k
        self.v[:, :, at : at + n] = v
        self.pos[:, :, at : at + n] = pos
        if score is not None:
            self.score[:, :, at : at + n] = score
        self.count = at + n

    def observe(self, weights: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """The probabilities [B, H, rows, S] of the step's last ``scored_rows`` queries (summed over the query
        heads of each K/V head) over the view's positions: keep what the policy chooses. ``real`` [B, S] or
        [B, H, S]: which of them are not pads (left-padded rows), which are chosen last, so that a row keeps
        the tokens it keeps alone."""
        k, v, pos = self.pending
        self.pending, self.scored_rows = None, 0
        n = k.shape[2]
        if real is not None and real.dim() == 2:
            real = real[:, None].expand(-1, k.shape[1], -1)
        if self.h2o:
            received = upcast(weights).sum(2)  # [B, H, n]: this step's queries' attention to each position
            held = self.count  # the view's first positions, then the step's own (no score yet)
            score = received + F.pad(self.score[:, :, :held], (0, n - held))
            budget, recent = self.policy.budget, self.policy.window
            if n <= budget:
                return self._keep(k, v, pos, score=score)
            candidates = score[:, :, : n - recent]
            if real is not None:
                candidates = candidates.masked_fill(~real[..., : n - recent], -1.0)  # a real token's score is > 0
            keep = _top_then_last(candidates, budget - recent, n)
        else:
            window = weights.shape[2]
            observed = upcast(weights).sum(2)[:, :, : n - window]  # [B, H, n - w]
            pool = F.avg_pool1d if self.policy.pooling == "avgpool" else F.max_pool1d
            width = self.policy.kernel
            if real is None:
                pooled = pool(observed, kernel_size=width, padding=width // 2, stride=1)
            else:
                # pooled with each row's pads moved before its first position, where they pool as the zero padding
                # a row alone has: after meta tokens (Hymba's), pads would sit between neighbours the row alone has
                real = real[..., : n - window]
                order = real.int().argsort(dim=-1, stable=True)  # pads first, then the rest in order
                pooled = pool(observed.gather(2, order), kernel_size=width, padding=width // 2, stride=1)
                pooled = torch.empty_like(pooled).scatter_(2, order, pooled).masked_fill(~real, -1.0)
            keep, score = _top_then_last(pooled, self.policy.budget - window, n), None

        def chosen(x: torch.Tensor) -> torch.Tensor:
            return x.gather(2, keep if x.dim() == 3 else keep[..., None].expand(-1, -1, -1, x.shape[-1]))

        self._keep(chosen(k), chosen(v), chosen(pos), score=None if score is None else chosen(score))

    def view(self, end: int) -> KVView:
        c = self.count
        return KVView(self.k[:, :, :c], self.v[:, :, :c], end, self.pos[:, :, :c].long())

    def nbytes(self, seen: int) -> int:
        """The positions held (H2O: ``min(seen, budget)``, whatever came before; SnapKV: as it chose)."""
        held = min(seen, self.capacity) if self.h2o else self.count
        return self.bytes_per_position() * held

    def allocated_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows(self._tensors(), batch_idx)

    def reset(self) -> None:
        self.count, self.pending, self.scored_rows = 0, None, 0


def _top_then_last(score: torch.Tensor, top: int, n: int) -> torch.Tensor:
    """Per row and head, the indices of the ``top`` highest of ``score`` [B, H, m] in order, then m..n-1. Ties
    (max pooling's plateaus) go to the earlier position, so the choice does not depend on topk's kernel."""
    B, H, m = score.shape
    chosen = score.sort(dim=-1, descending=True, stable=True).indices[..., :top].sort(dim=-1).values
    last = torch.arange(m, n, device=score.device).expand(B, H, n - m)
    return torch.cat([chosen, last], dim=-1)


def retained_count(n: int, retain: float) -> int:
    """MiniCache: the positions each K/V head keeps unmerged after ``n``: floor(retain * n), whatever the steps."""
    return int(n * retain + 1e-9)  # + 1e-9: 0.29 * 100 is 28.999... in floats


def slerp_merge(lower: torch.Tensor, upper: torch.Tensor, t: float):
    """MiniCache's merge of two layers' vectors [..., D] at the same positions: each one's magnitude (its L2
    norm), the SLERP of their directions ``e = sin((1 - t) W) / sin W * a + sin(t W) / sin W * b`` (a, b the unit
    vectors of lower and upper, W the angle between them), and their angular distance W / pi in [0, 1]. Computed
    in float32 at least. Where sin W vanishes, W near 0 (SLERP's weights tend to 1 - t and t there) or near pi
    (SLERP is undefined), the linear interpolation of the directions, normalized. Returns (e [..., D],
    magnitudes [..., 2]: lower's, upper's, distance [...])."""
    work = compute_dtype(lower.dtype)
    x, y = lower.to(work), upper.to(work)
    norms = torch.stack([x.norm(dim=-1), y.norm(dim=-1)], dim=-1)
    tiny = torch.finfo(work).tiny
    a, b = x / norms[..., :1].clamp_min(tiny), y / norms[..., 1:].clamp_min(tiny)
    angle = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(angle)
    curved = sin > 1e-6
    sin = torch.where(curved, sin, 1.0)
    wa = torch.where(curved, torch.sin((1 - t) * angle) / sin, 1 - t)
    wb = torch.where(curved, torch.sin(t * angle) / sin, t)
    e = wa * a + wb * b
    e = torch.where(curved, e, e / e.norm(dim=-1, keepdim=True).clamp_min(tiny))
    return e, norms, angle[..., 0] / math.pi


class _MergedVectors:
    """The keys (or values) of a MiniCache pair, [B, H, L, D] per layer: per position the shared direction and
    the two layers' magnitudes; per row and K/V head the ``count`` positions kept unmerged: their positions
    (int32), both layers' vectors as computed and their angular distance (float32, to compare later positions
    with)."""

    def __init__(self, B, H, L, D, kept: int, *, dtype, device):
        z = dict(device=device)
        self.width, self.count = D, 0
        self.direction = torch.zeros(B, H, L if D else 0, D, dtype=dtype, **z)
        self.magnitude = torch.zeros(B, H, L if D else 0, 2, dtype=dtype, **z)
        kept = kept if D else 0
        self.kept_pos = torch.zeros(B, H, kept, dtype=torch.int32, **z)
        self.kept = torch.zeros(B, H, kept, 2, D, dtype=dtype, **z)
        self.kept_distance = torch.zeros(B, H, kept, dtype=compute_dtype(dtype), **z)

    def tensors(self) -> list[torch.Tensor]:
        return [self.direction, self.magnitude, self.kept_pos, self.kept, self.kept_distance]

    def merge(self, lower: torch.Tensor, upper: torch.Tensor, start: int, t: float, retain: float) -> None:
        """Merge both layers' vectors of positions ``start..`` [B, H, n, D]; of the positions kept before and
        these, keep the ``retained_count(start + n)`` furthest apart (ties: the earlier position)."""
        if not self.width:
            return
        n = lower.shape[2]
        end = start + n
        direction, magnitude, distance = slerp_merge(lower, upper, t)
        self.direction[:, :, start:end] = direction
        self.magnitude[:, :, start:end] = magnitude
        held, keep = self.count, retained_count(end, retain)
        if not keep:
            return
        B, H = lower.shape[:2]
        # candidates in order of position: the positions kept so far, then the step's
        pos = torch.cat(
            [
                self.kept_pos[:, :, :held],
                torch.arange(start, end, dtype=torch.int32, device=lower.device).expand(B, H, n),
            ],
            dim=2,
        )
        dist = torch.cat([self.kept_distance[:, :, :held], upcast(distance)], dim=2)
        vectors = torch.cat([self.kept[:, :, :held], torch.stack([lower, upper], dim=3).to(self.kept.dtype)], dim=2)
        chosen = dist.sort(dim=-1, descending=True, stable=True).indices[..., :keep].sort(dim=-1).values
        self.kept_pos[:, :, :keep] = pos.gather(2, chosen)
        self.kept_distance[:, :, :keep] = dist.gather(2, chosen)
        self.kept[:, :, :keep] = vectors.gather(2, chosen[..., None, None].expand(-1, -1, -1, 2, self.width))
        self.count = keep

    def restore(self, merged: int, which: int) -> torch.Tensor:
        """Layer ``which``'s (0 lower, 1 upper) vectors of positions 0..merged-1: its magnitude times the shared
        direction, and its own vectors where they were kept unmerged."""
        B, H = self.direction.shape[:2]
        if not self.width:
            return self.direction.new_zeros(B, H, merged, 0)
        x = self.direction[:, :, :merged] * self.magnitude[:, :, :merged, which : which + 1]
        if self.count:
            pos = self.kept_pos[:, :, : self.count, None].long().expand(-1, -1, -1, self.width)
            x = x.scatter(2, pos, self.kept[:, :, : self.count, which])
        return x


class MergedPair:
    """The K/V of two layers held once, as MiniCache (Liu et al. 2024) holds them (``CachePolicy`` kind
    ``minicache``); ``lower`` and ``upper`` are the two layers' slots (``MergedKV``).

    A step's lower layer writes first: its keys and values wait as computed (``pending``) until the upper layer
    writes the same positions; then both are merged (``slerp_merge``): per position and K/V head the SLERP of
    the two directions and each layer's magnitude, a layer reading back its magnitude times the shared
    direction. Each step attends to the positions before it read back so, and its own as computed (as every
    policy's step does: a prompt in one step attends exactly as the full cache).

    Retention (the paper's "token retention": state pairs too far apart to merge stay unmerged): per row and
    K/V head, the ``retain`` fraction of positions (``retained_count``) whose two vectors have the largest
    angular distance keep both layers' vectors as computed. kvlab's form of it, the paper's rule being out of
    reach here: after n positions exactly floor(retain * n) are kept, chosen at each step among those kept
    before and the step's (after a prompt in one step: the prompt's furthest apart), so the bytes held are
    known at every length. What a pair holds (``minicache_bytes``) is counted in the upper layer's slot, where
    the paper stores it; the lower's counts nothing."""

    def __init__(self, batch_size, k_heads, v_heads, length, k_dim, v_dim, *, policy, dtype, device):
        self.policy, self.dtype, self.length = policy, dtype, length
        kept = retained_count(length, policy.retain)
        z = dict(dtype=dtype, device=device)
        self.k = _MergedVectors(batch_size, k_heads, length, k_dim, kept, **z)
        self.v = _MergedVectors(batch_size, v_heads, length, v_dim, kept, **z)
        self.shapes = (batch_size, k_heads, v_heads, k_dim, v_dim)
        self.merged = 0  # positions 0..merged-1 are held merged
        self.pending = None  # the lower layer's (keys, values) of the step, until the upper's arrive
        self.lower, self.upper = MergedKV(self, 0), MergedKV(self, 1)

    @classmethod
    def like(cls, slot: StaticKV, policy: CachePolicy, device) -> MergedPair:
        B, Hk, _, Dk = slot.k.shape
        _, Hv, _, Dv = slot.v.shape
        return cls(B, Hk, Hv, slot.length, Dk, Dv, policy=policy, dtype=slot.k.dtype, device=device)

    def write(self, which: int, k_new: torch.Tensor, v_new: torch.Tensor, start) -> KVView:
        if isinstance(start, torch.Tensor):
            raise ValueError(
                "cache policy minicache: the positions each K/V head keeps unmerged differ by head "
                "and step, so it decodes eagerly (generate does; decode_step does not take it)"
            )
        t = k_new.shape[2]
        end = start + t
        if end > self.length:
            raise ValueError(f"cache is full: {start} tokens held + {t} new > max_len={self.length}")
        if start != self.merged or (which == 1) != (self.pending is not None):
            raise ValueError(f"cache policy minicache: a merged pair takes its lower layer's step, then its upper "
                             f"layer's, at the position after those merged ({self.merged}); got the "
                             f"{('lower', 'upper')[which]} layer's at {start}")  # fmt: skip
        k_new, v_new = k_new.to(self.dtype), v_new.to(self.dtype)
        view = KVView(torch.cat([self.k.restore(start, which), k_new], dim=2),
                      torch.cat([self.v.restore(start, which), v_new], dim=2), end)  # fmt: skip
        if which == 0:
            self.pending = (k_new, v_new)
        else:
            (k_lower, v_lower), self.pending = self.pending, None
            if k_lower.shape[2] != t:
                raise ValueError(f"cache policy minicache: the upper layer wrote {t} positions where the lower "
                                 f"wrote {k_lower.shape[2]}")  # fmt: skip
            p = self.policy
            self.k.merge(k_lower, k_new, start, p.interpolation, p.retain)
            self.v.merge(v_lower, v_new, start, p.interpolation, p.retain)
            self.merged = end
        return view

    def view(self, which: int, end: int) -> KVView:
        held = min(end, self.merged)
        k, v = self.k.restore(held, which), self.v.restore(held, which)
        if end > held and which == 0 and self.pending is not None:  # the lower layer's step, not yet merged
            k = torch.cat([k, self.pending[0][:, :, : end - held]], dim=2)
            v = torch.cat([v, self.pending[1][:, :, : end - held]], dim=2)
        return KVView(k, v, k.shape[2])  # positions 0.. in order

    def nbytes(self, seen: int) -> int:
        B, Hk, Hv, Dk, Dv = self.shapes
        return B * minicache_bytes(seen, Hk, Hv, Dk, Dv, self.policy.retain, self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return self.k.tensors() + self.v.tensors()

    def reset(self) -> None:
        self.merged, self.pending, self.k.count, self.v.count = 0, None, 0, 0


class MergedKV:
    """One layer's slot of a ``MergedPair`` (``which`` 0: the lower layer, 1: the upper, which counts the pair's
    bytes)."""

    pads_refused_because = "the positions it keeps unmerged are a share of the cache's, pads included"

    def __init__(self, pair: MergedPair, which: int):
        self.pair, self.which = pair, which

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start) -> KVView:
        return self.pair.write(self.which, k_new, v_new, start)

    def view(self, end: int) -> KVView:
        return self.pair.view(self.which, end)

    def nbytes(self, seen: int) -> int:
        return self.pair.nbytes(seen) if self.which else 0

    def allocated_bytes(self) -> int:
        return sum(t.nbytes for t in self.pair.tensors()) if self.which else 0

    def reorder(self, batch_idx: torch.Tensor) -> None:
        if self.which:
            reorder_rows(self.pair.tensors(), batch_idx)

    def reset(self) -> None:
        self.pair.reset()


def minicache_bytes(n, k_heads: int, v_heads: int, k_dim: int, v_dim: int, retain: float, dtype: torch.dtype,
                    kept=None):  # fmt: skip
    """What a MiniCache pair holds for one sequence after ``n`` positions: per position and K/V head the shared
    direction and the two layers' magnitudes; per K/V head ``kept`` positions (None: ``retained_count(n)``) kept
    unmerged, with both layers' vectors, the position (int32) and the angular distance (float32). (The footprint's
    long-run rate: ``n`` 1 and ``kept`` the fraction ``retain`` as a Fraction.)"""
    kept, item = retained_count(n, retain) if kept is None else kept, dtype.itemsize
    return sum(H * (n * (D + 2) * item + kept * (2 * D * item + 8)) for H, D in ((k_heads, k_dim), (v_heads, v_dim))
               if D)  # fmt: skip


def merged_pairs(policy: CachePolicy, mixers: list) -> list[tuple[int, int]]:
    """MiniCache's pairs of layers (lower, upper): from ``start_layer`` on, consecutive layers among those that
    cache every token's keys and values in full at any length (``StaticKV``; not a window, even one as long as a
    short cache) with the same heads and widths, two by two.
    Others (windows, latents, readers of another layer's K/V, recurrent states, MatryoshkaKV's projections)
    stay as they are. Raises where there is no pair."""
    start = len(mixers) // 2 if policy.start_layer is None else policy.start_layer
    if start >= len(mixers):
        raise ValueError(f"cache policy minicache: start_layer={start} is past the last layer "
                         f"({len(mixers) - 1})")  # fmt: skip
    owners = []  # (layer, key shape, value shape)
    for i in range(start, len(mixers)):
        meta = mixers[i].new_cache_slot(1, 1 << 30, torch.float32, "meta")  # on meta: nothing allocated
        if type(meta) is StaticKV and getattr(mixers[i].cfg, "kv_ranks", None) is None:
            owners.append((i, meta.k.shape, meta.v.shape))
    pairs, j = [], 0
    while j + 1 < len(owners):
        if owners[j][1:] == owners[j + 1][1:]:
            pairs.append((owners[j][0], owners[j + 1][0]))
            j += 2
        else:
            j += 1
    if not pairs:
        raise ValueError(f"cache policy minicache: no two layers from layer {start} on cache every token's keys "
                         "and values alike (full attention with the same heads and widths), so there is nothing "
                         "to merge; set start_layer lower, or use another policy")  # fmt: skip
    return pairs


def kivi_bytes(n: int, k_heads: int, v_heads: int, k_dim: int, v_dim: int, policy: CachePolicy,
               dtype: torch.dtype) -> int:  # fmt: skip
    """What KIVI holds for one sequence after ``n`` tokens: the quantized keys' codes and their per-channel scales
    and zero points (one pair per ``group`` tokens), the residual keys as computed; the quantized values' codes
    with one pair per ``group`` channels, the last ``min(n, residual)`` values as computed."""
    R, G, b, item = policy.residual, policy.group, policy.bits, dtype.itemsize
    keys = n // R * R
    values = max(n - R, 0)
    key_bytes = k_dim * (keys * b // 8 + keys // G * 2 * item) + (n - keys) * k_dim * item
    value_bytes = values * (v_dim * b // 8 + v_dim // G * 2 * item) + (n - values) * v_dim * item
    return k_heads * key_bytes + v_heads * value_bytes


KV_SLOTS = (StaticKV, RingKV, SinkRingKV)


def check_model(policy: CachePolicy, mixers: list, kv_sources: list[int], max_seq_len: int) -> None:
    """Raise where ``policy`` cannot hold the caches of a model of these layers' ``mixers``, layer i reading the
    K/V of layer ``kv_sources[i]``: no layer caching per token (a recurrent model: nothing to hold), a budget
    beyond what the model ever holds (it would never evict), or an eviction under a layer that reads a later
    layer's K/V (LCKV), which reads the positions from 0 in order."""

    def per_token(mixer) -> bool:
        if hasattr(mixer, "branches"):
            return any(per_token(b) for b in mixer.branches)
        return isinstance(mixer.new_cache_slot(1, 1, torch.float32, "meta"), (*KV_SLOTS, LatentKV, QuantizedLatentKV))

    if not any(per_token(m) for m in mixers):
        kinds = sorted({m.cfg.kind for m in mixers})
        raise ValueError(f"cache policy {policy.kind}: no layer of this model caches keys and values per token "
                         f"(its mixers: {', '.join(kinds)}, whose states are fixed): nothing to hold")  # fmt: skip
    if policy.kind not in (*EVICTING, "minicache"):
        return
    if policy.kind in EVICTING and policy.budget > max_seq_len:
        raise ValueError(f"cache policy {policy.kind}: budget={policy.budget} is more than the model's "
                         f"max_seq_len={max_seq_len}, so it would never evict")  # fmt: skip
    for i, source in enumerate(kv_sources):
        if source > i:
            kept = "an eviction does not keep" if policy.kind in EVICTING else (
                "merged pairs hold only once both layers of a step have written")  # fmt: skip
            raise ValueError(f"cache policy {policy.kind}: layer {i} reads the K/V of the later layer {source} "
                             f"as every position from 0 in order, which {kept}")  # fmt: skip


def policy_cache_slot(mixer, batch_size: int, max_len: int, dtype: torch.dtype, device, policy: CachePolicy,
                      where: str):  # fmt: skip
    """``mixer``'s cache slot with its K/V held through ``policy``: its slot is first built on the meta device
    (nothing allocated), K/V slots are then made as the policy holds them on ``device`` (a window of a layer's
    own stays as it is under ``sinks``), a parallel layer's group branch by branch, and other slots (fixed
    recurrent states) as the mixer makes them."""
    meta = mixer.new_cache_slot(batch_size, max_len, dtype, "meta")
    if meta is None:
        return None
    if isinstance(meta, KV_SLOTS):
        _check_slot(meta, mixer, policy, where)
        if policy.kind == "kivi":
            return KiviKV.like(meta, policy, device)
        if policy.kind in EVICTING and isinstance(meta, StaticKV) and policy.budget < meta.length:
            return EvictingKV.like(meta, policy, device)
        if policy.codec_policy is not None or policy.kind == "sinks" and isinstance(meta, StaticKV):
            return PolicyKV.like(meta, policy, device, rotary=getattr(mixer, "rotary", None))
    if isinstance(meta, SlotGroup):  # a parallel layer's branches, each its own slot
        return SlotGroup([policy_cache_slot(b, batch_size, max_len, dtype, device, policy, f"{where}.{i}")
                          for i, b in enumerate(mixer.branches)])  # fmt: skip
    rank = _latent_rank(meta, mixer, policy, where)
    if rank is not None:
        return PolicyLatentKV(batch_size, meta.length, rank, meta.latent.shape[-1] - rank, policy.bits,
                              policy.group or rank, dtype=meta.latent.dtype, device=device)  # fmt: skip
    return mixer.new_cache_slot(batch_size, max_len, dtype, device)


def policy_cache_slots(mixers: list, batch_size: int, max_len: int, dtype: torch.dtype, device,
                       policy: CachePolicy) -> list:  # fmt: skip
    """The cache slots of a model of these layers' ``mixers`` held through ``policy``: each layer's own
    (``policy_cache_slot``), or, for MiniCache, its pairs' two slots over one ``MergedPair`` and the other layers'
    as their mixers make them."""
    if policy.kind != "minicache":
        return [policy_cache_slot(m, batch_size, max_len, dtype, device, policy, f"layer {i}")
                for i, m in enumerate(mixers)]  # fmt: skip
    pairs = merged_pairs(policy, mixers)
    paired = {i for pair in pairs for i in pair}
    slots = [None if i in paired else m.new_cache_slot(batch_size, max_len, dtype, device)
             for i, m in enumerate(mixers)]  # fmt: skip
    for lower, upper in pairs:
        pair = MergedPair.like(mixers[lower].new_cache_slot(batch_size, max_len, dtype, "meta"), policy, device)
        slots[lower], slots[upper] = pair.lower, pair.upper
    return slots


def _check_slot(meta_slot, mixer, policy: CachePolicy, where: str) -> None:
    if policy.kind in EVICTING:  # a window of the layer's own stays as it is, as under sinks
        if isinstance(meta_slot, StaticKV):
            problem = f"its {mixer.cfg.kind} mixer does not hand the cache the attention probabilities it keeps by"
            if hasattr(mixer, "score_problem"):
                problem = mixer.score_problem()
            if problem is not None:
                raise ValueError(f"cache policy {policy.kind}: {where} {problem}")
        return
    if policy.kind == "sinks":
        if isinstance(meta_slot, StaticKV) and not isinstance(getattr(mixer, "rotary", None), Rotary):
            raise ValueError(f"cache policy sinks: {where} has no rotary to move the sinks' keys by")
        if isinstance(meta_slot, StaticKV) and getattr(mixer.cfg, "kv_ranks", None) is not None:
            raise ValueError(f"cache policy sinks: {where} caches MatryoshkaKV's projections of its keys, which "
                             "RoPE's angles cannot turn")  # fmt: skip
        if isinstance(meta_slot, StaticKV) and mixer.rotary.original is not None:
            raise ValueError(f"cache policy sinks: {where} has LongRoPE, whose frequencies change once a step is past "
                             f"its original context ({mixer.rotary.original} positions): the sinks' keys, turned at "
                             "the ones they were cached with, cannot be moved by a step's")  # fmt: skip
        # and its codec's widths, below (without one, check_width has nothing to check)
    elif policy.kind == "kivi":
        if not isinstance(meta_slot, StaticKV):
            raise ValueError(f"cache policy kivi: {where} keeps a window, whose tokens leave one at a time, which "
                             "KIVI's key groups of several tokens cannot follow; use int8, int4 or fp8 for "
                             "models with windows")  # fmt: skip
        policy.check_width(meta_slot.v.shape[-1], f"{where}'s values")  # keys are grouped over tokens
        return
    policy.check_width(meta_slot.k.shape[-1], f"{where}'s keys")
    policy.check_width(meta_slot.v.shape[-1], f"{where}'s values")


def _latent_rank(meta_slot, mixer, policy: CachePolicy, where: str) -> int | None:
    """The width of the compressed part of the latent ``meta_slot`` holds per token (MLA's ``kv_lora_rank``),
    where ``policy`` quantizes it; None where the slot holds no latent. Raises for the policies that do not
    hold latents and for CLLA-quant's latent, codes already."""
    if isinstance(meta_slot, QuantizedLatentKV):
        raise ValueError(f"cache policy {policy.kind}: {where} holds its latent as codes already (CLLA-quant's "
                         "latent_bits: an architecture of its own)")  # fmt: skip
    if not isinstance(meta_slot, LatentKV):
        return None
    rank = getattr(mixer, "kv_lora_rank", None)
    if policy.kind not in ("int8", "int4") or rank is None:
        raise ValueError(f"cache policy {policy.kind}: {where} caches a latent per token (MLA), which int8 and "
                         "int4 compress (its compressed part, as CLLA-quant's cache does) and the other policies "
                         "do not; they compress attention's keys and values")  # fmt: skip
    policy.check_width(rank, f"{where}'s latent")
    return rank


class PolicyLatentKV(QuantizedLatentKV):
    """MLA's latent held through int8 or int4: its compressed part as codes with a scale and a zero point per
    ``group`` channels (as CLLA-quant's cache holds it), its RoPE keys as computed; a step reads what was
    cached before it back from the codes and its own latents as computed, as every policy's step does."""

    def update(self, new: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        held = super().update(new, start)
        t = new.shape[1]
        if isinstance(start, torch.Tensor):
            return held.index_copy(1, start + torch.arange(t, device=held.device), new.to(held.dtype))
        return torch.cat([held[:, :start], new.to(held.dtype)], dim=1)


@dataclass(frozen=True)
class PolicyFootprint:
    """What a layer's K/V cost held through a policy, for one sequence."""

    bytes_per_token: int | float  # per position, in the long run
    held: Callable[[int], int] | None = None  # the bytes of n positions where they are not n times that
    max_tokens: int | None = None  # the positions kept at most, where the policy bounds them (None: as the layer)


def policy_footprints(mixers: list, max_len: int, dtype: torch.dtype, policy: CachePolicy, name: str = "layer") -> list:
    """Each layer's ``PolicyFootprint`` under ``policy`` (None where its footprint stands): ``policy_footprint``,
    or, for MiniCache, a pair's bytes at its upper layer and nothing at its lower. ``name``: what errors call a
    layer."""
    if policy.kind != "minicache":
        return [policy_footprint(m, max_len, dtype, policy, f"{name} {i}") for i, m in enumerate(mixers)]
    rows = [None] * len(mixers)
    for lower, upper in merged_pairs(policy, mixers):
        meta = mixers[lower].new_cache_slot(1, max_len, dtype, "meta")
        (_, Hk, _, Dk), (_, Hv, _, Dv) = meta.k.shape, meta.v.shape
        shapes = (Hk, Hv, Dk, Dv)
        rate = Fraction(minicache_bytes(1, *shapes, policy.retain, dtype, kept=Fraction(repr(policy.retain))))
        rows[lower] = PolicyFootprint(0)
        rows[upper] = PolicyFootprint(
            int(rate) if rate.denominator == 1 else float(rate),
            held=lambda n, s=shapes: minicache_bytes(n, *s, policy.retain, dtype),
        )
    return rows


def policy_footprint(mixer, max_len: int, dtype: torch.dtype, policy: CachePolicy, where: str):
    """``mixer``'s ``PolicyFootprint`` under ``policy``; None where it caches no K/V or the policy leaves its
    cache as it is (its footprint stands)."""
    meta = mixer.new_cache_slot(1, max_len, dtype, "meta")
    if isinstance(meta, SlotGroup):
        parts = [p for i, b in enumerate(mixer.branches)
                 if (p := policy_footprint(b, max_len, dtype, policy, f"{where}.{i}")) is not None]  # fmt: skip
        if len(parts) > 1 and any(p.held is not None or p.max_tokens is not None for p in parts):
            raise ValueError(f"cache policy {policy.kind}: {where} has more than one attention branch")
        if len(parts) == 1:
            return parts[0]
        return PolicyFootprint(sum(p.bytes_per_token for p in parts)) if parts else None
    rank = _latent_rank(meta, mixer, policy, where)
    if rank is not None:  # codes, a scale and a zero point per group, then the RoPE keys
        rope = meta.latent.shape[-1] - rank
        return PolicyFootprint(policy.bytes_per_vector(rank, dtype) + rope * dtype.itemsize)
    if not isinstance(meta, KV_SLOTS):
        return None
    _check_slot(meta, mixer, policy, where)
    _, Hk, _, Dk = meta.k.shape
    _, Hv, _, Dv = meta.v.shape
    codec = policy.codec_policy
    per_position = (Hk * Dk + Hv * Dv) * dtype.itemsize if codec is None else (
        Hk * codec.bytes_per_vector(Dk, dtype) + Hv * codec.bytes_per_vector(Dv, dtype))  # fmt: skip
    if policy.kind == "sinks":
        kept = policy.sinks + policy.window
        if not isinstance(meta, StaticKV) or kept >= meta.length:  # a window of the layer's own, or room for all
            return None if codec is None else PolicyFootprint(per_position)  # as it is, or its positions coded
        return PolicyFootprint(per_position, max_tokens=kept)
    if policy.kind in EVICTING:
        if not isinstance(meta, StaticKV) or policy.budget >= meta.length:
            return None
        # each head's positions (int32) and H2O's scores (float32; float64 in a float64 cache) beside the keys and
        # values; SnapKV: a context read as one prompt (the decoded tokens after it add this much each)
        score = compute_dtype(dtype).itemsize if policy.kind == "h2o" else 0
        held = (Hk * Dk + Hv * Dv) * dtype.itemsize + Hk * (4 + score)
        return PolicyFootprint(held, max_tokens=policy.budget)
    if policy.kind == "kivi":
        # the keys' per-channel scale and zero point are shared by `group` tokens: a fraction of a byte per token
        rate = Hk * (Fraction(Dk * policy.bits, 8) + Fraction(2 * Dk * dtype.itemsize, policy.group))
        rate += Hv * policy.bytes_per_vector(Dv, dtype)
        return PolicyFootprint(int(rate) if rate.denominator == 1 else float(rate),
                               held=lambda n: kivi_bytes(n, Hk, Hv, Dk, Dv, policy, dtype))  # fmt: skip
    return PolicyFootprint(per_position)
