"""Every recurrent mixer: the chunked form (training, prefill) == the recurrent form (decoding, one token
at a time from the fixed state), at several chunk sizes over a length that is no multiple of them."""

import pytest
import torch

from kvlab.layers import MIXERS, mixer_config
from kvlab.layers.base import StepState

D_MODEL, T = 32, 19
SPECS = {
    "retention": {"kind": "retention", "n_heads": 2},
    "gated_retention": {"kind": "retention", "n_heads": 2, "decay": "gated", "v_head_dim": 8},
    "lightning": {"kind": "lightning", "n_heads": 2},
    "mamba2": {"kind": "mamba2", "head_dim": 16, "state_dim": 8, "n_groups": 2},
    "mamba": {"kind": "mamba", "state_dim": 4},
    "rwkv6": {"kind": "rwkv6", "head_dim": 8, "mix_lora_rank": 4, "decay_lora_rank": 4},
    "rwkv7": {"kind": "rwkv7", "head_dim": 8, "decay_lora_rank": 4, "lr_lora_rank": 4, "value_lora_rank": 4,
              "gate_lora_rank": 4, "value_residual": False},
    "gau": {"kind": "gau", "qk_dim": 8},
    "gated_deltanet": {"kind": "gated_deltanet", "n_heads": 4, "n_qk_heads": 2, "head_dim": 8},
    "kda": {"kind": "gated_deltanet", "n_heads": 4, "head_dim": 8, "decay": "channel", "gate_rank": 8,
            "gate_activation": "sigmoid"},
    "rglru": {"kind": "rglru", "width": 24, "n_heads": 3},  # (no chunks: one scan over the whole sequence)
    "short_conv": {"kind": "short_conv", "bias": True},  # (no chunks: a convolution)
}  # fmt: skip
CASES = [(name, chunk) for name in SPECS for chunk in ([None] if name in ("rglru", "short_conv") else [1, 3, 8, 64])]


def _layer(name: str, chunk_size: int | None):
    cfg = mixer_config({**SPECS[name], **({"chunk_size": chunk_size} if chunk_size else {})}, "mixer")
    cfg.validate(D_MODEL, "mixer")
    layer = MIXERS[cfg.kind](cfg, d_model=D_MODEL, layer_idx=0, kv_source=0, max_seq_len=64)
    with torch.no_grad():
        for p in layer.parameters():  # away from the initial values, which leave some paths idle
            p.add_(torch.randn_like(p) * 0.1)
    return layer.eval()


@pytest.mark.parametrize(("name", "chunk_size"), CASES)
def test_chunked_form_equals_the_recurrence(name, chunk_size):
    layer = _layer(name, chunk_size)
    x = torch.randn(2, T, D_MODEL)
    slot = layer.new_cache_slot(2, T, torch.float32, "cpu")
    with torch.no_grad():
        chunked = layer(x)
        recurrent = torch.cat([layer(x[:, t : t + 1], cache=slot, state=StepState(t)) for t in range(T)], dim=1)
    assert (chunked - recurrent).abs().max() <= 1e-4
