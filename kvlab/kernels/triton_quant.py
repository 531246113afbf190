"""Reading low-bit cache codes back in Triton (``kvlab.kernels.quant.dequantize``), one pass over the bytes.

Rows are the leading dims flattened: packed [N, width * bits / 8] uint8,
scale and zero [N, groups]; one program per block of rows, every channel of
a row at once: its byte, its ``bits`` at ``(c % (8 / bits)) * bits``, times
its group's scale plus its zero point, in float32, stored in the output
dtype. PyTorch's form holds the unpacked codes as int32 lanes and the
products apart; here nothing but the output is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.triton_common import interpreting


@triton.jit
def _dequantize(P, S, Z, OUT, n_rows, width, n_bytes, n_groups, group, BITS: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    c = tl.arange(0, BLOCK)
    inside = c < width
    per_byte: tl.constexpr = 8 // BITS
    shift = (c % per_byte) * BITS
    g = c // group
    for r in range(ROWS):
        row = tl.program_id(0) * ROWS + r
        if row < n_rows:
            byte = tl.load(P + row * n_bytes + c // per_byte, mask=inside, other=0).to(tl.int32)
            code = (byte >> shift) & ((1 << BITS) - 1)
            s = tl.load(S + row * n_groups + g, mask=inside, other=0.0).to(tl.float32)
            z = tl.load(Z + row * n_groups + g, mask=inside, other=0.0).to(tl.float32)
            tl.store(OUT + row * width + c, (code.to(tl.float32) * s + z).to(OUT.dtype.element_ty), mask=inside)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    *lead, n_bytes = packed.shape
    width, n_groups = n_bytes * 8 // bits, scale.shape[-1]
    out = torch.empty(*lead, width, dtype=dtype, device=packed.device)
    n_rows = out.numel() // max(width, 1)
    if n_rows == 0 or width == 0:
        return out
    rows = 4 if interpreting() else 16
    _dequantize[(triton.cdiv(n_rows, rows),)](
        packed.reshape(n_rows, n_bytes).contiguous(), scale.reshape(n_rows, n_groups).contiguous(),
        zero.reshape(n_rows, n_groups).contiguous(), out, n_rows, width, n_bytes, n_groups, width // n_groups,
        BITS=bits, ROWS=rows, BLOCK=triton.next_power_of_2(width),
    )  # fmt: skip
    return out
