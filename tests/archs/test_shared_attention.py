"""Shared Attention (Liao & Vargas 2024): layers that apply an earlier layer's attention probabilities to
their own values; the plan, the cache, the footprint and the conversion from a trained model."""

from __future__ import annotations

import math

import pytest
import torch

from kvlab.archs.convert import attention_similarity, convert_model, sa_span
from kvlab.archs.model import build_model
from tests.conftest import tiny


def _rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama's rotate-half RoPE at positions 0.. of x [B, H, T, d], in x's dtype."""
    d, T = x.shape[-1], x.shape[-2]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
    angles = torch.arange(T, dtype=x.dtype)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * cos + rotated * sin


def _heads(x: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, _ = x.shape
    return (x @ weight.T).view(B, T, heads, -1).transpose(1, 2)


def test_readers_apply_the_source_layers_probabilities_to_their_own_values():
    """Against a float64 transcription of the paper's layer: P_s = softmax(rope(Q_s) rope(K_s)^T / sqrt(d) +
    causal mask), computed by layer s from its own input; a reader r outputs W_o^r concat_h(P_s^h V_r^{g(h)}),
    V_r from its own input (GQA: query head h reads value head h // 2)."""
    model = build_model(tiny(n_layers=4, attention_source=[0, 1, 1, 3])).double().eval()
    assert not hasattr(model.layers[2].mixer, "q_proj") and not hasattr(model.layers[2].mixer, "k_proj")
    inputs, outputs = {}, {}
    for i, layer in enumerate(model.layers):
        layer.mixer.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
        layer.mixer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        model(ids)
    source, reader = model.layers[1].mixer, model.layers[2].mixer
    q = _rope(_heads(inputs[1], source.q_proj.weight, 4))
    k = _rope(_heads(inputs[1], source.k_proj.weight, 2)).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(16)
    probs = scores.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), -math.inf).softmax(-1)
    for layer, mixer in ((1, source), (2, reader)):
        v = _heads(inputs[layer], mixer.v_proj.weight, 2).repeat_interleave(2, dim=1)
        want = (probs @ v).transpose(1, 2).reshape(2, 11, 64) @ mixer.o_proj.weight.T
        torch.testing.assert_close(outputs[layer], want, rtol=1e-10, atol=1e-12)  # in float64 throughout


@pytest.mark.parametrize("settings", [{}, {"window": 5}], ids=["full", "window"])
def test_forming_the_weights_explicitly_computes_what_the_fused_kernels_do(settings):
    """A span of one layer (it gives its weights, nobody reads them) is plain attention: the same logits,
    packed documents included."""
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, **settings})).eval()
    ids = torch.randint(0, 97, (2, 16))
    documents = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    with torch.no_grad():
        fused, fused_packed = model(ids), model(ids, doc_ids=documents, labels=ids)
        for layer in model.layers:
            layer.mixer.shares_attention = True
        explicit, explicit_packed = model(ids), model(ids, doc_ids=documents, labels=ids)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit_packed, fused_packed, rtol=1e-5, atol=1e-5)


def test_decoding_from_the_value_cache_is_the_forward_and_the_cache_is_the_footprint():
    """A sliding window (ring buffers on both sides of the share), GQA values, a reader of every kind of
    position: prefill + decode equal the forward; the cache allocates exactly its footprint."""
    d = tiny(n_layers=4, attention_source=[0, 0, 0, 3], mixer={"kind": "attention", "n_heads": 4,
                                                                "n_kv_heads": 2, "window": 6})  # fmt: skip
    model = build_model(d).eval()
    ids = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    fp = model.kv_footprint(torch.float32)
    # two value-only layers: 2 heads x 16 of 4 bytes; the other two keep keys as well
    assert [r.bytes_per_token for r in fp.per_layer] == [256, 128, 128, 256]
    assert cache.allocated_bytes() == 2 * fp.total_bytes(20)
    torch.testing.assert_close(model.generate(ids[:, :4], 8), model.generate(ids[:, :4], 8, compile=False))


def test_under_streaming_llms_cache_readers_apply_the_weights_to_their_values_at_the_kept_positions():
    """Sinks 2 and a window of 4: the source's probabilities over the positions it keeps (the sinks, the window)
    applied to the reader's values of the same positions. (The reader caches values alone, and turning its
    sinks' keys, of no channels, failed.)"""
    from kvlab.layers.base import StepState

    model = build_model(tiny(n_layers=3, attention_source=[0, 1, 1])).double().eval()
    policy = {"kind": "sinks", "sinks": 2, "window": 4}
    published, inputs = [], []
    publish = StepState.publish
    reader = model.layers[2].mixer
    reader.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    outputs = []
    reader.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    ids = torch.randint(0, 97, (2, 12))

    def recording(state, what, layer, value):
        if what == "attention":
            published.append(value)
        return publish(state, what, layer, value)

    cache = model.new_cache(2, 12, dtype=torch.float64, policy=policy)
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(StepState, "publish", recording)
        for t in range(12):
            model(ids[:, t : t + 1], cache=cache)
    assert cache.nbytes() == model.kv_footprint(torch.float64, policy=policy).total_bytes(12, batch_size=2)
    values = _heads(torch.cat(inputs, 1), reader.v_proj.weight, 2).repeat_interleave(2, dim=1)  # [B, 4, 12, 16]
    for t in range(12):
        kept = list(range(t + 1)) if t < 6 else [0, 1, *range(t - 3, t + 1)]  # in order: sinks, then the window
        weights = published[t]  # [B, 4, 1, len(kept)]
        assert weights.shape[-1] == len(kept)
        want = (weights @ values[:, :, kept]).transpose(1, 2).reshape(2, 1, 64) @ reader.o_proj.weight.T
        torch.testing.assert_close(outputs[t], want, rtol=1e-10, atol=1e-12)


