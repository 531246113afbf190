"""Griffin and Hawk's recurrent block (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local
Attention for Efficient Language Models"), the RG-LRU inside it, as the paper and its code (Google DeepMind's
recurrentgemma) define them.

The block has two branches of width W (the paper's D_RNN) from the layer's input x:

    y = GeLU(W_y x + b_y)                                   the gate branch (tanh's GeLU, as the code)
    u = RG-LRU(Conv1D(W_x x + b_x))                          a causal depthwise convolution of 4 taps, with bias
    out = W_o (y * u) + b_o

and the Real-Gated Linear Recurrent Unit, per channel, over the convolution's outputs x_t:

    r_t = sigmoid(W_a x_t + b_a)          the recurrence gate
    i_t = sigmoid(W_x x_t + b_x)          the input gate     (W_a, W_x block-diagonal: ``n_heads`` blocks)
    a_t = a^(c r_t),  a = sigmoid(Lambda)                   (c = 8; log a_t = -c r_t softplus(-Lambda))
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

At a sequence's first token (position 0, and each packed document's first) the state starts empty and the
input is not scaled by sqrt(1 - a_t^2) (the code's ``reset``). The square root's gradient is bounded at 1000
as the code bounds it (``SqrtBoundDerivative``): 1 - a_t^2 reaches 0 when a_t does 1. Initialisation as the
code: a uniform in [0.9, 0.999] through a^2 (Lambda from it), the gates' blocks normal with variance 0.01 /
block width (their ``w_init_variance_scale``), the convolution normal with variance 0.01 / taps, zero biases.

The recurrence is a diagonal one, run by ``kvlab.kernels.ops.diagonal_scan`` (log2 T passes over the
sequence; the decode step one update). A left pad's input and decay are zero and one: the state passes it.
The cache is fixed: per sequence W states and the convolution's last ``conv_kernel - 1`` inputs (W each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_float, check_int
from kvlab.kernels.causal_conv import skipping_pads
from kvlab.kernels.ops import causal_conv1d, diagonal_scan
from kvlab.kernels.precision import upcast
from kvlab.layers.base import LayerFootprint, MixerConfig, StepState, check_reads_own_state, register_mixer
from kvlab.layers.kv_cache import StateSlot

MAX_SQRT_GRADIENT = 1000.0  # the code's bound on d sqrt(z) / dz
WEIGHT_VARIANCE = 0.01  # the code's w_init_variance_scale for the gates and the convolution


@dataclass
class RGLRUConfig(MixerConfig):
    kind = "rglru"
    width: int | None = None  # W, the recurrence's channels (the paper's D_RNN: 4/3 d_model); None: d_model
    n_heads: int = 4  # the gates' diagonal blocks (W / n_heads channels each; RecurrentGemma's num_attention_heads)
    conv_kernel: int = 4
    c: float = 8.0  # the paper's c: a_t = a^(c r_t)
    min_decay: float = 0.9  # a = sigmoid(Lambda) initialised uniform in [min_decay, max_decay] (through a^2)
    max_decay: float = 0.999

    def validate(self, d_model: int, path: str) -> None:
        if self.width is None:
            self.width = d_model
        check_int(self.width, f"{path}.width", minimum=1)
        check_int(self.n_heads, f"{path}.n_heads", minimum=1)
        check_int(self.conv_kernel, f"{path}.conv_kernel", minimum=1)
        check_float(self.c, f"{path}.c", positive=True)
        for name in ("min_decay", "max_decay"):
            check_float(getattr(self, name), f"{path}.{name}", positive=True)
            if getattr(self, name) >= 1:
                raise ValueError(f"{path}.{name}={getattr(self, name)} must be below 1 (a decay a in (0, 1))")
        if self.min_decay > self.max_decay:
            raise ValueError(f"{path}.min_decay={self.min_decay} must be at most {path}.max_decay={self.max_decay}")
        if self.width % self.n_heads:
            raise ValueError(f"{path}.width={self.width} is not divisible by {path}.n_heads={self.n_heads}: the "
                             "gates' blocks split the channels equally")  # fmt: skip


class _BoundedSqrt(torch.autograd.Function):
    """sqrt(z), its gradient 1 / (2 sqrt(z)) bounded at MAX_SQRT_GRADIENT (the code's SqrtBoundDerivative)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.sqrt()

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad / (4 * z).clamp(min=MAX_SQRT_GRADIENT**-2).sqrt()


@register_mixer
class RGLRU(nn.Module):
    Config = RGLRUConfig
    output_projection = "out_proj"
    takes_last_only = True  # forward's ``last_only``: the last position's output alone (``Block``)

    def __init__(self, cfg: RGLRUConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        W, H = cfg.width, cfg.n_heads
        self.in_proj = nn.Linear(d_model, 2 * W)  # [y (the gate branch), x (the recurrent branch)]
        self.conv_weight = nn.Parameter(torch.empty(W, cfg.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(W))
        # block-diagonal gates, each block [in, out] (x @ block, as the code's einsum)
        self.input_gate_weight = nn.Parameter(torch.empty(H, W // H, W // H))
        self.input_gate_bias = nn.Parameter(torch.empty(H, W // H))
        self.recurrence_gate_weight = nn.Parameter(torch.empty(H, W // H, W // H))
        self.recurrence_gate_bias = nn.Parameter(torch.empty(H, W // H))
        self.decay_logit = nn.Parameter(torch.empty(W))  # Lambda: a = sigmoid(Lambda)
        self.out_proj = nn.Linear(W, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.decay_logit.is_meta:
            return
        c, W = self.cfg, self.cfg.width
        nn.init.normal_(self.conv_weight, std=math.sqrt(WEIGHT_VARIANCE / c.conv_kernel))
        for gate in (self.input_gate_weight, self.recurrence_gate_weight):
            nn.init.normal_(gate, std=math.sqrt(WEIGHT_VARIANCE * c.n_heads / W))
        for bias in (self.conv_bias, self.input_gate_bias, self.recurrence_gate_bias, self.in_proj.bias,
                     self.out_proj.bias):  # fmt: skip
            bias.zero_()
        a = torch.empty(W).uniform_(c.min_decay**2, c.max_decay**2).sqrt()
        self.decay_logit.copy_(torch.log(a / (1 - a)))

    def forward(self, x, *, cache=None, state: StepState | None = None, last_only: bool = False):
        """Only whether a token is a sequence's first (position 0) is read of its position."""
        state = StepState() if state is None else state
        c = self.cfg
        B, T, _ = x.shape
        W, H = c.width, c.n_heads
        y, xs = self.in_proj(x).split([W, W], dim=-1)
        xs, conv_state = skipping_pads(
            causal_conv1d, xs, cache.conv if cache is not None else None, state.real, c.conv_kernel - 1,
            weight=self.conv_weight, bias=self.conv_bias, doc_ids=state.doc_ids,
        )  # fmt: skip
        blocks = upcast(xs).unflatten(-1, (H, W // H))  # [B, T, H, W / H]

        def gate(weight, bias):
            return torch.sigmoid(torch.einsum("bthi,hij->bthj", blocks, upcast(weight)) + upcast(bias)).flatten(-2)

        r = gate(self.recurrence_gate_weight, self.recurrence_gate_bias)  # the recurrence gate
        i = gate(self.input_gate_weight, self.input_gate_bias)  # the input gate
        log_a = -c.c * r * F.softplus(-upcast(self.decay_logit))  # [B, T, W], log a_t <= 0
        positions = state.positions if state.positions is not None else state.start + torch.arange(T, device=x.device)
        first = (positions == 0).expand(B, T)[..., None]  # the code's reset: the state starts empty, x unscaled
        scale = torch.where(first, 1.0, _BoundedSqrt.apply(-torch.expm1(2 * log_a)))
        u = blocks.flatten(-2) * i * scale
        log_a = log_a.masked_fill(first, float("-inf"))
        if state.real is not None:  # a pad adds nothing and does not decay: the state passes it
            real = state.real[..., None]
            u, log_a = u * real, torch.where(real, log_a, 0.0)  # (a pad's position counts as 0, a reset's -inf)
        h, new_state = diagonal_scan(
            u, log_a, state=cache.state if cache is not None else None, doc_ids=state.doc_ids
        )  # fmt: skip
        if cache is not None:
            cache.state.copy_(new_state)
            cache.conv.copy_(conv_state)
        if last_only:
            h, y = h[:, -1:], y[:, -1:]
        return self.out_proj((h * F.gelu(upcast(y), approximate="tanh")).to(x.dtype))

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        c = self.cfg
        shapes = {"state": (c.width,), "conv": (c.conv_kernel - 1, c.width)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        return LayerFootprint(fixed_bytes=self.cfg.conv_kernel * self.cfg.width * dtype.itemsize)
