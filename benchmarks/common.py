"""What the benchmark scripts share: best-of-n timing after a warm-up, rounds of several runs interleaved, waiting
for a GPU's queued work, the relative error they report, and a mean with its 95% interval as a table cell."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvlab.recipes.ablation import mean_interval


def sync() -> None:
    """Wait for the GPU's queued work (kernels run asynchronously to the host); nothing without one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """The best wall-clock seconds of ``repeats`` calls of ``fn``, after one warm-up call (on a GPU, until its
    queued work is done)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def best_interleaved(runners: list[tuple[str, object]], repeats: int) -> tuple[dict[str, float], bool]:
    """The best time of each name over ``repeats`` rounds of ``runners``, in order and back (a name listed more
    than once is timed each time it comes: decode.py's peer, between every preset's runs), and whether an interrupt
    (Ctrl-C, ``timeout -s INT`` in benchmarks/gpu.sh) cut the rounds short: then the best so far (inf: not yet run)."""
    best = {name: float("inf") for name, _ in runners}
    try:
        for r in range(repeats):
            # each round in the other order: a step can run up to 20% slower right after another kind of step
            # (two equal training steps timed in turn, benchmarks/RESULTS.md), so no row always follows the same one
            for name, run in runners[:: 1 if r % 2 == 0 else -1]:
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                best[name] = min(best[name], time.perf_counter() - t0)
    except KeyboardInterrupt:
        return best, True
    return best, False


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of ``a`` from ``b`` relative to ``b``'s largest magnitude (in float64)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def interval_cell(values: list[float], signed: bool = False) -> str:
    """``mean ± half-width`` of the 95% interval (Student's t) of ``values``, the mean alone for one value."""
    mean, half = mean_interval(values)
    return f"{mean:{'+' if signed else ''}.4f}" + ("" if half is None else f" ± {half:.4f}")
