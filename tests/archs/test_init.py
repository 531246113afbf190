"""Initialisation from per-module seeds: the same weights for the same module names whatever the architecture,
and the same weights whether the model is built in memory or on the meta device first."""

import pytest
import torch

from kvlab import ModelConfig, build_model
from tests.archs.test_decode import VARIANTS
from tests.conftest import PRESETS, preset_dict


def _seeded(model_dict: dict, seed: int, meta: bool = False):
    if meta:
        with torch.device("meta"):
            model = build_model(model_dict)
        model.to_empty(device="cpu")
    else:
        model = build_model(model_dict)
    model.init_weights(seed)
    return model


def test_architectures_share_the_weights_of_the_modules_they_share():
    mha, gqa = build_model(VARIANTS["mha"]), build_model(VARIANTS["gqa"])
    state = torch.get_rng_state()
    mha.init_weights(5)
    gqa.init_weights(5)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    m, g = mha.state_dict(), gqa.state_dict()
    assert m.keys() == g.keys()
    for name, w in m.items():
        if ".k_proj." in name or ".v_proj." in name:  # GQA's 2 K/V heads: the first rows of MHA's 4
            assert g[name].shape[0] == w.shape[0] // 2
            torch.testing.assert_close(g[name], w[: g[name].shape[0]], rtol=0, atol=0)
        else:
            torch.testing.assert_close(g[name], w, rtol=0, atol=0, msg=name)
    # Each module its own draw: no two projections alike, and another seed draws other weights.
    assert not torch.equal(m["layers.0.mixer.q_proj.weight"], m["layers.1.mixer.q_proj.weight"])
    assert not torch.equal(_seeded(VARIANTS["mha"], 6).state_dict()["embed_tokens.weight"], m["embed_tokens.weight"])
    # The init's scales: N(0, init_std), residual outputs by 1/sqrt(2 n_layers).
    std = mha.config.init_std
    assert m["layers.0.mixer.q_proj.weight"].std().item() == pytest.approx(std, rel=0.15)
    assert m["layers.0.mixer.o_proj.weight"].std().item() == pytest.approx(std / (2 * 4) ** 0.5, rel=0.15)


def _check_meta_equals_memory(model_dict: dict) -> None:
    direct, from_meta = _seeded(model_dict, 3), _seeded(model_dict, 3, meta=True)
    tensors = dict(from_meta.named_parameters()) | dict(from_meta.named_buffers())
    for name, t in list(direct.named_parameters()) + list(direct.named_buffers()):  # non-persistent ones too
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_building_on_the_meta_device_first_draws_the_same_model(name):
    _check_meta_equals_memory(VARIANTS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_the_same_model_from_the_meta_device(name):
    _check_meta_equals_memory(ModelConfig.from_dict(preset_dict(name)).to_dict())
