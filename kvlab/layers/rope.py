"""RoPE angles as modules, asked for the angles of a step: consecutive
positions after ``start`` (a cache's count) or explicit per-token
``positions`` (packed documents).

- ``Rotary``: the standard frequencies theta^(-2i/dims) (or their context-extended
  scaling, ``kvlab.kernels.rope.scaled_frequencies``), as cos/sin tables
  for every position up to max_seq_len, computed once. LongRoPE holds two
  sets, and a call whose last position is past the original context takes
  the long one for all its positions, as Phi-3's code and `transformers`
  choose per forward (so a cache filled before that point keeps keys turned
  at the short frequencies, as theirs does; ``CausalLM.generate`` fills it
  again at that point, as their generation does). The tables are
  buffers that are not saved; ``reset_buffers`` recomputes them after a
  model is built on the meta device, and after a cast to float64
  (``ConstantBuffers``).
- ``HeadwiseRotary``: each head rotates its pairs at its own frequencies,
  picked from a wider rotary's (partial RoPE as MHA2MLA converts it: each
  head keeps the parent's frequencies that mattered most to it). Angles are
  computed per step, so loaded selections are used as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from kvlab.kernels.precision import compute_dtype
from kvlab.kernels.rope import rope_tables


class ConstantBuffers(nn.Module):
    """A module whose ``reset_buffers`` computes constants from its settings in float64 (RoPE's tables, RetNet's
    decays) into buffers of the module's dtype. A cast to float64 (``model.double()``) computes them again, so a
    float64 model holds them exact rather than float32's values cast, and computes in float64 throughout."""

    def reset_buffers(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        before = [b.dtype for b in self.buffers(recurse=False)]
        super()._apply(fn, recurse)
        if torch.float64 not in before and any(b.dtype == torch.float64 for b in self.buffers(recurse=False)):
            self.reset_buffers()
        return self


class Rotary(ConstantBuffers):
    def __init__(self, dims: int, theta: float, max_seq_len: int, scaling: dict | None = None):
        super().__init__()
        self.dims, self.theta, self.max_seq_len, self.scaling = dims, theta, max_seq_len, scaling
        self.register_buffer("cos", torch.empty(max_seq_len, dims), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dims), persistent=False)
        # LongRoPE: the original context's length, past which a call takes the long tables
        self.original = (
            scaling["original_max_seq_len"] if scaling is not None and scaling["kind"] == "longrope" else None
        )
        if self.original is not None:
            self.register_buffer("cos_long", torch.empty(max_seq_len, dims), persistent=False)
            self.register_buffer("sin_long", torch.empty(max_seq_len, dims), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.cos.is_meta:
            return
        for long, suffix in ((False, ""), (True, "_long"))[: 1 if self.original is None else 2]:
            cos, sin = rope_tables(self.dims, self.theta, self.max_seq_len, device=self.cos.device,
                                   scaling=self.scaling, dtype=compute_dtype(self.cos.dtype), long=long)  # fmt: skip
            getattr(self, "cos" + suffix).copy_(cos)
            getattr(self, "sin" + suffix).copy_(sin)

    def forward(self, start: int | torch.Tensor, length: int, positions: torch.Tensor | None = None):
        """cos, sin of [length, dims] from position ``start`` on, or of [B, T, dims] at ``positions``.

        ``start`` may be a 0-d tensor (the compiled decode step: the graph must not depend on its value);
        its range is then the caller's to check."""
        if isinstance(start, torch.Tensor) and positions is None:
            positions = start + torch.arange(length, device=start.device)
        if positions is not None:
            cos, sin = self.cos[positions], self.sin[positions]
            if self.original is not None:  # (a tensor's choice: no host sync, one graph for both)
                long = positions.max() >= self.original
                cos = torch.where(long, self.cos_long[positions], cos)
                sin = torch.where(long, self.sin_long[positions], sin)
            return cos, sin
        if start + length > self.max_seq_len:
            raise ValueError(f"position {start + length - 1} is beyond max_seq_len={self.max_seq_len}")
        if self.original is not None and start + length > self.original:
            return self.cos_long[start : start + length], self.sin_long[start : start + length]
        return self.cos[start : start + length], self.sin[start : start + length]


class HeadwiseRotary(nn.Module):
    """Per head, ``dims / 2`` pairs rotated at frequencies picked from a ``spectrum``-wide rotary's.

    ``pair_index`` [heads, dims/2] (a saved integer buffer, so no dtype cast
    rounds it) says which: pair j of head h turns at
    theta^(-2 pair_index[h, j] / spectrum).
    """

    def __init__(self, heads: int, dims: int, spectrum: int, theta: float, max_seq_len: int):
        super().__init__()
        self.heads, self.dims, self.spectrum, self.theta, self.max_seq_len = heads, dims, spectrum, theta, max_seq_len
        self.register_buffer("pair_index", torch.empty(heads, dims // 2, dtype=torch.long))
        # no values: its dtype follows the model's casts, so a float64 model gets its angles in float64
        self.register_buffer("angle_dtype", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every head starts with the spectrum's highest frequencies."""
        if not self.pair_index.is_meta:
            self.pair_index.copy_(torch.arange(self.dims // 2).expand(self.heads, -1))

    def forward(self, start: int | torch.Tensor, length: int, positions: torch.Tensor | None = None):
        """cos, sin of [1, heads, length, dims] from ``start`` on, or [B, heads, T, dims] at ``positions``."""
        if isinstance(start, torch.Tensor) and positions is None:
            positions = (start + torch.arange(length, device=start.device))[None]
        if positions is None:
            if start + length > self.max_seq_len:
                raise ValueError(f"position {start + length - 1} is beyond max_seq_len={self.max_seq_len}")
            positions = torch.arange(start, start + length, device=self.pair_index.device)[None]
        inv_freq = self.theta ** (-2.0 * self.pair_index.double() / self.spectrum)
        angles = positions[:, None, :, None].double() * inv_freq[None, :, None, :]
        angles = torch.cat([angles, angles], dim=-1)
        dtype = compute_dtype(self.angle_dtype.dtype)  # float32, or float64 for a float64 model
        return angles.cos().to(dtype), angles.sin().to(dtype)
