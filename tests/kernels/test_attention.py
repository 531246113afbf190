import pytest
import torch

from kvlab.kernels.attention import (
    apply_attention_weights,
    attention,
    attention_reference,
    attention_weights,
    attention_weights_reference,
    position_mask,
    windowed_attention_with_sinks,
)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("masking", ["causal", "window", "none"])
def test_attention_matches_reference(n_heads, n_kv_heads, masking):
    q = torch.randn(2, n_heads, 9, 16, requires_grad=True)
    k = torch.randn(2, n_kv_heads, 9, 16, requires_grad=True)
    v = torch.randn(2, n_kv_heads, 9, 16, requires_grad=True)
    kwargs = {"causal": True} if masking == "causal" else {}
    if masking == "window":
        kwargs["mask"] = position_mask(torch.arange(9), torch.arange(9), window=3)
    out = attention(q, k, v, **kwargs)
    ref = attention_reference(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("grad", [False, True])
def test_causal_with_fewer_queries_than_keys_ends_at_the_last_key(n_kv_heads, grad):
    """A prompt on a filled cache: query i is position S - T + i and sees the keys up to it. Without gradients
    a CPU attends to the cached keys and to the new ones apart and merges the two by their log-sum-exps."""
    import kvlab.kernels.attention as kernels

    T, S, H = 5, 12, 4
    q = torch.randn(2, H, T, 16, requires_grad=grad)
    k, v = (torch.randn(2, n_kv_heads, S, 16, requires_grad=grad) for _ in range(2))
    allowed = position_mask(torch.arange(S - T, S), torch.arange(S))
    scores = q.double() @ k.double().repeat_interleave(H // n_kv_heads, 1).transpose(-1, -2) / 4.0
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double().repeat_interleave(H // n_kv_heads, 1)
    assert kernels._splits_on_cpu(q, k, v) is not grad
    out = attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_reference(q, k, v, causal=True).double(), want, atol=1e-5, rtol=1e-5)
    for window in (3, 2):  # T > 2 * window: block by block, each block's queries against their window's keys
        windowed = position_mask(torch.arange(S - T, S), torch.arange(S), window=window)
        within = scores.masked_fill(~windowed, float("-inf")).softmax(-1) @ v.double().repeat_interleave(
            H // n_kv_heads, 1
        )
        torch.testing.assert_close(
            attention(q, k, v, causal=True, window=window).double(), within, atol=1e-5, rtol=1e-5
        )
    if grad:  # through the mask
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for g, r in zip(grads, torch.autograd.grad(want.sum(), (q, k, v)), strict=True):
            torch.testing.assert_close(g, r.float(), atol=1e-5, rtol=1e-5)


def test_position_mask_is_causal_sliding_window():
    mask = position_mask(torch.arange(10, 13), torch.arange(0, 13), window=4)
    for qi, p in enumerate(range(10, 13)):
        for kp in range(13):
            assert bool(mask[qi, kp]) == (p - 4 < kp <= p)


@pytest.mark.parametrize("mask_shape", [None, (1, 13), (2, 1, 1, 13)])
def test_one_query_per_head_groups_the_query_heads(mask_shape):
    """Decoding's shape: the query heads of each K/V head attend as its queries (no K/V repeated)."""
    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 12)
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
    if mask is not None:
        mask[..., 0] = True
    torch.testing.assert_close(attention(q, k, v, mask=mask), attention_reference(q, k, v, mask=mask))


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("mask_shape", [None, (1, 13), (2, 1, 1, 13), (2, 8, 1, 13)])
def test_a_compiled_steps_one_query_is_fused_loops_over_a_short_cache(monkeypatch, n_kv_heads, mask_shape):
    """Inside a compiled CPU step (as Dynamo traces it), one query per head over a short cache is plain tensor ops
    (_one_query), not SDPA: softmax(q k^T / sqrt(d)) v in float64, per-head masks included, and bf16 in bf16."""
    import kvlab.kernels.attention as kernel

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    taken, fused = [], kernel._one_query
    monkeypatch.setattr(kernel, "_one_query", lambda *args: taken.append(args) or fused(*args))
    q, k, v = (torch.randn(2, h, s, d, dtype=torch.float64) for h, s, d in ((8, 1, 16), (n_kv_heads, 13, 16),
                                                                             (n_kv_heads, 13, 12)))  # fmt: skip
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
    if mask is not None:
        mask[..., 0] = True
    groups = 8 // n_kv_heads  # softmax(q k^T / sqrt(d)) v in float64, each K/V head repeated for its query heads
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) / 4.0
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    expected = scores.softmax(-1) @ v.repeat_interleave(groups, 1)
    torch.testing.assert_close(attention(q, k, v, mask=mask), expected, rtol=1e-12, atol=1e-12)
    assert len(taken) == 1
    half = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask=mask)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, atol=2e-2, rtol=2e-2)
    # past the short cache SDPA's kernel takes it
    long = torch.randn(2, n_kv_heads, kernel.SHORT_BATCH_CACHE, 16, dtype=torch.float64)
    attention(q, long, long)
    assert len(taken) == 2


