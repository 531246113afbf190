"""Channel mixers: SwiGLU (Shazeer 2020, as in Llama) and the GELU MLP of GPT-2."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_choice, check_int

MLP_KINDS = ("swiglu", "gelu")


@dataclass
class MLPConfig:
    kind: str = "swiglu"
    hidden: int | None = None  # None: 8/3 d_model for SwiGLU, 4 d_model for GELU, rounded up to 64

    def validate(self, d_model: int, path: str) -> None:
        check_choice(self.kind, f"{path}.kind", MLP_KINDS)
        check_int(self.hidden, f"{path}.hidden", minimum=1, optional=True)
        if self.hidden is None:
            width = 8 * d_model // 3 if self.kind == "swiglu" else 4 * d_model
            self.hidden = -(-width // 64) * 64


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names match `transformers` Llama."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def build_mlp(cfg: MLPConfig, d_model: int) -> nn.Module:
    cls = SwiGLU if cfg.kind == "swiglu" else GeluMLP
    return cls(d_model, cfg.hidden)
