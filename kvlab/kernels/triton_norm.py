"""RMSNorm (+ residual add) in Triton: one program per block of rows, forward and backward.

Forward, per row: s = x (+ residual), rstd = 1/sqrt(mean(s^2) + eps),
y = w * (s * rstd) (float32 inside, stored in x's dtype); rstd is kept for
the backward. Backward, with n = s * rstd:
    dw = sum over rows of dy * n
    ds = rstd * (dy w - n * mean(dy w n)) (+ the gradient of the returned sum)
and both x and the residual receive ds. Each program accumulates its rows'
dw in registers and writes one partial row; the partials are summed after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.triton_common import interpreting


@triton.jit
def _rms_norm_forward(X, R, SUM, Y, W, RSTD, n_rows, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(R + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
                tl.store(SUM + row * D + cols, x.to(SUM.dtype.element_ty), mask=in_row)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
            tl.store(RSTD + row, rstd)
            tl.store(Y + row * D + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _rms_norm_backward(DY, DSUM, S, W, RSTD, DX, DW_PARTIAL, n_rows, D, ROWS: tl.constexpr,
                       BLOCK_D: tl.constexpr, HAS_DSUM: tl.constexpr):  # fmt: skip
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            s = tl.load(S + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            n = s * rstd
            dw += dy * n
            dn = dy * w
            ds = rstd * (dn - n * tl.sum(dn * n, axis=0) / D)
            if HAS_DSUM:
                ds += tl.load(DSUM + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(DX + row * D + cols, ds.to(DX.dtype.element_ty), mask=in_row)
    tl.store(DW_PARTIAL + tl.program_id(0) * D + cols, dw, mask=in_row)


def _launch(n_rows: int) -> tuple[int, int]:
    rows = 4 if interpreting() else 16
    return rows, triton.cdiv(n_rows, rows)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        r2 = residual.reshape(-1, D).contiguous() if residual is not None else x2
        summed = torch.empty_like(x2) if residual is not None else x2
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        rows, grid = _launch(x2.shape[0])
        _rms_norm_forward[(grid,)](x2, r2, summed, y, weight.contiguous(), rstd, x2.shape[0], D, eps, ROWS=rows,
                                   BLOCK_D=triton.next_power_of_2(D), HAS_RESIDUAL=residual is not None)  # fmt: skip
        ctx.save_for_backward(summed, weight, rstd)
        ctx.shape, ctx.has_residual = shape, residual is not None
        return (y.view(shape), summed.view(shape)) if residual is not None else y.view(shape)

    @staticmethod
    def backward(ctx, dy, dsum=None):
        summed, weight, rstd = ctx.saved_tensors
        D = summed.shape[-1]
        dy = dy.reshape(-1, D).contiguous()
        has_dsum = ctx.has_residual and dsum is not None
        dsum = dsum.reshape(-1, D).contiguous() if has_dsum else dy
        dx = torch.empty_like(summed)
        rows, grid = _launch(summed.shape[0])
        partial = torch.empty(grid, D, dtype=torch.float32, device=dy.device)
        _rms_norm_backward[(grid,)](dy, dsum, summed, weight.contiguous(), rstd, dx, partial, summed.shape[0], D,
                                    ROWS=rows, BLOCK_D=triton.next_power_of_2(D), HAS_DSUM=has_dsum)  # fmt: skip
        dx = dx.view(ctx.shape)
        return dx, partial.sum(0).to(weight.dtype), None, dx if ctx.has_residual else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``kvlab.kernels.norm.rms_norm``'s contract."""
    return _RMSNorm.apply(x, weight, eps, residual)
