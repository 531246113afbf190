"""RecurFormer (Yan et al. 2024): the conversion that replaces a trained model's recency-aware attention
heads by Mamba, keeping the other heads' weights. Its layer against a float64 transcription: tests/layers/
test_parallel.py (combine: concat)."""

from __future__ import annotations

import pytest
import torch

from kvlab.archs.convert import convert_model, recurformer_recency
from kvlab.archs.model import build_model
from tests.conftest import tiny

WINDOW, T = 4, 24


def _parent():
    """Two GQA layers (4 query heads, 2 K/V heads of 16), float64: every query head uniform (zero queries),
    except layer 1's K/V head 0, whose two query heads read their own keys scaled up: attention on the
    query's own token."""
    parent = build_model(tiny(n_layers=2)).double().eval()
    with torch.no_grad():
        for i, layer in enumerate(parent.layers):
            q, k = layer.mixer.q_proj.weight, layer.mixer.k_proj.weight
            q.zero_()
            if i == 1:
                q[:32] = 3000 * k[:16].repeat(2, 1)
    return parent


def test_recency_is_the_attention_mass_on_the_last_window_positions():
    parent, ids = _parent(), torch.randperm(97)[: 2 * T].view(2, T)
    recency = recurformer_recency(parent, ids, WINDOW)
    uniform = sum(WINDOW / (t + 1) for t in range(WINDOW, T)) / (T - WINDOW)  # t + 1 keys, WINDOW of them near
    torch.testing.assert_close(recency[0], torch.full((2,), uniform, dtype=torch.float64))
    assert float(recency[1][1]) == pytest.approx(uniform) and float(recency[1][0]) > 0.99
    report = {}
    converted = convert_model(parent, {"to": "recurformer", "fraction": 0.25, "window": WINDOW}, ids, report)
    assert report["recurformer"]["replaced"] == [[], [0]] and report["recurformer"]["window"] == WINDOW
    assert converted.config.layer_mixers[0] == parent.config.layer_mixers[0]
    assert converted.config.layer_mixers[1].kind == "parallel"
    threshold = convert_model(parent, {"to": "recurformer", "threshold": 0.9, "window": WINDOW}, ids, report)
    assert report["recurformer"]["replaced"] == [[], [0]] and threshold.config == converted.config


def test_a_parent_with_meta_tokens_is_measured_with_them():
    """Its attention spans the meta tokens before the row (the recency took the row's length alone and failed)."""
    parent = build_model({**_parent().config.to_dict(), "meta_tokens": 2})
    ids = torch.randint(0, 97, (2, T))
    recency = recurformer_recency(parent, ids, WINDOW)
    assert sorted(recency) == [0, 1] and all(((r > 0) & (r < 1)).all() for r in recency.values())
    converted = convert_model(parent, {"to": "recurformer", "fraction": 0.25, "window": WINDOW}, ids)
    assert torch.isfinite(converted(ids)).all()


def test_no_head_replaced_is_the_parent():
    parent, ids = _parent(), torch.randint(0, 97, (2, T))
    for spec in ({"fraction": 0.0, "window": WINDOW}, {"heads": [[], []]}):
        converted = convert_model(parent, {"to": "recurformer", **spec}, ids)
        assert converted.config.layer_mixers == parent.config.layer_mixers
        with torch.no_grad():
            assert torch.equal(converted(ids), parent(ids))


@pytest.mark.parametrize("init", ["values", "fresh"])
def test_the_heads_that_stay_keep_their_weights(init):
    """With the Mamba's gate closed (its z rows zero: silu(0) = 0) the converted model is its parent with the
    replaced heads' values zeroed: the kept heads, their output columns and everything else are the parent's.
    Layer 0 keeps K/V head 0 (a parallel layer), layer 1 has both replaced (a Mamba layer)."""
    parent, ids = _parent(), torch.randint(0, 97, (2, T))
    converted = convert_model(parent, {"to": "recurformer", "heads": [[1], [0, 1]], "init": init})
    ssms = [converted.layers[0].mixer.branches[1], converted.layers[1].mixer]
    assert [ssm.inner for ssm in ssms] == [2 * 16, 4 * 16]  # the replaced query heads' width
    v = [layer.mixer.v_proj.weight for layer in parent.layers]
    from_values = [torch.cat([v[0][16:]] * 2), torch.cat([v[1][:16]] * 2 + [v[1][16:]] * 2)]  # per query head
    for ssm, rows in zip(ssms, from_values, strict=True):
        assert torch.equal(ssm.in_proj.weight[: ssm.inner], rows) == (init == "values")
    with torch.no_grad():
        for ssm in ssms:
            ssm.in_proj.weight[ssm.inner :] = 0
        v[0][16:] = 0
        v[1].zero_()
        torch.testing.assert_close(converted(ids), parent(ids), rtol=1e-12, atol=1e-12)
    assert converted.kv_footprint().bytes_per_token * 4 == parent.kv_footprint().bytes_per_token


@pytest.mark.parametrize(
    "spec,message",
    [
        ({}, "give one of fraction, threshold or heads"),
        ({"fraction": 0.5, "heads": [[], []]}, "give one of fraction, threshold or heads"),
        ({"fraction": 1.5}, "convert.fraction=1.5 must be in [0, 1]"),
        ({"fraction": 0.5}, "needs calibration tokens"),
        ({"heads": [[0]]}, "for each of the 2 layers"),
        ({"heads": [[0, 0], []]}, "convert.heads[0]=[0, 0] must list distinct K/V heads"),
        ({"heads": [[2], []]}, "head 2 is not one of layer 0's 2 K/V heads"),
        ({"heads": [[0], []], "init": "copy"}, "convert.init"),
        ({"heads": [[0], []], "mamba": {"inner": 8}}, "convert.mamba: inner and kind are set by the conversion"),
        ({"heads": [[0], []], "every": 2}, "every"),
    ],
)
def test_bad_conversions_name_the_setting(spec, message):
    with pytest.raises(ValueError) as e:
        convert_model(build_model(tiny(n_layers=2)), {"to": "recurformer", **spec})
    assert message in str(e.value)


def test_only_plain_attention_is_converted():
    with pytest.raises(ValueError, match="layer 1 is not plain attention with its own K/V"):
        convert_model(build_model(tiny(n_layers=2, kv_source=[0, 0])), {"to": "recurformer", "heads": [[0], []]})
    with pytest.raises(ValueError, match="window=3: the calibration rows are 3 tokens"):
        convert_model(build_model(tiny(n_layers=2)), {"to": "recurformer", "fraction": 0.5, "window": 3},
                      torch.randint(0, 97, (1, 3)))  # fmt: skip
