"""Gated DeltaNet against a float64 transcription of the paper's recurrence, token by token."""

import pytest
import torch

from kvlab.layers.delta_net import GatedDeltaNet, GatedDeltaNetConfig


def _transcription(layer: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """Yang et al. 2024, per value head: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t with alpha_t = exp(-exp(A_log) softplus(a_t + dt_bias)), beta_t = sigmoid(b_t); q, k, v
    through the causal convolution and SiLU, q and k L2-normalised (q over sqrt(Dk)); o RMS-normalised, weighted,
    times silu(z)."""
    c, (B, T, _) = layer.cfg, x.shape
    H, Dk, Dv, K = c.n_heads, c.head_dim, c.value_head_dim, c.conv_kernel
    qkv, z = (x @ layer.in_proj.weight.T).split([layer.conv_dim, layer.gate_width], -1)
    if c.gate_rank is not None:
        z = x @ layer.gate_down.weight.T @ layer.gate_up.weight.T
    if c.decay == "head":
        b, a = (x @ layer.beta_decay_proj.weight.T).split([H, H], -1)
    else:  # KDA: every key channel's step through the low rank
        b, a = x @ layer.beta_decay_proj.weight.T, x @ layer.decay_down.weight.T @ layer.decay_up.weight.T
    padded = torch.cat([qkv.new_zeros(B, K - 1, qkv.shape[-1]), qkv], 1)
    conv = torch.stack([(padded[:, t : t + K] * layer.conv_weight.T).sum(1) for t in range(T)], 1)
    q, k, v = (conv * torch.sigmoid(conv)).split([layer.key_dim, layer.key_dim, layer.value_dim], -1)
    out = torch.zeros(B, T, H, Dv, dtype=x.dtype)
    for row in range(B):
        for h in range(H):
            S, g = torch.zeros(Dk, Dv, dtype=x.dtype), h // (H // c.n_qk_heads)  # its query/key head
            for t in range(T):
                qt, kt, vt = (
                    q[row, t, g * Dk : (g + 1) * Dk],
                    k[row, t, g * Dk : (g + 1) * Dk],
                    v[row, t, h * Dv : (h + 1) * Dv],
                )
                qt = qt / torch.sqrt(qt @ qt + 1e-6) / Dk**0.5
                kt = kt / torch.sqrt(kt @ kt + 1e-6)
                beta, eye = torch.sigmoid(b[row, t, h]), torch.eye(Dk, dtype=x.dtype)
                beta = 2 * beta if c.negative_eigenvalues else beta  # (its eigenvalue along k: 1 - beta, in (-1, 1))
                if c.decay == "head":  # S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
                    step = torch.log1p(torch.exp(a[row, t, h] + layer.dt_bias[h]))
                    S = torch.exp(-layer.A_log[h].exp() * step) * (eye - beta * torch.outer(kt, kt)) @ S
                else:  # KDA: S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T
                    channels = slice(h * Dk, (h + 1) * Dk)
                    step = torch.log1p(torch.exp(a[row, t, channels] + layer.dt_bias[channels]))
                    S = (eye - beta * torch.outer(kt, kt)) @ torch.diag(torch.exp(-layer.A_log[h].exp() * step)) @ S
                S = S + beta * torch.outer(kt, vt)
                o = S.T @ qt
                o = o / torch.sqrt(o @ o / Dv + c.norm_eps) * layer.norm_weight
                zt = z[row, t, h * Dv : (h + 1) * Dv]
                gate = zt * torch.sigmoid(zt) if c.gate_activation == "silu" else torch.sigmoid(zt)
                out[row, t, h] = o * gate if c.output_gate else o
    return out.reshape(B, T, -1) @ layer.out_proj.weight.T


KDA = {"decay": "channel", "gate_rank": 8, "gate_activation": "sigmoid", "n_qk_heads": 4, "value_head_dim": 8}


@pytest.mark.parametrize("case", ["gated", "ungated", "kda", "negative_eigenvalues"])
def test_layer_matches_the_papers_recurrence(case):
    """Chunks of 8 over 21 tokens, 2 query/key heads for 4 value heads, one head decaying hard (a chunk of it far past
    exp's range), value heads narrower than the keys; float64 to its rounding, float32 to its own. KDA (Kimi
    Linear's): a decay per key channel through a low rank, a low-rank sigmoid gate. Negative eigenvalues (OLMo
    Hybrid's): beta = 2 sigmoid(b)."""
    options = {"gated": {}, "ungated": {"output_gate": False}, "kda": KDA,
               "negative_eigenvalues": {"negative_eigenvalues": True}}[case]  # fmt: skip
    cfg = GatedDeltaNetConfig(**{"n_heads": 4, "n_qk_heads": 2, "head_dim": 8, "value_head_dim": 6, "chunk_size": 8,
                                 **options})  # fmt: skip
    layer = GatedDeltaNet(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64).double()
    with torch.no_grad():
        layer.A_log.copy_(torch.tensor([0.5, 2.0, 3.0, -1.0]))
        layer.norm_weight.normal_()
        layer.dt_bias.normal_()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    want = _transcription(layer, x)
    with torch.no_grad():
        assert (layer(x) - want).abs().max() <= 1e-12
        assert (layer.float()(x.float()) - want).abs().max() <= 1e-5


def test_config_names_bad_head_counts():
    with pytest.raises(ValueError, match=r"mixer.n_heads=6 is not divisible by mixer.n_qk_heads=4"):
        GatedDeltaNetConfig(n_heads=6, n_qk_heads=4).resolved(64, "mixer")
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by mixer.n_heads=4; set mixer.head_dim"):
        GatedDeltaNetConfig(n_heads=4).resolved(30, "mixer")
