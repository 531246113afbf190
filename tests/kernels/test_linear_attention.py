"""Linear attention with scalar decay: the recurrence, the parallel form and the chunked form agree."""

import pytest
import torch

import kvlab.kernels.linear_attention as kernel_module
from kvlab.kernels.flushed_exp import flushed_exp
from kvlab.kernels.linear_attention import (
    decayed_products,
    linear_attention,
    linear_attention_chunked,
    linear_attention_reference,
    linear_attention_step,
)

B, H, DK, DV = 2, 3, 8, 6


def _inputs(T, dtype=torch.float32, requires_grad=False, vector=False):
    q, k = torch.randn(B, H, T, DK, dtype=dtype), torch.randn(B, H, T, DK, dtype=dtype)
    v = torch.randn(B, H, T, DV, dtype=dtype)
    log_decay = -torch.rand(B, H, T, *([DK] if vector else []), dtype=dtype) * 0.5
    if vector:  # some channels decaying hard, as RWKV's do
        log_decay[..., 0] *= 20
    state = torch.randn(B, H, DK, DV, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, log_decay, state)]


def parallel_form(q, k, v, log_decay, exclusive=False):
    """The parallel form from an empty state: o_t = sum_{s<=t} sum_d q_td k_sd D[t, s, d] v_s, with
    D[t, s] = prod_{s<j<=t} exp(g_j) (RetNet's decay matrix, per key channel); ``exclusive``: s < t, and
    the product stops at t - 1."""
    T = q.shape[2]
    g = log_decay if log_decay.dim() == 4 else log_decay[..., None].expand(*q.shape)
    cum = g.cumsum(2)
    read = cum - g if exclusive else cum
    seen = torch.ones(T, T, dtype=torch.bool).tril(-int(exclusive))[..., None]
    D = (read[..., :, None, :] - cum[..., None, :, :]).masked_fill(~seen, float("-inf")).exp()
    return (q[..., :, None, :] * k[..., None, :, :] * D).sum(-1) @ v


@pytest.mark.parametrize("vector", [False, True])
@pytest.mark.parametrize("exclusive", [False, True])
def test_recurrence_equals_the_parallel_form(vector, exclusive):
    q, k, v, g, _ = _inputs(11, torch.float64, vector=vector)
    out, _ = linear_attention_reference(q, k, v, g, exclusive=exclusive)
    torch.testing.assert_close(out, parallel_form(q, k, v, g, exclusive))


@pytest.mark.parametrize("vector", [False, True])
@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_one_token_step_equals_the_recurrence(vector, exclusive, with_state):
    """The decode step reads its output from the state it finds: the recurrence's output and state, in float64
    to rounding, and in float32 (the compute dtype of lower precisions) from float16 inputs."""
    q, k, v, g, state = _inputs(1, torch.float64, vector=vector)
    state = state if with_state else None
    out, final = linear_attention_step(q, k, v, g, state=state, exclusive=exclusive)
    expected, expected_final = linear_attention_reference(q, k, v, g, state=state, exclusive=exclusive)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, expected_final, rtol=1e-12, atol=1e-12)
    half = [t.half() for t in (q, k, v, g)]
    out, final = linear_attention_step(*half, state=state, exclusive=exclusive)
    assert out.dtype == torch.float16 and final.dtype == torch.float32
    expected, _ = linear_attention_reference(*half, state=state, exclusive=exclusive)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("vector", [False, True])
