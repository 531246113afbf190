"""Searching for K/V head groupings: QCQA's evolutionary search and AsymGQA's activation-informed one.

A grouping of a layer's ``H`` K/V heads is a list of groups (lists of head
indices, each group sorted, groups ordered by their first head); pooling a
group's heads gives one K/V head of the converted layer. The conversions
that apply a grouping are in ``kvlab.archs.convert``; this module only finds
them.

QCQA (Joshi et al. 2024, "QCQA: Quality and Capacity-aware grouped Query
Attention") finds groupings with NSGA-II (Deb et al. 2002), minimising two
objectives at once: the KV cache (the number of groups) and the
weight-sharing error, WSE, its cheap proxy for the accuracy lost by pooling:

    WSE = sum over groups g, heads h in g of ||W_K^h - mean_g W_K||_F^2 + ||W_V^h - mean_g W_V||_F^2

the squared distance of each head's key and value projection (bias
included) from its group's mean-pooled one. The search has two stages:
(1) per layer, the groupings of every size that trade WSE against groups;
(2) across layers, which of each layer's groupings to use, trading the
summed WSE against the summed cache. QCQA-AC lets groups have arbitrary
sizes (a chromosome labels each head with its group); QCQA-EC keeps them
equal (a permutation of the heads cut into equal runs, and a group count
dividing ``H``). The chosen model is the lowest-WSE point of the second
front within the budget; the whole front is returned for the run to keep.

AsymGQA (Chen et al. 2024, "Optimised Grouped-Query Attention Mechanism for
Transformers"): from a random grouping, repeatedly pick a random head, find
the head outside its group whose activations are most alike (cosine
similarity of keys and values on calibration tokens), and swap the two
(equal sizes) or, for asymmetric groups, move the head into that group;
keep the change when the converted model's loss on the calibration tokens
improves, else undo it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch

Grouping = list[list[int]]


def canonical(labels: Sequence[int]) -> Grouping:
    """Head labels (head h in group labels[h]) -> the grouping, groups ordered by their first head."""
    groups: dict[int, list[int]] = {}
    for head, label in enumerate(labels):
        groups.setdefault(label, []).append(head)
    return sorted(groups.values())


def projection_gram(weight: torch.Tensor, n_heads: int, bias: torch.Tensor | None = None) -> np.ndarray:
    """[H, H] float64 inner products between the heads of one projection (a head's rows, bias included,
    flattened)."""
    rows = weight.detach().double().reshape(n_heads, -1, weight.shape[-1])
    if bias is not None:
        rows = torch.cat([rows, bias.detach().double().reshape(n_heads, -1, 1)], dim=-1)
    flat = rows.reshape(n_heads, -1)
    return (flat @ flat.T).cpu().numpy()


def head_gram(k_weight: torch.Tensor, v_weight: torch.Tensor, n_heads: int, k_bias=None, v_bias=None) -> np.ndarray:
    """[H, H] float64 inner products between heads of their K and V projections together: all that the WSE
    of any grouping needs."""
    return projection_gram(k_weight, n_heads, k_bias) + projection_gram(v_weight, n_heads, v_bias)


def weight_sharing_error(gram: np.ndarray, groups: Grouping) -> float:
    """QCQA's WSE from the heads' Gram matrix: sum_h ||W_h||^2 - sum_g ||sum_{h in g} W_h||^2 / |g|."""
    pooled = sum(gram[np.ix_(g, g)].sum() / len(g) for g in groups)
    return float(np.trace(gram) - pooled)


# -- NSGA-II ------------------------------------------------------------------


def non_dominated_fronts(objectives: Sequence[tuple[float, ...]]) -> list[list[int]]:
    """Indices sorted into Pareto fronts (minimising every objective), the first front first."""
    n = len(objectives)
    dominates = [[] for _ in range(n)]
    dominated_by = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            a, b = objectives[i], objectives[j]
            if all(x <= y for x, y in zip(a, b, strict=True)) and a != b:
                dominates[i].append(j)
                dominated_by[j] += 1
            elif all(y <= x for x, y in zip(a, b, strict=True)) and a != b:
                dominates[j].append(i)
                dominated_by[i] += 1
    fronts, current = [], [i for i in range(n) if dominated_by[i] == 0]
    while current:
        fronts.append(current)
        following = []
        for i in current:
            for j in dominates[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    following.append(j)
        current = following
    return fronts


def crowding_distances(objectives: Sequence[tuple[float, ...]], front: list[int]) -> dict[int, float]:
    """NSGA-II's crowding distance of each member of a front (the ends are infinitely far)."""
    distance = dict.fromkeys(front, 0.0)
    for m in range(len(objectives[front[0]])):
        ordered = sorted(front, key=lambda i: objectives[i][m])
        lo, hi = objectives[ordered[0]][m], objectives[ordered[-1]][m]
        distance[ordered[0]] = distance[ordered[-1]] = float("inf")
        if hi > lo:
            for a, i, b in zip(ordered, ordered[1:], ordered[2:], strict=False):
                distance[i] += (objectives[b][m] - objectives[a][m]) / (hi - lo)
    return distance


