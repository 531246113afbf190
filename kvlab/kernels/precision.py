"""The precision kernels compute in: float32 at least."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype values of ``dtype`` are computed in: float32, or float64 for float64 (see ``upcast``)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least, for sums, exponentials, norms and softmaxes: bf16 and fp16 values go to float32,
    float64 stays float64 (``.float()`` rounded a float64 model, as the tests' transcriptions of the papers run,
    to float32 there, so it computed in float32 in parts and its float64 outputs held float32's error)."""
    return x.to(compute_dtype(x.dtype))
