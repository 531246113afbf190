"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019), with Gemma's unit offset or without, and LayerNorm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvlab._config import check_bool, check_choice, check_float
from kvlab.kernels.ops import rms_norm
from kvlab.kernels.precision import upcast

NORM_KINDS = ("rmsnorm", "layernorm")


@dataclass
class NormConfig:
    kind: str = "rmsnorm"
    eps: float = 1e-5
    unit_offset: bool = False  # Gemma's RMSNorm: weights w, initialised at 0, weighing by 1 + w

    def validate(self, path: str) -> None:
        check_choice(self.kind, f"{path}.kind", NORM_KINDS)
        check_float(self.eps, f"{path}.eps", positive=True)
        check_bool(self.unit_offset, f"{path}.unit_offset")
        if self.unit_offset and self.kind != "rmsnorm":
            raise ValueError(f"{path}.unit_offset=true is Gemma's RMSNorm; {path}.kind={self.kind!r} has none")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the input dtype (as Llama does). With ``unit_offset``
    (Gemma's): x / rms(x) * (1 + weight), the product in float32 too and rounded once, as Gemma computes it, so
    a bf16 weight near 0 keeps its digits (1 + w held in bf16 would round it to steps of 1/128)."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The normalised x; with ``residual``, normalises x + residual and returns (normalised, x + residual)."""
        if not self.unit_offset:
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        xf = upcast(x)
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + upcast(self.weight))).to(x.dtype)
        return y if residual is None else (y, x)

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)


def build_norm(cfg: NormConfig, dim: int) -> nn.Module:
    if cfg.kind == "rmsnorm":
        return RMSNorm(dim, cfg.eps, cfg.unit_offset)
    return nn.LayerNorm(dim, eps=cfg.eps)
