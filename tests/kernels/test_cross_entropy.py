"""The fused, chunked head + cross-entropy equals the plain one: loss and every gradient."""

import pytest
import torch

from kvlab.kernels.cross_entropy import cross_entropy_rows, linear_cross_entropy, linear_cross_entropy_reference
from tests.conftest import rel_error


def _inputs(dtype=torch.float32, ignored=True):
    hidden = torch.randn(3, 29, 48, dtype=dtype, requires_grad=True)
    weight = (torch.randn(101, 48, dtype=dtype) * 0.2).requires_grad_()
    labels = torch.randint(0, 101, (3, 29))
    if ignored:
        labels[:, ::4] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [1, 7, 1000], ids=["row-by-row", "uneven-chunks", "one-chunk"])
def test_loss_and_gradients_equal_the_plain_path(reduction, rows, dtype):
    """In float64 to its rounding (the mean's scale had been rounded to float32, its gradients 1e-8 off)."""
    hidden, weight, labels = _inputs(dtype)
    fused = linear_cross_entropy(hidden, weight, labels, reduction=reduction, rows_per_chunk=rows)
    plain = linear_cross_entropy_reference(hidden, weight, labels, reduction=reduction)
    exact = dtype == torch.float64
    assert rel_error(fused, plain) < (1e-14 if exact else 1e-6)
    scale = torch.tensor(1.7, dtype=dtype)  # the incoming gradient is not always 1
    got = torch.autograd.grad(fused * scale, (hidden, weight))
    expected = torch.autograd.grad(plain * scale, (hidden, weight))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype and rel_error(g, e) < (1e-13 if exact else 1e-5)


def test_a_cpu_loss_walks_cache_sized_chunks_of_at_least_128_rows():
    # 4 MiB of float32 logits per chunk on a CPU, never under 128 rows (cross_entropy._rows_per_chunk)
    chunks = []

    def counting_rows(logits, labels, grad_scale):
        chunks.append(logits.shape[0])
        return cross_entropy_rows(logits, labels, grad_scale)

    for vocab, expected in ((2048, [512, 300]), (16384, [128, 128, 128, 44])):  # 4 MiB is 64 rows of 16384
        hidden = torch.randn(sum(expected), 8, requires_grad=True)
        weight = (torch.randn(vocab, 8) * 0.2).requires_grad_()
        labels = torch.randint(0, vocab, (sum(expected),))
        chunks.clear()
        fused = linear_cross_entropy(hidden, weight, labels, rows_fn=counting_rows)
        assert chunks == expected
        assert rel_error(fused, linear_cross_entropy_reference(hidden, weight, labels)) < 1e-6


def test_bfloat16_matches_the_plain_path_at_its_precision():
    hidden, weight, labels = _inputs(torch.bfloat16)
    fused = linear_cross_entropy(hidden, weight, labels, rows_per_chunk=16)
    plain = linear_cross_entropy_reference(hidden, weight, labels)
    assert rel_error(fused, plain) < 1e-2
    for g, e in zip(
        torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)), strict=False
    ):
        assert g.dtype == torch.bfloat16 and rel_error(g, e) < 2e-2


def test_under_autocast_the_gradients_are_the_plain_paths_at_its_precision():
    """float32 weights under bf16 autocast (trainer.precision=bf16-mixed): loss and gradients as the plain path's under
    the same autocast, to bf16's precision, and as float32's; the weight's gradient float32 as the weight."""
    hidden, weight, labels = _inputs()
    exact = linear_cross_entropy_reference(hidden, weight, labels)
    exact_grads = torch.autograd.grad(exact, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, labels, rows_per_chunk=16)
        plain = linear_cross_entropy_reference(hidden, weight, labels)
    assert rel_error(fused, plain) < 1e-2 and rel_error(fused, exact) < 1e-2
    got = torch.autograd.grad(fused, (hidden, weight))
    for g, p, e in zip(got, torch.autograd.grad(plain, (hidden, weight)), exact_grads, strict=True):
        assert g.dtype == torch.float32 and rel_error(g, p) < 2e-2 and rel_error(g, e) < 2e-2


def test_per_row_losses_without_gradients_and_all_ignored_rows():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        per_row = linear_cross_entropy(hidden, weight, labels, reduction="none", rows_per_chunk=5)
        assert rel_error(per_row, linear_cross_entropy_reference(hidden, weight, labels, reduction="none")) < 1e-6
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    none_asked = torch.full_like(labels, -100)
    loss = linear_cross_entropy(hidden, weight, none_asked)
    assert loss.item() == 0.0 and torch.autograd.grad(loss, hidden)[0].abs().max() == 0


def test_logits_spread_past_exps_range_give_the_plain_paths_loss_and_gradients():
    """A trained model's logits can spread over hundreds (here about 300), below where float32's exp
    underflows: the chunk's softmax is flushed to 0 there (kvlab.kernels.flushed_exp), not slowed, and the
    loss and gradients still equal the plain path's; per-row losses without gradients too."""
    hidden = torch.randn(3, 29, 48, requires_grad=True)
    weight = (torch.randn(101, 48) * 7.0).requires_grad_()
    labels = torch.randint(0, 101, (3, 29))
    with torch.no_grad():
        logits = hidden @ weight.t()
        assert (logits.amax(-1) - logits.amin(-1)).min() > 150
    fused = linear_cross_entropy(hidden, weight, labels, rows_per_chunk=7)
    plain = linear_cross_entropy_reference(hidden, weight, labels)
    assert rel_error(fused, plain) < 1e-6
    for g, e in zip(
        torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)), strict=True
    ):
        assert rel_error(g, e) < 1e-5
    with torch.no_grad():
        per_row = linear_cross_entropy(hidden, weight, labels, reduction="none", rows_per_chunk=7)
        assert rel_error(per_row, linear_cross_entropy_reference(hidden, weight, labels, reduction="none")) < 1e-6


@pytest.mark.parametrize("rows", [7, 1000], ids=["uneven-chunks", "one-chunk"])
def test_soft_capped_logits_give_the_loss_and_gradients_of_their_definition(rows):
    """Gemma 2's final_logit_softcapping, c tanh(z / c), inside the fused loss: float64 against the cross-entropy
    of the capped logits written out."""
    hidden, weight, labels = (t.double() if t.is_floating_point() else t for t in _inputs())
    hidden, weight = hidden.detach().requires_grad_(), (weight.detach() * 10).requires_grad_()
    fused = linear_cross_entropy(hidden, weight, labels, rows_per_chunk=rows, softcap=2.0)
    logits = 2.0 * torch.tanh(hidden @ weight.t() / 2.0)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert rel_error(fused, plain) < 1e-14
    assert rel_error(linear_cross_entropy_reference(hidden, weight, labels, softcap=2.0), plain) < 1e-14
    assert rel_error(linear_cross_entropy(hidden, weight, labels, rows_per_chunk=rows), plain) > 0.1  # it caps
    for g, e in zip(torch.autograd.grad(fused, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)),
                    strict=True):  # fmt: skip
        assert rel_error(g, e) < 1e-13
