"""Eviction by attention (H2O, SnapKV): each K/V head keeps its own positions, chosen by the attention they
receive, as a float64 transcription of each paper's code says, step by step; counted exactly; composed with
grouped heads, cross-layer readers and left-padded rows; refused where a layer cannot score."""

import math

import pytest
import torch

from kvlab import build_model
from kvlab.kernels.rope import apply_rope
from kvlab.layers.attention import Attention, AttentionConfig
from kvlab.layers.base import StepState
from kvlab.layers.cache_policy import CachePolicy, EvictingKV
from kvlab.layers.kv_cache import StaticKV
from tests.archs.test_decode import VARIANTS

H2O = {"kind": "h2o", "budget": 5, "window": 2}
SNAPKV = {"kind": "snapkv", "budget": 5, "window": 2, "kernel": 3}
STEPS = [7, 1, 1, 3, 1, 1, 1, 2]  # a prompt, decoding, and a chunk of several tokens after it


def _reference(layer: Attention, x: torch.Tensor, policy: CachePolicy) -> torch.Tensor:
    """The layer's output for x [B, T, d] fed in STEPS through the policy, transcribed in float64 from the
    papers' code: per row and K/V head a list of positions held; H2O (H2OKVCache_LayerWise) adds each step's
    attention to every position's score and keeps the last `window` and the top `budget - window` of the rest;
    SnapKV (SnapKVCluster) on a step of several tokens reaching `budget`: the window's queries' attention summed,
    pooled (zero-padded), the top `budget - window` before the window and the window kept."""
    B, T, _ = x.shape
    H, G, D, Dv = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.v_head_dim
    cos, sin = layer.rotary(0, T)
    q = apply_rope(layer.q_proj(x).view(B, T, H, D).transpose(1, 2), cos, sin)
    k = apply_rope(layer.k_proj(x).view(B, T, G, D).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(B, T, G, Dv).transpose(1, 2)
    out = torch.zeros(B, H, T, Dv, dtype=torch.float64)
    for b in range(B):
        for g in range(G):
            heads = [h for h in range(H) if h // (H // G) == g]
            held, score, start = [], {}, 0
            for t in STEPS:
                new = list(range(start, start + t))
                visible = held + new
                probs = {}  # (head, query) -> {position: probability}
                for h in heads:
                    for i in new:
                        keys = [p for p in visible if p <= i]
                        s = torch.stack([q[b, h, i] @ k[b, g, p] / math.sqrt(D) for p in keys]).softmax(0)
                        out[b, h, i] = sum(w * v[b, g, p] for w, p in zip(s, keys, strict=True))
                        probs[h, i] = dict(zip(keys, s.tolist(), strict=True))
                held = visible
                if policy.kind == "h2o":
                    for p in visible:
                        score[p] = score.get(p, 0.0) + sum(probs[h, i].get(p, 0.0) for h in heads for i in new)
                    if len(visible) > policy.budget:
                        recent = visible[len(visible) - policy.window :]
                        rest = visible[: len(visible) - policy.window]
                        heavy = sorted(rest, key=lambda p: -score[p])[: policy.budget - policy.window]
                        held = sorted(heavy) + recent
                elif t > 1 and len(visible) >= policy.budget:
                    w = min(t, policy.window)
                    prefix = visible[: len(visible) - w]
                    summed = [sum(probs[h, i][p] for h in heads for i in new[-w:]) for p in prefix]
                    r = policy.kernel // 2
                    padded = [0.0] * r + summed + [0.0] * r  # avg_pool1d counts its zero padding
                    window_of = [padded[j : j + policy.kernel] for j in range(len(prefix))]
                    pooled = [sum(c) / policy.kernel if policy.pooling == "avgpool" else max(c) for c in window_of]
                    top = sorted(range(len(prefix)), key=lambda j: -pooled[j])[: policy.budget - w]
                    held = [prefix[j] for j in sorted(top)] + visible[len(visible) - w :]
                start += t
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, H * Dv))


