"""MLA: the absorbed form attends over the cached latent and equals the expanded form."""

import pytest
import torch

import kvlab.layers.mla as mla_module
from kvlab.archs.config import ModelConfig
from kvlab.kernels.attention import attention_reference, position_mask
from kvlab.layers.mla import MLA, MLAConfig


def _mla(q_lora_rank=None):
    cfg = MLAConfig(n_heads=4, head_dim=16, rope_head_dim=8, kv_lora_rank=24, q_lora_rank=q_lora_rank)
    cfg.validate(64, "mixer")
    torch.manual_seed(0)
    layer = MLA(cfg, d_model=64, layer_idx=0, kv_source=0, max_seq_len=32)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


@pytest.mark.parametrize("fused", [False, True])
def test_absorbed_equals_expanded_and_a_reference_built_from_decompressed_heads(fused, monkeypatch):
    """``fused``: the up-projection products as elementwise products and sums (a compiled CPU step's few rows)."""
    monkeypatch.setattr(mla_module, "_fused_absorption", lambda q_nope: fused)
    layer = _mla()
    B, T, S, H, D, R, r = 2, 3, 11, 4, 16, 8, 24
    q_nope, q_rope = torch.randn(B, H, T, D), torch.randn(B, H, T, R)
    latent = torch.randn(B, S, r + R)
    mask = position_mask(torch.arange(S - T, S), torch.arange(S))  # the last T positions, causal
    absorbed = layer._absorbed(q_nope, q_rope, latent, mask)
    # Reference: decompress K/V per head by hand (eqs. 10-11), attend as plain MHA.
    w = layer.kv_b_proj.weight.view(H, 2 * D, r)
    c, k_rope = latent[..., :r], latent[..., r:]
    k = torch.cat([torch.einsum("hdr,bsr->bhsd", w[:, :D], c), k_rope[:, None].expand(B, H, S, R)], dim=-1)
    v = torch.einsum("hdr,bsr->bhsd", w[:, D:], c)
    want = attention_reference(torch.cat([q_nope, q_rope], -1), k, v, mask=mask, scale=(D + R) ** -0.5)
    torch.testing.assert_close(absorbed, want, atol=1e-5, rtol=1e-5)
    # With every position a query (S == T), the expanded form is the same attention.
    q_nope, q_rope = torch.randn(B, H, S, D), torch.randn(B, H, S, R)
    causal = position_mask(torch.arange(S), torch.arange(S))
    torch.testing.assert_close(
        layer._expanded(q_nope, q_rope, latent), layer._absorbed(q_nope, q_rope, latent, causal), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_cache_holds_only_the_latent_and_rope_key(q_lora_rank):
    layer = _mla(q_lora_rank)
    slot = layer.new_cache_slot(2, 10, torch.bfloat16, "cpu")
    assert slot.allocated_bytes() == 2 * 10 * (24 + 8) * 2  # never decompressed K/V (2 * 4 heads * 16)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        layer(x, cache=slot)
    assert slot.nbytes(5) == 2 * 5 * (24 + 8) * 2


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mixer.rope_head_dim=7 must be even"):
        ModelConfig(vocab_size=97, d_model=64, n_layers=2, mixer={"kind": "mla", "n_heads": 4, "rope_head_dim": 7})
    attention, mla = {"kind": "attention", "n_heads": 4}, {"kind": "mla", "n_heads": 4}
    with pytest.raises(
        ValueError,
        match=r"kv_source\[1\]=0: layer 1 cannot read layer 0's K/V: source mixer kind 'attention' has no MLA",
    ):
        ModelConfig(vocab_size=97, d_model=64, n_layers=2, pattern="AM", mixers={"A": attention, "M": mla},
                    kv_source=[0, 0])  # fmt: skip
    with pytest.raises(ValueError, match="kv_lora_rank=32 differs from the source's kv_lora_rank=64"):
        ModelConfig(vocab_size=97, d_model=64, n_layers=2, pattern="MN",
                    mixers={"M": mla, "N": {**mla, "kv_lora_rank": 32}}, kv_source=[0, 0])  # fmt: skip


def test_defaults_follow_deepseek_v2_ratios():
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, mixer={"kind": "mla", "n_heads": 2})
    assert (cfg.mixer.head_dim, cfg.mixer.rope_head_dim, cfg.mixer.kv_lora_rank) == (32, 16, 128)


def _clla(bits=4, group=8):
    cfg = MLAConfig(n_heads=4, head_dim=16, rope_head_dim=8, kv_lora_rank=24, latent_bits=bits, latent_group=group)
    cfg.validate(64, "mixer")
    torch.manual_seed(0)
    return MLA(cfg, d_model=64, layer_idx=0, kv_source=0, max_seq_len=32)


def test_quantized_latents_are_cached_bit_exactly_and_read_back_as_the_forward_saw_them():
    """CLLA-quant: 24 latent channels at 4 bits = 12 bytes, 3 groups of 8 with a bf16 scale and zero each,
    and the 8 RoPE channels in bf16 (the footprint counts exactly that, per token)."""
    from kvlab.kernels.quant import dequantize, quantize

    layer = _clla()
    per_token = 24 * 4 // 8 + 2 * 3 * 2 + 8 * 2
    assert layer.kv_footprint(torch.bfloat16).bytes_per_token == per_token == 40
    slot = layer.new_cache_slot(2, 10, torch.bfloat16, "cpu")
    assert slot.allocated_bytes() == 2 * 10 * per_token
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        layer(x, cache=slot)
        assert slot.nbytes(5) == 2 * 5 * per_token
        latent = layer.kv_a_layernorm(layer.kv_a_proj_with_mqa(x)[..., :24])
        codes, scale, zero = quantize(latent, 4, 8, torch.bfloat16)
        assert torch.equal(slot.codes[:, :5], codes)  # the cache holds the codes of the latents
        want = dequantize(codes, scale, zero, 4, torch.bfloat16)
        assert torch.equal(slot.update(torch.zeros(2, 0, 32), 5)[..., :24], want)  # and gives them back


def test_quantized_latents_train_through_a_straight_through_estimator():
    layer = _clla(bits=2, group=24)
    x = torch.randn(2, 7, 64)
    layer(x).square().mean().backward()
    assert layer.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0  # the codes' rounding does not stop gradients
    eight, plain = _clla(bits=8), _clla()
    plain.cfg.latent_bits = None  # the same weights without quantization
    with torch.no_grad():
        assert (eight(x) - plain(x)).abs().max() < 0.02 * plain(x).abs().max()  # 8 bits: close to unquantized


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"latent_bits": 3}, "mixer.latent_bits=3"),
        ({"latent_bits": 4, "latent_group": 7}, "latent_group=7 must divide kv_lora_rank=24"),
        ({"latent_bits": 2, "kv_lora_rank": 6}, "kv_lora_rank=6 x latent_bits=2 must fill whole bytes"),
    ],
)
def test_impossible_latent_quantizations_are_refused(settings, message):
    cfg = MLAConfig(**{"n_heads": 4, "head_dim": 16, "kv_lora_rank": 24, **settings})
    with pytest.raises(ValueError, match=message):
        cfg.validate(64, "mixer")
