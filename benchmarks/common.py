"""What the benchmark scripts share: best-of-n timing after a warm-up, and the relative error they report."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int) -> float:
    """The best wall-clock seconds of ``repeats`` calls of ``fn``, after one warm-up call (on a GPU, until its
    queued work is done: kernels run asynchronously to the host)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of ``a`` from ``b`` relative to ``b``'s largest magnitude (in float64)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))
