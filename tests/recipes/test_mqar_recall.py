"""MQAR acceptance (slow): attention solves a small recall setting that a small fixed-state mixer does not.

Same data, steps and optimiser for both (``benchmarks/mqar.py``, whose
numbers are in ``benchmarks/RESULTS.md``): 4 key-value pairs in 32 tokens,
2-layer d_model-64 models. Attention keeps every pair in its cache;
retention (RetNet's fixed decay) with an 8-wide state per head must squeeze
them into 2 x 8 x 8 numbers per layer, and interference between keys caps
its recall.
"""

import importlib.util

import pytest

from tests.conftest import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("mqar_benchmark", REPO / "benchmarks" / "mqar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_attention_solves_mqar_where_a_small_fixed_state_mixer_does_not():
    bench = _benchmark()
    args = bench.parser().parse_args(
        "--state 8 --d-model 64 --heads 2 --lr 3e-3 --steps 1500 --pairs 4 --seq 32".split()
    )
    attention = bench.train_and_evaluate("attention", args)
    retention = bench.train_and_evaluate("retention", args)
    assert attention["accuracy"] > 0.95
    assert retention["accuracy"] < 0.6
    assert retention["state_bytes"] < attention["state_bytes"] / 16  # the small state is the point
