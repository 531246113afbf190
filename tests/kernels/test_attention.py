import pytest
import torch

from kvlab.kernels.attention import attention, attention_reference, position_mask


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


def test_position_mask_is_causal_sliding_window():
    mask = position_mask(torch.arange(10, 13), torch.arange(0, 13), window=4)
    for qi, p in enumerate(range(10, 13)):
        for kp in range(13):
            assert bool(mask[qi, kp]) == (p - 4 < kp <= p)
