"""Rotary embedding in Triton (the rotate-half layout of ``kvlab.kernels.rope``), forward and backward.

One program per block of (batch, head, position) rows of x [B, H, T, D],
tables cos/sin [T, d] (d <= D rotated channels, both halves of a table
row equal). The pair (x_i, x_{i+d/2}) turns by angle a_i:
    (x_i cos a - x_{i+d/2} sin a,  x_{i+d/2} cos a + x_i sin a)
and channels past d pass through. The backward is the same rotation by
-a (a rotation's transpose is its inverse), so one kernel does both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.triton_common import interpreting


@triton.jit
def _rope(X, COS, SIN, OUT, n_rows, T, D, half, sign, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
          BLOCK_REST: tl.constexpr):  # fmt: skip
    i = tl.arange(0, BLOCK_HALF)
    rot = i < half
    rest = tl.arange(0, BLOCK_REST) + 2 * half
    in_rest = rest < D
    for r in range(ROWS):
        row = tl.program_id(0) * ROWS + r
        if row < n_rows:
            t = row % T
            c = tl.load(COS + t * 2 * half + i, mask=rot, other=1.0)
            s = tl.load(SIN + t * 2 * half + i, mask=rot, other=0.0) * sign
            x1 = tl.load(X + row * D + i, mask=rot, other=0.0).to(tl.float32)
            x2 = tl.load(X + row * D + half + i, mask=rot, other=0.0).to(tl.float32)
            tl.store(OUT + row * D + i, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=rot)
            tl.store(OUT + row * D + half + i, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=rot)
            tl.store(OUT + row * D + rest, tl.load(X + row * D + rest, mask=in_rest), mask=in_rest)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, H, T, D = x.shape
    d = cos.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    n_rows = B * H * T
    rows = 8 if interpreting() else 32
    rest = D - d
    _rope[(triton.cdiv(n_rows, rows),)](
        x, cos.contiguous().float(), sin.contiguous().float(), out, n_rows, T, D, d // 2, sign, ROWS=rows,
        BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK_REST=triton.next_power_of_2(max(rest, 1)),
    )  # fmt: skip
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``kvlab.kernels.rope.apply_rope`` for tables [T, d] (one position per row of x)."""
    return _Rope.apply(x, cos, sin)
