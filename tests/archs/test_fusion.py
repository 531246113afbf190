"""DHA's adaptive heads fusion (``kvlab.archs.fusion``): the fused heads, the fusion loss and the merge against a
float64 transcription; the augmented-Lagrangian fusion drives a cluster's heads together; the conversion."""

import pytest
import torch

from kvlab import build_model
from kvlab.archs.convert import calibration_rows, convert_model
from kvlab.archs.fusion import HeadFusion, fuse_heads
from tests.conftest import tiny

MHA = tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 4, "head_dim": 8, "qkv_bias": True}, n_layers=2)
CLUSTERS = {(0, "k_proj"): [[0, 2, 3], [1]], (0, "v_proj"): [[0, 1], [2, 3]], (1, "k_proj"): [[0, 1, 2, 3]],
            (1, "v_proj"): [[0], [1], [2, 3]]}  # fmt: skip


def test_fused_heads_fusion_loss_and_merge_match_their_definitions():
    model = build_model(MHA).double()
    fusion = HeadFusion(model, CLUSTERS).double()
    with torch.no_grad():
        for w in fusion.operators.values():
            w.copy_(torch.randn_like(w))
    fused = fusion.fused_rows()
    params = fusion.fused_parameters(fused)
    merged = fusion.merged()
    losses = []
    for (layer, proj), clusters in CLUSTERS.items():
        linear = getattr(model.layers[layer].mixer, proj)
        heads = [
            torch.cat([linear.weight[8 * h : 8 * h + 8], linear.bias[8 * h : 8 * h + 8, None]], 1) for h in range(4)
        ]
        out, spread = [None] * 4, 0.0
        for c, members in enumerate(clusters):
            w = fusion.operators[f"{layer}_{proj}_{c}"] if len(members) > 1 else torch.ones(1, 1, dtype=torch.float64)
            for a, i in enumerate(members):  # W~_i = sum_j w_ij W_j
                out[i] = sum(w[a, b] * heads[j] for b, j in enumerate(members))
            mean = sum(out[i] for i in members) / len(members)
            spread = spread + sum(((out[i] - mean) ** 2).sum() for i in members)
            # the merged head of cluster c: the mean of its fused heads
            assert (merged[f"layers.{layer}.mixer.{proj}.weight"][8 * c : 8 * c + 8] - mean[:, :-1]).abs().max() < 1e-12
            assert (merged[f"layers.{layer}.mixer.{proj}.bias"][8 * c : 8 * c + 8] - mean[:, -1]).abs().max() < 1e-12
        losses.append(spread / sum((h**2).sum() for h in heads))
        weight = torch.cat([o[:, :-1] for o in out])
        assert (params[f"layers.{layer}.mixer.{proj}.weight"] - weight).abs().max() < 1e-12
        assert (params[f"layers.{layer}.mixer.{proj}.bias"] - torch.cat([o[:, -1] for o in out])).abs().max() < 1e-12
    assert fusion.fusion_loss(fused).item() == pytest.approx(sum(losses).item() / len(losses), rel=1e-12)


