"""RMSNorm (Zhang & Sennrich 2019), optionally fused with the residual add before it.

    y = weight * x / sqrt(mean(x^2) + eps)        (normalised in float32, then cast back)

With ``residual``: x = x + residual first, and both y and that sum are
returned, the sum being the next residual stream (one pass over memory for
a fused kernel instead of two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.kernels.precision import upcast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None:
        x = x + residual
    y = weight * F.rms_norm(upcast(x), (x.shape[-1],), eps=eps).to(x.dtype)
    return y if residual is None else (y, x)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None:
        x = x + residual
    xf = upcast(x)
    y = weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if residual is None else (y, x)
