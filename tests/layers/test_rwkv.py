"""RWKV-6 and RWKV-7 time mix and RWKV channel mix against the papers' equations, token by token in float64."""

import math

import torch
import torch.nn.functional as F

from kvlab.layers.base import StepState
from kvlab.layers.mlp import RWKVChannelMix
from kvlab.layers.rwkv import RWKV6, RWKV7, RWKV6Config, RWKV7Config


def _layer() -> RWKV6:
    cfg = RWKV6Config(head_dim=8, mix_lora_rank=4, decay_lora_rank=6, chunk_size=3)
    cfg.validate(32, "mixer")
    layer = RWKV6(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64).double()
    with torch.no_grad():
        for p in layer.parameters():  # random everywhere (the LoRAs start near zero otherwise)
            p.normal_(std=0.3)
    return layer


def textbook_rwkv6(layer: RWKV6, x: torch.Tensor) -> torch.Tensor:
    """Eagle and Finch eqs. 11-17 as a loop over tokens, one sequence."""
    T, C = x.shape
    H, D = layer.n_heads, layer.head_dim
    S = torch.zeros(H, D, D, dtype=x.dtype)
    prev = torch.zeros(C, dtype=x.dtype)
    outputs = []
    for t in range(T):
        xt = x[t]
        xx = prev - xt
        lora = torch.tanh((xt + xx * layer.mix_x) @ layer.mix_lora_a).view(5, -1)
        m = {n: layer.mix_base[i] + lora[i] @ layer.mix_lora_b[i] for i, n in enumerate("wkvrg")}
        xs = {n: xt + xx * m[n] for n in "wkvrg"}
        r = layer.r_proj(xs["r"]).view(H, D)
        k = layer.k_proj(xs["k"]).view(H, D)
        v = layer.v_proj(xs["v"]).view(H, D)
        g = F.silu(layer.g_proj(xs["g"]))
        w = torch.exp(-torch.exp(layer.decay_base + torch.tanh(xs["w"] @ layer.decay_lora_a) @ layer.decay_lora_b))
        kv = k[:, :, None] * v[:, None, :]  # [H, D, D]
        o = (r[:, None, :] @ (S + layer.bonus[:, :, None] * kv)).squeeze(1)  # [H, D]
        S = w.view(H, D, 1) * S + kv
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + layer.cfg.norm_eps)
        normed = o.flatten() * layer.group_norm.weight + layer.group_norm.bias
        outputs.append(layer.o_proj(normed * g))
        prev = xt
    return torch.stack(outputs)


def test_rwkv6_matches_the_papers_recurrence():
    layer = _layer()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        for b in range(2):
            torch.testing.assert_close(got[b], textbook_rwkv6(layer, x[b]))


def test_channel_mix_matches_its_equation():
    mlp = RWKVChannelMix(16, 40)
    with torch.no_grad():
        mlp.mix_k.uniform_(0, 1)
        mlp.mix_r.uniform_(0, 1)
    x = torch.randn(1, 6, 16)
    prev = torch.cat([torch.zeros(1, 1, 16), x[:, :-1]], dim=1)
    mu_k, mu_r = mlp.mix_k, mlp.mix_r
    k = torch.relu((x * (1 - mu_k) + prev * mu_k) @ mlp.up_proj.weight.T) ** 2
    want = torch.sigmoid((x * (1 - mu_r) + prev * mu_r) @ mlp.gate_proj.weight.T) * (k @ mlp.down_proj.weight.T)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want)


def _rwkv7_layer(layer_idx: int) -> RWKV7:
    cfg = RWKV7Config(head_dim=8, decay_lora_rank=4, lr_lora_rank=4, value_lora_rank=4, gate_lora_rank=6, chunk_size=3)
    cfg.validate(32, "mixer")
    layer = RWKV7(cfg, d_model=32, layer_idx=layer_idx, kv_source=layer_idx, max_seq_len=64).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return layer


def textbook_rwkv7(layer: RWKV7, x: torch.Tensor, v_first: torch.Tensor | None) -> torch.Tensor:
    """RWKV-7's time mix as a loop over tokens, one sequence, state S [H, Dv, Dk] as in the paper."""
    T, C = x.shape
    H, D = layer.n_heads, layer.head_dim
    S = torch.zeros(H, D, D, dtype=x.dtype)
    prev = torch.zeros(C, dtype=x.dtype)
    outputs = []
    for t in range(T):
        xt = x[t]
        xs = {n: xt + (prev - xt) * layer.mix[i] for i, n in enumerate("rwkvag")}
        r, k, v = layer.r_proj(xs["r"]), layer.k_proj(xs["k"]), layer.v_proj(xs["v"])
        d = layer.decay_base + torch.tanh(xs["w"] @ layer.decay_lora_a) @ layer.decay_lora_b
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(d))
        a = torch.sigmoid(layer.lr_base + xs["a"] @ layer.lr_lora_a @ layer.lr_lora_b)
        if v_first is not None:
            nu = torch.sigmoid(layer.value_base + xs["v"] @ layer.value_lora_a @ layer.value_lora_b)
            v = v + (v_first[t] - v) * nu
        g = torch.sigmoid(xs["g"] @ layer.gate_lora_a) @ layer.gate_lora_b
        kappa = F.normalize((k * layer.key_scale).view(H, D), dim=-1)
        k = k * (1 + (a - 1) * layer.key_lr_mix)
        r, k, v, a, w = (z.view(H, D) for z in (r, k, v, a, w))
        # S_t = S_{t-1} (diag(w) - kappa^T (a * kappa)) + v^T k, o = S r
        transition = torch.diag_embed(w) - kappa[:, :, None] * (a * kappa)[:, None, :]
        S = S @ transition + v[:, :, None] * k[:, None, :]
        o = (S @ r[:, :, None]).squeeze(-1)  # [H, D]
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + layer.cfg.norm_eps)
        o = o.flatten() * layer.group_norm.weight + layer.group_norm.bias
        own = ((r * k * layer.bonus).sum(-1, keepdim=True) * v).flatten()
        outputs.append(layer.o_proj((o + own) * g))
        prev = xt
    return torch.stack(outputs)


def test_rwkv7_matches_the_papers_recurrence():
    first, above = _rwkv7_layer(0), _rwkv7_layer(1)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        state = StepState()
        got_first = first(x, state=state)
        v_first = state.published[("values", 0)]
        got_above = above(x, state=state)
        for b in range(2):
            torch.testing.assert_close(got_first[b], textbook_rwkv7(first, x[b], None))
            torch.testing.assert_close(got_above[b], textbook_rwkv7(above, x[b], v_first[b]))
