"""LFM2's gated short convolution against a float64 transcription of its definition, token by token."""

import pytest
import torch

from kvlab.layers.base import StepState
from kvlab.layers.short_conv import ShortConv, ShortConvConfig


@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_its_definition(bias):
    """y_t = out_proj(C_t * sum_j w_j (B x)_{t-j} + b) over the taps inside the token's document (two packed in
    one row, one in the other), biases as ``bias`` says; float64 to its rounding."""
    layer = ShortConv(ShortConvConfig(conv_kernel=3, bias=bias), d_model=8, layer_idx=0, kv_source=0,
                      max_seq_len=32).double()  # fmt: skip
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 11])
    projected = x @ layer.in_proj.weight.T + (layer.in_proj.bias if bias else 0)
    b, c, v = projected[..., :8], projected[..., 8:16], projected[..., 16:]
    want = torch.zeros(2, 11, 8, dtype=torch.float64)
    for row in range(2):
        for t in range(11):
            taps = [s for s in range(t - 2, t + 1) if s >= 0 and doc_ids[row, s] == doc_ids[row, t]]
            conv = sum(layer.conv_weight[:, 2 - (t - s)] * b[row, s] * v[row, s] for s in taps)
            want[row, t] = c[row, t] * (conv + (layer.conv_bias if bias else 0))
    want = want @ layer.out_proj.weight.T + (layer.out_proj.bias if bias else 0)
    with torch.no_grad():
        got = layer(x, state=StepState(doc_ids=doc_ids))
    assert (got - want).abs().max() <= 1e-13
