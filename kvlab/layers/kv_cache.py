"""Preallocated cache slots: key/value buffers for softmax attention, fixed states for recurrent mixers.

``StaticKV`` holds every position up to ``max_len``; ``RingKV`` holds the
last ``window`` positions in a ring buffer, so a sliding-window layer never
stores more than its window (``SinkRingKV``: and the first ``sinks``
positions); ``LatentKV`` holds one vector per position (MLA's compressed
latent and RoPE key) that every head reads, and
``QuantizedLatentKV`` the same with the latent as low-bit codes (CLLA-quant).
They allocate once and write new keys in place, so decoding allocates no
cache memory. Keys are stored after RoPE.

Slots store; they do not count. The one position counter is the model's
cache (``Cache.seen``), handed to mixers as the step state's ``start``:
``update(k_new, v_new, start)`` writes the step's K/V at positions
``start..`` and returns a ``KVView``: the keys and values the step's queries
attend to, which the layer publishes for cross-layer readers, so readers
never touch the slot. Writing the same positions again overwrites them,
which is what the parallel passes over layers that read later layers rely
on. ``view(end)`` is what the slot holds for positions before ``end``.

In the compiled decode step ``start`` is a 0-d tensor: a slot then writes
by ``index_copy_`` and returns its whole buffer with every slot's position
(``k_pos``; a position after the query for what is not yet written), so
causal masking hides the rest and the shapes never change with the step.

``StateSlot`` holds the fixed-size states of recurrent mixers (retention's
and Mamba's S, a convolution's last inputs, RWKV's previous token), zeros
at a sequence's start, whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.kernels.ops import dequantize
from kvlab.kernels.quant import quantize


def reorder_rows(tensors: list[torch.Tensor], batch_idx: torch.Tensor) -> None:
    """In place, row r of each [B, ...] tensor becomes its row ``batch_idx[r]`` (beam search)."""
    for t in tensors:
        t.copy_(t.index_select(0, batch_idx.to(t.device)))


@dataclass
class KVView:
    """Keys/values, and the positions they sit at.

    ``end`` is one past the absolute position of the newest key. ``k_pos``
    gives the absolute position of each key; None means the keys are the
    ``S`` positions ending at ``end``, in order (the common case, which needs
    no position tensor), or, with ``ring`` (a ring buffer's one-token step),
    in the ring's slot order: position p in slot p % ring (its one query sees
    them all, in any order; a mask that needs them, as left pads do, asks
    ``key_positions``). Where the queries sit is the step's business
    (``StepState.start``), not the keys'. A cache that keeps different
    positions in each row and K/V head (H2O, SnapKV) gives them per head,
    [B, Hkv, S].
    """

    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor  # [B, Hkv, S, Dv]
    end: int
    k_pos: torch.Tensor | None = None  # [S], or [B, Hkv, S]
    ring: int | None = None  # k_pos None: the keys in the slot order of a ring buffer of this length

    def key_positions(self) -> torch.Tensor:
        """Each key's absolute position, [S] (or ``k_pos`` as given)."""
        if self.k_pos is not None:
            return self.k_pos
        S = self.k.shape[2]
        index = torch.arange(S, device=self.k.device)
        if self.ring is None:
            return index + (self.end - S)
        newest = self.end - 1  # slot j holds the latest position up to the newest that sits in slot j
        return newest - (newest - index) % self.ring


class _KVBuffers:
    """K and V buffers of ``length`` positions, allocated once."""

    def __init__(self, batch_size, n_heads, length, head_dim, v_head_dim, *, v_heads=None, dtype, device):
        """``v_heads``: value heads when they are not as many as the key heads (DHA); None: ``n_heads``."""
        self.k = torch.zeros(batch_size, n_heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, v_heads or n_heads, length, v_head_dim, dtype=dtype, device=device)
        self.length = length
        self.bytes_per_position = (self.k.nbytes + self.v.nbytes) // length  # whole batch
        self.slot_index = torch.arange(length, device=device)

    def allocated_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows([self.k, self.v], batch_idx)

    def reset(self) -> None:
        """Nothing to clear: positions are overwritten before they are read."""


