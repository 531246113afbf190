"""Value residual: ResFormer mixes layer 0's values in, SVFormer uses them alone."""

import pytest
import torch

from kvlab import ModelConfig, build_model
from tests.conftest import tiny

GQA = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}


def _same_weights(target, source):
    state = {k: v for k, v in source.state_dict().items() if k in target.state_dict()}
    target.load_state_dict(state)
    return target.eval()


def test_resformer_at_mix_0_is_plain_attention_and_at_mix_1_is_svformer():
    plain = build_model(tiny(mixer=GQA)).eval()
    ids = torch.randint(0, 97, (2, 11))
    res0 = _same_weights(build_model(tiny(mixer=GQA | {"value_residual": "resformer", "value_mix": 0.0})), plain)
    res1 = _same_weights(build_model(tiny(mixer=GQA | {"value_residual": "resformer", "value_mix": 1.0})), plain)
    sv = _same_weights(build_model(tiny(mixer=GQA | {"value_residual": "svformer"})), plain)
    assert not hasattr(sv.layers[1].mixer, "v_proj") and hasattr(sv.layers[0].mixer, "v_proj")
    with torch.no_grad():
        torch.testing.assert_close(res0(ids), plain(ids))
        torch.testing.assert_close(res1(ids), sv(ids))
        assert (sv(ids) - plain(ids)).abs().max() > 1e-3


def test_svformer_caches_keys_per_layer_and_one_layer_of_values():
    fp = build_model(tiny(mixer=GQA | {"value_residual": "svformer"})).kv_footprint(torch.bfloat16)
    per_layer = [r.bytes_per_token for r in fp.per_layer]
    assert per_layer == [2 * 2 * 16 * 2] + [2 * 16 * 2] * 3  # K and V in layer 0, K only above


def test_value_residual_needs_matching_attention_in_layer_0():
    mixers = {"I": {"kind": "infini", "n_heads": 4}, "A": GQA | {"value_residual": "svformer"}}
    with pytest.raises(
        ValueError,
        match="layer 1 cannot read layer 0's values: value_residual=svformer needs attention in layer 0, which is "
        "'infini'",
    ):
        ModelConfig.from_dict(tiny(mixer=None, pattern="IA", mixers=mixers))
    mixers = {"A": GQA, "B": GQA | {"n_kv_heads": 1, "value_residual": "resformer"}}
    with pytest.raises(ValueError, match="needs layer 0's n_kv_heads=2, this layer has n_kv_heads=1"):
        ModelConfig.from_dict(tiny(mixer=None, pattern="AB", mixers=mixers))
