"""The retention mixer against the paper's parallel form, written out here."""

import math

import pytest
import torch

from kvlab.kernels.rope import apply_rope_reference
from kvlab.layers.retention import Retention, RetentionConfig
from tests.kernels.test_linear_attention import parallel_form


def _layer(**settings) -> Retention:
    cfg = RetentionConfig(n_heads=4, chunk_size=3, **settings)
    cfg.validate(32, "mixer")
    layer = Retention(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64)
    for p in layer.parameters():  # random affine group norm and gate bias too
        torch.nn.init.normal_(p, std=0.3)
    return layer


def textbook_retention(layer: Retention, x: torch.Tensor) -> torch.Tensor:
    """MSR(X) = W_o (swish(X W_G) * GroupNorm(heads of (Q K^T * D) V)), Q and K rotated by position."""
    B, T, _ = x.shape
    H, D, Dv = layer.n_heads, layer.head_dim, layer.v_head_dim
    pos = torch.arange(T)

    def heads(proj, dim):
        return proj(x).view(B, T, H, dim).transpose(1, 2).double()

    q = apply_rope_reference(heads(layer.q_proj, D), pos, D, layer.cfg.rope_theta)
    k = apply_rope_reference(heads(layer.k_proj, D), pos, D, layer.cfg.rope_theta) / math.sqrt(D)
    if layer.cfg.decay == "fixed":
        gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
        log_decay = gamma.log()[None, :, None].expand(B, H, T)
    else:
        logits = layer.gamma_proj(x).double().transpose(1, 2)
        log_decay = torch.sigmoid(logits).pow(1 / layer.cfg.gate_temperature).log()
    o = parallel_form(q, k, heads(layer.v_proj, Dv), log_decay)  # [B, H, T, Dv]
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    normed = ((o - mean) / (var + layer.cfg.norm_eps).sqrt()).transpose(1, 2).reshape(B, T, H * Dv)
    normed = normed * layer.group_norm.weight.double() + layer.group_norm.bias.double()
    gate = layer.g_proj(x).double()
    return (gate * torch.sigmoid(gate) * normed) @ layer.o_proj.weight.double().T


@pytest.mark.parametrize("decay", ["fixed", "gated"])
def test_retention_matches_the_parallel_form(decay):
    layer = _layer(decay=decay, v_head_dim=12).double()  # computing in float64 throughout, as the equations
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    assert (got - textbook_retention(layer, x)).abs().max() <= 1e-11


def test_gated_decay_depends_on_the_token_and_fixed_does_not():
    fixed, gated = _layer(decay="fixed"), _layer(decay="gated")
    assert not any("gamma" in name for name, _ in fixed.named_parameters())
    x = torch.randn(1, 5, 32)
    gamma = torch.sigmoid(gated.gamma_proj(x)).pow(1 / 16)
    assert gamma.std(dim=1).min() > 0  # differs across tokens


def test_state_footprint_is_fixed():
    layer = _layer(v_head_dim=12)
    fp = layer.kv_footprint(torch.bfloat16)
    assert (fp.bytes_per_token, fp.fixed_bytes) == (0, 4 * 8 * 12 * 2)
    slot = layer.new_cache_slot(3, 64, torch.bfloat16, "cpu")
    assert slot.nbytes() == slot.allocated_bytes() == 3 * fp.fixed_bytes
