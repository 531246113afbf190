"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): the SSD layer; and Mamba (Gu & Dao 2023).

Mamba-2
-------

One input projection gives the gate z, the SSM input x, the shared B and C
(``n_groups`` of them, each read by n_heads / n_groups heads, as GQA's K/V)
and a step size dt per head. x, B and C pass a short causal depthwise
convolution and SiLU; then per head h, with state S [state_dim, head_dim]:

    dt_t = softplus(dt_t + dt_bias_h),     a_t = -exp(A_log_h) dt_t
    S_t  = exp(a_t) S_{t-1} + B_t^T (dt_t x_t),     y_t = C_t S_t + D_h x_t

which is linear attention with a scalar decay per head and token (q = C,
k = B, v = dt x): the chunked kernel trains it, the recurrence decodes it.
The output is gated and normalised, RMSNorm(y * silu(z)) per group
(``gated_norm: false``: y * silu(z) alone), and projected back. Heads are
``head_dim`` wide, ``expand * d_model`` channels in all (``inner``, where
given: Falcon-H1's mamba_d_ssm, 1.5 d_model in its 0.5B). Initialisation as
in the paper's code: A in [1, 16], dt in [dt_min, dt_max] log-uniformly,
D = 1.

The cache is fixed: per sequence the SSM state (n_heads x state_dim x
head_dim; on a CPU held with state_dim contiguous, as mamba-ssm holds it,
so a compiled step updates and reads it in one pass) plus the last
``conv_kernel - 1`` inputs of the convolution.
Packed documents start from an empty state and convolve within themselves.

Mamba
-----
The selective SSM of Gu & Dao 2023 (Algorithm 2): x and the gate z from one
projection; x through the causal convolution and SiLU; from x, a low-rank
step dt (``dt_rank``, then a projection to every channel), B and C; per
channel d with a state h [state_dim]:

    dt = softplus(W_dt dt_low + b_dt),   h_t = exp(dt_td A_d) h_{t-1} + dt_td B_t x_td,   y_td = C_t h_t + D_d x_td

A_d = -exp(A_log_d) (S4D-real init: A_dn = -(n + 1)), then y * silu(z) and
the output projection. With ``inner_norms`` (Jamba, Lieber et al. 2024: "we
add RMSNorm to internal activations"; as its `transformers` code does),
dt_low, B and C are each RMS-normalised, with a learned weight, before their
use. The decay differs per channel and per state element, so each of the
``expand * d_model`` channels (``inner``, where given: RecurFormer's Mamba is as wide as the
heads it replaces) is a head of the linear-attention kernel with a
vector decay (q = C, k = dt B, v = x, one value): the reference; the torch
backend runs the elementwise scan itself (``kvlab.kernels.ssm``). The cache:
h (channels x state_dim) plus the convolution's inputs.

Conba
-----
MixCon's layer (Xu et al. 2024, "MixCon: A Hybrid Architecture for Efficient
and Adaptive Sequence Modeling"). The paper's text is out of reach (its
abstract only); this follows the most precise description found, a
`transformers`-style ``modeling_mixcon.py`` (MixConConbaMixer, built on
Jamba's code) whose repository the search index does not name. Conba is
Mamba with Jamba's inner norms, then three maps of its output u per token:

    s = u * (W_s u + b_s)          "dynamic state scaling"
    e = s + W_d s + b_d            "delayed state representation" (no delay in the code: a residual map)
    y = e - K e                    "adaptive control": K e is the gain times the tracking error e - 0

and "online learning" of the gain, outside the gradient: K <- K - eta sum_t e_t e_t^T.
Deviations, each where the code cannot run as written: W_s, W_d and K are
d_model x d_model (the code has d_state x d_state and inner x inner, which
cannot multiply its d_model-wide u); the online update is the mean over the
batch's rows of the code's per-row update (the code's broadcast makes K
batched), taken from real tokens only, applied once per training batch by
the training step (``CausalLM.after_training_batch``; the code reassigns a
parameter inside its forward, which autograd refuses) and never in
evaluation or decoding, so decoding equals the forward and evaluating does
not change the model. K is drawn standard normal, as the code draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_bool, check_float, check_int
from kvlab.kernels.causal_conv import skipping_pads
from kvlab.kernels.ops import causal_conv1d, rms_norm, selective_scan, ssd
from kvlab.kernels.precision import upcast
from kvlab.layers.base import LayerFootprint, MixerConfig, StepState, check_reads_own_state, register_mixer
from kvlab.layers.kv_cache import StateSlot
from kvlab.layers.norm import RMSNorm


@torch.no_grad()
def _init_conv_and_step(conv_weight, conv_bias, dt_bias, dt_min: float, dt_max: float) -> None:
    """Mamba's init of the convolution and of the step."""
    init_depthwise_conv(conv_weight, conv_bias)
    init_step_bias(dt_bias, dt_min, dt_max)


@torch.no_grad()
def init_depthwise_conv(conv_weight, conv_bias=None) -> None:
    """nn.Conv1d's default init of a depthwise kernel [channels, taps] (and its bias): uniform in +-1/sqrt(taps)
    (Mamba's and gated DeltaNet's short convolutions)."""
    bound = 1 / math.sqrt(conv_weight.shape[1])
    nn.init.uniform_(conv_weight, -bound, bound)
    if conv_bias is not None:
        nn.init.uniform_(conv_bias, -bound, bound)


@torch.no_grad()
def init_step_bias(dt_bias, dt_min: float, dt_max: float) -> None:
    """Mamba's init of the step: dt log-uniform in [dt_min, dt_max], through a bias that softplus maps onto it
    (Mamba-2 and gated DeltaNet's too)."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(dt_bias.shape) * (hi - lo) + lo).clamp(min=1e-4)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt


def inner_width(cfg, d_model: int) -> int:
    """A Mamba or Mamba-2 config's inner channels: ``inner`` where given, else ``expand * d_model``."""
    return cfg.expand * d_model if cfg.inner is None else cfg.inner


@dataclass
class Mamba2Config(MixerConfig):
    kind = "mamba2"
    head_dim: int = 64  # P: channels per head; n_heads = expand * d_model / head_dim
    state_dim: int = 64  # N: the state's width per head (d_state)
    expand: int = 2  # inner channels = expand * d_model
    inner: int | None = None  # inner channels given outright (None: expand * d_model)
    n_groups: int = 1  # B and C are shared by n_heads / n_groups heads each
    conv_kernel: int = 4
    chunk_size: int = 64  # tokens per chunk of the chunked form (speed only)
    dt_min: float = 0.001
    dt_max: float = 0.1
    norm_eps: float = 1e-5
    gated_norm: bool = True  # false: the output y * silu(z), not normalised (Falcon-H1's mamba_rms_norm: false)

    def validate(self, d_model: int, path: str) -> None:
        check_bool(self.gated_norm, f"{path}.gated_norm")
        for name, minimum in (("head_dim", 1), ("state_dim", 1), ("expand", 1), ("n_groups", 1),
                              ("conv_kernel", 1), ("chunk_size", 1)):  # fmt: skip
            check_int(getattr(self, name), f"{path}.{name}", minimum=minimum)
        check_int(self.inner, f"{path}.inner", minimum=1, optional=True)
        check_float(self.dt_min, f"{path}.dt_min", positive=True)
        check_float(self.dt_max, f"{path}.dt_max", positive=True)
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        if self.dt_min > self.dt_max:
            raise ValueError(f"{path}.dt_min={self.dt_min} must be at most {path}.dt_max={self.dt_max}")
        inner, named = inner_width(self, d_model), "expand * d_model" if self.inner is None else "inner"
        if inner % self.head_dim:
            raise ValueError(f"{path}.{named} = {inner} is not divisible by {path}.head_dim={self.head_dim}")
        if (inner // self.head_dim) % self.n_groups:
            raise ValueError(
                f"{path}: n_heads = {inner // self.head_dim} ({named} / head_dim) is not divisible "
                f"by {path}.n_groups={self.n_groups}"
            )


@register_mixer
class Mamba2(nn.Module):
    Config = Mamba2Config
    output_projection = "out_proj"  # what a parallel layer with shared_output replaces by its own
    takes_last_only = True  # forward's ``last_only``: the last position's output alone (``Block``)

    def __init__(self, cfg: Mamba2Config, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        self.inner = inner_width(cfg, d_model)
        self.n_heads = self.inner // cfg.head_dim
        self.conv_dim = self.inner + 2 * cfg.n_groups * cfg.state_dim  # x, B, C
        self.in_proj = nn.Linear(d_model, self.inner + self.conv_dim + self.n_heads, bias=False)  # z, xBC, dt
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        if cfg.gated_norm:
            self.norm_weight = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.A_log.is_meta:
            return
        _init_conv_and_step(self.conv_weight, self.conv_bias, self.dt_bias, self.cfg.dt_min, self.cfg.dt_max)
        self.A_log.copy_(torch.empty(self.n_heads).uniform_(1, 16).log())
        self.D.fill_(1.0)
        if self.cfg.gated_norm:
            self.norm_weight.fill_(1.0)

    def forward(self, x, *, cache=None, state: StepState | None = None, last_only: bool = False):
        """``positions`` are not used: the convolution and the decay carry order. ``last_only``: the output of
        the last position alone (a prefill's top layer); the scan still runs over every position."""
        state = StepState() if state is None else state
        doc_ids = state.doc_ids
        B, T, _ = x.shape
        H, P, N, G = self.n_heads, self.cfg.head_dim, self.cfg.state_dim, self.cfg.n_groups
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, H], dim=-1)
        xbc, conv_state = skipping_pads(
            causal_conv1d, xbc, cache.conv if cache is not None else None, state.real, self.cfg.conv_kernel - 1,
            weight=self.conv_weight, bias=self.conv_bias, doc_ids=doc_ids,
        )  # fmt: skip
        # (without a gradient in place: the convolution's output is its own, not a view of the projection's)
        xs, b, c = F.silu(xbc, inplace=not torch.is_grad_enabled()).split([self.inner, G * N, G * N], dim=-1)
        dt = F.softplus(upcast(dt) + upcast(self.dt_bias))  # [B, T, H]
        if state.real is not None:  # a pad's step 0: no decay, no input, the state passes it unchanged
            dt = dt * state.real[..., None]
        xs = xs.view(B, T, H, P)
        y, ssm_state = ssd(
            xs, dt, -upcast(self.A_log).exp(), b.view(B, T, G, N), c.view(B, T, G, N),
            state=cache.ssm if cache is not None else None, doc_ids=doc_ids, chunk_size=self.cfg.chunk_size,
        )  # fmt: skip
        if cache is not None:
            cache.ssm.copy_(ssm_state)
            cache.conv.copy_(conv_state)
        if last_only:  # the gate, the norm and the projection for the last position
            y, xs, z, T = y[:, -1:], xs[:, -1:], z[:, -1:], 1
        # the skip term first: the sum takes its layout, [B, T, H, P], not the scan's transposed one, which the
        # reshape would copy; and the sum is made in place on it (one [B, T, inner] tensor, not two)
        y = (xs * self.D.view(H, 1).to(xs.dtype)).add_(y).reshape(B, T, self.inner)
        return self.out_proj(self._gated_norm(y, z))

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm(y * silu(z)) within each of the n_groups channel groups, times a learned weight (gated_norm false:
        y * silu(z) alone)."""
        if not self.cfg.gated_norm:
            return y * F.silu(z)
        gated = upcast(y * F.silu(z) if torch.is_grad_enabled() else F.silu(z).mul_(y))  # (no grad: in place)
        G, eps = self.cfg.n_groups, self.cfg.norm_eps
        if G == 1:  # the kernels' RMSNorm (in float32 here, its weight too)
            return rms_norm(gated, upcast(self.norm_weight), eps).to(y.dtype)
        normed = F.rms_norm(gated.unflatten(-1, (G, -1)), (self.inner // G,), eps=eps).flatten(-2)
        return (normed * upcast(self.norm_weight)).to(y.dtype)

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        c = self.cfg
        shapes = {"ssm": (self.n_heads, c.state_dim, c.head_dim), "conv": (c.conv_kernel - 1, self.conv_dim)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device, key_contiguous=("ssm",))

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        c = self.cfg
        elements = self.n_heads * c.state_dim * c.head_dim + (c.conv_kernel - 1) * self.conv_dim
        return LayerFootprint(fixed_bytes=elements * dtype.itemsize)


@dataclass
class MambaConfig(MixerConfig):
    kind = "mamba"
    state_dim: int = 16  # N (d_state)
    expand: int = 2  # inner channels = expand * d_model
    inner: int | None = None  # inner channels given outright (RecurFormer: the replaced heads' width); None: expand
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    conv_kernel: int = 4
    chunk_size: int = 16  # unused since the torch scan is elementwise (kvlab.kernels.ssm); kept so configs stay valid
    dt_min: float = 0.001
    dt_max: float = 0.1
    inner_norms: bool = False  # Jamba's RMSNorms of dt_low, B and C
    norm_eps: float = 1e-6

    def validate(self, d_model: int, path: str) -> None:
        for name in ("state_dim", "expand", "conv_kernel", "chunk_size"):
            check_int(getattr(self, name), f"{path}.{name}", minimum=1)
        check_int(self.dt_rank, f"{path}.dt_rank", minimum=1, optional=True)
        check_int(self.inner, f"{path}.inner", minimum=1, optional=True)
        check_bool(self.inner_norms, f"{path}.inner_norms")
        check_float(self.norm_eps, f"{path}.norm_eps", positive=True)
        check_float(self.dt_min, f"{path}.dt_min", positive=True)
        check_float(self.dt_max, f"{path}.dt_max", positive=True)
        if self.dt_min > self.dt_max:
            raise ValueError(f"{path}.dt_min={self.dt_min} must be at most {path}.dt_max={self.dt_max}")
        if self.dt_rank is None:
            self.dt_rank = -(-d_model // 16)


@register_mixer
class Mamba(nn.Module):
    Config = MambaConfig
    output_projection = "out_proj"  # what a parallel layer with shared_output replaces by its own

    def __init__(self, cfg: MambaConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__()
        cfg = cfg.resolved(d_model, "mixer")  # defaults filled on a copy: any config builds a working layer
        check_reads_own_state(cfg.kind, layer_idx, kv_source)
        self.cfg = cfg
        self.inner = inner_width(cfg, d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.inner, bias=False)  # x, z
        self.conv_weight = nn.Parameter(torch.empty(self.inner, cfg.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.inner))
        self.x_proj = nn.Linear(self.inner, cfg.dt_rank + 2 * cfg.state_dim, bias=False)  # dt_low, B, C
        self.dt_proj = nn.Linear(cfg.dt_rank, self.inner, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.inner))  # apart from dt_proj: init_weights zeroes Linear biases
        self.A_log = nn.Parameter(torch.empty(self.inner, cfg.state_dim))
        self.D = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, d_model, bias=False)
        if cfg.inner_norms:
            self.dt_norm = RMSNorm(cfg.dt_rank, cfg.norm_eps)
            self.b_norm = RMSNorm(cfg.state_dim, cfg.norm_eps)
            self.c_norm = RMSNorm(cfg.state_dim, cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's init: S4D-real A, dt log-uniform in [dt_min, dt_max] through its bias, D = 1."""
        if self.A_log.is_meta:
            return
        _init_conv_and_step(self.conv_weight, self.conv_bias, self.dt_bias, self.cfg.dt_min, self.cfg.dt_max)
        self.A_log.copy_(torch.arange(1, self.cfg.state_dim + 1, dtype=torch.float32).log().expand(self.inner, -1))
        self.D.fill_(1.0)

    def forward(self, x, *, cache=None, state: StepState | None = None):
        """``positions`` are not used: the convolution and the decay carry order."""
        state = StepState() if state is None else state
        doc_ids = state.doc_ids
        B, T, _ = x.shape
        N, R = self.cfg.state_dim, self.cfg.dt_rank
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_state = skipping_pads(
            causal_conv1d, xs, cache.conv if cache is not None else None, state.real, self.cfg.conv_kernel - 1,
            weight=self.conv_weight, bias=self.conv_bias, doc_ids=doc_ids,
        )  # fmt: skip
        xs = F.silu(xs)
        dt_low, b, c = self.x_proj(xs).split([R, N, N], dim=-1)
        if self.cfg.inner_norms:
            dt_low, b, c = self.dt_norm(dt_low), self.b_norm(b), self.c_norm(c)
        dt = F.softplus(upcast(self.dt_proj(dt_low)) + upcast(self.dt_bias))  # [B, T, inner]
        if state.real is not None:  # a pad's step 0: no decay, no input, the state passes it unchanged
            dt = dt * state.real[..., None]
        y, ssm_state = selective_scan(
            upcast(xs).transpose(1, 2), dt.transpose(1, 2), -upcast(self.A_log).exp(),
            upcast(b).transpose(1, 2), upcast(c).transpose(1, 2),
            state=cache.ssm if cache is not None else None, doc_ids=doc_ids, chunk_size=self.cfg.chunk_size,
        )  # fmt: skip
        if cache is not None:
            cache.ssm.copy_(ssm_state)
            cache.conv.copy_(conv_state)
        y = y.transpose(1, 2).to(xs.dtype) + xs * self.D.to(xs.dtype)
        return self.out_proj(y * F.silu(z))

    def new_cache_slot(self, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shapes = {"ssm": (self.inner, self.cfg.state_dim, 1), "conv": (self.cfg.conv_kernel - 1, self.inner)}
        return StateSlot(batch_size, shapes, dtype=dtype, device=device)

    def kv_footprint(self, dtype: torch.dtype) -> LayerFootprint:
        elements = self.inner * self.cfg.state_dim + (self.cfg.conv_kernel - 1) * self.inner
        return LayerFootprint(fixed_bytes=elements * dtype.itemsize)


@dataclass
class ConbaConfig(MambaConfig):
    kind = "conba"
    inner_norms: bool = True  # MixCon's Conba normalises dt_low, B and C as Jamba's Mamba does
    online_lr: float = 1e-5  # the code's online_learning_rate (eta); 0 keeps the gain K to the optimiser alone

    def validate(self, d_model: int, path: str) -> None:
        super().validate(d_model, path)
        check_float(self.online_lr, f"{path}.online_lr")
        if self.online_lr < 0:
            raise ValueError(f"{path}.online_lr={self.online_lr} must be at least 0")


@register_mixer
class Conba(Mamba):
    """MixCon's Conba: Mamba, then the scaling, "delayed" and control maps of its output (module docstring).
    The code's gain K is held as two terms, ``control_gain`` (the optimiser's) plus ``online_gain`` (a buffer,
    the online updates' sum), so that no optimiser or sharded strategy holding a copy of the parameter
    overwrites the online updates; the same K, and the same gradient for it."""

    Config = ConbaConfig
    output_projection = None  # the output goes on past out_proj: a parallel layer cannot share it

    def __init__(self, cfg: ConbaConfig, *, d_model: int, layer_idx: int, kv_source: int, max_seq_len: int):
        super().__init__(cfg, d_model=d_model, layer_idx=layer_idx, kv_source=kv_source, max_seq_len=max_seq_len)
        self.scaling = nn.Linear(d_model, d_model)
        self.delayed = nn.Linear(d_model, d_model)
        self.control_gain = nn.Parameter(torch.empty(d_model, d_model))
        self.register_buffer("online_gain", torch.zeros(d_model, d_model))
        # The last training forward's online update: the sum over its rows of sum_t e_t e_t^T, and its rows
        self.gain_update: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reset_gain()  # (Mamba's own parameters were drawn by its __init__)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "control_gain"):  # not while Mamba's __init__ draws its own, before the gain exists
            self._reset_gain()

    @torch.no_grad()
    def _reset_gain(self) -> None:
        if not self.control_gain.is_meta:
            self.control_gain.normal_()  # torch.randn, as the MixCon code draws it

    @torch.no_grad()
    def reset_buffers(self) -> None:
        if not self.online_gain.is_meta:
            self.online_gain.zero_()

    def forward(self, x, *, cache=None, state: StepState | None = None):
        u = super().forward(x, cache=cache, state=state)
        s = u * self.scaling(u)
        e = s + self.delayed(s)
        if self.training and torch.is_grad_enabled() and self.cfg.online_lr:
            with torch.no_grad():
                err = upcast(e)
                real = state.real if state is not None else None
                if real is not None:  # a pad's output is no tracking error
                    err = err * real[..., None].to(err.dtype)
                rows = torch.tensor(float(x.shape[0]), device=x.device)
                self.gain_update = (torch.einsum("btd,bte->de", err, err), rows)
        return e - F.linear(e, self.control_gain + self.online_gain.to(self.control_gain.dtype))

    @torch.no_grad()
    def apply_gain_update(self, reduce=None) -> None:
        """MixCon's online learning, once per training batch: K -= online_lr * (the rows' mean of sum_t e_t
        e_t^T), from the last training forward; ``reduce`` sums a tensor over ranks (None: this process's)."""
        if self.gain_update is None:
            return
        total, rows = self.gain_update if reduce is None else tuple(reduce(t) for t in self.gain_update)
        self.online_gain -= (self.cfg.online_lr * total / rows).to(self.online_gain.dtype)
        self.gain_update = None
