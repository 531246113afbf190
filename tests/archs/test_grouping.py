"""Head-grouping searches: QCQA (NSGA-II on the weight-sharing error) and AsymGQA, against brute force and
float64 transcriptions of their definitions."""

import itertools
import json
import random

import pytest
import torch

from kvlab import build_model
from kvlab.archs import grouping
from kvlab.archs.convert import convert_model
from tests.conftest import tiny

MHA8 = tiny(mixer={"kind": "attention", "n_heads": 8, "head_dim": 8}, n_layers=3)


def _partitions(items):
    """Every set partition of ``items`` (Bell(6) = 203 for six heads)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _partitions(rest):
        yield [[first], *p]
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1 :]]


def _wse_reference(k, v, groups, H):
    """QCQA's WSE as written: each head's K and V rows against its group's mean-pooled rows, squared."""
    total = 0.0
    for w in (k.double().view(H, -1), v.double().view(H, -1)):
        for g in groups:
            mean = w[g].mean(0)
            total += sum(((w[h] - mean) ** 2).sum().item() for h in g)
    return total


def test_weight_sharing_error_matches_its_definition():
    H = 5
    k, v = torch.randn(H * 4, 16), torch.randn(H * 4, 16)
    gram = grouping.head_gram(k, v, H)
    for groups in ([[0, 3], [1, 2, 4]], [[0], [1], [2], [3], [4]], [[0, 1, 2, 3, 4]]):
        assert grouping.weight_sharing_error(gram, groups) == pytest.approx(_wse_reference(k, v, groups, H), rel=1e-12)


@pytest.mark.parametrize("equal", [False, True])
def test_qcqa_layer_front_is_the_brute_force_front(equal):
    """Six heads: the search's best WSE for each group count equals the best of all 203 partitions
    (QCQA-AC) or of the equal ones (QCQA-EC)."""
    H = 6
    k, v = torch.randn(H * 4, 16), torch.randn(H * 4, 16)
    gram = grouping.head_gram(k, v, H)
    best = {}
    for p in _partitions(list(range(H))):
        if equal and len({len(g) for g in p}) > 1:
            continue
        best[len(p)] = min(best.get(len(p), float("inf")), grouping.weight_sharing_error(gram, p))
    front = grouping.qcqa_layer_front(gram, equal, population=16, generations=30, rng=random.Random(0))
    assert {n: pytest.approx(w) for n, w in best.items()} == {n: w for n, w, _ in front}
    for n, w, groups in front:
        assert len(groups) == n and sorted(h for g in groups for h in g) == list(range(H))
        assert grouping.weight_sharing_error(gram, groups) == pytest.approx(w)