def nsga2(
    evaluate: Callable[[object], tuple[float, ...]],
    key: Callable[[object], Hashable],
    initial: list,
    crossover: Callable[[object, object, random.Random], object],
    mutate: Callable[[object, random.Random], object],
    generations: int,
    rng: random.Random,
) -> dict[Hashable, tuple[tuple[float, ...], object]]:
    """NSGA-II (Deb et al. 2002) from ``initial``, keeping its size. Returns every individual evaluated
    (by ``key``, with its objectives), so the caller can take the Pareto front of all it saw."""
    seen: dict[Hashable, tuple[tuple[float, ...], object]] = {}

    def scored(individual):
        k = key(individual)
        if k not in seen:
            seen[k] = (evaluate(individual), individual)
        return seen[k][0]

    size = len(initial)
    population = list(initial)
    for _ in range(generations):
        objectives = [scored(p) for p in population]
        rank, crowd = {}, {}
        for r, front in enumerate(non_dominated_fronts(objectives)):
            crowd.update(crowding_distances(objectives, front))
            rank.update(dict.fromkeys(front, r))

        def tournament(population=population, rank=rank, crowd=crowd):  # binary, by rank then crowding
            a, b = rng.randrange(size), rng.randrange(size)
            return population[min((a, b), key=lambda j: (rank[j], -crowd[j]))]

        offspring = [mutate(crossover(tournament(), tournament(), rng), rng) for _ in range(size)]
        merged = population + offspring
        objectives = [scored(p) for p in merged]
        unique = {key(p): i for i, p in enumerate(merged)}  # duplicates would crowd out the front's spread
        candidates = sorted(unique.values())
        survivors: list[int] = []
        for front in non_dominated_fronts([objectives[i] for i in candidates]):
            members = [candidates[i] for i in front]
            if len(survivors) + len(members) <= size:
                survivors += members
                continue
            crowd = crowding_distances(objectives, members)
            survivors += sorted(members, key=lambda i: -crowd[i])[: size - len(survivors)]
            break
        survivors += [survivors[0]] * (size - len(survivors))  # fewer distinct ones than the population
        population = [merged[i] for i in survivors]
    return seen


def pareto(points: dict[Hashable, tuple[tuple[float, ...], object]]) -> list[tuple[tuple[float, ...], object]]:
    """The non-dominated ``(objectives, individual)`` of ``points``, by the first objective then the second."""
    items = sorted(points.values(), key=lambda item: item[0])
    if not items or len(items[0][0]) != 2:
        return [items[i] for i in sorted(non_dominated_fronts([objectives for objectives, _ in items])[0])]
    # Two objectives, in that order: each point is dominated by an earlier one unless its second objective is
    # below all before it (or it ties the point that set that low exactly). O(n log n) where the fronts' pairwise
    # comparisons took QCQA's search on 32 layers of 32 heads several minutes.
    front, best = [], None
    for item in items:
        if best is None or item[0][1] < best[1] or item[0] == best:
            front.append(item)
            best = item[0]
    return front


