"""The generalised delta rule: chunked form == recurrence, and the delta rule does what it is named for."""

import pytest
import torch
import torch.nn.functional as F

from kvlab.kernels.delta_rule import (
    delta_rule,
    delta_rule_chunked,
    delta_rule_reference,
    gated_delta_rule_chunked,
    gated_delta_rule_reference,
)
from kvlab.kernels.linear_attention import linear_attention_reference

B, H, DK, DV = 2, 3, 8, 6
DOCS = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 3 + [2] * 31])


def _inputs(T, requires_grad=False):
    """RWKV-7's shapes: a = kappa * lr, b = -kappa with kappa unit-norm, decays in (exp(-0.61), 1)."""
    q, k = torch.randn(B, H, T, DK), torch.randn(B, H, T, DK)
    v = torch.randn(B, H, T, DV)
    g = -torch.rand(B, H, T, DK) * 0.6
    kappa = F.normalize(torch.randn(B, H, T, DK), dim=-1)
    a, b = kappa * torch.rand(B, H, T, DK), -kappa
    state = torch.randn(B, H, DK, DV)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g, a, b, state)]


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_docs", [False, True])
def test_chunked_equals_recurrent_outputs_state_and_gradients(chunk_size, with_state, with_docs):
    q, k, v, g, a, b, s0 = _inputs(37, requires_grad=True)
    kwargs = {"state": s0 if with_state else None, "doc_ids": DOCS if with_docs else None}
    out, state = delta_rule_chunked(q, k, v, g, a, b, chunk_size=chunk_size, **kwargs)
    ref_out, ref_state = delta_rule_reference(q, k, v, g, a, b, **kwargs)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)
    weights = torch.randn_like(out)
    leaves = (q, k, v, g, a, b, s0) if with_state else (q, k, v, g, a, b)
    grads = torch.autograd.grad((out * weights).sum() + state.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_state.sum(), leaves)
    for name, got, want in zip("q k v log_decay a b state".split(), grads, ref_grads, strict=False):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.parametrize(
    "chunk_size, with_docs, per_channel", [(4, True, False), (16, False, False), (64, True, False), (16, True, True)]
)
def test_gated_rules_wy_form_equals_the_recurrence(chunk_size, with_docs, per_channel):
    """Gated DeltaNet's rule (one decay per head) and KDA's (one per key channel) in their chunked (WY) form against
    the generalised rule's recurrence (a = -beta k, b = k exp(g), the write beta k): decays down to -8 a token (a
    chunk's far past exp's range), packed documents and a carried state; outputs, state and every gradient, in
    float64."""
    q, k, v, _, _, _, s0 = (t.double() for t in _inputs(37))
    k = F.normalize(k, dim=-1)
    g = -torch.rand(B, H, 37, *([DK] if per_channel else []), dtype=torch.float64) * 8
    beta = torch.rand(B, H, 37, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta, s0)]
    kwargs = {"state": leaves[-1], "doc_ids": DOCS if with_docs else None}
    out, state = gated_delta_rule_chunked(*leaves[:-1], chunk_size=chunk_size, **kwargs)
    ref_out, ref_state = gated_delta_rule_reference(*leaves[:-1], **kwargs)
    assert (out - ref_out).abs().max() <= 1e-12 and (state - ref_state).abs().max() <= 1e-12
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum() + state.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_state.sum(), leaves)
    for name, got, want in zip("q k v log_decay beta state".split(), grads, ref_grads, strict=True):
        assert (got - want).abs().max() <= 1e-11, name


def test_without_the_correction_it_is_linear_attention_with_vector_decay():
    q, k, v, g, a, b, s0 = _inputs(20)
    out, state = delta_rule_reference(q, k, v, g, torch.zeros_like(a), b, state=s0)
    want, want_state = linear_attention_reference(q, k, v, g, state=s0)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(state, want_state)


@pytest.mark.parametrize("kernel", [delta_rule_reference, delta_rule_chunked])
def test_delta_rule_replaces_what_a_key_recalls(kernel):
    """DeltaNet's rule (no decay, a = beta k, b = -k) with beta = 1 and unit keys: reading a key right
    after writing it returns exactly its value, whatever the state held for it before."""
    q, k, v, g, a, b, s0 = _inputs(12)
    k = F.normalize(k, dim=-1)
    out, _ = kernel(k, k, v, torch.zeros_like(g), k, -k, state=s0)
    torch.testing.assert_close(out, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [delta_rule_reference, delta_rule_chunked])
def test_documents_start_from_an_empty_state(kernel):
    q, k, v, g, a, b, _ = _inputs(37)
    packed, _ = kernel(q, k, v, g, a, b, doc_ids=DOCS)
    for row in range(B):
        bounds = [0, *(torch.nonzero(DOCS[row, 1:] != DOCS[row, :-1]).flatten() + 1).tolist(), 37]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            alone, _ = delta_rule_reference(*(t[row : row + 1, :, s:e] for t in (q, k, v, g, a, b)))
            torch.testing.assert_close(packed[row : row + 1, :, s:e], alone, atol=1e-4, rtol=1e-4)


def test_any_split_into_calls_carries_the_state():
    q, k, v, g, a, b, _ = _inputs(30)
    whole, final = delta_rule(q, k, v, g, a, b)
    state, parts = None, []
    for s, e in [(0, 1), (1, 9), (9, 11), (11, 30)]:
        out, state = delta_rule(*(t[:, :, s:e] for t in (q, k, v, g, a, b)), state=state, chunk_size=4)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, final, atol=1e-4, rtol=1e-4)
