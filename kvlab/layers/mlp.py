"""Channel mixers: SwiGLU (Shazeer 2020, as in Llama), the GELU MLP of GPT-2, and RWKV's channel mix.

RWKV's channel mix (Peng et al. 2023, 2024) mixes each token with the one
before it (token shift), so it is the one MLP that keeps state when
decoding: the previous token's input, ``d_model`` values per sequence.
MLPs say so with ``stateful``; a stateful one takes ``cache`` and
``doc_ids`` and allocates its slot with ``new_cache_slot``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_choice, check_int
from kvlab.kernels.causal_conv import token_shift
from kvlab.layers.kv_cache import StateSlot

MLP_KINDS = ("swiglu", "gelu", "rwkv_channel_mix", "none")


@dataclass
class MLPConfig:
    kind: str = "swiglu"
    hidden: int | None = None  # None: 8/3 d_model (SwiGLU), 4 d_model (GELU), 7/2 d_model (RWKV), rounded up to 64
    # kind none: blocks without an MLP, for mixers that carry one's weight (GAU)

    def validate(self, d_model: int, path: str) -> None:
        check_choice(self.kind, f"{path}.kind", MLP_KINDS)
        check_int(self.hidden, f"{path}.hidden", minimum=1, optional=True)
        if self.kind == "none":
            if self.hidden is not None:
                raise ValueError(f"{path}.hidden={self.hidden} is set but {path}.kind=none has no hidden layer")
        elif self.hidden is None:
            width = {"swiglu": 8 * d_model // 3, "gelu": 4 * d_model, "rwkv_channel_mix": 7 * d_model // 2}[self.kind]
            self.hidden = -(-width // 64) * 64

    @property
    def stateful(self) -> bool:
        """Whether this MLP keeps a state in the cache (RWKV's channel mix: the previous token)."""
        return self.kind != "none" and MLP_CLASSES[self.kind].stateful


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names match `transformers` Llama."""

    stateful = False

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    stateful = False

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class RWKVChannelMix(nn.Module):
    """x' = x + mix * (x_{t-1} - x) per channel (one mix for the key, one for the gate);
    out = sigmoid(gate(x'_r)) * down(relu(up(x'_k))^2)."""

    stateful = True

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.mix_k = nn.Parameter(torch.empty(d_model))
        self.mix_r = nn.Parameter(torch.empty(d_model))
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.gate_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.mix_k.is_meta:
            nn.init.constant_(self.mix_k, 0.5)  # half the previous token, half this one
            nn.init.constant_(self.mix_r, 0.5)

    def forward(self, x: torch.Tensor, *, cache=None, doc_ids=None) -> torch.Tensor:
        before, last = token_shift(x, prev=cache.prev if cache is not None else None, doc_ids=doc_ids)
        if cache is not None:
            cache.prev.copy_(last)
        delta = before - x
        key = torch.relu(self.up_proj(x + delta * self.mix_k)).square()
        return torch.sigmoid(self.gate_proj(x + delta * self.mix_r)) * self.down_proj(key)

    def new_cache_slot(self, batch_size: int, dtype: torch.dtype, device) -> StateSlot:
        return StateSlot(batch_size, {"prev": (self.mix_k.shape[0],)}, dtype=dtype, device=device)

    def state_bytes(self, dtype: torch.dtype) -> int:
        return self.mix_k.shape[0] * dtype.itemsize


def build_mlp(cfg: MLPConfig, d_model: int) -> nn.Module | None:
    """The block's MLP, or None for ``kind: none``."""
    if cfg.kind == "none":
        return None
    return MLP_CLASSES[cfg.kind](d_model, cfg.hidden)


MLP_CLASSES = {"swiglu": SwiGLU, "gelu": GeluMLP, "rwkv_channel_mix": RWKVChannelMix}
