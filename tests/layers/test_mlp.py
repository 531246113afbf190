"""SwiGLU: down(silu(gate(x)) * up(x)), with a gradient and without (where it computes in place)."""

import torch
import torch.nn.functional as F

from kvlab.layers.mlp import SwiGLU


def test_swiglu_is_its_formula_with_and_without_a_gradient():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 40)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mlp.double()
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    want = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    trained = mlp(x)
    assert trained.requires_grad
    given = x.clone()
    with torch.no_grad():
        inferred = mlp(x)
    torch.testing.assert_close(trained.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inferred, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, given)


def test_geglu_and_gelu_mlps_are_their_formulas():
    """GeGLU (Gemma's): tanh's GELU on the gate; the GELU MLP with GPT-NeoX's biases and exact GELU."""
    from kvlab.layers.mlp import GeGLU, GeluMLP

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mlp = GeGLU(16, 40).double()
    want = (
        F.gelu(x @ mlp.gate_proj.weight.T, approximate="tanh") * (x @ mlp.up_proj.weight.T)
    ) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)
    neox = GeluMLP(16, 40, bias=True, approximate="none").double()
    up, down = neox.up_proj, neox.down_proj
    with torch.no_grad():
        up.bias.normal_(), down.bias.normal_()
    exact = F.gelu(x @ up.weight.T + up.bias) @ down.weight.T + down.bias  # erf's GELU
    torch.testing.assert_close(neox(x), exact, rtol=1e-12, atol=1e-12)


def test_gemma_rms_norm_weighs_by_one_plus_its_weight_in_float32():
    """unit_offset: x / rms(x) * (1 + w), in float32 and rounded once (as Gemma): a bf16 weight near 0 keeps its
    digits, which 1 + w held in bf16 would round away."""
    from kvlab.layers.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6, unit_offset=True)
    assert torch.equal(norm.weight, torch.zeros(16))  # initialised to weigh by 1
    with torch.no_grad():
        norm.weight.normal_(std=0.01)
    norm = norm.to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    xf = x.double()
    want = xf / (xf.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * (1 + norm.weight.double())
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= 2**-8 * want.abs().max()  # one bf16 rounding
    rounded = RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        rounded.weight.copy_(1 + norm.weight.float())  # 1 + w in bf16: steps of 1/128
    assert (rounded(x).double() - want).abs().max() > 2 * (got.double() - want).abs().max()
    y, s = norm(x, residual=x)
    assert torch.equal(s, x + x) and torch.equal(y, norm(x + x))
