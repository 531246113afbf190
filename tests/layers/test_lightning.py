"""MiniMax-01's lightning attention against a float64 transcription of its definition, token by token, and its
decays against the schedule its paper's code gives."""

import math

import pytest
import torch

from kvlab.layers.base import StepState
from kvlab.layers.retention import LightningAttention, LightningConfig, lightning_log_decays


def test_layer_matches_its_definition():
    """Per head, S_t = gamma S_{t-1} + k_t^T v_t and o_t = q_t S_t over the token's document (two packed in one row),
    q, k and v SiLU'd from one projection (each head's three side by side), then out_proj(sigmoid(x W_g) * RMSNorm
    over all heads' o_t); a pad (the second row's first two positions) writes nothing; float64 to its rounding."""
    H, D, d = 2, 4, 8
    layer = LightningAttention(LightningConfig(n_heads=H, head_dim=D, chunk_size=3), d_model=d, layer_idx=1,
                               kv_source=1, max_seq_len=32, n_layers=3).double()  # fmt: skip
    with torch.no_grad():
        layer.norm.weight.add_(torch.randn(H * D, dtype=torch.float64) * 0.3)
    x = torch.randn(2, 11, d, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    real = torch.tensor([[1.0] * 11, [0.0] * 2 + [1.0] * 9], dtype=torch.float64)
    gamma = [math.exp(-(2 ** (-8 * (h + 1) / H)) * (1 - 1 / (2 + 1e-5) + 1e-5)) for h in range(H)]
    qkv = torch.nn.functional.silu(x @ layer.in_proj.weight.T).view(2, 11, H, 3 * D)
    o = torch.zeros(2, 11, H, D, dtype=torch.float64)
    for row in range(2):
        state = torch.zeros(H, D, D, dtype=torch.float64)
        for t in range(11):
            if t and doc_ids[row, t] != doc_ids[row, t - 1]:
                state = torch.zeros_like(state)
            for h in range(H):
                q, k, v = qkv[row, t, h, :D], qkv[row, t, h, D : 2 * D], qkv[row, t, h, 2 * D :]
                if real[row, t]:
                    state[h] = gamma[h] * state[h] + torch.outer(k, v)
                o[row, t, h] = q @ state[h]
    flat = o.reshape(2, 11, H * D)
    normed = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.norm.weight
    want = (torch.sigmoid(x @ layer.output_gate.weight.T) * normed) @ layer.out_proj.weight.T
    with torch.no_grad():
        got = layer(x, state=StepState(doc_ids=doc_ids, real=real))
    assert (got[0] - want[0]).abs().max() <= 1e-12
    assert (got[1, 2:] - want[1, 2:]).abs().max() <= 1e-12  # (a pad's own output is not defined)


def test_decays_follow_the_depth_schedule():
    """ALiBi's slopes 2^(-8 (h+1) / H), times 1 - l / (L - 1 + 1e-5) + 1e-5: the bottom layer decays at the slopes,
    the top one by 1e-5 of them; a layer given no depth is a model's only one, and one past its model's depth is
    refused."""
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 8) for h in range(8)], dtype=torch.float64)
    assert torch.allclose(-lightning_log_decays(8, 0, 80), slopes * (1 + 1e-5), rtol=1e-15)
    top = 1 - 79 / (79 + 1e-5) + 1e-5
    assert torch.allclose(-lightning_log_decays(8, 79, 80), slopes * top, rtol=1e-12) and top < 2e-5
    alone = LightningAttention(LightningConfig(n_heads=8, head_dim=2), d_model=16, layer_idx=0, kv_source=0,
                               max_seq_len=8)  # fmt: skip
    assert torch.allclose(alone.log_gamma.double(), lightning_log_decays(8, 0, 1))
    with pytest.raises(ValueError, match=r"layer 2: mixer kind 'lightning' places its decays by the model's depth"):
        LightningAttention(LightningConfig(), d_model=16, layer_idx=2, kv_source=2, max_seq_len=8, n_layers=2)
