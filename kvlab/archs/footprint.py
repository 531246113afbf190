"""KV-cache footprint of a whole model, layer by layer.

Each mixer reports what its own cache slot holds (``LayerFootprint``); a
layer that reads another layer's K/V adds nothing. ``total_bytes`` is exact
at any length (sliding windows stop growing at their window), and equals
what ``Cache.nbytes()`` holds after that many tokens.

A row's unit is an *entry*: one token, except in a Block Transformer's block
decoder, which caches one entry per block of ``per_tokens`` tokens (and one
for its start block, ``entries_before``). A model with meta tokens (Hymba)
holds them before the tokens in every layer with a per-token cache
(``entries_before`` too; windows keep them, so count them in ``max_tokens``).

A model with a context encoder (CEPE, XC-Cache) also holds the encoder's
states of a context given beside the input: ``context_bytes_per_token`` per
context token, against the ``bytes_per_token`` the same tokens would cost as
part of the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import torch


def human(n: int) -> str:
    """Bytes in binary units, 3 significant digits."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class FootprintRow:
    layer: int
    kind: str
    bytes_per_token: int | float  # a float only where a policy keeps a fraction of positions (MiniCache)
    fixed_bytes: int
    kv_source: int
    max_tokens: int | None = None  # the window, for layers that keep only the last max_tokens entries
    per_tokens: int = 1  # tokens per cached entry (a Block Transformer's block decoder: the block length)
    entries_before: int = 0  # entries held before the tokens (a Block Transformer's start block, meta tokens)
    # the bytes of n entries where they are not n * bytes_per_token (a cache policy with a full-precision
    # residual: KIVI); bytes_per_token is then what each entry costs in the long run
    held: Callable[[int], int] | None = field(default=None, compare=False, repr=False)

    def total_bytes(self, seq_len: int) -> int:
        """What this layer holds for one sequence after ``seq_len`` tokens (``bytes_per_token`` is per entry;
        the entries before the tokens are written with the first of them)."""
        entries = self.entries_before + seq_len // self.per_tokens if seq_len else 0
        if self.max_tokens is not None:
            entries = min(entries, self.max_tokens)
        per_entry = self.bytes_per_token * entries if self.held is None else self.held(entries)
        return per_entry + self.fixed_bytes


@dataclass(frozen=True)
class Footprint:
    per_layer: tuple[FootprintRow, ...]
    dtype: torch.dtype
    context_bytes_per_token: int = 0  # the context encoder's states per context token (0: no context encoder)
    policy: str | None = None  # the cache policy its K/V are held through (None: as computed, in dtype)

    @property
    def bytes_per_token(self) -> int | float:
        """Bytes added per token of context, for one sequence, once every window is full (a float only where
        a block's entry does not divide evenly among its tokens, or a policy keeps a fraction: MiniCache)."""
        per_token = Fraction(0)
        for r in self.per_layer:
            if r.max_tokens is None:
                per_token += Fraction(r.bytes_per_token) / r.per_tokens
        return int(per_token) if per_token.denominator == 1 else float(per_token)

    @property
    def fixed_bytes(self) -> int:
        """Bytes per sequence that do not grow with context: states, memories, full windows, start entries."""
        held = sum(r.bytes_per_token * (r.max_tokens if r.max_tokens is not None else r.entries_before)
                   for r in self.per_layer)  # fmt: skip
        return sum(r.fixed_bytes for r in self.per_layer) + held

    def total_bytes(self, seq_len: int, batch_size: int = 1, context_len: int = 0) -> int:
        """Exact bytes held after ``seq_len`` tokens (and a context of ``context_len``) for ``batch_size``
        sequences."""
        held = sum(r.total_bytes(seq_len) for r in self.per_layer) + self.context_bytes_per_token * context_len
        return held * batch_size

    def read_bytes_per_step(self, seq_len: int, batch_size: int = 1) -> int:
        """Cache bytes one decode step reads after ``seq_len`` tokens: each layer reads the slot it
        attends over (its own, or its ``kv_source``'s: cross-layer sharing stores once and reads many
        times), a recurrent layer its state. Layer 0's values that value-residual layers mix in are
        not counted."""
        rows = {r.layer: r for r in self.per_layer}
        return sum(rows[r.kv_source].total_bytes(seq_len) for r in self.per_layer) * batch_size

    def max_batch_size(self, budget_bytes: int, seq_len: int) -> int:
        """The most sequences of ``seq_len`` tokens whose caches fit in ``budget_bytes`` (0 if none)."""
        per_seq = self.total_bytes(seq_len, 1)
        return budget_bytes // per_seq if per_seq else -1  # -1: no cache at all, any batch fits

    def table(self) -> str:
        """A plain-text table of the rows and totals."""
        blocks = any(r.per_tokens > 1 for r in self.per_layer)  # then bytes are per entry of per_tokens tokens
        unit = f"{'bytes/entry':>12} {'tokens/entry':>12}" if blocks else f"{'bytes/token':>12}"
        lines = [f"{'layer':>5}  {'kind':<16} {unit} {'fixed bytes':>12} {'window':>8} {'kv_source':>9}"]
        for r in self.per_layer:
            window = "-" if r.max_tokens is None else str(r.max_tokens)
            per = f"{r.bytes_per_token:>12,}" + (f" {r.per_tokens:>12}" if blocks else "")
            lines.append(f"{r.layer:>5}  {r.kind:<16} {per} {r.fixed_bytes:>12,} {window:>8} {r.kv_source:>9}")
        held = f"{self.dtype}" + (f", K/V {self.policy}" if self.policy else "")
        lines.append(f"total ({held}): {self.bytes_per_token:,} bytes/token + {self.fixed_bytes:,} fixed bytes")
        if self.context_bytes_per_token:
            lines.append(f"context: {self.context_bytes_per_token:,} bytes per context token (encoder states; in the "
                         f"prompt instead, {self.bytes_per_token:,} bytes/token)")  # fmt: skip
        return "\n".join(lines)