def test_fusion_drives_each_cluster_together_and_leaves_the_parent_alone():
    model = build_model(MHA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (8, 17))
    fusion, history = fuse_heads(model, CLUSTERS, ids, steps=60, lr=0.03, lambda_lr=10.0, batch=2)
    assert len(history) == 61 and history[0]["fusion_loss"] > 0.3 and history[-1]["fusion_loss"] < 0.02
    assert history[0]["lambda1"] == 0 and history[-1]["lambda1"] > 0 and history[-1]["lambda2"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # at the start (identity operators) the fused model is the parent, and merging is mean-pooling
    parent_loss = model(ids[:2, :-1], labels=ids[:2, 1:]).item()
    assert history[0]["lm_loss"] == pytest.approx(parent_loss, rel=1e-5)


def test_a_fused_cluster_whose_heads_agree_merges_exactly():
    """Operators with equal rows make a cluster's fused heads one head: the merged model (one K/V head per
    cluster) computes what the fused MHA model does."""
    model = build_model(MHA).double().eval()
    clusters = {key: c for key, c in CLUSTERS.items() if key[0] == 0}
    clusters.update({(1, "k_proj"): [[h] for h in range(4)], (1, "v_proj"): [[h] for h in range(4)]})
    fusion = HeadFusion(model, clusters).double()
    with torch.no_grad():
        for w in fusion.operators.values():
            w.copy_(torch.randn(1, w.shape[1], dtype=torch.float64).expand_as(w))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        fused = torch.func.functional_call(model, fusion.fused_parameters(fusion.fused_rows()), (ids,))
        assert fusion.fusion_loss(fusion.fused_rows()).item() < 1e-20
    # the merged model, built as the conversion builds it: one K and one V head per cluster
    from kvlab.archs.convert import _build, _cluster_of_query, _one_mixer_per_layer

    dicts = [dict(MHA["mixer"]) for _ in range(2)]
    for i in range(2):
        mixer = model.layers[i].mixer
        k, v = clusters[i, "k_proj"], clusters[i, "v_proj"]
        dicts[i].update(n_kv_heads=len(k), kv_groups=_cluster_of_query(mixer, k), n_v_heads=len(v),
                        v_groups=_cluster_of_query(mixer, v))  # fmt: skip
    merged = _build(_one_mixer_per_layer(model.config.to_dict(), dicts), {**model.state_dict(), **fusion.merged()},
                    like=model).eval()  # fmt: skip
    with torch.no_grad():
        assert (merged(ids) - fused).abs().max() < 1e-10


def test_dha_conversion_spreads_the_budget_and_reports_the_fusion():
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 4}, n_layers=3))
    ids = torch.randint(0, 97, (4, 17))
    report = {}
    spec = {"to": "dha", "n_k_heads": 2, "n_v_heads": 1, "method": "fusion", "adaptive": True, "fusion_steps": 3}
    dha = convert_model(model, spec, calibration=ids, report=report)
    k, v = report["dha"]["k_heads_per_layer"], report["dha"]["v_heads_per_layer"]
    assert sum(k) == 6 and sum(v) == 3 and len(k) == len(v) == 3
    assert [m.n_kv_heads for m in dha.config.layer_mixers] == k and [m.n_v_heads for m in dha.config.layer_mixers] == v
    assert len(report["dha"]["fusion"]) == 4 and report["dha"]["fusion_tokens"] == 3 * 4 * 16
    assert dha.kv_footprint().bytes_per_token * 8 == model.kv_footprint().bytes_per_token * 3  # (2 + 1) of 4 + 4
    assert calibration_rows(spec) == 32 and calibration_rows({**spec, "calibration_rows": 5}) == 5
    assert calibration_rows({"to": "gqa", "n_kv_heads": 1}) == 0


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "similarity", "fusion_steps": 3}, "convert.fusion_steps is a setting of method=fusion"),
        ({"method": "fusion", "lambda_lr": -1.0}, "convert.lambda_lr=-1.0 must be >= 0"),
        ({"method": "fusion", "fusion_batch": 0}, "convert.fusion_batch=0 must be >= 1"),
        ({"method": "fusion", "adaptive": "yes"}, "convert.adaptive='yes' must be true or false"),
        ({"n_k_heads": 5}, "layer 0 has 4 K/V heads, fewer than the 5 asked"),
        ({"method": "mean"}, "convert.method='mean' is not one of 'similarity', 'fusion'"),
    ],
)
def test_bad_dha_settings_are_refused(spec, message):
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 4}, n_layers=1))
    with pytest.raises(ValueError, match=message):
        convert_model(model, {"to": "dha", "n_k_heads": 2, "n_v_heads": 2, **spec}, torch.randint(0, 97, (2, 9)))


def test_calibration_rows_only_where_a_conversion_uses_them():
    model = build_model(tiny(n_layers=1))
    with pytest.raises(ValueError, match="convert.calibration_rows: the conversion .* uses no calibration tokens"):
        convert_model(model, {"to": "mqa", "calibration_rows": 4})
