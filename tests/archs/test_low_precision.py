"""A model cast to bfloat16 or float16 as a whole (``model.to(torch.bfloat16)``: inference in half precision, and
Lightning's ``bf16-true`` training): every mixer family runs, keeps the model's dtype through the layers, decodes
as it runs the whole sequence, and stays within half precision's rounding of the float32 model.

Retention and RWKV-6 once failed here: their chunked kernel returned float32 outputs, which their float16 group
norms refused (the one-token step and the short-sequence recurrence returned the input's dtype)."""

import pytest
import torch

from kvlab import build_model
from tests.conftest import tiny

# one layer of each mixer family, in one decoder (chunk sizes below the sequence, so the chunked kernels run);
# RWKV-7 first: it is the layer 0 whose values its value residual reads
FAMILIES = {
    "rwkv7": {"kind": "rwkv7", "chunk_size": 4},
    "attention": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
    "mla": {"kind": "mla", "n_heads": 4, "kv_lora_rank": 16, "head_dim": 16, "rope_head_dim": 8},
    "retention": {"kind": "retention", "n_heads": 4, "chunk_size": 4},
    "lightning": {"kind": "lightning", "n_heads": 4, "chunk_size": 4},
    "rwkv6": {"kind": "rwkv6", "chunk_size": 4},
    "mamba": {"kind": "mamba", "state_dim": 4, "expand": 1},
    "mamba2": {"kind": "mamba2", "head_dim": 16, "chunk_size": 4},
    "gated_deltanet": {"kind": "gated_deltanet", "n_heads": 4, "n_qk_heads": 2, "chunk_size": 4},
    "conba": {"kind": "conba", "state_dim": 4, "expand": 1},
    "rglru": {"kind": "rglru", "width": 32},
    "short_conv": {"kind": "short_conv"},
    "gau": {"kind": "gau", "qk_dim": 16, "chunk_size": 4},
    "infini": {"kind": "infini", "n_heads": 4, "n_kv_heads": 2, "segment_len": 5},
    "parallel": {
        "kind": "parallel",
        "mixers": [{"kind": "attention", "n_heads": 4}, {"kind": "mamba2", "head_dim": 16}],
    },
}


def test_every_mixer_family_is_tested():
    from kvlab.layers.base import MIXERS

    assert set(FAMILIES) == set(MIXERS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_of_every_mixer_family_decodes_and_trains(dtype):
    spec = tiny(n_layers=len(FAMILIES), mixer=None, layers=[{"mixer": m} for m in FAMILIES.values()])
    reference = build_model(spec).eval()
    model = build_model(spec).eval()
    model.load_state_dict(reference.state_dict())
    model.to(dtype)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = reference(ids)
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=11, dtype=dtype)
        steps = torch.cat(
            [model(ids[:, :6], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(6, 11)], 1
        )
    assert full.dtype == steps.dtype == dtype
    scale = expected.abs().max()
    # half precision's rounding through 11 layers (bfloat16 keeps 8 bits, float16 11)
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (full.float() - expected).abs().max() <= tolerance * scale
    assert (steps.float() - expected).abs().max() <= tolerance * scale
    assert cache.nbytes() == model.kv_footprint(dtype=dtype).total_bytes(11, batch_size=2)
    model.train()
    model(ids, labels=ids).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
