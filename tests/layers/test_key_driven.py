"""KDGQA and DGQA (Khan et al. 2024): query heads allocated to K/V heads by key norms, against a float64
transcription of the official code's rule, query by query."""

import math

import pytest
import torch

from kvlab import build_model
from kvlab.layers.attention import Attention, AttentionConfig, key_driven_allocation, kv_head_of_query
from tests.conftest import tiny


def _layer(**settings) -> Attention:
    cfg = AttentionConfig(**settings)
    cfg.validate(32, "mixer")
    return Attention(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64).double()


def _allocation_reference(norms: list[float], n_heads: int, min_max: bool = True) -> list[int]:
    """The official KDGQA code's rule, transcribed: min-max scaling, rounded shares, mended totals."""
    if min_max:
        lo, hi = min(norms), max(norms)
        norms = [(n - lo) / (hi - lo) for n in norms]
    alloc = [int(torch.tensor(n / sum(norms) * n_heads).round()) for n in norms]  # torch rounds half to even
    while sum(alloc) > n_heads:
        alloc[alloc.index(max(alloc))] -= 1
    while sum(alloc) < n_heads:
        alloc[alloc.index(min(alloc))] += 1
    return alloc


def test_allocation_follows_the_official_rule():
    norms = torch.rand(200, 5, dtype=torch.float64) * torch.rand(200, 1, dtype=torch.float64) * 10
    for min_max in (True, False):
        got = key_driven_allocation(norms, 12, min_max=min_max)
        want = [_allocation_reference(row.tolist(), 12, min_max) for row in norms]
        assert got.tolist() == want
        assert (got.sum(-1) == 12).all()
    assert key_driven_allocation(torch.ones(3), 6).tolist() == [2, 2, 2]  # equal norms: equal shares
    assert kv_head_of_query(torch.tensor([3, 0, 1]), 4).tolist() == [0, 0, 0, 2]


def test_kdgqa_layer_matches_a_query_by_query_transcription():
    """Each query's heads go to the K/V heads by the norms of the keys it sees; rope_dims=0 keeps the
    transcription free of RoPE (which preserves norms; decode == forward covers it)."""
    H, G, D, T = 6, 3, 8, 9
    layer = _layer(n_heads=H, n_kv_heads=G, head_dim=D, rope_dims=0, query_allocation="kdgqa")
    x = torch.randn(2, T, 32, dtype=torch.float64)
    q = layer.q_proj(x).view(2, T, H, D)
    k = layer.k_proj(x).view(2, T, G, D)
    v = layer.v_proj(x).view(2, T, G, D)
    out = torch.zeros(2, T, H, D, dtype=torch.float64)
    for b in range(2):
        for t in range(T):
            norms = [k[b, : t + 1, g].norm().item() for g in range(G)]
            alloc = _allocation_reference(norms, H)
            reads = [g for g in range(G) for _ in range(alloc[g])]
            for h in range(H):
                g = reads[h]
                p = torch.softmax(k[b, : t + 1, g] @ q[b, t, h] / math.sqrt(D), dim=0)
                out[b, t, h] = p @ v[b, : t + 1, g]
    want = layer.o_proj(out.reshape(2, T, H * D))
    with torch.no_grad():
        assert (layer(x) - want).abs().max() <= 1e-10


def test_dgqa_learns_its_allocation_in_training_and_keeps_it_at_inference():
    H, G, D, T = 6, 3, 8, 5
    layer = _layer(n_heads=H, n_kv_heads=G, head_dim=D, query_allocation="dgqa", allocation_beta=0.75)
    assert layer.allocation.tolist() == [2, 2, 2] and layer.key_norm_average.tolist() == [0, 0, 0]
    with torch.no_grad():
        layer.k_proj.weight[:D] *= 8  # K/V head 0's keys are far larger
    x = torch.randn(2, T, 32, dtype=torch.float64)
    average = [0.0] * G
    layer.train()
    for _ in range(2):
        keys = layer.k_proj(x).view(2, T, G, D)
        norms = [sum(keys[b, :, g].norm().item() for b in range(2)) for g in range(G)]
        average = [0.75 * n + 0.25 * a for n, a in zip(norms, average, strict=True)]
        before = layer.allocation.clone()
        y = layer(x)
        y.sum().backward()
        assert layer.key_norm_average.tolist() == pytest.approx(average)
        assert layer.allocation.tolist() == _allocation_reference(average, H, min_max=False)
    assert before.tolist() != [2, 2, 2] and layer.allocation[0] > 2  # the large keys won query heads
    layer.eval()
    with torch.no_grad():
        fixed = layer.allocation.clone()
        y = layer(x)
        assert layer.allocation.tolist() == fixed.tolist()  # inference does not move it
        uneven = _layer(n_heads=H, n_kv_heads=G, head_dim=D, kv_groups=kv_head_of_query(fixed, H).tolist())
        uneven.load_state_dict({k: v for k, v in layer.state_dict().items() if "allocation" not in k
                                and "key_norm" not in k})  # fmt: skip
        assert (uneven(x) - y).abs().max() <= 1e-12  # at inference DGQA is uneven GQA


def test_dgqa_allocation_is_saved_with_the_weights():
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "query_allocation": "dgqa"}))
    with torch.no_grad():
        model.layers[1].mixer.allocation.copy_(torch.tensor([3, 1]))
    again = build_model(model.config.to_dict())
    again.load_state_dict(model.state_dict())
    assert again.layers[1].mixer.allocation.tolist() == [3, 1]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"n_kv_heads": 1, "query_allocation": "kdgqa"}, "needs n_kv_heads >= 2"),
        ({"n_kv_heads": 2, "query_allocation": "kdgqa", "window": 4}, "cannot be combined with window=4"),
        ({"n_kv_heads": 2, "query_allocation": "dgqa", "kv_groups": [0, 1, 1, 1]}, "cannot be combined with kv_g"),
        ({"n_kv_heads": 2, "query_allocation": "spread"}, "query_allocation"),
        ({"n_kv_heads": 2, "query_allocation": "dgqa", "allocation_beta": 1.5}, "allocation_beta=1.5 must be in"),
    ],
)
def test_impossible_allocations_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        _layer(n_heads=4, **settings)


@pytest.mark.parametrize("allocation", ["kdgqa", "dgqa"])
def test_conversion_mean_pools_and_allocates_by_key_norms(allocation):
    """With the K/V heads of each group made identical, pooling is exact; DGQA's equal starting allocation
    then computes what the parent did, and KDGQA differs only by where its norms send the query heads."""
    from kvlab.archs.convert import convert_model

    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4})).eval()
    converted = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "query_allocation": allocation}).eval()
    assert [m.query_allocation for m in converted.config.layer_mixers] == [allocation] * 4
    assert converted.kv_footprint().bytes_per_token * 2 == model.kv_footprint().bytes_per_token
    plain = convert_model(model, {"to": "gqa", "n_kv_heads": 2}).eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        if allocation == "dgqa":
            assert torch.equal(converted(ids), plain(ids))
        else:
            assert torch.isfinite(converted(ids)).all()
    with pytest.raises(ValueError, match="query_allocation=kdgqa pools K/V heads by method=mean"):
        convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": "first", "query_allocation": "kdgqa"})
