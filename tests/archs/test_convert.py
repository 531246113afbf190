import re

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
@pytest.mark.parametrize("qk_norm", [False, True])
def test_pooling_identical_heads_is_exact(method, qk_norm):
    """With Qwen3's query and key norms too (their weights, shared by the heads, carried as they are)."""
    spec = tiny(mixer={**MHA["mixer"], "qk_norm": qk_norm})
    model = build_model(spec).double().eval()  # (exact to float64's rounding)
    with torch.no_grad():  # make heads (0,1) and (2,3) identical in K and V
        for layer in model.layers:
            for proj in (layer.mixer.k_proj, layer.mixer.v_proj):
                w = proj.weight.view(2, 2, 16, 64)
                w[:, 1] = w[:, 0]
            if qk_norm:
                layer.mixer.q_norm.weight.normal_(1.0, 0.3)
                layer.mixer.k_norm.weight.normal_(1.0, 0.3)
    gqa = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": method}).eval()
    assert gqa.config.mixer.n_kv_heads == 2 and gqa.layers[0].mixer.k_proj.weight.shape == (32, 64)
    ids = _ids()
    with torch.no_grad():
        assert (gqa(ids) - model(ids)).abs().max() <= 1e-12


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
        ({"to": "mla_v2"}, "convert.to='mla_v2' is not one of"),
        ({"to": "cla"}, "give one of every (CLA-s) or kv_source"),
        ({"to": "cla", "every": 0}, "convert.every=0"),
        ({"to": "cla", "kv_source": [0, 0, 3, 2]}, "convert.to=cla: kv_source[2]=3"),
        ({"to": "gqa", "n_kv_heads": 2, "groups": 2}, "convert.groups: unknown key"),
        ({"n_kv_heads": 2}, "'to' key"),
    ],
)
def test_bad_conversions_are_named(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_model(build_model(MHA), spec)


def _interleaved_twins(spec):
    """A model whose K/V heads 0 and 2 are identical, and 1 and 3 (so position-based groups are wrong)."""
    model = build_model(spec).eval()
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.mixer, "k_proj"):
                for proj in (layer.mixer.k_proj, layer.mixer.v_proj):
                    w = proj.weight.view(4, 16, 64)
                    w[2], w[3] = w[0], w[1]
                    if proj.bias is not None:
                        b = proj.bias.view(4, 16)
                        b[2], b[3] = b[0], b[1]
    return model


@pytest.mark.parametrize(
    "spec",
    [
        MHA,
        tiny(mixer={"kind": "attention", "n_heads": 8, "n_kv_heads": 4, "head_dim": 16, "qkv_bias": True,
                    "o_bias": True, "output_gate": True}),  # (each query head's gate permuted with it)
        tiny(mixer={"kind": "attention", "n_heads": 4}, kv_sharing={"kind": "cla", "every": 2}),
    ],
    ids=["mha", "gqa-bias-gated", "cla"],
)  # fmt: skip
def test_similarity_groups_alike_heads_and_pools_them_exactly(spec):
    from kvlab.archs.convert import similarity_groups

    model = _interleaved_twins(spec).double()  # (exact to float64's rounding)
    ids = _ids()
    owners = [i for i, layer in enumerate(model.layers) if hasattr(layer.mixer, "k_proj")]
    assert similarity_groups(model, ids, 2) == {i: [[0, 2], [1, 3]] for i in owners}
    similar = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": "similarity"}, calibration=ids).eval()
    by_position = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": "mean"}).eval()
    with torch.no_grad():
        assert (similar(ids) - model(ids)).abs().max() <= 1e-12  # query heads permuted with their K/V heads
        assert (by_position(ids) - model(ids)).abs().max() > 1e-3


def test_similarity_needs_calibration_tokens():
    with pytest.raises(ValueError, match="method=similarity needs calibration tokens"):
        convert_model(build_model(MHA), {"to": "gqa", "n_kv_heads": 2, "method": "similarity"})