class StaticKV(_KVBuffers):
    """Every position up to ``max_len``, in order."""

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int | torch.Tensor) -> KVView:
        t = k_new.shape[2]
        end = start + t
        if isinstance(start, torch.Tensor):  # static shapes: the whole buffer, positions mask the unwritten
            new = start + self.slot_index[:t]
            self.k.index_copy_(2, new, k_new.to(self.k.dtype))
            self.v.index_copy_(2, new, v_new.to(self.v.dtype))
            return self.view(end)
        if end > self.length:
            raise ValueError(f"cache is full: {start} tokens held + {t} new > max_len={self.length}")
        self.k[:, :, start:end].copy_(k_new)
        self.v[:, :, start:end].copy_(v_new)
        return self.view(end)

    def view(self, end: int | torch.Tensor) -> KVView:
        if isinstance(end, torch.Tensor):  # static shapes: the reader masks the positions from end on
            return KVView(self.k, self.v, end, self.slot_index)
        return KVView(self.k[:, :, :end], self.v[:, :, :end], end)

    def nbytes(self, seen: int) -> int:
        return self.bytes_per_position * seen


class RingKV(_KVBuffers):
    """The last ``length`` (the window) positions; position p lives in slot p % length."""

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int | torch.Tensor) -> KVView:
        t, w = k_new.shape[2], self.length
        if isinstance(start, torch.Tensor):  # static shapes (decoding one token): every slot, at its position
            if t != 1:
                raise ValueError(f"a ring buffer takes one token at a tensor start, got {t}")
            slot = (start % w).view(1)
            self.k.index_copy_(2, slot, k_new.to(self.k.dtype))
            self.v.index_copy_(2, slot, v_new.to(self.v.dtype))
            held = start - (start - self.slot_index) % w  # the latest position each slot holds
            # a slot not yet written holds nothing: a position after the query, which causality hides
            k_pos = torch.where(self.slot_index <= start, held, start + 1)
            return KVView(self.k, self.v, start + 1, k_pos)
        if t == 1:  # decode: overwrite the oldest slot, attend to all held slots
            self.k[:, :, start % w].copy_(k_new[:, :, 0])
            self.v[:, :, start % w].copy_(v_new[:, :, 0])
            held = min(start + 1, w)
            return KVView(self.k[:, :, :held], self.v[:, :, :held], start + 1, ring=w)
        # Several tokens: the queries need the held keys and all new keys, so
        # gather them before the ring overwrites the oldest ones.
        held = min(start, w)
        new_pos = torch.arange(start, start + t, device=self.k.device)
        if held == 0:  # a prefill from nothing: its own keys, in order (attention can go block by block)
            view = KVView(k_new.to(self.k.dtype), v_new.to(self.v.dtype), start + t)
        else:  # the held keys in the order of their positions (start - held ..), then the new: positions in a
            # row, so the queries are the last t of them and attention goes block by block, as from nothing
            order = (start - held + torch.arange(held, device=self.k.device)) % w
            view = KVView(
                torch.cat([self.k.index_select(2, order), k_new.to(self.k.dtype)], dim=2),
                torch.cat([self.v.index_select(2, order), v_new.to(self.v.dtype)], dim=2),
                start + t,
            )
        keep = min(t, w)
        dest = new_pos[-keep:] % w
        self.k.index_copy_(2, dest, k_new[:, :, -keep:].to(self.k.dtype))
        self.v.index_copy_(2, dest, v_new[:, :, -keep:].to(self.v.dtype))
        return view

    def nbytes(self, seen: int) -> int:
        return self.bytes_per_position * min(seen, self.length)


