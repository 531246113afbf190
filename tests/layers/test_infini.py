"""Infini-attention against a plain per-segment transcription of the paper's equations."""

import pytest
import torch
import torch.nn.functional as F

from kvlab import build_model
from kvlab.kernels.attention import attention_reference
from kvlab.kernels.rope import apply_rope_reference
from kvlab.layers.infini import InfiniAttention, InfiniConfig
from tests.conftest import tiny


def _layer(update, n_kv_heads=2, segment_len=4):
    cfg = InfiniConfig(n_heads=4, n_kv_heads=n_kv_heads, head_dim=8, segment_len=segment_len, update=update)
    cfg.validate(32, "mixer")
    layer = InfiniAttention(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64)
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))  # gates away from an even mix
    return layer


def _reference(layer, x):
    """Eqs. 3-6 and 10 segment by segment, one head at a time, in float64."""
    cfg, (B, T, _) = layer.cfg, x.shape
    H, Hk, D, N = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.segment_len
    q = layer.q_proj(x).double().view(B, T, H, D).transpose(1, 2)
    k = layer.k_proj(x).double().view(B, T, Hk, D).transpose(1, 2)
    v = layer.v_proj(x).double().view(B, T, Hk, D).transpose(1, 2)
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for h in range(H):
        g = h // (H // Hk)
        M, z = torch.zeros(B, D, D, dtype=torch.float64), torch.zeros(B, D, dtype=torch.float64)
        for s in range(0, T, N):
            qs, ks, vs = q[:, h, s : s + N], k[:, g, s : s + N], v[:, g, s : s + N]
            pos = torch.arange(qs.shape[1])  # RoPE positions within the segment
            qr, kr = apply_rope_reference(qs, pos, D, cfg.rope_theta), apply_rope_reference(ks, pos, D, cfg.rope_theta)
            local = attention_reference(qr[:, None], kr[:, None], vs[:, None], causal=True, scale=D**-0.5)[:, 0]
            sq, sk = F.elu(qs) + 1, F.elu(ks) + 1
            mem = (sq @ M) / ((sq @ z[..., None]) + 1e-6)
            gate = torch.sigmoid(layer.beta[h].double())
            out[:, h, s : s + N] = gate * mem + (1 - gate) * local
            if qs.shape[1] == N:
                write = vs - (sk @ M) / ((sk @ z[..., None]) + 1e-6) if cfg.update == "delta" else vs
                M = M + sk.transpose(1, 2) @ write
                z = z + sk.sum(dim=1)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * D).to(x.dtype))


@pytest.mark.parametrize("update", ["delta", "linear"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_matches_the_equations_segment_by_segment(update, n_kv_heads):
    torch.manual_seed(0)
    layer = _layer(update, n_kv_heads).double()  # computing in float64 throughout, as the equations
    x = torch.randn(2, 14, 32, dtype=torch.float64)  # three whole segments of 4 and a partial one
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x), atol=1e-12, rtol=1e-10)


def test_memory_carries_what_left_the_segment():
    """A token two segments back changes later outputs only through the memory."""
    layer = _layer("delta")
    x = torch.randn(1, 12, 32)
    other = x.clone()
    other[0, 1] += 1.0
    with torch.no_grad():
        assert (layer(x)[0, 8:] - layer(other)[0, 8:]).abs().max() > 1e-4
        layer.beta.fill_(-30.0)  # gate closed: local attention only
        torch.testing.assert_close(layer(x)[0, 4:], layer(other)[0, 4:])


def test_cache_is_fixed_memory_plus_one_segment():
    model = build_model(tiny(mixer={"kind": "infini", "n_heads": 4, "n_kv_heads": 2, "segment_len": 8}, n_layers=1))
    fp = model.kv_footprint(torch.float32)
    assert fp.bytes_per_token == 0
    assert fp.fixed_bytes == (2 * 16 * 16 + 2 * 16 + 2 * 2 * 8 * 16) * 4  # M, z, K and V of one segment
    cache = model.new_cache(batch_size=1, max_len=64)
    with torch.no_grad():
        for _ in range(40):
            model(torch.randint(0, 97, (1, 1)), cache=cache)
            assert cache.nbytes() == fp.fixed_bytes