def test_the_compiled_step_on_a_key_contiguous_state_reduces_the_new_state(vector):
    """Traced (``torch.compile``) over a state held keys-first (``StateSlot``'s key_contiguous), the step takes
    its output as a reduction of the new state, with no matrix product (Inductor fuses it with the update), and
    still gives the recurrence's output and state; a value-contiguous state keeps the product."""
    q, k, v, g, state = _inputs(1, torch.float64, vector=vector)
    expected, expected_final = linear_attention_reference(q, k, v, g, state=state)
    for keys_first in (True, False):
        held = state.mT.contiguous().mT if keys_first else state.clone()
        ops = []

        def capture(gm, example_inputs, ops=ops):
            ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
            return gm

        torch._dynamo.reset()
        out, final = torch.compile(linear_attention_step, backend=capture, fullgraph=True)(q, k, v, g, state=held)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final, expected_final, rtol=1e-12, atol=1e-12)
        assert any("matmul" in op for op in ops) != keys_first, ops


@pytest.mark.parametrize("shared_head", [False, True])
def test_the_chunked_prefill_from_a_key_contiguous_state_keeps_its_layout(shared_head):
    """Without a gradient, a state held keys-first gives the same outputs and final state as a plain one, and the
    final state comes back keys-first (so its copy into the cache is not a transpose)."""
    q, k, v, g, state = _inputs(37)
    if shared_head:
        q, k = q[:, :1], k[:, :1]
    with torch.no_grad():
        out, final = linear_attention_chunked(q, k, v, g, state=state, chunk_size=8)
        out_kf, final_kf = linear_attention_chunked(q, k, v, g, state=state.mT.contiguous().mT, chunk_size=8)
    torch.testing.assert_close(out_kf, out)
    torch.testing.assert_close(final_kf, final)
    assert final_kf.stride(-2) == 1 and final.stride(-1) == 1
    expected, expected_final = linear_attention_reference(q, k, v, g, state=state)
    torch.testing.assert_close(final_kf, expected_final, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_kf, expected, rtol=1e-4, atol=1e-4)


DOCS = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 3 + [2] * 31])


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("decay", ["scalar", "vector", "vector_exclusive"])
def test_chunked_equals_recurrent_outputs_state_and_gradients(chunk_size, with_state, with_docs, decay):
    """37 tokens: never a whole number of chunks of more than one token."""
    q, k, v, g, s0 = _inputs(37, requires_grad=True, vector=decay != "scalar")
    kwargs = {"state": s0 if with_state else None, "doc_ids": DOCS if with_docs else None}
    kwargs["exclusive"] = decay == "vector_exclusive"
    out, state = linear_attention_chunked(q, k, v, g, chunk_size=chunk_size, **kwargs)
    ref_out, ref_state = linear_attention_reference(q, k, v, g, **kwargs)
    assert (out - ref_out).abs().max() <= 1e-4
    assert (state - ref_state).abs().max() <= 1e-4
    with torch.no_grad():  # (a scalar decay computes in place there) the same, the given state untouched
        given = s0.clone()
        inference_out, inference_state = linear_attention_chunked(q, k, v, g, chunk_size=chunk_size, **kwargs)
    torch.testing.assert_close(inference_out, out, atol=1e-5, rtol=1e-5)  # (float32: another order of sums)
    torch.testing.assert_close(inference_state, state, atol=1e-5, rtol=1e-5)
    assert torch.equal(s0, given)
    weights = torch.randn_like(out)
    leaves = (q, k, v, g, s0) if with_state else (q, k, v, g)
    grads = torch.autograd.grad((out * weights).sum() + state.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_state.sum(), leaves)
    for name, got, want in zip("q k v log_decay state".split(), grads, ref_grads, strict=False):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("vector", [False, True])
def test_the_chunked_form_returns_outputs_in_the_inputs_dtype(vector):
    """From bfloat16 inputs, in float32 inside (as the recurrence): outputs in bfloat16, the state in float32."""
    q, k, v, g, _ = _inputs(11, vector=vector)
    half = [t.bfloat16() for t in (q, k, v, g)]
    out, state = linear_attention_chunked(*half, chunk_size=4)
    expected, expected_state = linear_attention_reference(*half)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["reference", "chunked", "step"])