def test_weighted_starts_as_mean_pooling_and_folds_exactly():
    from kvlab.archs.convert import fold_kv_merge

    spec = tiny(mixer={"kind": "attention", "n_heads": 4, "qkv_bias": True}, kv_sharing={"kind": "cla", "every": 2})
    model = build_model(spec).double().eval()  # (exact to float64's rounding)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases too
            p.add_(0.02 * torch.randn_like(p))
    weighted = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": "weighted"}).eval()
    mean = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": "mean"}).eval()
    assert weighted.config.mixer.kv_merge == 2 and weighted.layers[0].mixer.k_proj.weight.shape == (64, 64)
    assert weighted.kv_footprint(torch.float32).bytes_per_token == mean.kv_footprint(torch.float32).bytes_per_token
    ids = _ids()
    with torch.no_grad():
        assert (weighted(ids) - mean(ids)).abs().max() <= 1e-12
        for layer in weighted.layers:  # as if uptraining had moved the weights
            if hasattr(layer.mixer, "k_merge"):
                layer.mixer.k_merge.copy_(torch.rand(4, dtype=torch.float64))
                layer.mixer.v_merge.copy_(torch.rand(4, dtype=torch.float64))
        folded = fold_kv_merge(weighted).eval()
        assert folded.config.mixer.kv_merge == 1 and folded.layers[0].mixer.k_proj.weight.shape == (32, 64)
        assert (folded(ids) - weighted(ids)).abs().max() <= 1e-12
        assert (folded(ids) - mean(ids)).abs().max() > 1e-4


def test_weighted_merge_weights_learn():
    weighted = convert_model(build_model(MHA), {"to": "mqa", "method": "weighted"})
    torch.nn.functional.cross_entropy(weighted(_ids()).flatten(0, 1), _ids().flatten()).backward()
    mixer = weighted.layers[0].mixer
    assert mixer.k_merge.grad.abs().sum() > 0 and mixer.v_merge.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fold_kv_merge it first"):
        convert_model(weighted, {"to": "mqa"})


def test_cla_every_1_is_the_identity():
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "qkv_bias": True})).eval()
    same = convert_model(model, {"to": "cla", "every": 1}).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(same(ids), model(ids), atol=0, rtol=0)


@pytest.mark.parametrize("spec", [{"to": "cla", "every": 2}, {"to": "cla", "kv_source": [0, 0, 0, 3]}])
def test_cla_owners_take_the_mean_of_their_readers_and_readers_drop_their_kv(spec):
    """Qwen3's key norms too: the owner's is its readers' mean; the readers keep their query norms."""
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "qkv_bias": True, "qk_norm": True}))
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.k_norm.weight.normal_(1.0, 0.3)
    shared = convert_model(model, spec)
    sources = shared.config.layer_kv_source
    assert sources == ([0, 0, 2, 2] if "every" in spec else [0, 0, 0, 3])
    for owner in set(sources):
        group = [i for i, src in enumerate(sources) if src == owner]
        for proj in ("k_proj", "v_proj"):
            for tensor in ("weight", "bias"):
                want = torch.stack([getattr(getattr(model.layers[i].mixer, proj), tensor) for i in group]).mean(0)
                torch.testing.assert_close(getattr(getattr(shared.layers[owner].mixer, proj), tensor), want)
        want = torch.stack([model.layers[i].mixer.k_norm.weight for i in group]).mean(0)
        torch.testing.assert_close(shared.layers[owner].mixer.k_norm.weight, want)
        for reader in group[1:]:
            assert not hasattr(shared.layers[reader].mixer, "k_proj") and not hasattr(
                shared.layers[reader].mixer, "k_norm"
            )
            assert hasattr(shared.layers[reader].mixer, "q_norm")
    owners = len(set(sources))
    assert shared.kv_footprint().bytes_per_token * 4 == model.kv_footprint().bytes_per_token * owners
    # everything but K/V is carried over unchanged
    assert torch.equal(shared.layers[1].mixer.q_proj.weight, model.layers[1].mixer.q_proj.weight)
    assert torch.equal(shared.layers[3].mlp.down_proj.weight, model.layers[3].mlp.down_proj.weight)


def test_cla_refuses_a_model_that_already_shares():
    with pytest.raises(ValueError, match="already shares K/V"):
        convert_model(build_model(tiny(kv_sharing={"kind": "cla", "every": 2})), {"to": "cla", "every": 2})


WIDE_V = tiny(mixer={"kind": "attention", "n_heads": 4, "v_head_dim": 32})  # value heads twice the keys' width


