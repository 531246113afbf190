"""Griffin's recurrent block and RG-LRU against a float64 transcription of the paper's equations, token by token."""

import pytest
import torch

from kvlab.kernels.attention import positions_in_documents
from kvlab.layers.base import StepState
from kvlab.layers.rglru import RGLRU, RGLRUConfig, _BoundedSqrt


def _transcription(layer: RGLRU, x: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """De et al. 2024 per channel: r_t = sigmoid(W_a x_t + b_a), i_t = sigmoid(W_x x_t + b_x) (block-diagonal),
    a_t = sigmoid(Lambda)^(c r_t), h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t), with h empty and the input
    unscaled at position 0 (the code's reset); x_t the causal convolution (with bias) of the recurrent branch
    over the document's tokens; out = W_o (GeLU(W_y x + b_y) * h) + b_o."""
    c, (B, T, _) = layer.cfg, x.shape
    W, H, K = c.width, c.n_heads, c.conv_kernel
    bw = W // H
    y, xs = (x @ layer.in_proj.weight.T + layer.in_proj.bias).split([W, W], -1)
    a = torch.sigmoid(layer.decay_logit)
    out = torch.zeros(B, T, W, dtype=x.dtype)
    for row in range(B):
        h = torch.zeros(W, dtype=x.dtype)
        for t in range(T):
            start = positions[row, t] == 0
            first = max(s for s in range(t + 1) if s == 0 or doc_ids[row, s] != doc_ids[row, s - 1])
            taps = [xs[row, s] if s >= first else torch.zeros(W, dtype=x.dtype) for s in range(t - K + 1, t + 1)]
            conv = sum(layer.conv_weight[:, j] * tap for j, tap in enumerate(taps)) + layer.conv_bias
            blocks = conv.reshape(H, bw)
            r = torch.sigmoid(torch.stack([blocks[n] @ layer.recurrence_gate_weight[n] for n in range(H)]).flatten()
                              + layer.recurrence_gate_bias.flatten())  # fmt: skip
            i = torch.sigmoid(torch.stack([blocks[n] @ layer.input_gate_weight[n] for n in range(H)]).flatten()
                              + layer.input_gate_bias.flatten())  # fmt: skip
            a_t = a ** (c.c * r)
            if start:
                h = i * conv
            else:
                h = a_t * h + torch.sqrt(1 - a_t**2) * (i * conv)
            gelu = 0.5 * y[row, t] * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y[row, t] + 0.044715 * y[row, t] ** 3)))
            out[row, t] = gelu * h
    return out @ layer.out_proj.weight.T + layer.out_proj.bias


@pytest.mark.parametrize("split", ["documents", "positions"])
def test_layer_matches_the_papers_recurrence(split):
    """Two packed documents in one row, one in the other (or, ``positions``, the row's positions restarting without
    documents: the recurrence resets, the convolution reads on); the gates and biases moved off their initial
    values, a channel decaying hard; float64 to its rounding, float32 to its own."""
    layer = RGLRU(RGLRUConfig(width=12, n_heads=3), d_model=16, layer_idx=0, kv_source=0, max_seq_len=64).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        layer.decay_logit[0] = -3.0  # a = 0.047: the state mostly forgotten each token
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 13])
    positions = positions_in_documents(doc_ids)
    if split == "positions":
        doc_ids = torch.zeros_like(doc_ids)
    state = StepState(positions=positions, doc_ids=doc_ids if split == "documents" else None)
    want = _transcription(layer, x, doc_ids, positions)
    with torch.no_grad():
        assert (layer(x, state=state) - want).abs().max() <= 1e-12
        assert (layer.float()(x.float(), state=state) - want).abs().max() <= 1e-5


def test_square_roots_gradient_is_bounded_where_the_decay_reaches_one():
    """sqrt(1 - a^2)'s gradient is 1 / (2 sqrt(1 - a^2)), unbounded as a -> 1; the code bounds it at 1000."""
    z = torch.tensor([0.0, 1e-12, 0.25], requires_grad=True)
    _BoundedSqrt.apply(z).sum().backward()
    assert z.grad.tolist() == pytest.approx([1000.0, 1000.0, 1.0])
    layer = RGLRU(RGLRUConfig(width=4, n_heads=1), d_model=4, layer_idx=0, kv_source=0, max_seq_len=8)
    with torch.no_grad():
        layer.decay_logit.fill_(30.0)  # a = 1 in float32: 1 - a^2 = 0
    layer(torch.randn(1, 3, 4)).sum().backward()
    assert torch.isfinite(layer.decay_logit.grad).all() and torch.isfinite(layer.in_proj.weight.grad).all()


def test_config_names_bad_values():
    with pytest.raises(ValueError, match=r"mixer.width=10 is not divisible by mixer.n_heads=4"):
        RGLRUConfig(width=10, n_heads=4).resolved(16, "mixer")
    with pytest.raises(ValueError, match=r"mixer.max_decay=1.0 must be below 1"):
        RGLRUConfig(max_decay=1.0).resolved(16, "mixer")