def test_long_sliding_window_runs_block_by_block():
    """T > 2 * window: blocks of queries against the keys in reach, the full attention's values and gradients."""
    q, k, v = (torch.randn(1, 4, 23, 8, requires_grad=True) for _ in range(3))
    out = attention(q, k[:, :2], v[:, :2], causal=True, window=4)
    ref = attention_reference(q, k[:, :2], v[:, :2], causal=True, window=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gap", [0, 9, "first position"], ids=["one run", "sinks then a later run", "a run's start"])
def test_a_window_with_sinks_runs_block_by_block(gap):
    """Sinks beside a window, block by block over keys at ascending positions whose last T are the queries (a sink
    ring's view: 3 sinks, then a run, with or without a gap after the sinks), values wider than keys: against the
    reference with the whole mask (blocks through the reference, and through SDPA, gradients too: Hymba's training
    rows run so, its meta tokens making them longer than two windows)."""
    T, window, sinks = 23, 4, 3
    given = k_pos = torch.arange(sinks + 8 + T)  # 8 held keys before the queries
    if gap == "first position":  # the same run given by its first position
        given = 0
    elif gap:
        k_pos = given = torch.cat([torch.arange(sinks), torch.arange(sinks + gap, sinks + gap + 8 + T)])
    q, k, v = (
        torch.randn(2, h, n, d, requires_grad=True) for h, n, d in ((4, T, 8), (2, len(k_pos), 8), (2, len(k_pos), 16))
    )
    mask = position_mask(k_pos[-T:], k_pos, window, sinks)
    expected = attention_reference(q, k, v, mask=mask, scale=0.3)
    blocks = windowed_attention_with_sinks(attention_reference, q, k, v, given, window, sinks, scale=0.3)
    torch.testing.assert_close(blocks, expected, atol=1e-6, rtol=1e-6)
    fused = windowed_attention_with_sinks(attention, q, k, v, given, window, sinks, scale=0.3)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    for g, r in zip(torch.autograd.grad((fused * weights).sum(), (q, k, v)),
                    torch.autograd.grad((expected * weights).sum(), (q, k, v)), strict=True):  # fmt: skip
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_bf16_training_on_a_cpu_attends_in_float32_over_short_rows(monkeypatch):
    """Gradients wanted, bf16, positions x head size at most BF16_SHORT: SDPA runs on float32 copies (its CPU bf16
    backward is the slower there) under autocast too, and hands back bf16; values and gradients as a float64
    textbook's to bf16's rounding. Without gradients, or over longer rows, SDPA takes the bf16 tensors."""
    import torch.nn.functional as F

    import kvlab.kernels.attention as kernel

    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw)
    )
    q, k, v = (torch.randn(2, h, 12, 16, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, causal=True)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = attention_reference(*wide, causal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(want.square().sum(), wide), strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        attention(q, k, v, causal=True)
    monkeypatch.setattr(kernel, "BF16_SHORT", 12 * 16 - 1)
    attention(q, k, v, causal=True)
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]


def test_narrower_values_are_padded_for_the_fused_kernel():
    """MLA's head sizes (queries and keys wider than values), causal over many tokens: the padded call's
    outputs, cut back to the value width."""
    q, k, v = torch.randn(1, 4, 30, 24), torch.randn(1, 4, 30, 24), torch.randn(1, 4, 30, 16)
    out = attention(q, k, v, causal=True)
    assert out.shape == (1, 4, 30, 16)
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_wider_values_pad_the_queries_and_keys_at_their_own_scale():
    """Hymba's head sizes (values twice the keys' width): zero-padded queries and keys, scaled by the unpadded
    width, against a float64 textbook; a padded row mask too (a prompt on a filled cache), and the gradients."""
    q = torch.randn(2, 4, 12, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 20, 8, requires_grad=True), torch.randn(2, 2, 20, 16, requires_grad=True)
    mask = position_mask(torch.arange(8, 20), torch.arange(20), window=5) & (torch.arange(20) != 3)
    for kwargs, allowed in (
        ({"causal": True}, position_mask(torch.arange(8, 20), torch.arange(20))),
        ({"mask": mask}, mask),
    ):
        scores = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) / 8**0.5
        want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double().repeat_interleave(2, 1)
        out = attention(q, k, v, **kwargs)
        assert out.shape == (2, 4, 12, 16)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        for g, r in zip(
            torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v)), strict=True
        ):
            torch.testing.assert_close(g, r.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masking", ["causal", "window", "documents", "mask"])
def test_attention_weights_match_the_reference_and_give_attention(masking):
    """The probabilities shared by SA layers: the grouped form against the textbook one (values and
    gradients), float64 rows summing to 1, and applied to the values they are attention."""
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 6, dtype=torch.float64)
    kwargs = {
        "causal": {"causal": True},
        "window": {"causal": True, "window": 3},
        "documents": {"doc_ids": torch.tensor([[0] * 4 + [1] * 5, [0] * 9])},
        "mask": {"mask": torch.ones(9, 9, dtype=torch.bool).tril()},
    }[masking]
    weights = attention_weights(q, k, **kwargs)
    ref = attention_weights_reference(q, k, **kwargs)
    torch.testing.assert_close(weights, ref)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))
    for g, r in zip(torch.autograd.grad((weights * ref.detach()).sum(), (q, k)),
                    torch.autograd.grad((ref * ref.detach()).sum(), (q, k)), strict=True):  # fmt: skip
        torch.testing.assert_close(g, r)
    applied = apply_attention_weights(weights, v)  # the reference attention computes in float32
    torch.testing.assert_close(applied, attention_reference(q, k, v, **kwargs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["causal", "long-window", "one-query-over-a-cache", "documents"])
def test_soft_capped_scores_match_a_transcription(case):
    """Gemma 2's attn_logit_softcapping in float64 against its definition, softmax(c tanh(q k^T s / c) + mask) v
    (values and gradients), through the fast path's every route (block by block for a long window, one query
    after a cache), the reference and the shared weights."""
    T, S = (1, 13) if case == "one-query-over-a-cache" else (37, 37)
    q = (torch.randn(2, 4, T, 8, dtype=torch.float64) * 2).requires_grad_()
    k, v = (torch.randn(2, 2, S, 8, dtype=torch.float64) * 2).requires_grad_(), torch.randn(2, 2, S, 8).double()
    kwargs = {"causal": {"causal": True}, "long-window": {"causal": True, "window": 5}, "one-query-over-a-cache": {},
              "documents": {"doc_ids": torch.tensor([[0] * 20 + [1] * 17, [0] * 37])}}[case]  # fmt: skip
    cap, scale = 1.5, 0.3
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * scale
    scores = cap * torch.tanh(scores / cap)
    if case in ("causal", "long-window"):
        qp, kp = torch.arange(T)[:, None], torch.arange(S)[None]
        scores = scores.masked_fill((kp > qp) | (kp <= qp - kwargs.get("window", S)), float("-inf"))
    if case == "documents":
        same = kwargs["doc_ids"][:, :, None] == kwargs["doc_ids"][:, None, :]
        scores = scores.masked_fill(~(same & torch.ones(T, S, dtype=torch.bool).tril())[:, None], float("-inf"))
    want = scores.softmax(-1) @ v.repeat_interleave(2, dim=1)
    plain = attention(q, k, v, scale=scale, **kwargs)  # (uncapped: the cap matters here)
    assert (plain - want).abs().max() > 0.1
    want_grads = torch.autograd.grad(want.sum(), (q, k))
    for got in (
        attention(q, k, v, scale=scale, softcap=cap, **kwargs),
        attention_reference(q, k, v, scale=scale, softcap=cap, **kwargs),
        apply_attention_weights(attention_weights(q, k, scale=scale, softcap=cap, **kwargs), v),
    ):
        torch.testing.assert_close(got, want)
        for g, r in zip(torch.autograd.grad(got.sum(), (q, k)), want_grads, strict=True):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("case", ["causal", "documents", "mask"])
def test_a_long_capped_prefill_goes_block_by_block_as_in_one(case, monkeypatch):
    """Without gradients, capped scores are formed a block of queries at a time: the same output as in one."""
    import kvlab.kernels.attention as module

    q, k, v = torch.randn(2, 4, 23, 8), torch.randn(2, 2, 23, 8), torch.randn(2, 2, 23, 8)
    kwargs = {"causal": {"causal": True}, "documents": {"doc_ids": torch.tensor([[0] * 9 + [1] * 14, [0] * 23])},
              "mask": {"mask": torch.rand(2, 1, 23, 23) < 0.7}}[case]  # fmt: skip
    kwargs.get("mask", torch.ones(1, dtype=torch.bool))[..., 0] = True  # (every row sees a key)
    whole = attention(q, k, v, softcap=1.5, **kwargs)
    monkeypatch.setattr(module, "EXPLICIT_ROWS", 5)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, softcap=1.5, **kwargs), whole)
    torch.testing.assert_close(attention_reference(q, k, v, softcap=1.5, **kwargs), whole)


