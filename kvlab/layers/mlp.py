"""Channel mixers: SwiGLU (Shazeer 2020, as in Llama), the GELU MLP of GPT-2, the squared ReLU MLP (Primer;
Nemotron-H's), RWKV's channel mix, and a mixture of SwiGLU experts (MoE).

RWKV's channel mix (Peng et al. 2023, 2024) mixes each token with the one
before it (token shift), so it is the one MLP that keeps state when
decoding: the previous token's input, ``d_model`` values per sequence.
MLPs say so with ``stateful``; a stateful one takes ``cache`` and
``doc_ids`` and allocates its slot with ``new_cache_slot``.

The mixture of experts (Shazeer et al. 2017; Fedus et al. 2022; as Jamba,
Mixtral and DeepSeek-V2/V3 use it) routes each token to ``top_k`` of
``n_experts`` SwiGLU experts: scores s = softmax(W_r x) (or sigmoid, as
DeepSeek-V3), the ``top_k`` largest g_e = s_e chosen (renormalised to sum 1
with ``norm_topk``, times ``routed_scale``), and

    y = sum_{e in top_k} g_e * expert_e(x)  +  shared(x)

where ``shared`` is a SwiGLU of ``n_shared * hidden`` units every token
passes (DeepSeek's shared experts; none by default), or with ``shared_gate``
sigmoid(w_s . x) shared(x), a gate per token (Qwen2-MoE's shared expert).
gpt-oss's experts (OpenAI 2025) take ``bias`` (on the router's logits and on
each expert's projections) and ``swiglu_limit`` L, its clamped SwiGLU:

    g = min(gate, L),  u = clamp(up, -L, L),  expert(x) = down((u + 1) * g * sigmoid(swiglu_alpha * g))

(swiglu_alpha 1.702 by default, GELU's sigmoid approximation). Routing is dropless:
every token reaches its ``top_k`` experts, whatever the load (no capacity
factor, so no token is ever dropped). The load-balancing loss of the last
training forward, ``aux_loss``, is DeepSeek-V2's expert-level one (Switch's,
scaled to be 1 when balanced):

    L = aux_loss_coef * sum_e f_e P_e,   f_e = n_experts / (top_k T) * #{tokens routed to e},
                                         P_e = mean over tokens of the (normalised) score s_e

The training step adds it to the language-model loss (``CausalLM.aux_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab._config import check_bool, check_choice, check_float, check_int
from kvlab.kernels.causal_conv import skipping_pads, token_shift
from kvlab.kernels.precision import compute_dtype
from kvlab.layers.kv_cache import StateSlot

MLP_KINDS = ("swiglu", "geglu", "gelu", "relu2", "rwkv_channel_mix", "moe", "none")
GELU_APPROXIMATIONS = ("tanh", "none")  # torch's names: F.gelu(approximate=...)
ROUTER_SCORES = ("softmax", "sigmoid")
# Up to this many (token, expert) assignments (a decode step of up to 32 sequences at top-2), a compiled MoE gathers
# each token's experts' weights: static shapes, so the compiled decode step is one graph; more group tokens by
# expert. Eager, it gathers only up to one assignment per expert: beyond, gathering copies more weights than grouping
# reads (eager decoding at batch 8, top 2 of 8 experts: x1.25 to x1.6 faster grouped, benchmarks/RESULTS.md).
GATHER_ASSIGNMENTS = 64
MOE_FIELDS = ("n_experts", "top_k", "n_shared", "score", "norm_topk", "routed_scale", "aux_loss_coef", "n_groups",
              "topk_groups", "group_rank", "score_bias", "bias_update", "shared_gate", "swiglu_limit",
              "swiglu_alpha")  # fmt: skip
GROUP_RANKS = ("top2_sum", "max")  # a group's rank: its two best scores summed (DeepSeek-V3) | its best (V2)


@dataclass
class MLPConfig:
    kind: str = "swiglu"
    # None: 8/3 d_model (SwiGLU, GeGLU and each MoE expert), 4 d_model (GELU), 7/2 d_model (RWKV), rounded up to 64
    hidden: int | None = None
    # kind none: blocks without an MLP, for mixers that carry one's weight (GAU)
    # kind gelu, relu2 or moe (None: false): biases on both projections (GPT-NeoX has them); moe: on the router and
    # on each expert's projections (gpt-oss); swiglu or geglu (None: none): on the three (RecurrentGemma's)
    bias: bool | None = None
    # kind gelu (None: tanh): torch's GELU approximation: tanh (GPT-2's) | none (the exact erf form, GPT-NeoX's)
    approximate: str | None = None
    # kind moe (None: its defaults; set only for moe):
    n_experts: int | None = None  # routed experts (default 8)
    top_k: int | None = None  # experts per token (default 2)
    n_shared: int | None = None  # shared experts, one SwiGLU of n_shared * hidden units (default 0) ...
    shared_gate: bool | None = None  # ... its output times sigmoid(w . x) per token (Qwen2-MoE's; default false)
    score: str | None = None  # softmax (default) | sigmoid: the router's scores
    norm_topk: bool | None = None  # renormalise the chosen scores to sum 1 (default false)
    routed_scale: float | None = None  # the routed experts' output scale (default 1)
    aux_loss_coef: float | None = None  # the load-balancing loss's weight (default 0.01)
    n_groups: int | None = None  # DeepSeek-V3: experts in this many groups (default 1) ...
    topk_groups: int | None = None  # ... of which each token picks from the best this many (default n_groups) ...
    group_rank: str | None = None  # ... ranked by top2_sum (default: V3's) | max (V2's group_limited_greedy)
    score_bias: bool | None = None  # DeepSeek-V3: a per-expert bias added to the scores to choose (default false)
    bias_update: float | None = None  # its update per step toward balance, auxiliary-loss-free (default 0)
    swiglu_limit: float | None = None  # gpt-oss's clamped SwiGLU in the experts, clamped at this (None: plain SwiGLU)
    swiglu_alpha: float | None = None  # ... its sigmoid's gain (default 1.702; only with swiglu_limit)

    def validate(self, d_model: int, path: str) -> None:
        check_choice(self.kind, f"{path}.kind", MLP_KINDS)
        check_int(self.hidden, f"{path}.hidden", minimum=1, optional=True)
        if self.kind == "moe":
            self._validate_moe(path)
        else:
            given = [f"{path}.{name}={getattr(self, name)!r}" for name in MOE_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set but {path}.kind={self.kind}; they configure kind moe")
        if self.kind in ("gelu", "relu2", "moe"):
            self.bias = False if self.bias is None else self.bias
            check_bool(self.bias, f"{path}.bias")
        elif self.kind in ("swiglu", "geglu"):  # (None stays None: the configs written before biases read alike)
            if self.bias is not None:
                check_bool(self.bias, f"{path}.bias")
        elif self.bias is not None:
            raise ValueError(f"{path}.bias={self.bias!r} set but {path}.kind={self.kind}; it configures kinds gelu, "
                             "relu2, moe, swiglu, geglu")  # fmt: skip
        if self.kind == "gelu":
            self.approximate = "tanh" if self.approximate is None else self.approximate
            check_choice(self.approximate, f"{path}.approximate", GELU_APPROXIMATIONS)
        elif self.approximate is not None:
            raise ValueError(f"{path}.approximate={self.approximate!r} set but {path}.kind={self.kind}; it "
                             "configures kind gelu")  # fmt: skip
        if self.kind == "none":
            if self.hidden is not None:
                raise ValueError(f"{path}.hidden={self.hidden} is set but {path}.kind=none has no hidden layer")
        elif self.hidden is None:
            width = {"gelu": 4 * d_model, "relu2": 4 * d_model, "rwkv_channel_mix": 7 * d_model // 2}.get(
                self.kind, 8 * d_model // 3
            )
            self.hidden = -(-width // 64) * 64

    def _validate_moe(self, path: str) -> None:
        defaults = {"n_experts": 8, "top_k": 2, "n_shared": 0, "score": "softmax", "norm_topk": False,
                    "routed_scale": 1.0, "aux_loss_coef": 0.01, "n_groups": 1, "topk_groups": self.n_groups or 1,
                    "group_rank": "top2_sum", "score_bias": False, "bias_update": 0.0,
                    "shared_gate": False}  # fmt: skip
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_int(self.n_experts, f"{path}.n_experts", minimum=1)
        check_int(self.top_k, f"{path}.top_k", minimum=1)
        check_int(self.n_shared, f"{path}.n_shared", minimum=0)
        check_bool(self.shared_gate, f"{path}.shared_gate")
        if self.shared_gate and not self.n_shared:
            raise ValueError(f"{path}.shared_gate=true gates the shared experts, but {path}.n_shared=0: set n_shared")
        check_choice(self.score, f"{path}.score", ROUTER_SCORES)
        check_bool(self.norm_topk, f"{path}.norm_topk")
        check_float(self.routed_scale, f"{path}.routed_scale", positive=True)
        check_float(self.aux_loss_coef, f"{path}.aux_loss_coef")
        if self.aux_loss_coef < 0:
            raise ValueError(f"{path}.aux_loss_coef={self.aux_loss_coef} must be at least 0")
        if self.top_k > self.n_experts:
            raise ValueError(f"{path}.top_k={self.top_k} exceeds {path}.n_experts={self.n_experts}")
        check_int(self.n_groups, f"{path}.n_groups", minimum=1)
        check_int(self.topk_groups, f"{path}.topk_groups", minimum=1)
        check_choice(self.group_rank, f"{path}.group_rank", GROUP_RANKS)
        check_bool(self.score_bias, f"{path}.score_bias")
        check_float(self.bias_update, f"{path}.bias_update")
        if self.n_experts % self.n_groups:
            raise ValueError(f"{path}.n_experts={self.n_experts} is not divisible by {path}.n_groups={self.n_groups}")
        if self.topk_groups > self.n_groups:
            raise ValueError(f"{path}.topk_groups={self.topk_groups} exceeds {path}.n_groups={self.n_groups}")
        if self.top_k > self.topk_groups * (self.n_experts // self.n_groups):
            raise ValueError(f"{path}.top_k={self.top_k} exceeds the experts of {path}.topk_groups={self.topk_groups} "
                             f"groups ({self.topk_groups * (self.n_experts // self.n_groups)})")  # fmt: skip
        if self.bias_update < 0 or (self.bias_update and not self.score_bias):
            raise ValueError(f"{path}.bias_update={self.bias_update}: must be at least 0, and needs score_bias: true")
        if self.swiglu_limit is not None:
            check_float(self.swiglu_limit, f"{path}.swiglu_limit", positive=True)
            self.swiglu_alpha = 1.702 if self.swiglu_alpha is None else self.swiglu_alpha
            check_float(self.swiglu_alpha, f"{path}.swiglu_alpha", positive=True)
        elif self.swiglu_alpha is not None:
            raise ValueError(f"{path}.swiglu_alpha={self.swiglu_alpha} is the gain of gpt-oss's clamped SwiGLU: set "
                             f"{path}.swiglu_limit too")  # fmt: skip

    @property
    def stateful(self) -> bool:
        """Whether this MLP keeps a state in the cache (RWKV's channel mix: the previous token)."""
        return self.kind != "none" and MLP_CLASSES[self.kind].stateful


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names match `transformers` Llama."""

    stateful = False

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled():
            return self.down_proj(self.activation(gate) * up)
        # Without a gradient (a prefill) the activation and the product overwrite the gate, not two new [T, hidden]
        # tensors: an eager prefill of 8 x 128 tokens x1.09 (gqa) to x1.12 (mamba2); at 1 x 128 the same
        return self.down_proj(self.activation(gate, inplace=True).mul_(up))

    @staticmethod
    def activation(gate: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return F.silu(gate, inplace=inplace)


class GeGLU(SwiGLU):
    """down(gelu(gate(x)) * up(x)), tanh's GELU (Shazeer 2020; Gemma's MLP, ``gelu_pytorch_tanh``)."""

    @staticmethod
    def activation(gate: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")  # (no in-place form)


class GeluMLP(nn.Module):
    """down(gelu(up(x))): GPT-2's MLP (tanh's approximation, no biases by default), GPT-NeoX's with biases and
    the exact GELU."""

    stateful = False

    def __init__(self, d_model: int, hidden: int, bias: bool = False, approximate: str = "tanh"):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class SquaredReluMLP(GeluMLP):
    """down(relu(up(x))^2): the squared ReLU of Primer (So et al. 2021), Nemotron-H's MLP (no gate); GeluMLP's
    projections with another activation."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__(d_model, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


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

    def forward(self, x: torch.Tensor, *, cache=None, doc_ids=None, real=None) -> torch.Tensor:
        """``real`` [B, T]: which tokens are not pads (left-padded rows), which the token shift skips."""
        prev = cache.prev if cache is not None else None
        before, last = skipping_pads(token_shift, x, prev, real, 1, doc_ids=doc_ids)
        if cache is not None:
            cache.prev.copy_(last)
        delta = before - x
        key = torch.relu(self.up_proj(x + delta * self.mix_k)).square()
        return torch.sigmoid(self.gate_proj(x + delta * self.mix_r)) * self.down_proj(key)

    def new_cache_slot(self, batch_size: int, dtype: torch.dtype, device) -> StateSlot:
        return StateSlot(batch_size, {"prev": (self.mix_k.shape[0],)}, dtype=dtype, device=device)

    def state_bytes(self, dtype: torch.dtype) -> int:
        return self.mix_k.shape[0] * dtype.itemsize


