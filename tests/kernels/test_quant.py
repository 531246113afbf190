"""Low-bit codes for cached vectors (CLLA-quant's latent cache) against a float64 transcription."""

import pytest
import torch

from kvlab.kernels.quant import dequantize, dequantize_reference, fake_quantize, pack, quantize, unpack


def _reference(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max quantization per group of channels, written out: code = round((x - min) / scale)."""
    out = torch.empty_like(x, dtype=torch.float64)
    levels = 2**bits - 1
    for index in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]).view(-1, x.dim() - 1):
        row = x[tuple(index)].double()
        for g in range(0, x.shape[-1], group):
            chunk = row[g : g + group]
            lo, hi = chunk.min(), chunk.max()
            scale = (hi - lo) / levels
            codes = torch.zeros_like(chunk) if scale == 0 else ((chunk - lo) / scale).round().clamp(0, levels)
            out[tuple(index)][g : g + group] = codes * scale + lo
    return out


@pytest.mark.parametrize("bits, group", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_round_trip_matches_the_transcription_and_packs_whole_bytes(bits, group):
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    x[0, 0, :group] = 0.25  # a constant group: zero scale, exact
    packed, scale, zero = quantize(x, bits, group, torch.float64)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 5, 16 * bits // 8)
    assert scale.shape == zero.shape == (2, 5, 16 // group)
    got = dequantize(packed, scale, zero, bits, torch.float64)
    torch.testing.assert_close(got, _reference(x, bits, group), rtol=0, atol=1e-12)
    assert ((got - x).abs() <= scale.repeat_interleave(group, -1) / 2 + 1e-12).all()  # within half a step
    assert (got[0, 0, :group] == 0.25).all()


@pytest.mark.parametrize("bits, group", [(2, 4), (4, 16), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_dequantize_op_reads_codes_as_their_definition_in_every_backend(bits, group, dtype):
    from kvlab.kernels.ops import dequantize as dequantize_op
    from kvlab.kernels.registry import use_kernels

    x = torch.randn(3, 2, 7, 16)
    packed, scale, zero = quantize(x, bits, group, dtype)
    want = dequantize_reference(packed, scale, zero, bits, dtype)
    assert want.dtype == dtype and want.shape == x.shape
    # float32 arithmetic rounds code * scale + zero twice where float64 rounds once: an ulp of the largest value
    ulp = {torch.float64: 1e-15, torch.float32: 2**-23, torch.bfloat16: 2**-7}[dtype] * float(want.abs().max())
    for mode in ("reference", "torch"):
        with use_kernels(mode):
            torch.testing.assert_close(dequantize_op(packed, scale, zero, bits, dtype), want, rtol=0, atol=ulp)
    torch.testing.assert_close(dequantize(packed, scale, zero, bits, dtype), want, rtol=0, atol=ulp)


def test_pack_is_the_inverse_of_unpack():
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 32), dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, bits), bits), codes)
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [1 + (2 << 4)]  # lowest channel lowest


def test_fake_quantize_passes_gradients_straight_through():
    x = torch.randn(3, 16, requires_grad=True)
    y = fake_quantize(x, 4, 8, torch.float32)
    (y * torch.arange(16.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(16.0).expand(3, 16))
    packed, scale, zero = quantize(x.detach(), 4, 8, torch.float32)
    torch.testing.assert_close(y.detach(), dequantize(packed, scale, zero, 4, torch.float32))