def test_qcqa_picks_the_best_front_point_within_the_budget():
    grams = {i: grouping.head_gram(torch.randn(24, 8), torch.randn(24, 8), 6) for i in range(3)}
    groups, front = grouping.qcqa_search(grams, budget=7, equal=False, population=16, generations=30, seed=0)
    fronts = [grouping.qcqa_layer_front(grams[i], False, 16, 30, random.Random(0)) for i in range(3)]
    best = min(sum(p[1] for p in combo) for combo in itertools.product(*fronts) if sum(p[0] for p in combo) <= 7)
    chosen = [p for p in front if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kv_heads"] <= 7
    assert chosen[0]["wse"] == pytest.approx(best, rel=1e-9)
    assert sum(grouping.weight_sharing_error(grams[i], groups[i]) for i in range(3)) == pytest.approx(best)
    heads = [p["kv_heads"] for p in front]
    assert heads == sorted(heads) and all(
        a["wse"] > b["wse"] for a, b in zip(front, front[1:], strict=False)
    )  # a Pareto front


def test_nsga2_fronts_and_crowding():
    points = [(1, 5), (2, 3), (3, 1), (2, 4), (4, 4), (1, 5)]
    assert grouping.non_dominated_fronts(points) == [[0, 1, 2, 5], [3], [4]]
    crowd = grouping.crowding_distances(points, [0, 1, 2])
    assert crowd[0] == crowd[2] == float("inf") and crowd[1] == pytest.approx(2 / 2 + 4 / 4)


def _twin_heads(model, H):
    """K/V heads 2j and 2j+1 made identical in every layer: pooling those pairs loses nothing."""
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.mixer.k_proj, layer.mixer.v_proj):
                w = proj.weight.view(H // 2, 2, -1, proj.weight.shape[1])
                w[:, 1] = w[:, 0]
    return model


@pytest.mark.parametrize("uneven", [False, True])
def test_qcqa_conversion_finds_lossless_pairs_and_writes_its_front(uneven):
    model = _twin_heads(build_model(MHA8).double().eval(), 8)  # (exact to float64's rounding)
    report = {}
    spec = {"to": "gqa", "method": "qcqa", "n_kv_heads": 4, "uneven": uneven, "population": 16, "generations": 20}
    qcqa = convert_model(model, spec, report=report).eval()
    assert qcqa.kv_footprint().bytes_per_token * 2 == model.kv_footprint().bytes_per_token
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert (qcqa(ids) - model(ids)).abs().max() <= 1e-12  # the twins found and pooled, in every layer
    front = report["qcqa_front"]
    json.dumps(front)  # what the run writes beside itself
    chosen = next(p for p in front if p["chosen"])
    assert chosen["wse"] == pytest.approx(0, abs=1e-9) and chosen["kv_bytes_per_token_bf16"] == 3 * 4 * 2 * 8 * 2
    same = convert_model(model, {**spec, "n_kv_heads": 8}).eval()  # the whole budget: the twins pooled at no loss
    with torch.no_grad():
        assert (same(ids) - model(ids)).abs().max() <= 1e-12


def test_asymgqa_search_only_keeps_improvements():
    model = build_model(MHA8).eval()
    ids = torch.randint(0, 97, (4, 17))
    report = {}
    spec = {"to": "gqa", "method": "asymgqa", "n_kv_heads": 2, "uneven": True, "iterations": 12, "seed": 1}
    converted = convert_model(model, spec, calibration=ids, report=report).eval()
    losses = report["asymgqa_losses"]
    assert len(losses) == 13 and all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    with torch.no_grad():  # the returned grouping is the one whose loss was recorded last
        assert converted(ids[:, :-1], labels=ids[:, 1:]).item() == pytest.approx(losses[-1], rel=1e-6)
    assert all(m.n_kv_heads == 2 for m in converted.config.layer_mixers)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "qcqa", "n_kv_heads": 9}, "n_kv_heads=9 is more than layer 0's 8"),
        ({"method": "asymgqa", "n_kv_heads": 3}, "must be at most layer 0's 8 K/V heads and divide them"),
        ({"method": "mean", "n_kv_heads": 2, "generations": 5}, "convert.generations is a setting of method=qcqa"),
        ({"method": "qcqa", "n_kv_heads": 2, "population": 0}, "convert.population"),
        ({"method": "first", "n_kv_heads": 2, "uneven": True}, "needs method=similarity, qcqa or asymgqa"),
    ],
)
def test_impossible_searches_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        convert_model(build_model(MHA8), {"to": "gqa", **spec}, calibration=torch.randint(0, 97, (2, 9)))


def test_linkage_hierarchy_merges_the_most_alike_clusters_level_by_level():
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    similarity = features @ features.T
    levels = grouping.linkage_hierarchy(similarity)
    assert sorted(levels) == list(range(1, 7)) and levels[6] == [[h] for h in range(6)] and levels[1] == [[*range(6)]]
    for n in range(6, 1, -1):  # level n - 1 is level n with its two most alike clusters (mean similarity) merged
        pairs = itertools.combinations(levels[n], 2)
        a, b = max(pairs, key=lambda p: similarity[p[0]][:, p[1]].mean().item())
        expected = sorted([c for c in levels[n] if c not in (a, b)] + [sorted(a + b)])
        assert levels[n - 1] == expected


def test_allocate_heads_is_the_brute_force_optimum():
    rng = random.Random(0)
    costs = [sorted((rng.random() for _ in range(h)), reverse=True) for h in (4, 3, 5, 2)]
    for total in range(4, 15):
        best = min(
            (c for c in itertools.product(*(range(1, len(c) + 1) for c in costs)) if sum(c) == total),
            key=lambda counts: sum(costs[layer][n - 1] for layer, n in enumerate(counts)),
        )
        chosen = grouping.allocate_heads(costs, total)
        assert sum(chosen) == total
        assert sum(costs[i][n - 1] for i, n in enumerate(chosen)) == pytest.approx(
            sum(costs[i][n - 1] for i, n in enumerate(best)))  # fmt: skip
    with pytest.raises(ValueError, match="15 heads cannot be spread over 4 layers of at most 14"):
        grouping.allocate_heads(costs, 15)


def test_pareto_of_two_objectives_sweeps_to_the_first_front_with_ties_and_duplicates():
    """The sort-and-sweep front equals NSGA-II's first front by pairwise comparison (the reference), in the same
    order, on points full of equal objectives; more objectives take the pairwise path."""
    import random

    rng = random.Random(0)
    for n in range(1, 80):
        for width in (2, 3):
            points = {i: (tuple(float(rng.randint(0, 5)) for _ in range(width)), i) for i in range(n)}
            items = list(points.values())
            first = grouping.non_dominated_fronts([objectives for objectives, _ in items])[0]
            assert grouping.pareto(points) == sorted((items[i] for i in first), key=lambda item: item[0])