def test_the_conversion_finds_the_most_alike_span_and_keeps_what_the_parent_computes():
    """Layers 1 and 2 have zero queries, so uniform attention, the others sharp attention: the one pair whose
    distributions agree, the span the search picks; layer 2 then applies layer 1's (equal) weights, and the
    converted model computes exactly what its parent did, with layer 2's query and key projections gone."""
    parent = build_model(tiny(n_layers=4)).double().eval()
    with torch.no_grad():
        for i, scale in enumerate((30.0, 0.0, 0.0, 30.0)):
            parent.layers[i].mixer.q_proj.weight.mul_(scale)
    calibration = torch.randint(0, 97, (3, 12))
    similarity = attention_similarity(parent, calibration)
    assert similarity.shape == (4, 4) and float(similarity[1, 2]) == pytest.approx(1.0, abs=1e-5)
    assert float(similarity[0, 1]) < 0.9 and sa_span(similarity, 1) == [1, 2]
    report = {}
    converted = convert_model(parent, {"to": "sa", "n_shared": 1}, calibration, report)
    assert converted.config.attention_source == [0, 1, 1, 3]
    assert report["sa"]["spans"] == [[1, 2]] and len(report["sa"]["similarity"]) == 4
    assert not hasattr(converted.layers[2].mixer, "k_proj")
    with torch.no_grad():
        torch.testing.assert_close(converted(calibration), parent(calibration))
    assert converted.kv_footprint().bytes_per_token * 8 == parent.kv_footprint().bytes_per_token * 7
    by_hand = convert_model(parent, {"to": "sa", "spans": [[0, 1], [2, 3]]})
    assert by_hand.config.attention_source == [0, 0, 2, 2]
    assert any(hasattr(parent.layers[i].mixer, "k_proj") for i in (1, 3))  # the parent is left as it was
    # Qwen3's query and key norms go with a reader's query and key projections
    qwen3 = build_model(tiny(n_layers=4, mixer={"kind": "attention", "n_heads": 4, "qk_norm": True}))
    reader = convert_model(qwen3, {"to": "sa", "spans": [[0, 1]]}).layers[1].mixer
    assert not any(hasattr(reader, name) for name in ("q_proj", "k_proj", "q_norm", "k_norm"))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"attention_source": [0, 2, 2, 3]}, "attention_source[1]=2: layer 1 cannot read layer 2's attention weights"),
        ({"attention_source": [0, 0, 1, 3]}, "layer 0's itself; point at that layer"),
        ({"attention_source": [0, 0]}, "attention_source has 2 entries"),
        ({"attention_source": [0, 0, 2, 3], "kv_source": [0, 0, 2, 3]}, "reads layer 0's K/V too"),
        ({"attention_source": [0, 0, 2, 3], "pattern": "AB", "mixer": None,
          "mixers": {"A": {"kind": "attention", "n_heads": 4}, "B": {"kind": "attention", "n_heads": 2}}},
         "n_heads=2 differs from the source's n_heads=4"),
        ({"attention_source": [0, 0, 2, 3], "pattern": "RA", "mixer": None,
          "mixers": {"R": {"kind": "retention", "n_heads": 4}, "A": {"kind": "attention", "n_heads": 4}}},
         "its mixer kind 'retention' publishes no attention weights"),
        ({"attention_source": [0, 0, 2, 3], "pattern": "AR", "mixer": None,
          "mixers": {"R": {"kind": "retention", "n_heads": 4}, "A": {"kind": "attention", "n_heads": 4}}},
         "mixer kind 'retention' does not read another layer's attention weights"),
        ({"attention_source": [0, 0, 2, 3], "mixer": {"kind": "attention", "n_heads": 4, "kv_merge": 2}},
         "kv_merge=2 needs keys"),
        ({"layers": [{"mixer": {"kind": "attention", "n_heads": 4}, "attention_from": 3, "repeat": 4}],
          "mixer": None}, "layers (layer 0): layer 0 cannot read layer 3's attention weights"),
    ],
)  # fmt: skip
def test_bad_sharing_names_the_field(changes, message):
    d = tiny(**changes)
    if d.get("mixer") is None:
        d.pop("mixer")
    with pytest.raises(ValueError) as e:
        build_model(d)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"to": "sa"}, "give one of n_shared"),
        ({"to": "sa", "n_shared": 4}, "convert.n_shared=4 must be below n_layers=4"),
        ({"to": "sa", "spans": [[2, 1]]}, "convert.spans[0]=[2, 1] must have first < last"),
        ({"to": "sa", "spans": [[0, 2], [1, 3]]}, "layer 2 lies in two spans"),
        ({"to": "sa", "n_shared": 1}, "needs calibration tokens"),
        ({"to": "sa", "spans": [[0, 1]], "every": 2}, "every"),
    ],
)
def test_bad_conversions_name_the_setting(spec, message):
    with pytest.raises(ValueError) as e:
        convert_model(build_model(tiny()), spec)
    assert message in str(e.value)


@pytest.mark.parametrize("spec", [{"to": "gqa", "n_kv_heads": 1}, {"to": "sa", "spans": [[2, 3]]}])
def test_a_model_sharing_weights_is_not_converted_again(spec):
    with pytest.raises(ValueError, match="layer 1 applies layer 0's attention weights"):
        convert_model(build_model(tiny(attention_source=[0, 0, 2, 3])), spec)
