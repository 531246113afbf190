"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and LayerNorm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvlab._config import check_choice, check_float
from kvlab.kernels.ops import rms_norm

NORM_KINDS = ("rmsnorm", "layernorm")


@dataclass
class NormConfig:
    kind: str = "rmsnorm"
    eps: float = 1e-5

    def validate(self, path: str) -> None:
        check_choice(self.kind, f"{path}.kind", NORM_KINDS)
        check_float(self.eps, f"{path}.eps", positive=True)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the input dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The normalised x; with ``residual``, normalises x + residual and returns (normalised, x + residual)."""
        return rms_norm(x, self.weight, self.eps, residual)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(cfg: NormConfig, dim: int) -> nn.Module:
    if cfg.kind == "rmsnorm":
        return RMSNorm(dim, cfg.eps)
    return nn.LayerNorm(dim, eps=cfg.eps)
