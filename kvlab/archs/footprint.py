"""KV-cache footprint of a whole model, layer by layer.

Each mixer reports what its own cache slot holds (``LayerFootprint``); a
layer that reads another layer's K/V adds nothing. ``total_bytes`` is exact
at any length (sliding windows stop growing at their window), and equals
what ``Cache.nbytes()`` holds after that many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FootprintRow:
    layer: int
    kind: str
    bytes_per_token: int
    fixed_bytes: int
    kv_source: int
    max_tokens: int | None = None  # the window, for layers that keep only the last max_tokens tokens

    def total_bytes(self, seq_len: int) -> int:
        """What this layer holds for one sequence after ``seq_len`` tokens."""
        tokens = seq_len if self.max_tokens is None else min(seq_len, self.max_tokens)
        return self.bytes_per_token * tokens + self.fixed_bytes


@dataclass(frozen=True)
class Footprint:
    per_layer: tuple[FootprintRow, ...]
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Bytes added per token of context, for one sequence, once every window is full."""
        return sum(r.bytes_per_token for r in self.per_layer if r.max_tokens is None)

    @property
    def fixed_bytes(self) -> int:
        """Bytes per sequence that do not grow with context: states, memories, full windows."""
        windows = sum(r.bytes_per_token * r.max_tokens for r in self.per_layer if r.max_tokens is not None)
        return sum(r.fixed_bytes for r in self.per_layer) + windows

    def total_bytes(self, seq_len: int, batch_size: int = 1) -> int:
        """Exact bytes held after ``seq_len`` tokens for ``batch_size`` sequences."""
        return sum(r.total_bytes(seq_len) for r in self.per_layer) * batch_size

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
        lines = [f"{'layer':>5}  {'kind':<12} {'bytes/token':>12} {'fixed bytes':>12} {'window':>8} {'kv_source':>9}"]
        for r in self.per_layer:
            window = "-" if r.max_tokens is None else str(r.max_tokens)
            lines.append(
                f"{r.layer:>5}  {r.kind:<12} {r.bytes_per_token:>12,} {r.fixed_bytes:>12,} {window:>8} {r.kv_source:>9}"
            )
        lines.append(f"total ({self.dtype}): {self.bytes_per_token:,} bytes/token + {self.fixed_bytes:,} fixed bytes")
        return "\n".join(lines)