# -- QCQA -----------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def qcqa_layer_front(
    gram: np.ndarray, equal: bool, population: int, generations: int, rng: random.Random
) -> list[tuple[int, float, Grouping]]:
    """Stage 1 for one layer: the Pareto front of (groups, WSE) as ``(n_groups, wse, grouping)``,
    fewest groups first. Always holds the MHA point (every head its own group, WSE 0)."""
    H = gram.shape[0]
    counts = divisors(H) if equal else list(range(1, H + 1))
    if equal:  # (permutation of the heads, group count): consecutive runs of H / count heads

        def grouping(ind):
            perm, count = ind
            size = H // count
            return sorted(sorted(perm[i : i + size]) for i in range(0, H, size))

        def random_individual(count):
            return (rng.sample(range(H), H), count)

        def crossover(a, b, rng):  # order crossover of the permutations; the count of either parent
            i, j = sorted(rng.sample(range(H + 1), 2))
            middle = a[0][i:j]
            rest = [h for h in b[0] if h not in middle]
            return (rest[:i] + middle + rest[i:], rng.choice((a[1], b[1])))

        def mutate(ind, rng):
            perm, count = list(ind[0]), ind[1]
            x, y = rng.randrange(H), rng.randrange(H)
            perm[x], perm[y] = perm[y], perm[x]
            if rng.random() < 0.2:
                count = rng.choice(counts)
            return (perm, count)

    else:  # a group label per head: any number of groups of any sizes

        def grouping(ind):
            return canonical(ind)

        def random_individual(count):
            labels = list(range(count)) + [rng.randrange(count) for _ in range(H - count)]
            rng.shuffle(labels)
            return labels

        def crossover(a, b, rng):
            return [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]

        def mutate(ind, rng):
            return [rng.randrange(H) if rng.random() < 1.0 / H else label for label in ind]

    def evaluate(ind):
        groups = grouping(ind)
        return (weight_sharing_error(gram, groups), float(len(groups)))

    def key(ind):
        return tuple(tuple(g) for g in grouping(ind))

    initial = [random_individual(counts[i % len(counts)]) for i in range(population)]
    seen = nsga2(evaluate, key, initial, crossover, mutate, generations, rng)
    for count in counts:  # the neighbour groupings (GQA's) are candidates too, so QCQA never does worse
        size = H // count
        if H % count == 0:
            ind = (list(range(H)), count) if equal else [h // size for h in range(H)]
            seen.setdefault(key(ind), (evaluate(ind), ind))
    return [(int(obj[1]), obj[0], grouping(ind)) for obj, ind in sorted(pareto(seen), key=lambda item: item[0][1])]


def qcqa_search(
    grams: dict[int, np.ndarray],
    budget: int,
    equal: bool,
    population: int,
    generations: int,
    seed: int,
) -> tuple[dict[int, Grouping], list[dict]]:
    """Both stages over the K/V-owning layers ``grams`` (layer -> its heads' Gram matrix).

    ``budget``: the most K/V heads in all, summed over the layers. Returns the chosen grouping per layer
    and stage 2's Pareto front (one dict per point: ``kv_heads``, ``wse``, ``kv_heads_per_layer``,
    ``chosen``), fewest heads first.
    """
    rng = random.Random(seed)
    layers = sorted(grams)
    from tqdm.auto import tqdm

    bar = tqdm(layers, desc="QCQA: each layer's groupings", unit="layer", disable=None)  # (about a second each)
    fronts = {i: qcqa_layer_front(grams[i], equal, population, generations, rng) for i in bar}
    sizes = [len(fronts[i]) for i in layers]

    def evaluate(choice):
        points = [fronts[i][c] for i, c in zip(layers, choice, strict=True)]
        return (sum(p[1] for p in points), float(sum(p[0] for p in points)))

    def crossover(a, b, rng):
        return [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]

    def mutate(choice, rng):
        out = list(choice)
        for n, size in enumerate(sizes):
            if rng.random() < 1.0 / len(sizes):
                out[n] = min(size - 1, max(0, out[n] + rng.choice((-1, 1))))
        return out

    # Start from uniform choices (every layer with the same group count, where its front has it) and random ones.
    initial = []
    for n_groups in sorted({p[0] for i in layers for p in fronts[i]}):
        initial.append([min(range(len(fronts[i])), key=lambda c: abs(fronts[i][c][0] - n_groups)) for i in layers])
    while len(initial) < population:
        initial.append([rng.randrange(size) for size in sizes])
    seen = nsga2(evaluate, tuple, initial, crossover, mutate, generations, rng)
    front = pareto(seen)
    within = [(obj, choice) for obj, choice in front if obj[1] <= budget]
    if not within:
        fewest = min(obj[1] for obj, _ in front)
        raise ValueError(f"QCQA found no grouping within {budget} K/V heads (its fewest: {int(fewest)})")
    best = min(within, key=lambda item: item[0])[1]
    report = [
        {
            "kv_heads": int(obj[1]),
            "wse": obj[0],
            "kv_heads_per_layer": [fronts[i][c][0] for i, c in zip(layers, choice, strict=True)],
            "chosen": choice == best,
        }
        for obj, choice in sorted(front, key=lambda item: item[0][1])
    ]
    return {i: fronts[i][c][2] for i, c in zip(layers, best, strict=True)}, report


# -- AsymGQA ----------------------------------------------------------------------


def asymgqa_search(
    similarity: dict[int, torch.Tensor],
    n_groups: int,
    uneven: bool,
    loss: Callable[[dict[int, Grouping]], float],
    iterations: int,
    seed: int,
) -> tuple[dict[int, Grouping], list[float]]:
    """AsymGQA's search over the layers ``similarity`` (layer -> [H, H] cosine similarity of its heads'
    activations). Returns the grouping per layer and the loss after each iteration (the first: the random
    start's)."""
    rng = random.Random(seed)
    labels = {}
    for i, sim in similarity.items():
        H = sim.shape[0]
        if n_groups > H or (not uneven and H % n_groups):
            raise ValueError(
                f"convert.n_kv_heads={n_groups} must be at most layer {i}'s {H} K/V heads"
                + ("" if uneven else " and divide them (or uneven: true)")
            )
        if uneven:  # random groups of random sizes, none empty
            layer = list(range(n_groups)) + [rng.randrange(n_groups) for _ in range(H - n_groups)]
        else:
            layer = [h * n_groups // H for h in range(H)]
        rng.shuffle(layer)
        labels[i] = layer

    def groupings():
        return {i: canonical(layer) for i, layer in labels.items()}

    from tqdm.auto import tqdm

    best = loss(groupings())
    history = [best]
    layers = sorted(labels)
    for _ in tqdm(range(iterations), desc="AsymGQA: groupings tried", unit="model", disable=None):  # (a forward each)
        i = rng.choice(layers)
        layer, sim = labels[i], similarity[i]
        a = rng.randrange(len(layer))
        others = [h for h in range(len(layer)) if layer[h] != layer[a]]
        if not others:
            history.append(best)
            continue
        b = max(others, key=lambda h: sim[a, h].item())
        old = list(layer)
        if uneven and rng.random() < 0.5 and layer.count(layer[a]) > 1:
            layer[a] = layer[b]  # move a into b's group (asymmetric sizes)
        else:
            layer[a], layer[b] = layer[b], layer[a]  # swap a and b
        trial = loss(groupings())
        if trial < best:
            best = trial
        else:
            labels[i] = old
        history.append(best)
    return groupings(), history


# -- Average linkage and DHA's head budgets ----------------------------------------


def linkage_hierarchy(similarity: torch.Tensor) -> dict[int, Grouping]:
    """Average-linkage clustering of ``H`` heads by ``similarity`` ([H, H]): the grouping into ``n`` clusters
    for every ``n`` from ``H`` down to 1 (each level merges the two most alike clusters of the one above)."""
    clusters = [[h] for h in range(similarity.shape[0])]
    levels = {len(clusters): sorted(clusters)}
    while len(clusters) > 1:
        best, pair = None, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                mean = similarity[clusters[a]][:, clusters[b]].mean().item()
                if best is None or mean > best:
                    best, pair = mean, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
        levels[len(clusters)] = sorted(clusters)
    return levels


def allocate_heads(costs: Sequence[Sequence[float]], total: int) -> list[int]:
    """Heads per layer minimising the summed cost with exactly ``total`` heads in all, by dynamic
    programming; ``costs[l][n - 1]`` is layer ``l``'s cost with ``n`` heads (DHA's per-layer head budgets:
    the cost is the fusion loss of that layer at that count)."""
    most = sum(len(c) for c in costs)
    if not len(costs) <= total <= most:
        raise ValueError(f"{total} heads cannot be spread over {len(costs)} layers of at most {most} heads in all")
    best = {0: (0.0, [])}  # heads used so far -> (least summed cost, counts)
    for layer_costs in costs:
        step = {}
        for used, (cost, counts) in best.items():
            for n, c in enumerate(layer_costs, start=1):
                if used + n <= total and (used + n not in step or cost + c < step[used + n][0]):
                    step[used + n] = (cost + c, [*counts, n])
        best = step
    return best[total][1]
