"""The GAU/FLASH mixer against its definition written pair by pair, and its cache."""

import torch
import torch.nn.functional as F

from kvlab.kernels.rope import apply_rope_reference
from kvlab.layers.base import StepState
from kvlab.layers.gau import GAU, GAUConfig


def _layer(chunk_size: int) -> GAU:
    cfg = GAUConfig(expand=2, qk_dim=8, chunk_size=chunk_size)
    cfg.validate(16, "mixer")
    layer = GAU(cfg, d_model=16, layer_idx=0, kv_source=0, max_seq_len=64).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.5)
    return layer


def textbook_flash(layer: GAU, x: torch.Tensor) -> torch.Tensor:
    """Token t: relu(quad_q_t . quad_k_s)^2 / C over the s <= t of its chunk, plus lin_q_t . lin_k_s / C
    over the s of earlier chunks, both weighting v_s; gated by u_t."""
    T, C = x.shape[0], layer.cfg.chunk_size
    u, v, z = F.silu(layer.in_proj(x)).split([layer.e, layer.e, layer.s], dim=-1)
    parts = [apply_rope_reference(z * layer.scale[i] + layer.offset[i], torch.arange(T), layer.s, 10000.0)
             for i in range(4)]  # fmt: skip
    quad_q, quad_k, lin_q, lin_k = parts
    rows = []
    for t in range(T):
        acc = torch.zeros(layer.e, dtype=x.dtype)
        for s in range(t + 1):
            if s // C == t // C:
                acc += F.relu(quad_q[t] @ quad_k[s]) ** 2 / C * v[s]
            else:
                acc += (lin_q[t] @ lin_k[s]) / C * v[s]
        rows.append(layer.o_proj(u[t] * acc))
    return torch.stack(rows)


def test_flash_matches_its_definition():
    layer = _layer(chunk_size=4)
    x = torch.randn(1, 11, 16, dtype=torch.float64)
    with torch.no_grad():  # in float64 throughout, RoPE's tables included
        torch.testing.assert_close(layer(x)[0], textbook_flash(layer, x[0]), rtol=1e-10, atol=1e-10)


def test_one_chunk_over_the_context_is_plain_gau():
    """No earlier chunk: only the quadratic part."""
    layer = _layer(chunk_size=16)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.offset[2:] = 0
        layer.scale[2:] = 0  # the linear part's queries and keys: nothing can come of them
        without_linear = layer(x)
        layer.scale[2:] = 5.0
        torch.testing.assert_close(layer(x), without_linear)


def test_cache_is_one_chunk_and_the_global_state():
    layer = _layer(chunk_size=4)
    fp = layer.kv_footprint(torch.float32)
    assert (fp.bytes_per_token, fp.fixed_bytes) == (0, (4 * (8 + 32) + 8 * 32) * 4)
    slot = layer.new_cache_slot(2, 64, torch.float32, "cpu")
    assert slot.nbytes() == 2 * fp.fixed_bytes


def test_the_state_holds_every_token_so_far_and_decoding_gives_the_definition():
    """The cache's state is sum_s lin_k_s^T v_s over every token so far, the current chunk's included (a token's
    global part takes its chunk's terms back off). Decoding from a prefill that ends inside a chunk, one token at
    a time, by the cache's counter and through the static step (a tensor position), gives the definition's
    outputs across chunk ends, and the state after all eleven tokens is their sum."""
    layer = _layer(chunk_size=4)
    x = torch.randn(1, 11, 16, dtype=torch.float64)
    expected = textbook_flash(layer, x[0])
    _, v, z = F.silu(layer.in_proj(x[0])).split([layer.e, layer.e, layer.s], dim=-1)
    lin_k = apply_rope_reference(z * layer.scale[3] + layer.offset[3], torch.arange(11), layer.s, 10000.0)
    with torch.no_grad():
        for static in (False, True):
            slot = layer.new_cache_slot(1, 64, torch.float64, "cpu")
            outputs = [layer(x[:, :6], cache=slot, state=StepState(0))]
            for t in range(6, 11):
                start = torch.tensor(t) if static else t
                outputs.append(layer(x[:, t : t + 1], cache=slot, state=StepState(start)))
            torch.testing.assert_close(torch.cat(outputs, dim=1)[0], expected, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(slot.state[0], lin_k.T @ v, rtol=1e-5, atol=1e-4)
