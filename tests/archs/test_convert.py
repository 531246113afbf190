import pytest
import torch

from kvlab import build_model
from kvlab.archs.convert import convert_model
from tests.conftest import tiny

MHA = tiny(mixer={"kind": "attention", "n_heads": 4})  # 4 query heads, 4 K/V heads of 16


def _ids():
    return torch.randint(0, 97, (2, 13))


@pytest.mark.parametrize("tied", [False, True])
def test_gqa_with_as_many_kv_heads_is_the_identity(tied):
    model = build_model({**MHA, "tie_embeddings": tied}).eval()
    same = convert_model(model, {"to": "gqa", "n_kv_heads": 4, "method": "mean"}).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(same(ids), model(ids))
    if tied:
        assert same.lm_head.weight is same.embed_tokens.weight


@pytest.mark.parametrize("method", ["mean", "first"])
def test_pooling_identical_heads_is_exact(method):
    model = build_model(MHA).eval()
    with torch.no_grad():  # make heads (0,1) and (2,3) identical in K and V
        for layer in model.layers:
            for proj in (layer.mixer.k_proj, layer.mixer.v_proj):
                w = proj.weight.view(2, 2, 16, 64)
                w[:, 1] = w[:, 0]
    gqa = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": method}).eval()
    assert gqa.config.mixer.n_kv_heads == 2 and gqa.layers[0].mixer.k_proj.weight.shape == (32, 64)
    ids = _ids()
    with torch.no_grad():
        assert (gqa(ids) - model(ids)).abs().max() <= 1e-5


def test_mean_pooling_averages_each_group_and_shrinks_the_cache():
    model = build_model(MHA)
    mqa = convert_model(model, {"to": "mqa"})
    k = model.layers[1].mixer.k_proj.weight.view(4, 16, 64)
    torch.testing.assert_close(mqa.layers[1].mixer.k_proj.weight, k.mean(dim=0))
    before = model.kv_footprint(torch.bfloat16).bytes_per_token
    assert mqa.kv_footprint(torch.bfloat16).bytes_per_token * 4 == before
    # The source model is untouched.
    assert model.layers[1].mixer.k_proj.weight.shape == (64, 64)


def test_bias_and_cross_layer_readers_are_converted():
    spec = tiny(mixer={"kind": "attention", "n_heads": 4, "qkv_bias": True}, kv_sharing={"kind": "cla", "every": 2})
    model = build_model(spec)
    gqa = convert_model(model, {"to": "gqa", "n_kv_heads": 2})
    assert gqa.layers[0].mixer.k_proj.bias.shape == (32,)
    assert not hasattr(gqa.layers[1].mixer, "k_proj")
    assert torch.isfinite(gqa(_ids())).all()


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"to": "gqa", "n_kv_heads": 3}, "convert.n_kv_heads=3 must divide"),
        ({"to": "gqa", "n_kv_heads": 2, "method": "median"}, "convert.method='median'"),
        ({"to": "mla"}, "convert.to='mla' is not one of"),
        ({"to": "gqa", "n_kv_heads": 2, "groups": 2}, "convert.groups: unknown key"),
        ({"n_kv_heads": 2}, "'to' key"),
    ],
)
def test_bad_conversions_are_named(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        convert_model(build_model(MHA), spec)
