"""Low-bit integer codes for cached vectors: asymmetric min-max quantization in groups, bit-packed.

A vector's channels are cut into groups of ``group`` channels; each group
keeps a scale and a zero point (its minimum), and each channel a ``bits``-wide
code, ``round((x - zero) / scale)`` with ``scale = (max - min) / (2^bits - 1)``,
so ``code * scale + zero`` gives the value back within half a step. Codes are
packed ``8 / bits`` to a byte, the lowest channel in the lowest bits. What a
cache holds per vector is then exactly ``width * bits / 8`` bytes of codes plus
two numbers per group, which is what the footprint counts.

``quantize`` and ``dequantize`` are the one definition (``dequantize`` is also
the kernel op ``kvlab.kernels.ops.dequantize`` that caches read their codes
back through, with ``dequantize_reference`` and a Triton kernel beside it);
the forward pass of a model that caches quantized vectors runs its vectors
through ``fake_quantize`` (the same round trip, with a straight-through
gradient), so decoding from the codes computes what the forward computed.
"""

from __future__ import annotations

import torch

from kvlab.kernels.precision import compute_dtype

BITS = (2, 4, 8)


def quantize(x: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype):
    """x [..., width] -> (packed codes uint8 [..., width * bits / 8], scale, zero [..., width / group]).

    ``scale`` and ``zero`` are rounded to ``scale_dtype`` (what the cache stores) before the codes are
    computed from them, so dequantizing from the stored numbers is the round trip the forward pass takes."""
    *lead, width = x.shape
    levels = 2**bits - 1
    work = compute_dtype(x.dtype)  # float64 stays float64 (the tests' transcription)
    groups = x.to(work).reshape(*lead, width // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    zero = lo.to(scale_dtype)
    scale = ((hi - zero.to(work)) / levels).to(scale_dtype)
    step = scale.to(work).unsqueeze(-1)
    offsets = groups - zero.to(work).unsqueeze(-1)
    codes = torch.where(step > 0, offsets / step.clamp_min(torch.finfo(work).tiny), 0.0)
    codes = codes.round().clamp(0, levels).to(torch.uint8).reshape(*lead, width)
    return pack(codes, bits), scale, zero


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype):
    """The inverse of ``quantize``: [..., width] in ``dtype``."""
    work = compute_dtype(scale.dtype)
    codes = unpack(packed, bits).to(work)
    *lead, width = codes.shape
    n_groups = scale.shape[-1]
    if n_groups == 0:  # nothing held yet (KIVI's keys before their first group: a cache shorter than its residual)
        return codes.to(dtype)
    values = codes.reshape(*lead, n_groups, width // n_groups) * scale.to(work).unsqueeze(-1)
    return (values + zero.to(work).unsqueeze(-1)).reshape(*lead, width).to(dtype)


def dequantize_reference(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                         dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``dequantize`` as its definition reads, in float64: channel c's code is bits ``(c % k) * bits`` on of byte
    ``c // k`` (``k = 8 / bits`` codes a byte), times its group's scale, plus its group's zero point."""
    per_byte = 8 // bits
    width = packed.shape[-1] * per_byte
    channel = torch.arange(width, device=packed.device)
    byte = packed.index_select(-1, channel // per_byte).to(torch.int64)
    code = byte // 2 ** ((channel % per_byte) * bits) % 2**bits  # arithmetic, not the shifts dequantize uses
    group = channel // (width // scale.shape[-1])
    value = code.double() * scale.double().index_select(-1, group) + zero.double().index_select(-1, group)
    return value.to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(quantize(x))`` in the forward pass, the identity in the backward (straight through)."""
    packed, scale, zero = quantize(x.detach(), bits, group, scale_dtype)
    values = dequantize(packed, scale, zero, bits, x.dtype)
    return x + (values - x).detach() if x.requires_grad else values


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2^bits [..., width] -> [..., width * bits / 8], ``8 / bits`` codes a byte."""
    per_byte = 8 // bits
    lanes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (lanes << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack``."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    lanes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return lanes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)
