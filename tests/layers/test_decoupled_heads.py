"""Decoupled key and value heads (after DHA, Chen et al. 2024): each query head reads its own key head and its
own value head, against a float64 transcription; the cache and footprint count both; DHA's grouping conversion."""

import math

import pytest
import torch

from kvlab import build_model
from kvlab.archs.convert import convert_model
from kvlab.layers.attention import Attention, AttentionConfig
from tests.conftest import tiny


def _layer(**settings) -> Attention:
    cfg = AttentionConfig(**{"n_heads": 6, "head_dim": 8, "rope_dims": 0, **settings})
    cfg.validate(32, "mixer")
    return Attention(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64).double()


def test_each_query_head_reads_its_key_head_and_its_value_head():
    layer = _layer(n_kv_heads=2, kv_groups=[0, 1, 1, 0, 1, 1], n_v_heads=3, v_groups=[2, 0, 1, 1, 0, 2])
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    B, T, d = 2, 7, 8
    q = layer.q_proj(x).view(B, T, 6, d)
    k = layer.k_proj(x).view(B, T, 2, d)
    v = layer.v_proj(x).view(B, T, 3, d)
    out = torch.zeros(B, T, 6, d, dtype=torch.float64)
    causal = torch.ones(T, T).triu(1).bool()
    for b in range(B):
        for h, (kh, vh) in enumerate(zip([0, 1, 1, 0, 1, 1], [2, 0, 1, 1, 0, 2], strict=True)):
            scores = (q[b, :, h] @ k[b, :, kh].T / math.sqrt(d)).masked_fill(causal, float("-inf"))
            out[b, :, h] = torch.softmax(scores, -1) @ v[b, :, vh]
    with torch.no_grad():
        assert (layer(x) - layer.o_proj(out.reshape(B, T, 6 * d))).abs().max() <= 1e-12
    assert layer.kv_footprint(torch.bfloat16).bytes_per_token == (2 + 3) * d * 2
    slot = layer.new_cache_slot(2, 10, torch.bfloat16, "cpu")
    assert slot.k.shape[1] == 2 and slot.v.shape[1] == 3 and slot.allocated_bytes() == 2 * 10 * (2 + 3) * d * 2


def test_dha_grouping_pools_alike_heads_apart_for_keys_and_values():
    """Keys of heads (0,1) and (2,3) identical, values of heads (0,2) and (1,3): pooled apart, both are exact."""
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4})).double().eval()  # (to float64's rounding)
    with torch.no_grad():
        for layer in model.layers:
            k = layer.mixer.k_proj.weight.view(4, 16, 64)
            v = layer.mixer.v_proj.weight.view(4, 16, 64)
            k[1], k[3] = k[0], k[2]
            v[2], v[3] = v[0], v[1]
    ids = torch.randint(0, 97, (2, 13))
    dha = convert_model(model, {"to": "dha", "n_k_heads": 2, "n_v_heads": 2}, calibration=ids).eval()
    m = dha.config.layer_mixers[0]
    assert (m.n_kv_heads, m.kv_groups, m.n_v_heads, m.v_groups) == (2, [0, 0, 1, 1], 2, [0, 1, 0, 1])
    assert dha.kv_footprint().bytes_per_token * 2 == model.kv_footprint().bytes_per_token
    with torch.no_grad():
        assert (dha(ids) - model(ids)).abs().max() <= 1e-12
    uneven = convert_model(model, {"to": "dha", "n_k_heads": 1, "n_v_heads": 3}, calibration=ids)
    assert uneven.kv_footprint().bytes_per_token * 2 == model.kv_footprint().bytes_per_token  # (1 + 3) of 8


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"n_kv_heads": 2, "n_v_heads": 4}, "n_heads=6 is not divisible by mixer.n_v_heads=4"),
        ({"n_kv_heads": 2, "n_v_heads": 2, "v_groups": [0, 0, 0, 0, 0, 0]}, "leaves value heads \\[1\\] unread"),
        ({"n_kv_heads": 2, "n_v_heads": 2, "v_groups": [0, 1, 2, 0, 1, 1]}, "v_groups\\[2\\]=2 must be below"),
        ({"n_kv_heads": 2, "kv_groups": [0, 1, 2, 0, 1, 1]}, "kv_groups\\[2\\]=2 must be below the 2 K/V heads"),
        ({"n_kv_heads": 2, "n_v_heads": 3, "kv_merge": 2}, "cannot be combined with kv_merge=2"),
    ],
)
def test_impossible_value_heads_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        _layer(**settings)
