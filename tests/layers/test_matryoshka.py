"""MatryoshkaKV (Lin et al. 2024): orthogonal K/V projections per head, against a float64 transcription of the
paper's (and its code's) attention; PCA conversion; the Matryoshka rank schedule; the greedy rank search."""

import math

import pytest
import torch

from kvlab import build_model
from kvlab.archs.convert import convert_model
from kvlab.layers.attention import Attention, AttentionConfig, cayley, inverse_cayley
from kvlab.layers.base import StepState
from tests.conftest import tiny

SPEC = tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2})


def _layer(**settings) -> Attention:
    cfg = AttentionConfig(**{"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "rope_dims": 0, **settings})
    cfg.validate(32, "mixer")
    layer = Attention(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64).double()
    with torch.no_grad():
        for p in (layer.k_rotation, layer.v_rotation, layer.k_mean, layer.v_mean):
            p.normal_(std=0.5)
    return layer


def test_cayley_round_trip():
    q, _ = torch.linalg.qr(torch.randn(3, 6, 6, dtype=torch.float64))
    q[..., 0] *= torch.linalg.det(q).sign()[:, None]  # determinant +1 (a rotation: what Cayley reaches)
    torch.testing.assert_close(cayley(inverse_cayley(q)), q)
    u = cayley(torch.randn(2, 5, 5, dtype=torch.float64))
    torch.testing.assert_close(u @ u.transpose(-1, -2), torch.eye(5, dtype=torch.float64).expand(2, 5, 5))


@pytest.mark.parametrize("kv_rank", [[4, 2], [[4, 6], [2, 8]], [3, [5, 1]]])  # per-head ranks: packed in the cache
def test_layer_matches_a_transcription_of_the_projected_attention(kv_rank):
    """Per head: q' = q U_k[:, :r_k], k' = (k - mu_k) U_k[:, :r_k], v' = (v - mu_v) U_v[:, :r_v], softmax(q'k'^T /
    sqrt(d)) v' U_v[:, :r_v]^T + mu_v (rope_dims=0 keeps RoPE out of the transcription), with each K/V head's
    own ranks where they differ; decoding from the cache gives the same, and the cache holds what the footprint
    counts."""
    layer = _layer(kv_ranks=[1, 2, 4, 8], kv_rank=kv_rank).eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    B, T, H, G, d = 2, 7, 4, 2, 8
    r_k, r_v = (r if isinstance(r, list) else [r] * G for r in kv_rank)
    q = layer.q_proj(x).view(B, T, H, d)
    k = layer.k_proj(x).view(B, T, G, d)
    v = layer.v_proj(x).view(B, T, G, d)
    out = torch.zeros(B, T, H, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // 2
            uk, uv = cayley(layer.k_rotation[g])[:, : r_k[g]], cayley(layer.v_rotation[g])[:, : r_v[g]]
            qp = q[b, :, h] @ uk
            kp = (k[b, :, g] - layer.k_mean[g]) @ uk
            vp = (v[b, :, g] - layer.v_mean[g]) @ uv
            scores = (qp @ kp.T / math.sqrt(d)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[b, :, h] = torch.softmax(scores, -1) @ vp @ uv.T + layer.v_mean[g]
    expected = layer.o_proj(out.reshape(B, T, H * d))
    slot = layer.new_cache_slot(B, 16, torch.float64, "cpu")
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() <= 1e-10
        steps = [layer(x[:, :3], cache=slot, state=StepState(start=0))]
        steps += [layer(x[:, t : t + 1], cache=slot, state=StepState(start=t)) for t in range(3, T)]
        assert (torch.cat(steps, dim=1) - expected).abs().max() <= 1e-10
    per_token = (sum(r_k) + sum(r_v)) * 8  # float64 bytes
    assert layer.kv_footprint(torch.float64).bytes_per_token == per_token
    assert slot.allocated_bytes() == B * 16 * per_token


def test_training_cycles_through_every_rank_pair_and_saves_where_it_is():
    layer = _layer(kv_ranks=[2, 8]).train()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    seen = []
    for _ in range(5):
        step = int(layer.rank_step)
        basis_k, basis_v = layer._matryoshka_bases()
        seen.append((basis_k.shape[-1], basis_v.shape[-1]))
        layer(x).sum().backward()
        assert int(layer.rank_step) == step + 1
    assert seen == [(2, 2), (2, 8), (8, 2), (8, 8), (2, 2)]  # the official code's order: keys outer
    assert "rank_step" in layer.state_dict()  # a resumed run continues the cycle where it stopped
    assert layer.k_rotation.grad.abs().sum() > 0 and layer.v_mean.grad.abs().sum() > 0


@pytest.mark.parametrize("qk_norm", [False, True])
def test_pca_conversion_is_exact_at_full_rank_and_orders_by_variance(qk_norm):
    """With Qwen3's key norms, the bases are those of the keys as cached: normalised, then turned."""
    spec = {**SPEC, "mixer": {**SPEC["mixer"], "qk_norm": qk_norm}}
    model = build_model(spec).double().eval()  # exact to float64's rounding: the bases keep the parent's precision
    if qk_norm:
        with torch.no_grad():
            for layer in model.layers:
                layer.mixer.k_norm.weight.copy_(torch.linspace(0.2, 3.0, 16))
    ids = torch.randint(0, 97, (4, 33))
    full = convert_model(model, {"to": "matryoshka"}, calibration=ids).eval()
    assert full.config.layer_mixers[0].kv_ranks == [4, 8, 12, 16]  # the official d/4 schedule
    with torch.no_grad():
        assert (full(ids) - model(ids)).abs().max() <= 1e-12
        cache = full.new_cache(4, 33)
        full(ids, cache=cache)
    coords = cache.slots[1].k[:, :, :33]  # PCA coordinates of layer 1's keys: variance falls with the index
    variance = coords.transpose(1, 2).reshape(-1, 2, 16).var(0)
    assert (variance[:, :-1] >= variance[:, 1:] - 1e-4).all()
    half = convert_model(model, {"to": "matryoshka", "rank": [8, 8]}, calibration=ids)
    assert half.kv_footprint().bytes_per_token * 2 == model.kv_footprint().bytes_per_token


def test_one_trained_model_serves_every_rank():
    from kvlab.archs.convert import with_kv_rank

    model = build_model(SPEC).eval()
    ids = torch.randint(0, 97, (2, 17))
    converted = convert_model(model, {"to": "matryoshka", "rank": [4, 4]}, calibration=ids)
    full = with_kv_rank(converted, [16, 16]).eval()
    assert converted.kv_footprint().bytes_per_token * 4 == full.kv_footprint().bytes_per_token
    with torch.no_grad():
        assert (full(ids) - model(ids)).abs().max() <= 1e-5  # the same weights, at full rank: the parent
    with pytest.raises(ValueError, match="without MatryoshkaKV projections"):
        with_kv_rank(model, [4, 4])


def test_greedy_ranks_fit_the_budget():
    model = build_model(SPEC).eval()
    ids = torch.randint(0, 97, (2, 17))
    report = {}
    spec = {"to": "matryoshka", "ranks": [4, 8, 16], "budget": 0.4}
    chosen = convert_model(model, spec, calibration=ids, report=report)
    ranks = [m.kv_rank for m in chosen.config.layer_mixers]
    assert ranks == [report["matryoshka_ranks"][str(i)] for i in range(4)]
    assert sum(sum(r) for r in ranks) <= 0.4 * 4 * 2 * 16
    assert chosen.kv_footprint().bytes_per_token == sum(2 * sum(r) * 2 for r in ranks)  # heterogeneous, exact

    per_head = convert_model(model, {**spec, "per_head": True}, calibration=ids, report=report)
    ranks = [m.kv_rank for m in per_head.config.layer_mixers]  # [[keys per head], [values per head]] per layer
    assert ranks == [report["matryoshka_ranks"][str(i)] for i in range(4)]
    assert all(len(r) == 2 and all(len(x) == 2 for x in r) for r in ranks)
    cached = sum(sum(map(sum, r)) for r in ranks)
    assert cached <= 0.4 * 4 * 2 * 2 * 16 and per_head.kv_footprint().bytes_per_token == cached * 2
    assert len(report["matryoshka_losses"]) == 2  # at the start and the end
    # the same choice, transcribed: each head's keys (values) lowered alone, then the cheapest steps taken
    full = convert_model(model, {"to": "matryoshka", "ranks": [4, 8, 16]}, calibration=ids).eval()
    with torch.no_grad():
        base = full(ids[:, :-1], labels=ids[:, 1:]).item()
        rise = {}
        for unit in [(i, which, g) for i in range(4) for which in (0, 1) for g in (0, 1)]:
            for r in (8, 4):
                trial = [[16, 16], [16, 16]]
                trial[unit[1]][unit[2]] = r
                full.layers[unit[0]].mixer.kv_rank = tuple(trial)
                rise[unit, r] = full(ids[:, :-1], labels=ids[:, 1:]).item() - base
            full.layers[unit[0]].mixer.kv_rank = (16, 16)
    level = {unit: 16 for unit, _ in rise}
    while sum(level.values()) > 0.4 * 4 * 2 * 2 * 16:
        _, unit = min((rise[u, r // 2] - rise.get((u, r), 0.0), u) for u, r in level.items() if r > 4)
        level[unit] //= 2
    assert ranks == [[[level[i, which, g] for g in (0, 1)] for which in (0, 1)] for i in range(4)]
    cache = per_head.new_cache(2, 16)  # packed where the heads' ranks differ: the cache is what is counted
    assert cache.allocated_bytes() == 2 * 16 * cached * 4


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"kv_ranks": [4, 2]}, "must be increasing"),
        ({"kv_ranks": [4, 16]}, "kv_ranks\\[1\\]=16 exceeds head_dim=8"),
        ({"kv_rank": [4, 4]}, "needs kv_ranks"),
        ({"kv_ranks": [4], "kv_rank": [4]}, "must be \\[key rank, value rank\\]"),
        ({"kv_ranks": [4], "kv_merge": 2}, "cannot be combined with kv_merge=2"),
        (
            {"kv_ranks": [4], "kv_rank": [[4, 4, 4], 4]},
            "kv_rank\\[0\\]=\\[4, 4, 4\\] must be one rank, or one per K/V head",
        ),
        ({"kv_ranks": [4], "kv_rank": [4, [4, 9]]}, "kv_rank\\[1\\]\\[1\\]=9 exceeds head_dim=8"),
    ],
)
def test_impossible_ranks_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        _layer(**settings)


def test_conversion_needs_calibration_and_unshared_layers():
    with pytest.raises(ValueError, match="needs calibration tokens"):
        convert_model(build_model(SPEC), {"to": "matryoshka"})
    with pytest.raises(ValueError, match="convert.per_head=true chooses ranks by the greedy search: it needs"):
        convert_model(
            build_model(SPEC), {"to": "matryoshka", "per_head": True}, calibration=torch.randint(0, 97, (2, 9))
        )
    shared = build_model({**SPEC, "kv_sharing": {"kind": "cla", "every": 2}})
    with pytest.raises(ValueError, match="layer 1 reads layer 0's K/V"):
        convert_model(shared, {"to": "matryoshka"}, calibration=torch.randint(0, 97, (2, 9)))
