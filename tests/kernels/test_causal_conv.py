"""The causal depthwise convolution against torch's conv1d, across calls and documents."""

import pytest
import torch
import torch.nn.functional as F

from kvlab.kernels.causal_conv import causal_conv1d, token_shift


def torch_conv(x, weight, bias):
    """conv1d with K - 1 zeros of left padding, one group per channel."""
    C, K = weight.shape
    return F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), weight[:, None], bias, groups=C).transpose(1, 2)


def test_matches_torch_conv1d_and_its_gradients():
    x, w, b = (t.requires_grad_() for t in (torch.randn(2, 11, 6), torch.randn(6, 4), torch.randn(6)))
    y, prev = causal_conv1d(x, w, b)
    expected = torch_conv(x, w, b)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(prev, x[:, -3:])
    cotangent = torch.randn_like(y)  # the taps accumulate in place: their gradients must still reach x, w, b
    for got, want in zip(torch.autograd.grad(y, (x, w, b), cotangent),
                         torch.autograd.grad(expected, (x, w, b), cotangent), strict=True):  # fmt: skip
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("grad", [True, False], ids=["padded", "in place"])
def test_split_calls_continue_from_the_state(grad):
    x, w, b = torch.randn(2, 11, 6), torch.randn(6, 4), torch.randn(6)
    prev, parts = None, []
    with torch.set_grad_enabled(grad):  # without a gradient the taps go in place (_taps_in_place)
        for s, e in [(0, 2), (2, 3), (3, 9), (9, 11)]:  # calls shorter and longer than the kernel
            y, prev = causal_conv1d(x[:, s:e], w, b, prev=prev)
            parts.append(y)
    torch.testing.assert_close(torch.cat(parts, dim=1), torch_conv(x, w, b))


@pytest.mark.parametrize("T", [1, 2, 3, 4, 9])
def test_the_in_place_form_is_the_padded_one(T):
    """Without a gradient: the same outputs and state as under autograd, from a strided slice (as Mamba's
    projection gives), with and without a state, documents or a bias, calls shorter than the kernel too."""
    torch.manual_seed(T)
    wide = torch.randn(2, T, 20, dtype=torch.float64)
    x, w, b = wide[..., 3:11], torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    doc_ids = torch.randint(0, 2, (2, T)).cumsum(1)
    for prev in (None, torch.randn(2, 3, 8, dtype=torch.float64)):
        for docs in (None, doc_ids):
            for bias in (None, b):
                want = causal_conv1d(x, w, bias, prev=prev, doc_ids=docs)
                with torch.no_grad():
                    got = causal_conv1d(x, w, bias, prev=prev, doc_ids=docs)
                for g, e in zip(got, want, strict=True):
                    torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_documents_do_not_see_each_other():
    lengths = [2, 5, 1, 4]
    x, w, b = torch.randn(1, 12, 6), torch.randn(6, 4), torch.randn(6)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    y, _ = causal_conv1d(x, w, b, doc_ids=doc_ids)
    with torch.no_grad():
        torch.testing.assert_close(causal_conv1d(x, w, b, doc_ids=doc_ids)[0], y)
    start = 0
    for n in lengths:
        torch.testing.assert_close(y[:, start : start + n], torch_conv(x[:, start : start + n], w, b))
        start += n


def test_token_shift_is_the_previous_token_within_documents():
    x = torch.randn(2, 6, 3)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    shifted, last = token_shift(x, doc_ids=doc_ids)
    want = torch.cat([torch.zeros(2, 1, 3), x[:, :-1]], dim=1)
    want[0, 3] = 0  # the second document starts from nothing
    torch.testing.assert_close(shifted, want)
    torch.testing.assert_close(last, x[:, -1])
    continued, _ = token_shift(x[:, 4:], prev=x[:, 3])
    torch.testing.assert_close(continued, x[:, 3:5])
