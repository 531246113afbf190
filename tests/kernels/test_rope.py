import pytest
import torch

from kvlab.kernels.rope import apply_rope, apply_rope_reference, rope_tables


@pytest.mark.parametrize("head_dim,dims", [(16, 16), (32, 16), (48, 48)])
def test_rope_matches_complex_reference(head_dim, dims):
    x = torch.randn(2, 3, 11, head_dim)
    cos, sin = rope_tables(dims, 10000.0, 64)
    pos = torch.arange(5, 16)
    got = apply_rope(x, cos[pos], sin[pos])
    want = apply_rope_reference(x, pos, dims, 10000.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[..., dims:], x[..., dims:])  # partial rotary passes the rest through


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(32, 500.0, 128)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m, n):
        return (apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum()

    torch.testing.assert_close(score(10, 3), score(107, 100), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 4))


def test_rope_per_sequence_positions():
    cos, sin = rope_tables(8, 10000.0, 32)
    x = torch.randn(2, 2, 4, 8)
    pos = torch.tensor([[0, 1, 2, 3], [7, 8, 0, 1]])
    got = apply_rope(x, cos[pos], sin[pos])
    for b in range(2):
        torch.testing.assert_close(got[b : b + 1], apply_rope(x[b : b + 1], cos[pos[b]], sin[pos[b]]))