@pytest.mark.parametrize("spec", [H2O, SNAPKV, SNAPKV | {"pooling": "maxpool"}, H2O | {"window": 0}], ids=str)
def test_eviction_decodes_as_a_float64_transcription_of_the_papers_code(spec):
    policy = CachePolicy.from_spec(spec)
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2)
    layer = Attention(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=32).double()
    x = torch.randn(2, sum(STEPS), 32, dtype=torch.float64)
    slot = EvictingKV.like(StaticKV(2, 2, 32, 8, 8, dtype=torch.float64, device="meta"), policy, "cpu")
    outs, start = [], 0
    with torch.no_grad():
        for t in STEPS:
            outs.append(layer(x[:, start : start + t], cache=slot, state=StepState(start=start)))
            start += t
        want = _reference(layer, x, policy)
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=0, atol=1e-12)
    assert slot.count == policy.budget  # SnapKV too: the last step is a chunk of two, which it compresses
    assert slot.view(start).k_pos.shape == (2, 2, slot.count)  # positions per row and head


@pytest.mark.parametrize("spec", [H2O, SNAPKV], ids=str)
def test_a_budget_with_room_for_every_token_is_bitwise_the_plain_cache(spec):
    model = build_model(VARIANTS["gqa"]).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        plain, roomy = model.new_cache(2, 12), model.new_cache(2, 12, policy=spec | {"budget": 12})
        assert all(type(a) is type(b) for a, b in zip(plain.slots, roomy.slots, strict=True))
        for cache in (plain, roomy):
            steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
            cache.out = torch.cat(steps, 1)
    assert torch.equal(plain.out, roomy.out)


def test_h2os_footprint_counts_its_scores_in_the_caches_compute_dtype():
    """A float64 cache keeps H2O's scores in float64: the footprint counted them as float32."""
    model = build_model(VARIANTS["gqa"]).double().eval()
    fp = model.kv_footprint(torch.float64, policy=H2O)
    cache = model.new_cache(2, 20, dtype=torch.float64, policy=H2O)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 12)), cache=cache)
    assert cache.nbytes() == fp.total_bytes(12, batch_size=2)


@pytest.mark.parametrize("name", ["gqa", "uneven_groups_cla", "yoco_swa"])
def test_snapkv_holds_its_budget_after_a_prompt_then_every_decoded_token(name):
    model = build_model(VARIANTS[name]).eval()
    fp = model.kv_footprint(torch.float32, policy=SNAPKV)
    cache = model.new_cache(2, 20, dtype=torch.float32, policy=SNAPKV)
    # what a decoded token adds: the evicting layers' bytes per token (windows of the layers' own are full)
    per_token = sum(r.bytes_per_token for r in fp.per_layer if r.max_tokens == SNAPKV["budget"])
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        model(ids[:, :12], cache=cache)
        assert cache.nbytes() == fp.total_bytes(12, batch_size=2)  # a prompt of 12 kept as 5 per head
        for t in range(12, 16):
            model(ids[:, t : t + 1], cache=cache)
            assert cache.nbytes() == fp.total_bytes(12, batch_size=2) + (t - 11) * per_token * 2  # 2 rows


@pytest.mark.parametrize(
    "name, spec",
    [("cla2", H2O), ("cla2", SNAPKV), ("hymba", SNAPKV)],  # cla2: readers of the owners' kept positions too
    ids=["cla2-h2o", "cla2-snapkv", "hymba-snapkv"],
)
def test_padded_rows_keep_and_decode_what_each_row_does_alone(name, spec):
    """Hymba's meta tokens come before a row's pads: SnapKV pools each row's attention as if its pads were not
    between them and its tokens (they were, and a padded row kept other positions: 0.16 off in the logits)."""
    model = build_model(VARIANTS[name]).eval()
    rows = [torch.randint(0, 97, (n,)) for n in (9, 4, 7)]
    ids, mask = model.left_padded(rows, pad_id=1)
    new = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        cache = model.new_cache(3, ids.shape[1] + 5, policy=spec)
        steps = [model(ids, cache=cache, attention_mask=mask)[:, -1:]]
        steps += [model(new[:, t : t + 1], cache=cache) for t in range(5)]
        for b, row in enumerate(rows):
            alone = model.new_cache(1, len(row) + 5, policy=spec)
            want = [model(row[None], cache=alone)[:, -1:]] + [model(new[b : b + 1, t : t + 1], cache=alone)
                                                               for t in range(5)]  # fmt: skip
            torch.testing.assert_close(torch.cat(steps, 1)[b], torch.cat(want, 1)[0], rtol=1e-5, atol=1e-5)