@pytest.mark.parametrize("decay", ["scalar", "vector_exclusive"])
def test_one_q_and_k_head_read_by_every_head_equals_it_copied_to_each(kernel, decay):
    """Mamba-2's single B/C group: q and k [B, 1, T, Dk] broadcast over v's heads, outputs, state and
    gradients (summed over the heads for q and k) as the same head repeated through the reference, float64."""
    T = 1 if kernel == "step" else 37
    q, k, v, g, s0 = _inputs(T, torch.float64, requires_grad=True, vector=decay != "scalar")
    q1, k1 = (t[:, :1].detach().requires_grad_() for t in (q, k))
    kwargs = {"state": s0, "exclusive": decay == "vector_exclusive"}
    if kernel == "chunked":
        out, state = linear_attention_chunked(q1, k1, v, g, chunk_size=8, doc_ids=DOCS, **kwargs)
        with torch.no_grad():
            inference = linear_attention_chunked(q1, k1, v, g, chunk_size=8, doc_ids=DOCS, **kwargs)
        torch.testing.assert_close(inference, (out, state), rtol=1e-10, atol=1e-10)
        kwargs["doc_ids"] = DOCS
    else:
        out, state = (linear_attention_step if kernel == "step" else linear_attention_reference)(q1, k1, v, g, **kwargs)
    ref_out, ref_state = linear_attention_reference(q1.expand(-1, H, -1, -1), k1.expand(-1, H, -1, -1), v, g, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out)
    leaves = (q1, k1, v, g, s0)
    grads = torch.autograd.grad((out * weights).sum() + state.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_state.sum(), leaves)
    for name, got, want in zip("q k v log_decay state".split(), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kernel", [linear_attention_reference, linear_attention_chunked])
@pytest.mark.parametrize("exclusive", [False, True])
def test_documents_start_from_an_empty_state(kernel, exclusive):
    q, k, v, g, _ = _inputs(37, vector=exclusive)
    packed, _ = kernel(q, k, v, g, doc_ids=DOCS, exclusive=exclusive)
    for b in range(B):
        bounds = [0, *(torch.nonzero(DOCS[b, 1:] != DOCS[b, :-1]).flatten() + 1).tolist(), 37]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            alone = parallel_form(*(t[b : b + 1, :, s:e] for t in (q, k, v, g)), exclusive=exclusive)
            assert (packed[b : b + 1, :, s:e] - alone).abs().max() <= 1e-4


def test_any_split_into_calls_carries_the_state():
    q, k, v, g, _ = _inputs(30)
    whole, final = linear_attention(q, k, v, g)
    state, parts = None, []
    for s, e in [(0, 1), (1, 9), (9, 11), (11, 30)]:  # decode-sized and chunk-sized calls
        out, state = linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], g[:, :, s:e], state=state, chunk_size=4)
        parts.append(out)
    assert (torch.cat(parts, dim=2) - whole).abs().max() <= 1e-4
    assert (state - final).abs().max() <= 1e-4


def test_decayed_products_factored_and_pairwise_agree(monkeypatch):
    """Moderate decays take the factored matrix product; the pairwise form (forced here) is the definition."""
    x, y = torch.randn(2, 16, 8, dtype=torch.float64), torch.randn(2, 16, 8, dtype=torch.float64)
    cum = (-torch.rand(2, 16, 8, dtype=torch.float64)).cumsum(1)  # total decay about 8 < FACTORABLE_DECAY
    visible = torch.ones(16, 16, dtype=torch.bool).tril()
    factored = decayed_products(x, y, cum, cum, visible)
    monkeypatch.setattr(kernel_module, "FACTORABLE_DECAY", -1.0)
    pairwise = decayed_products(x, y, cum, cum, visible)
    definition = torch.einsum("td,sd,tsd->ts", x[0], y[0], (cum[0, :, None] - cum[0, None, :]).exp())
    torch.testing.assert_close(factored, pairwise)
    torch.testing.assert_close(pairwise[0], definition * visible)


