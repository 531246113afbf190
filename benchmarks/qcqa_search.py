"""QCQA's search time at a large model's head counts: the Pareto fronts by sort and sweep (kvlab's) beside the
pairwise comparisons of NSGA-II's fronts (what ``pareto`` used before), in one process, on random head Gram
matrices (the search's cost depends on the layer and head counts, not on the weights).

    python benchmarks/qcqa_search.py [--layers 32] [--heads 32] [--population 32] [--generations 60]
"""

from __future__ import annotations

import argparse
import time

import torch

from kvlab.archs import grouping


def pairwise_pareto(points):
    items = list(points.values())
    front = grouping.non_dominated_fronts([objectives for objectives, _ in items])[0]
    return sorted((items[i] for i in front), key=lambda item: item[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--generations", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    H = args.heads
    grams = {i: grouping.head_gram(torch.randn(H * 16, 64), torch.randn(H * 16, 64), H, None, None)
             for i in range(args.layers)}  # fmt: skip
    budget = args.layers * H // 4
    results = {}
    for label, pareto in (("sort and sweep", grouping.pareto), ("pairwise fronts", pairwise_pareto)):
        grouping.pareto = pareto  # (qcqa_search looks it up in the module)
        start = time.perf_counter()
        groups, front = grouping.qcqa_search(grams, budget, False, args.population, args.generations, 0)
        results[label] = (time.perf_counter() - start, groups, front)
    (fast, groups, front), (slow, groups_before, front_before) = results.values()
    assert groups == groups_before and front == front_before  # the same search, the same choice
    print(f"| {args.layers} layers x {H} heads, population {args.population}, {args.generations} generations | "
          f"{fast:.1f} s | {slow:.1f} s | x{slow / fast:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
