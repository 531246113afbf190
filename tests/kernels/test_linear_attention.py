"""Linear attention with scalar decay: the recurrence, the parallel form and the chunked form agree."""

import pytest
import torch

from kvlab.kernels.linear_attention import linear_attention, linear_attention_chunked, linear_attention_reference

B, H, DK, DV = 2, 3, 8, 6


def _inputs(T, dtype=torch.float32, requires_grad=False):
    q, k = torch.randn(B, H, T, DK, dtype=dtype), torch.randn(B, H, T, DK, dtype=dtype)
    v = torch.randn(B, H, T, DV, dtype=dtype)
    log_decay = -torch.rand(B, H, T, dtype=dtype) * 0.5
    state = torch.randn(B, H, DK, DV, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, log_decay, state)]


def parallel_form(q, k, v, log_decay):
    """RetNet's parallel form from an empty state: (Q K^T * D) V with D[t, s] = prod_{s<j<=t} exp(g_j)."""
    T = q.shape[2]
    cum = log_decay.cumsum(-1)
    D = (cum[..., :, None] - cum[..., None, :]).exp() * torch.ones(T, T).tril()
    return ((q @ k.transpose(-1, -2)) * D) @ v


def test_recurrence_equals_the_parallel_form():
    q, k, v, g, _ = _inputs(11, torch.float64)
    out, _ = linear_attention_reference(q, k, v, g)
    torch.testing.assert_close(out, parallel_form(q, k, v, g))


DOCS = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 3 + [2] * 31])


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_docs", [False, True])
def test_chunked_equals_recurrent_outputs_state_and_gradients(chunk_size, with_state, with_docs):
    """37 tokens: never a whole number of chunks of more than one token."""
    q, k, v, g, s0 = _inputs(37, requires_grad=True)
    kwargs = {"state": s0 if with_state else None, "doc_ids": DOCS if with_docs else None}
    out, state = linear_attention_chunked(q, k, v, g, chunk_size=chunk_size, **kwargs)
    ref_out, ref_state = linear_attention_reference(q, k, v, g, **kwargs)
    assert (out - ref_out).abs().max() <= 1e-4
    assert (state - ref_state).abs().max() <= 1e-4
    weights = torch.randn_like(out)
    leaves = (q, k, v, g, s0) if with_state else (q, k, v, g)
    grads = torch.autograd.grad((out * weights).sum() + state.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_state.sum(), leaves)
    for name, got, want in zip("q k v log_decay state".split(), grads, ref_grads, strict=False):
        assert (got - want).abs().max() <= 1e-4, name


@pytest.mark.parametrize("kernel", [linear_attention_reference, linear_attention_chunked])
def test_documents_start_from_an_empty_state(kernel):
    q, k, v, g, _ = _inputs(37)
    packed, _ = kernel(q, k, v, g, doc_ids=DOCS)
    for b in range(B):
        bounds = [0, *(torch.nonzero(DOCS[b, 1:] != DOCS[b, :-1]).flatten() + 1).tolist(), 37]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            alone = parallel_form(*(t[b : b + 1, :, s:e] for t in (q, k, v, g)))
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
