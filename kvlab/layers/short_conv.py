"""LFM2's gated short convolution (Liquid AI 2025: the "conv" layers of the LFM2 models, as Liquid's own
`transformers` class, Lfm2ShortConv, defines them; no paper gives them otherwise).

    B, C, x = in_proj(u)                  three d_model-wide projections of the layer's input u
    y = out_proj(C * conv(B * x))         conv: causal, depthwise, ``conv_kernel`` taps (3)

Two multiplicative gates and no activation ("double-gated"): B gates what enters the convolution, C what leaves
it. ``bias`` puts biases on both projections and the convolution (the class's one ``conv_bias``). A token sees
the ``conv_kernel - 1`` tokens before it and nothing further, so the cache is fixed: the last ``conv_kernel - 1``
gated inputs B * x, d_model each. Packed documents: the convolution stops at a document's first token; left pads:
it skips them (a pad's gated input is zero in LFM2's class too, which zeroes a pad's hidden state).
Initialisation: the convolution as nn.Conv1d's default (the class's own), the projections kvlab's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvlab._config import check_bool, check_int
from kvlab.kernels.causal_conv import skipping_pads
from kvlab.kernels.ops import causal_conv1d
from kvlab.layers.base import LayerFootprint, MixerConfig, StepState, check_reads_own_state, register_mixer
from kvlab.layers.kv_cache import StateSlot
from kvlab.layers.mamba import init_depthwise_conv


@dataclass
class ShortConvConfig(MixerConfig):
    kind = "short_conv"
    conv_kernel: int = 3  # taps: a token reads conv_kernel - 1 before it (LFM2's conv_L_cache)
    bias: bool = False  # on in_proj, the convolution and out_proj (LFM2's conv_bias)

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.conv_kernel, f"{path}.conv_kernel", minimum=1)
        check_bool(self.bias, f"{path}.bias")


@register_mixer
class ShortConv(nn.Module):
    Config = ShortConvConfig
    output_projection = "out_proj"
    takes_last_only = True  # forward's ``last_only``: the last position's output alone (``Block``)

    def __init__(self, cfg: ShortConvConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg, self.d_model = cfg, d_model
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=cfg.bias)  # [B, C, x]
        self.conv_weight = nn.Parameter(torch.empty(d_model, cfg.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(d_model)) if cfg.bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if not self.conv_weight.is_meta:
            init_depthwise_conv(self.conv_weight, self.conv_bias)

    def forward(self, x, *, cache=None, state: StepState | None = None, last_only: bool = False):
        """Positions are not read: the convolution carries order."""
        state = StepState() if state is None else state
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        conv, conv_state = skipping_pads(
            causal_conv1d, b * v, cache.conv if cache is not None else None, state.real, self.cfg.conv_kernel - 1,
            weight=self.conv_weight, bias=self.conv_bias, doc_ids=state.doc_ids,
        )  # fmt: skip
        if cache is not None:
            cache.conv.copy_(conv_state)
        y = c * conv
        return self.out_proj(y[:, -1:] if last_only else y)

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        return StateSlot(batch_size, {"conv": (self.cfg.conv_kernel - 1, self.d_model)}, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        return LayerFootprint(fixed_bytes=(self.cfg.conv_kernel - 1) * self.d_model * dtype.itemsize)