def test_parents_with_wider_values_or_meta_tokens_convert_exactly_at_full_size():
    """Found by a fuzz of random parents: MHA2MLA and regrouping by similarity took the value heads as wide as the
    key heads, MatryoshkaKV's PCA the calibration as its rows' length without the meta tokens before them."""
    ids = torch.randint(0, 97, (2, 13))
    wide = build_model(WIDE_V).double().eval()
    mla = convert_model(wide, {"to": "mla", "kv_lora_rank": 64, "rope_dims": 16}, calibration=ids).eval()
    alike = convert_model(wide, {"to": "mqa", "method": "similarity"}, calibration=ids).eval()
    mean = convert_model(wide, {"to": "mqa"}).eval()  # one group: the same pool, the query heads reordered
    meta = build_model({**MHA, "meta_tokens": 2}).double().eval()
    matryoshka = convert_model(meta, {"to": "matryoshka", "rank": [16, 16]}, calibration=ids).eval()
    with torch.no_grad():
        assert (mla(ids) - wide(ids)).abs().max() <= 1e-11 and mla.config.mixer.v_head_dim == 32
        assert (alike(ids) - mean(ids)).abs().max() <= 1e-12
        assert (matryoshka(ids) - meta(ids)).abs().max() <= 1e-11


def test_value_residual_parents_convert_where_their_values_allow_and_are_refused_by_name_elsewhere():
    """SVFormer's upper layers have no V projection (they read layer 0's); a regrouping of each layer's heads its
    own way would pair them with layer 0's heads in another order. These crashed with Python errors."""
    ids = torch.randint(0, 97, (2, 13))
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "value_residual": "svformer"}))
    cla = convert_model(model, {"to": "cla", "every": 2})
    torch.testing.assert_close(cla.layers[0].mixer.v_proj.weight, model.layers[0].mixer.v_proj.weight)
    assert torch.isfinite(cla(ids)).all()
    for spec, message in [
        ({"to": "gqa", "n_kv_heads": 2, "method": "similarity"}, "layer 1 reads layer 0's values"),
        ({"to": "matryoshka", "rank": [8, 8]}, "layer 0 has WGQA merge weights, a value residual"),
        ({"to": "dha", "n_k_heads": 2, "n_v_heads": 2}, "layer 0 has value_residual=svformer"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            convert_model(model, spec, calibration=ids)
    with pytest.raises(ValueError, match="value heads are 32 wide, its key heads 16"):
        convert_model(build_model(WIDE_V), {"to": "matryoshka", "rank": [8, 8]}, calibration=ids)


MHA2MLA_PARENTS = {
    "mha": tiny(mixer={"kind": "attention", "n_heads": 4}),
    "gqa": tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2}),
}


@pytest.mark.parametrize("parent", list(MHA2MLA_PARENTS))
def test_mha2mla_keeping_every_rope_pair_at_full_rank_is_the_identity(parent):
    """In float64, to its rounding: the SVD and the converted model keep the parent's precision."""
    model = build_model(MHA2MLA_PARENTS[parent]).double().eval()
    ids = torch.randint(0, 97, (2, 13))
    # keys' no-RoPE rows (none here) + values of all K/V heads: at most d_model = 64 independent rows
    mla = convert_model(model, {"to": "mla", "kv_lora_rank": 64, "rope_dims": 16}, calibration=ids).eval()
    assert mla.config.mixer.kind == "mla" and mla.config.mixer.rope_kv_heads == model.config.mixer.n_kv_heads
    with torch.no_grad():
        assert (mla(ids) - model(ids)).abs().max() <= 1e-11


