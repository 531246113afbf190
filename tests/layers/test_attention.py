"""The attention mixer's head layouts, against attention written head pair by head pair."""

import pytest
import torch

from kvlab import build_model
from kvlab.archs import convert_model
from kvlab.kernels.attention import attention_reference
from kvlab.kernels.rope import apply_rope_reference
from kvlab.layers.attention import Attention, AttentionConfig
from tests.conftest import tiny


def _layer(**settings) -> Attention:
    cfg = AttentionConfig(**settings)
    cfg.validate(32, "mixer")
    return Attention(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64)


def test_gqkva_pairs_every_query_head_with_every_kv_head():
    layer = _layer(n_heads=6, n_q_heads=3, n_kv_heads=2, head_dim=8)
    x = torch.randn(2, 7, 32)
    B, T, D, pos = 2, 7, 8, torch.arange(7)

    def heads(proj, n):
        return apply_rope_reference(proj(x).view(B, T, n, D).transpose(1, 2), pos, D, 10000.0)

    q, k = heads(layer.q_proj, 3), heads(layer.k_proj, 2)
    v = layer.v_proj(x).view(B, T, 2, D).transpose(1, 2)
    pairs = [attention_reference(q[:, i : i + 1], k[:, j : j + 1], v[:, j : j + 1], causal=True)
             for j in range(2) for i in range(3)]  # fmt: skip
    want = layer.o_proj(torch.cat(pairs, dim=1).transpose(1, 2).reshape(B, T, 6 * D))
    with torch.no_grad():
        assert (layer(x) - want).abs().max() <= 1e-5
    assert layer.q_proj.weight.shape == (3 * D, 32)
    assert layer.kv_footprint(torch.bfloat16).bytes_per_token == 2 * 2 * D * 2  # the cache of its 2 K/V heads


def test_gqkva_with_one_kv_head_is_mqa():
    gqkva, mqa = _layer(n_heads=4, n_q_heads=4, n_kv_heads=1), _layer(n_heads=4, n_kv_heads=1)
    mqa.load_state_dict(gqkva.state_dict())
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(gqkva(x), mqa(x))


def test_gqkva_head_count_must_be_the_product():
    with pytest.raises(ValueError, match=r"mixer.n_heads=4 must be n_q_heads \* n_kv_heads = 3 \* 2"):
        _layer(n_heads=4, n_q_heads=3, n_kv_heads=2)


def test_conversions_refuse_gqkva_layers():
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "n_q_heads": 2, "n_kv_heads": 2}))
    with pytest.raises(ValueError, match="layer 0 is GQKVA"):
        convert_model(model, {"to": "gqa", "n_kv_heads": 1})