def sink_ring_slot(pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """The slot of each position in a buffer of ``sinks`` kept positions then a ring of ``window``: p < sinks in
    slot p, a later one in ``sinks + (p - sinks) % window`` (no window: every position in its own slot)."""
    return torch.where(pos < sinks, pos, sinks + (pos - sinks) % max(window, 1))


def sink_ring_held(slot_index: torch.Tensor, sinks: int, window: int, end) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot of such a buffer, the position it holds once positions before ``end`` are written, and whether it
    holds one: a ring slot the latest position congruent to it modulo the window (slot i holds p = i mod window)."""
    i = slot_index
    ring = (end - 1) - (end - 1 - i) % max(window, 1)
    return torch.where(i < sinks, i, ring), torch.where(i < sinks, i < end, ring >= sinks)


def sink_ring_in_order(pos: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """The slots ``held`` (a ``sink_ring_held`` mask), in the order of the positions ``pos`` they hold: a view of
    them is the sinks, then a run of positions, so attention can go block by block over it."""
    idx = held.nonzero()[:, 0]
    return idx[pos[idx].argsort()]


class SinkRingKV(_KVBuffers):
    """The first ``sinks`` positions, kept for good, and the last ``window`` positions after them in a ring
    buffer: position p < sinks lives in slot p, a later one in slot ``sinks + (p - sinks) % window`` (Hymba's
    meta tokens beside its sliding window). The positions held are not one run, so every view carries each
    key's position (``k_pos``) and readers mask by them."""

    def __init__(self, batch_size, n_heads, sinks, window, head_dim, v_head_dim, *, v_heads=None, dtype, device):
        super().__init__(batch_size, n_heads, sinks + window, head_dim, v_head_dim, v_heads=v_heads, dtype=dtype,
                         device=device)  # fmt: skip
        self.sinks, self.window = sinks, window

    def _slot(self, pos: torch.Tensor) -> torch.Tensor:
        return sink_ring_slot(pos, self.sinks, self.window)

    def _held(self, end: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sink_ring_held(self.slot_index, self.sinks, self.window, end)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int | torch.Tensor) -> KVView:
        t = k_new.shape[2]
        if isinstance(start, torch.Tensor):  # static shapes (decoding one token): every slot, at its position
            if t != 1:
                raise ValueError(f"a ring buffer takes one token at a tensor start, got {t}")
            slot = self._slot(start).view(1)
            self.k.index_copy_(2, slot, k_new.to(self.k.dtype))
            self.v.index_copy_(2, slot, v_new.to(self.v.dtype))
            pos, held = self._held(start + 1)
            return KVView(self.k, self.v, start + 1, torch.where(held, pos, start + 1))  # unwritten: after the query
        new_pos = torch.arange(start, start + t, device=self.k.device)
        # the queries need the held keys and all new ones: gathered before the ring overwrites the oldest
        if start == 0:
            view = KVView(k_new.to(self.k.dtype), v_new.to(self.v.dtype), t, new_pos)
        else:
            pos, held = self._held(start)
            idx = sink_ring_in_order(pos, held)
            view = KVView(
                torch.cat([self.k.index_select(2, idx), k_new.to(self.k.dtype)], dim=2),
                torch.cat([self.v.index_select(2, idx), v_new.to(self.v.dtype)], dim=2),
                start + t,
                torch.cat([pos[idx], new_pos]),
            )
        keep = (new_pos < self.sinks) | (new_pos >= start + t - self.window)  # what the buffer holds after
        dest = self._slot(new_pos[keep])
        self.k.index_copy_(2, dest, k_new[:, :, keep].to(self.k.dtype))
        self.v.index_copy_(2, dest, v_new[:, :, keep].to(self.v.dtype))
        return view

    def nbytes(self, seen: int) -> int:
        return self.bytes_per_position * (min(seen, self.sinks) + min(max(seen - self.sinks, 0), self.window))


class LatentKV:
    """One ``width``-wide vector per position, shared by all heads (MLA), up to ``max_len``.

    ``update(new, start)`` takes [B, T, width] for positions ``start..`` and
    returns every held position up to them, [B, S, width], a view of the buffer.
    """

    def __init__(self, batch_size: int, length: int, width: int, *, dtype, device):
        self.latent = torch.zeros(batch_size, length, width, dtype=dtype, device=device)
        self.length = length

    def update(self, new: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """With a tensor ``start`` (static shapes): the whole buffer; positions from ``start + t`` on are
        not yet written, for the reader to mask."""
        t = new.shape[1]
        if isinstance(start, torch.Tensor):
            self.latent.index_copy_(1, start + torch.arange(t, device=start.device), new.to(self.latent.dtype))
            return self.latent
        if start + t > self.length:
            raise ValueError(f"cache is full: {start} tokens held + {t} new > max_len={self.length}")
        self.latent[:, start : start + t].copy_(new)
        return self.latent[:, : start + t]

    def nbytes(self, seen: int) -> int:
        return self.latent[:, :seen].nbytes

    def allocated_bytes(self) -> int:
        return self.latent.nbytes

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows([self.latent], batch_idx)

    def reset(self) -> None:
        """Nothing to clear: positions are overwritten before they are read."""


class QuantizedLatentKV:
    """A ``LatentKV`` whose first ``width`` channels (MLA's compressed latent) are held as ``bits``-wide
    integer codes with a scale and a zero point per ``group`` channels (CLLA-quant, ``kvlab.kernels.quant``),
    and whose last ``rope_width`` (the RoPE keys) as they are. ``update`` returns the held positions
    dequantized, [B, S, width + rope_width] in the cache's dtype; what it holds is bit-exact to the
    footprint: ``width * bits / 8`` bytes of codes and two numbers per group, per position."""

    def __init__(self, batch_size: int, length: int, width: int, rope_width: int, bits: int, group: int, *,
                 dtype, device):  # fmt: skip
        self.width, self.rope_width, self.bits, self.group, self.dtype = width, rope_width, bits, group, dtype
        self.codes = torch.zeros(batch_size, length, width * bits // 8, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(batch_size, length, width // group, dtype=dtype, device=device)
        self.zero = torch.zeros(batch_size, length, width // group, dtype=dtype, device=device)
        self.rope = torch.zeros(batch_size, length, rope_width, dtype=dtype, device=device)
        self.length = length

    def _buffers(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero, self.rope]

    def update(self, new: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """As ``LatentKV.update``: with a tensor ``start`` the whole buffer (unwritten positions masked by the
        reader), else the positions up to the new ones."""
        t = new.shape[1]
        c, rope = new.split([self.width, self.rope_width], dim=-1)
        parts = [*quantize(c, self.bits, self.group, self.dtype), rope.to(self.dtype)]
        if isinstance(start, torch.Tensor):
            index = start + torch.arange(t, device=start.device)
            for buffer, part in zip(self._buffers(), parts, strict=True):
                buffer.index_copy_(1, index, part)
            return self._held(self.length)
        if start + t > self.length:
            raise ValueError(f"cache is full: {start} tokens held + {t} new > max_len={self.length}")
        for buffer, part in zip(self._buffers(), parts, strict=True):
            buffer[:, start : start + t].copy_(part)
        return self._held(start + t)

    def _held(self, end: int) -> torch.Tensor:
        c = dequantize(self.codes[:, :end], self.scale[:, :end], self.zero[:, :end], self.bits, self.dtype)
        return torch.cat([c, self.rope[:, :end]], dim=-1)

    def nbytes(self, seen: int) -> int:
        return sum(b[:, :seen].nbytes for b in self._buffers())

    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers())

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows(self._buffers(), batch_idx)

    def reset(self) -> None:
        """Nothing to clear: positions are overwritten before they are read."""


class StateSlot:
    """Named fixed-size state tensors per sequence, each [batch_size, *shape], read as attributes.

    ``key_contiguous`` names matrix states [..., N, P] held on a CPU with N the contiguous dimension (a
    transposed view of [..., P, N] memory, mamba-ssm's own layout for Mamba-2). A compiled decode step then
    updates such a state and reduces it over N in one pass, row by row (``linear_attention_step``); with P
    contiguous Inductor reads the state twice, once for the output and once for the update (mamba2's steps
    x1.01 to x1.06, benchmarks/RESULTS.md). Other devices keep P contiguous (not measured there)."""

    def __init__(self, batch_size: int, shapes: dict[str, tuple[int, ...]], *, dtype, device, key_contiguous=()):
        on_cpu = torch.device(device).type == "cpu"

        def zeros(name, shape):
            if name not in key_contiguous or not on_cpu:
                return torch.zeros(batch_size, *shape, dtype=dtype, device=device)
            return torch.zeros(batch_size, *shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device).mT

        self.tensors = {n: zeros(n, shape) for n, shape in shapes.items()}

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    def nbytes(self, seen: int = 0) -> int:
        return sum(t.nbytes for t in self.tensors.values())  # fixed: held from the first token

    def allocated_bytes(self) -> int:
        return self.nbytes()

    def reorder(self, batch_idx: torch.Tensor) -> None:
        reorder_rows(list(self.tensors.values()), batch_idx)

    def reset(self) -> None:
        for t in self.tensors.values():
            t.zero_()


class SlotGroup:
    """The slots of mixers that share a layer (parallel branches), as one slot."""

    def __init__(self, slots: list):
        self.slots = slots

    def _held(self) -> list:
        return [s for s in self.slots if s is not None]

    def nbytes(self, seen: int) -> int:
        return sum(s.nbytes(seen) for s in self._held())

    def allocated_bytes(self) -> int:
        return sum(s.allocated_bytes() for s in self._held())

    def reorder(self, batch_idx: torch.Tensor) -> None:
        for s in self._held():
            s.reorder(batch_idx)

    def reset(self) -> None:
        for s in self._held():
            s.reset()