def test_generate_decodes_an_eviction_eagerly_and_the_static_step_refuses_it():
    model = build_model(VARIANTS["gqa"]).eval()
    ids = torch.randint(0, 97, (2, 8))
    out = model.generate(ids, max_new_tokens=6, compile=True, cache_policy=H2O)
    assert out.shape == (2, 14) and torch.equal(out[:, :8], ids)
    with pytest.raises(ValueError, match="h2o: its positions held differ by head and step"):
        model.decode_step(ids[:, :1], model.new_cache(2, 16, policy=H2O), torch.tensor(0))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "h2o", "budget": 0}, "h2o: budget=0 must be a count of positions"),
        ({"kind": "h2o", "budget": 8, "window": 9}, r"h2o: window=9 \(recent tokens\) must be from 0 to 8"),
        ({"kind": "snapkv", "budget": 8, "window": 8}, "snapkv: window=8 .* must be from 1 to 7"),
        ({"kind": "snapkv", "kernel": 4}, "kernel=4 must be an odd width"),
        ({"kind": "snapkv", "pooling": "mean"}, "pooling='mean' is not one of avgpool, maxpool"),
        ({"kind": "int8", "budget": 8}, "budget is a setting of h2o, snapkv, not of int8"),
    ],
)
def test_bad_eviction_settings_are_refused_naming_what_is_valid(spec, message):
    with pytest.raises(ValueError, match=message):
        CachePolicy.from_spec(spec)


@pytest.mark.parametrize(
    "name, message",
    [
        ("dha_cla", "layer 0 groups its values apart from its keys"),
        ("lckv", "layer 1 reads the K/V of the later layer 3"),
        ("mla", "layer 0 caches a latent per token"),
        ("mamba2", "no layer of this model caches keys and values per token .its mixers: mamba2"),
    ],
)
def test_layers_that_cannot_score_are_refused_naming_the_layer(name, message):
    model = build_model(VARIANTS[name])
    for attempt in (lambda: model.new_cache(1, 8, policy=H2O), lambda: model.kv_footprint(policy=SNAPKV)):
        with pytest.raises(ValueError, match=message):
            attempt()


@pytest.mark.parametrize("prompt, chunk", [(0, 1), (7, 1), (7, 3)])
def test_the_decoded_validation_loss_reads_every_token_once_after_its_prompt(prompt, chunk):
    from kvlab.recipes.evals import cached_val_loss

    model = build_model(VARIANTS["gqa"]).eval()
    ids = torch.randint(0, 97, (2, 12))
    batch = {"input_ids": ids, "labels": torch.randint(0, 97, (2, 12))}
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), batch["labels"].flatten()))
    roomy = CachePolicy.from_spec(SNAPKV | {"budget": 12})  # nothing to compress: the forward's loss
    assert abs(cached_val_loss(model, [batch], roomy, chunk, prompt) - want) < 1e-5
    # SnapKV compresses a prompt of 7 (and chunks of 3) to 5; token by token with no prompt, nothing
    tight = cached_val_loss(model, [batch], CachePolicy.from_spec(SNAPKV), chunk, prompt)
    assert abs(tight - want) > 1e-4 if prompt else abs(tight - want) < 1e-5


def test_a_budget_beyond_the_models_context_is_refused():
    model = build_model(VARIANTS["gqa"])  # max_seq_len 64
    with pytest.raises(ValueError, match="budget=65 is more than the model's max_seq_len=64, so it would never evict"):
        model.new_cache(1, 8, policy={"kind": "snapkv", "budget": 65})