@pytest.mark.parametrize("strict, with_docs", [(False, False), (True, True)])
def test_blocked_products_match_the_definition_at_any_decay(strict, with_docs):
    """Chunks that decay too hard to factor whole (down to -10 a token per channel, so a chunk's exponents span
    hundreds) are factored block by block: the definition's products, pair by pair, in float64, gradients too; a
    chunk of 21 (blocks of 8, the last padded), a read before its own token's decay (strict) and packed documents."""
    C = 21
    x, y = (torch.randn(2, 3, C, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = -torch.rand(2, 3, C, 5, dtype=torch.float64) * 10
    cum = g.cumsum(2)
    reads = cum - g if strict else cum
    visible = torch.ones(C, C, dtype=torch.bool).tril(-1 if strict else 0)
    if with_docs:
        segment = torch.tensor([0] * 6 + [1] * 10 + [2] * 5)
        visible = visible & (segment[:, None] == segment[None, :])
    got = decayed_products(x, y, reads, cum, visible)
    exponent = (reads[..., :, None, :] - cum[..., None, :, :]).masked_fill(~visible[..., None], float("-inf"))
    want = (x[..., :, None, :] * y[..., None, :, :] * exponent.exp()).sum(-1)
    assert (got - want).abs().max() <= 1e-12
    weights = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), (x, y)),
        torch.autograd.grad((want * weights).sum(), (x, y)),
        strict=True,
    ):
        assert (a - b).abs().max() <= 1e-12


def test_flushed_exp_is_exp_without_subnormals_and_exact_at_minus_infinity():
    """float32 on a CPU: exp to 4e-6 relative above the flush (2^-100), exactly 0 below it and at -inf, never
    a subnormal (which would slow every matrix product it enters); its gradient is exp's. float64: exp itself."""
    x = torch.cat([torch.linspace(-69.0, 0.0, 2001), torch.linspace(-120.0, -70.0, 51), torch.tensor([float("-inf")])])
    x.requires_grad_(True)
    got = flushed_exp(x)
    want = x.detach().double().exp()
    kept = x.detach() > -69.3
    assert ((got.detach().double() - want).abs() / want)[kept].max() < 4e-6
    assert (got[~kept] == 0).all()
    assert not ((got > 0) & (got < torch.finfo(torch.float32).tiny)).any()
    (grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(grad[kept], got.detach()[kept], rtol=1e-6, atol=0)
    spent = x.detach().clone()  # inplace (the loss's spent logits): the same values, over its input
    assert flushed_exp(spent, inplace=True).data_ptr() == spent.data_ptr() and torch.equal(spent, got.detach())
    x64 = x.detach().double()[:-1]
    assert torch.equal(flushed_exp(x64), x64.exp())


@pytest.mark.parametrize("with_docs", [False, True])
def test_chunked_form_under_decays_strong_enough_to_underflow(with_docs):
    """Heads that forget within a few tokens (log decay down to -30 a token, as Mamba-2's dt A can be after
    training): a 16-token chunk spans exponents far below float32's range, whose weights are flushed to 0;
    outputs, state and gradients still agree with the float64 recurrence."""
    q, k, v, g, s0 = _inputs(37, requires_grad=False)
    g = -torch.rand(B, H, 37) * 30.0
    leaves = [t.requires_grad_(True) for t in (q, k, v, g, s0)]
    docs = DOCS if with_docs else None
    out, state = linear_attention_chunked(*leaves[:4], state=leaves[4], doc_ids=docs, chunk_size=16)
    doubled = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_out, ref_state = linear_attention_reference(*doubled[:4], state=doubled[4], doc_ids=docs)
    assert (out.double() - ref_out).abs().max() <= 1e-4 and (state.double() - ref_state).abs().max() <= 1e-4
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum() + state.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weights.double()).sum() + ref_state.sum(), doubled)
    for name, got, want in zip("q k v log_decay state".split(), grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=name)