class MoE(nn.Module):
    """A dropless mixture of SwiGLU experts (the module docstring has the equations). The experts' weights are
    stacked, ``gate_up_proj`` [n_experts, 2 hidden, d_model] and ``down_proj`` [n_experts, d_model, hidden],
    as `transformers` keeps them (Jamba, Mixtral, DeepSeek-V3); with ``bias``, ``gate_up_bias`` [n_experts,
    2 hidden] and ``down_bias`` [n_experts, d_model] (gpt-oss)."""

    stateful = False

    def __init__(self, d_model: int, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        E, H = cfg.n_experts, cfg.hidden
        self.router = nn.Linear(d_model, E, bias=cfg.bias)
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * H, d_model))
        self.down_proj = nn.Parameter(torch.empty(E, d_model, H))
        self.gate_up_bias = nn.Parameter(torch.empty(E, 2 * H)) if cfg.bias else None
        self.down_bias = nn.Parameter(torch.empty(E, d_model)) if cfg.bias else None
        self.shared = SwiGLU(d_model, cfg.n_shared * H) if cfg.n_shared else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_gate else None
        # DeepSeek-V3's bias on the scores that choose (not on the weights), moved toward balance by
        # ``update_score_bias`` rather than by gradients: a buffer, saved with the model
        self.register_buffer("score_bias", torch.zeros(E) if cfg.score_bias else None)
        self.aux_loss: torch.Tensor | None = None  # of the last training forward (see CausalLM.aux_loss)
        self.tokens_per_expert: torch.Tensor | None = None  # in the last training forward

    def __getstate__(self):
        # Copies and pickles leave out the last forward's auxiliary loss: it holds that forward's graph, and
        # copy.deepcopy refuses tensors inside a graph (a model copied after a training step).
        return {**self.__dict__, "aux_loss": None}

    def init_normal(self, std: float, out_std: float) -> None:
        """The model's init (``CausalLM.init_weights``) for the stacked weights: N(0, std) in, N(0, out_std)
        out, as a Linear named up/down would get."""
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=out_std)
        for bias in (self.gate_up_bias, self.down_bias):  # (as a Linear's: zero)
            if bias is not None:
                nn.init.zeros_(bias)
        if self.score_bias is not None:
            self.score_bias.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores [N, E] in fp32 or wider, the chosen experts [N, top_k], their weights [N, top_k]) for tokens
        [N, D]."""
        c = self.cfg
        logits = self.router(x)
        logits = logits.to(compute_dtype(logits.dtype))  # bf16 scores would tie and flip
        scores = logits.softmax(-1) if c.score == "softmax" else logits.sigmoid()
        choice = scores if self.score_bias is None else scores + self.score_bias
        if c.topk_groups < c.n_groups:  # DeepSeek-V3: a group ranks by the sum of its two best scores; V2: its best
            groups = choice.unflatten(-1, (c.n_groups, -1))
            best = 2 if c.group_rank == "top2_sum" else 1
            rank = groups.topk(min(best, groups.shape[-1]), dim=-1).values.sum(-1)
            kept = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, rank.topk(c.topk_groups, -1).indices, True)
            choice = groups.masked_fill(~kept[..., None], float("-inf")).flatten(-2)
        experts = choice.topk(c.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if c.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, experts, weights * c.routed_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores, experts, weights = self.route(x)
        weights = weights.to(x.dtype)
        training = self.training and torch.is_grad_enabled()
        limit = GATHER_ASSIGNMENTS if torch.compiler.is_compiling() else 0
        gather = experts.numel() <= max(self.cfg.n_experts, limit)  # decoding: each token's experts
        counts = None if gather and not training else torch.bincount(experts.flatten(), minlength=self.cfg.n_experts)
        y = self._gathered(x, experts, weights) if gather else self._grouped(x, experts, weights, counts)
        if self.shared is not None:
            shared = self.shared(x)
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * shared)
        if training:
            self.aux_loss = self.cfg.aux_loss_coef * self.balance(scores, counts)
            self.tokens_per_expert = counts
        return y.reshape(shape)

    @torch.no_grad()
    def update_score_bias(self, load: torch.Tensor | None = None) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, once per optimiser step: b_e += bias_update * sign(mean
        load - load_e), from ``load`` (the step's tokens per expert, summed over ranks) or the last forward's."""
        load = self.tokens_per_expert if load is None else load
        if self.score_bias is None or not self.cfg.bias_update or load is None:
            return
        load = load.to(self.score_bias.dtype)
        self.score_bias += self.cfg.bias_update * torch.sign(load.mean() - load)

    def balance(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """sum_e f_e P_e from the scores [N, E] and the tokens routed to each expert (1 when every expert gets
        as many tokens and as much score as the others)."""
        E = self.cfg.n_experts
        load = counts.to(scores.dtype) * (E / (scores.shape[0] * self.cfg.top_k))
        share = scores if self.cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        return (load * share.mean(0)).sum()

    def _expert(self, x: torch.Tensor, gate_up, down, gate_up_bias=None, down_bias=None) -> torch.Tensor:
        gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
        return F.linear(self._glu(gate, up), down, down_bias)

    def _glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's silu(gate) * up, or gpt-oss's clamped form (``swiglu_limit``)."""
        limit = self.cfg.swiglu_limit
        if limit is None:
            return F.silu(gate) * up
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.cfg.swiglu_alpha)

    # Outside any compiled graph (trainer.compile's blocks): the experts' row counts change every step, and a
    # graph specialised on them recompiled at every step (jamba: 4.3 s a step against 0.64 eager).
    @torch.compiler.disable
    def _grouped(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, counts) -> torch.Tensor:
        """Tokens sorted by expert, each expert applied once to its ``counts`` tokens. Experts that got none
        still run (on no rows), so every expert is in the graph and gets a (zero) gradient: DDP needs no unused
        parameters."""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # In float32: bf16 matrix products on a CPU go through oneDNN, which builds a kernel for each new shape
            # (about 1 ms), and the experts' row counts are new every step: jamba's step under bf16 autocast ran at
            # 0.94x its float32 speed, and at 1.25x with its experts in float32 (benchmarks/RESULTS.md)
            wide = compute_dtype(x.dtype)
            with torch.autocast("cpu", enabled=False):
                return self._grouped(x.to(wide), experts, weights.to(wide), counts).to(x.dtype)
        order = experts.flatten().argsort(stable=True)
        rows = order // self.cfg.top_k  # the token of each sorted assignment
        parts = x[rows].split(counts.tolist())
        # unbind, not [e]: indexing's backward writes each expert's gradient into a zeroed copy of the whole stack
        # and sums the copies (jamba's step: 64 zero-fills of 8 MB), unbind's stacks the experts' gradients once
        stacks = [self.gate_up_proj, self.down_proj] + ([self.gate_up_bias, self.down_bias] if self.cfg.bias else [])
        experts_in = zip(parts, *(t.unbind(0) for t in stacks), strict=True)
        out = torch.cat([self._expert(*weights) for weights in experts_in])
        out = out * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, rows, out)

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's experts' weights gathered: static shapes, so one compiled decode step serves any
        routing."""
        gate_up = torch.einsum("nd,nkhd->nkh", x, self.gate_up_proj[experts])
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias[experts]
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.einsum("nkh,nkdh->nkd", self._glu(gate, up), self.down_proj[experts])
        if self.down_bias is not None:
            out = out + self.down_bias[experts]
        return (out * weights.unsqueeze(-1)).sum(1)


def build_mlp(cfg: MLPConfig, d_model: int) -> nn.Module | None:
    """The block's MLP, or None for ``kind: none``."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "moe":
        return MoE(d_model, cfg)
    if cfg.kind == "gelu":
        return GeluMLP(d_model, cfg.hidden, cfg.bias, cfg.approximate)
    if cfg.kind == "relu2":
        return SquaredReluMLP(d_model, cfg.hidden, cfg.bias)
    if cfg.kind in ("swiglu", "geglu"):
        return MLP_CLASSES[cfg.kind](d_model, cfg.hidden, bool(cfg.bias))
    return MLP_CLASSES[cfg.kind](d_model, cfg.hidden)


MLP_CLASSES = {"swiglu": SwiGLU, "geglu": GeGLU, "gelu": GeluMLP, "relu2": SquaredReluMLP,
               "rwkv_channel_mix": RWKVChannelMix, "moe": MoE}  # fmt: skip
