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