@pytest.mark.parametrize(
    "case", ["causal", "long-window", "one-query-over-a-cache", "prompt-over-a-cache", "documents", "mask"]
)
def test_sink_logits_match_a_transcription(case):
    """gpt-oss's attention sinks in float64 against their definition, each weight exp(s_j) / (exp(b_h) + sum_i
    exp(s_i)) written out row by row (values and gradients, the sink logits' included), through the fast path's
    every route (the sink as a key in the fused kernels, one query's scores formed), the reference, the weights,
    and the scores formed over many queries (capped scores' route), block by block without gradients."""
    T, S = {"one-query-over-a-cache": (1, 13), "prompt-over-a-cache": (5, 13)}.get(case, (37, 37))
    q = (torch.randn(2, 4, T, 8, dtype=torch.float64) * 2).requires_grad_()
    k, v = (torch.randn(2, 2, S, 8, dtype=torch.float64) * 2).requires_grad_(), torch.randn(2, 2, S, 8).double()
    sinks = torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    kwargs = {"causal": {"causal": True}, "long-window": {"causal": True, "window": 5}, "one-query-over-a-cache": {},
              "prompt-over-a-cache": {"causal": True}, "mask": {"mask": torch.rand(2, 1, T, S) < 0.6},
              "documents": {"doc_ids": torch.tensor([[0] * 20 + [1] * 17, [0] * 37])}}[case]  # fmt: skip
    scale = 0.3
    doc = kwargs.get("doc_ids", torch.zeros(2, S, dtype=torch.long))
    rows = []
    for b in range(2):
        for h in range(4):
            for t in range(T):
                p = t + S - T  # the query's position
                seen = [j for j in range(S) if (not kwargs.get("causal") and "doc_ids" not in kwargs) or (
                    j <= p and j > p - kwargs.get("window", S) and doc[b, j] == doc[b, min(p, S - 1)])]  # fmt: skip
                seen = [j for j in seen if "mask" not in kwargs or kwargs["mask"][b, 0, t, j]]
                e = torch.stack([(q[b, h, t] @ k[b, h // 2, j] * scale).exp() for j in seen] or [q.new_zeros(())])
                rows.append((e[:, None] * v[b, h // 2, seen or [0]]).sum(0) / (sinks[h].exp() + e.sum()))
    want = torch.stack(rows).view(2, 4, T, 8)
    assert (attention(q, k, v, scale=scale, **kwargs) - want).abs().max() > 0.01  # (the sinks matter here)
    want_grads = torch.autograd.grad((want * want.detach()).sum(), (q, k, sinks))
    for got in (
        attention(q, k, v, scale=scale, sink_logits=sinks, **kwargs),
        attention_reference(q, k, v, scale=scale, sink_logits=sinks, **kwargs),
        apply_attention_weights(attention_weights(q, k, scale=scale, sink_logits=sinks, **kwargs), v),
    ):
        torch.testing.assert_close(got, want)
        for g, r in zip(torch.autograd.grad((got * want.detach()).sum(), (q, k, sinks)), want_grads, strict=True):
            torch.testing.assert_close(g, r)
    import kvlab.kernels.attention as module

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "EXPLICIT_ROWS", 5)
        options = [kwargs.get(o) for o in ("mask", "causal", "window", "doc_ids")]
        torch.testing.assert_close(module._explicit_attention(q, k, v, *options, scale, None, sinks), want)
        # (and the fast path without gradients: a prompt over a cache splits in two fused calls there)
        torch.testing.assert_close(attention(q, k, v, scale=scale, sink_logits=sinks, **kwargs), want)
        if T > 1:  # the heads widened to a multiple of 8, as on a GPU (the flash kernels' sizes)
            torch.testing.assert_close(module._sink_as_key(q, k, v, sinks, *options, scale, align=8), want)