@pytest.mark.parametrize("parent", list(MHA2MLA_PARENTS))
def test_mha2mla_partial_rope_is_attention_with_the_dropped_pairs_unrotated(parent):
    """At full rank, only partial RoPE changes the function: compare one layer with a textbook reference."""
    from kvlab.archs.convert import mha2mla_rope_pairs
    from kvlab.kernels.attention import attention_reference
    from kvlab.kernels.rope import rope_tables

    model = build_model(MHA2MLA_PARENTS[parent] | {"n_layers": 1}).eval()
    ids = torch.randint(0, 97, (2, 13))
    mla = convert_model(model, {"to": "mla", "kv_lora_rank": 64, "rope_dims": 6}, calibration=ids).eval()
    keep = mha2mla_rope_pairs(model, 6, ids)[0]  # [Hk, 3]
    old = model.layers[0].mixer
    H, Hk, d, T = 4, old.n_kv_heads, 16, 13
    x = torch.randn(2, T, 64)
    q = old.q_proj(x).view(2, T, H, d).transpose(1, 2)
    k = old.k_proj(x).view(2, T, Hk, d).transpose(1, 2)
    v = old.v_proj(x).view(2, T, Hk, d).transpose(1, 2)
    cos, sin = rope_tables(d, old.cfg.rope_theta, T)
    kept = torch.zeros(Hk, d, dtype=torch.bool)
    for g in range(Hk):
        kept[g, keep[g]] = kept[g, keep[g] + d // 2] = True

    def rotate(t, heads_kept):  # RoPE on the kept pairs only
        c = torch.where(heads_kept[:, None], cos, torch.ones_like(cos))
        s = torch.where(heads_kept[:, None], sin, torch.zeros_like(sin))
        return t * c + torch.cat([-t[..., d // 2 :], t[..., : d // 2]], dim=-1) * s

    q = rotate(q, kept.repeat_interleave(H // Hk, dim=0))
    k = rotate(k, kept)
    y = attention_reference(q, k, v, causal=True, scale=d**-0.5)
    want = old.o_proj(y.transpose(1, 2).reshape(2, T, H * d))
    with torch.no_grad():
        torch.testing.assert_close(mla.layers[0].mixer(x), want, atol=1e-5, rtol=1e-5)


def test_mha2mla_keeps_the_pairs_that_carry_the_scores():
    model = build_model(MHA2MLA_PARENTS["gqa"])
    with torch.no_grad():  # K/V head 0 leans on pair 5, head 1 on pair 2 (channels p and p + 8)
        for layer in model.layers:
            for proj, heads in ((layer.mixer.q_proj, 4), (layer.mixer.k_proj, 2)):
                w = proj.weight.view(heads, 16, 64)
                for h in range(heads):
                    p = 5 if h * 2 // heads == 0 else 2
                    w[h, [p, p + 8]] *= 20
    from kvlab.archs.convert import mha2mla_rope_pairs

    for calibration in (None, torch.randint(0, 97, (2, 13))):
        pairs = mha2mla_rope_pairs(model, 2, calibration)
        assert all(p.tolist() == [[5], [2]] for p in pairs.values())


def test_mha2mla_error_falls_with_rank_and_the_cache_is_latent_plus_rope_keys():
    model = build_model(MHA2MLA_PARENTS["mha"]).eval()
    ids = torch.randint(0, 97, (2, 13))
    errors = []
    for rank in (8, 24, 48, 64):
        mla = convert_model(model, {"to": "mla", "kv_lora_rank": rank, "rope_dims": 16}, calibration=ids).eval()
        assert mla.kv_footprint().bytes_per_token == 4 * (rank + 4 * 16) * 2  # 4 layers, bf16
        with torch.no_grad():
            errors.append((mla(ids) - model(ids)).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] <= 1e-4


@pytest.mark.parametrize(
    "spec,convert,message",
    [
        (tiny(mixer={"kind": "attention", "n_heads": 4, "qkv_bias": True}), {}, "the model has biases; MLA has none"),
        (tiny(mixer={"kind": "attention", "n_heads": 4, "rope_dims": 8}), {}, "the model has partial RoPE"),
        (MHA2MLA_PARENTS["mha"], {"rope_dims": 5}, "convert.rope_dims=5 must be even"),
        (MHA2MLA_PARENTS["mha"], {"rope_dims": 32}, "convert.rope_dims=32 must be even and at most the head_dim=16"),
        (tiny(kv_sharing={"kind": "cla", "every": 2}), {}, "unshared"),
        (tiny(mixer={"kind": "attention", "n_heads": 4, "qk_norm": True}), {}, "per-head query and key norms"),
        (tiny(mixer={"kind": "attention", "n_heads": 4, "softmax_scale": 0.2}), {}, "a softmax_scale of its own"),
    ],
    ids=["bias", "partial_rope", "odd", "too_wide", "shared", "qk_norm", "softmax_scale"],
)
def test_mha2mla_refuses_what_it_cannot_convert(spec, convert, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_model(build_model(spec), {"to": "mla", "kv_lora_rank": 16, "rope_dims": 4} | convert)


def test_a_chain_converts_step_by_step():
    """[{to: mqa}, {to: cla, every: 3}]: every layer's K/V heads pooled, then the layers' (the K/V heads MLKV's
    layout shares across layers and heads): the owner's projection is the mean over its layers and heads."""
    from kvlab.archs.convert import calibration_rows

    torch.manual_seed(0)
    model = build_model(tiny(n_layers=6, mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 4}))
    chained = convert_model(model, [{"to": "mqa"}, {"to": "cla", "every": 3}])
    assert chained.config.layer_kv_source == [0, 0, 0, 3, 3, 3] and chained.config.layer_mixers[0].n_kv_heads == 1
    for owner in (0, 3):
        heads = torch.stack([model.layers[i].mixer.k_proj.weight.view(4, 16, 64) for i in range(owner, owner + 3)])
        torch.testing.assert_close(chained.layers[owner].mixer.k_proj.weight, heads.mean(dim=(0, 1)))
    assert chained.kv_footprint().bytes_per_token * 12 == model.kv_footprint().bytes_per_token  # 4 heads, 3 layers
    with pytest.raises(ValueError, match=r"step 2 of 2 \(to: cla\): convert.every"):
        convert_model(model, [{"to": "mqa"}, {"to": "cla", "every": 0}])
    with pytest.raises(ValueError, match="an empty list of conversions"):
        convert_model(model, [])
    similarity = {"to": "gqa", "n_kv_heads": 2, "method": "similarity", "calibration_rows": 5}
    assert calibration_rows([{"to": "mqa"}, similarity]) == 5 and calibration_rows([{"to": "mqa"}]) == 0


def test_key_norms_over_the_projection_pool_with_the_heads():
    """OLMo 2's key norm spans the whole projection: GQA's mean pooling pools its weights as the heads', so twin
    heads convert exactly (the norm's statistic over twins is the pooled heads'); CLA carries it; the rest refuse."""
    olmo = {"kind": "attention", "n_heads": 4, "qk_norm": True, "qk_norm_over": "projection"}
    torch.manual_seed(0)
    model = build_model(tiny(pre_norms=False, post_norms=True, mixer=olmo)).double().eval()
    with torch.no_grad():
        for layer in model.layers:  # K/V heads 0 = 1 and 2 = 3, their key norm weights too (away from 1)
            a = layer.mixer
            a.k_norm.weight.add_(torch.randn_like(a.k_norm.weight))
            for t in (a.k_proj.weight, a.v_proj.weight, a.k_norm.weight):
                heads = t.view(4, 16, *t.shape[1:])
                heads[1], heads[3] = heads[0], heads[2]
    ids = torch.randint(0, 97, (2, 12))
    gqa = convert_model(model, {"to": "gqa", "n_kv_heads": 2}).eval()
    assert gqa.layers[0].mixer.k_norm.weight.shape == (32,)
    with torch.no_grad():
        assert (gqa(ids) - model(ids)).abs().max() <= 1e-12
    assert convert_model(model, {"to": "cla", "every": 2}).config.layer_kv_source == [0, 0, 2, 2]
    with pytest.raises(ValueError, match=r"qk_norm_over: projection, OLMo 2's\), which to: gqa or mqa"):
        convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": "similarity"}, calibration=ids)


def test_uneven_kv_groups_equal_mha_with_the_heads_duplicated():
    """kv_groups [0, 2, 1, 2] over 3 K/V heads is MHA whose K/V heads are copies of those three."""
    uneven = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 3, "kv_groups": [0, 2, 1, 2]}))
    mha = build_model(tiny(mixer={"kind": "attention", "n_heads": 4}))
    state = uneven.state_dict()
    for i in range(4):
        for proj in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.mixer.{proj}.weight"].view(3, 16, 64)
            state[f"layers.{i}.mixer.{proj}.weight"] = w[[0, 2, 1, 2]].reshape(64, 64)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(uneven.eval()(ids), mha.eval()(ids), atol=1e-5, rtol=1e-5)


def test_uneven_similarity_groups_pool_unequal_twins_exactly():
    """K/V heads 0, 1 and 3 are identical, 2 differs: two uneven groups pool exactly, equal ones cannot."""
    model = build_model(MHA).eval()
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.mixer.k_proj, layer.mixer.v_proj):
                w = proj.weight.view(4, 16, 64)
                w[1], w[3] = w[0], w[0]
    ids = torch.randint(0, 97, (2, 13))
    spec = {"to": "gqa", "n_kv_heads": 2, "method": "similarity"}
    uneven = convert_model(model, spec | {"uneven": True}, calibration=ids).eval()
    equal = convert_model(model, spec, calibration=ids).eval()
    assert [m.kv_groups for m in uneven.config.layer_mixers] == [[0, 0, 1, 0]] * 4
    assert uneven.kv_footprint().bytes_per_token * 2 == model.kv_footprint().bytes_per_token
    with torch.no_grad():
        assert (uneven(ids) - model(ids)).abs().max() <= 1e-5
        assert (equal(ids) - model(ids)).abs().max() > 1e-3


def test_uneven_needs_similarity():
    with pytest.raises(ValueError, match="convert.uneven=true needs method=similarity"):
        convert_model(build_model(MHA), {"to": "gqa", "n_kv_heads": 2, "uneven": True})
