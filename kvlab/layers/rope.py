"""RoPE tables as a module: cos/sin for every position up to max_seq_len, computed once.

Mixers that rotate queries and keys (attention, MLA) hold one ``Rotary``
and ask it for the angles of a step: consecutive positions after ``start``
(a cache's count) or explicit per-token ``positions`` (packed documents).
The tables are buffers that are not saved; ``reset_buffers`` recomputes
them after a model is built on the meta device.
"""

from __future__ import annotations

import torch
from torch import nn

from kvlab.kernels.rope import rope_tables


class Rotary(nn.Module):
    def __init__(self, dims: int, theta: float, max_seq_len: int):
        super().__init__()
        self.dims, self.theta, self.max_seq_len = dims, theta, max_seq_len
        self.register_buffer("cos", torch.empty(max_seq_len, dims), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dims), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.cos.is_meta:
            return
        cos, sin = rope_tables(self.dims, self.theta, self.max_seq_len, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, start: int, length: int, positions: torch.Tensor | None = None):
        """cos, sin of [length, dims] from position ``start`` on, or of [B, T, dims] at ``positions``."""
        if positions is not None:
            return self.cos[positions], self.sin[positions]
        if start + length > self.max_seq_len:
            raise ValueError(f"position {start + length - 1} is beyond max_seq_len={self.max_seq_len}")
        return self.cos[start : start + length], self.sin[start : start + length]
