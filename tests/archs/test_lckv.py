"""LCKV: sequential decoding is the definition; the parallel training passes converge to it."""

import pytest
import torch

from kvlab import ModelConfig, build_model
from tests.conftest import tiny


def _lckv(iterations, **sharing):
    torch.manual_seed(0)
    return build_model(tiny(kv_sharing={"kind": "lckv", "warmup": 1, "iterations": iterations, **sharing})).eval()


def _sequential(model, ids):
    cache = model.new_cache(batch_size=ids.shape[0], max_len=ids.shape[1])
    return torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)


def test_parallel_passes_settle_one_token_each_and_converge_to_sequential_decoding():
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        exact = _sequential(_lckv(1), ids)
        errors = []
        for iterations in (1, 2, 4, 10):
            logits = _lckv(iterations)(ids)
            # after n passes the first n tokens are exact
            assert (logits[:, :iterations] - exact[:, :iterations]).abs().max() <= 1e-5
            errors.append((logits - exact).abs().max().item())
    assert errors[0] > 1e-3 and errors[-1] <= 1e-5


def test_only_the_warmup_layers_and_the_top_layer_cache():
    model = _lckv(3)  # 4 layers: 0 keeps its own, 1 and 2 read layer 3
    assert model.config.layer_kv_source == [0, 3, 3, 3]
    fp = model.kv_footprint(torch.bfloat16)
    assert [r.bytes_per_token for r in fp.per_layer] == [2 * 2 * 16 * 2, 0, 0, 2 * 2 * 16 * 2]


def test_gradients_flow_through_the_last_passes_only():
    """With one pass under autograd the readers get the top layer's K/V detached: its K/V projections
    learn only through its own attention; with two, through the readers too."""
    ids = torch.randint(0, 97, (2, 9))
    grads = {}
    for b in (1, 2):
        model = _lckv(4, grad_iterations=b).train()
        model(ids).sum().backward()
        grads[b] = model.layers[3].mixer.k_proj.weight.grad
        assert all(p.grad is not None for p in model.parameters())
    assert (grads[1] - grads[2]).abs().max() > 1e-6


def test_lckv_settings_are_checked():
    with pytest.raises(ValueError, match="kv_sharing.iterations=0 must be >= 1"):
        ModelConfig.from_dict(tiny(kv_sharing={"kind": "lckv", "iterations": 0}))
    with pytest.raises(
        ValueError,
        match="kv_sharing: layer 1 cannot read layer 3's K/V: window=4: a sliding window over a later layer's",
    ):
        ModelConfig.from_dict(
            tiny(mixer={"kind": "attention", "n_heads": 4, "window": 4}, kv_sharing={"kind": "lckv", "warmup": 1})
        )
