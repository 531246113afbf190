"""The Mamba-2 and Mamba mixers against `transformers`' Mamba2Mixer and MambaMixer (their PyTorch paths)
at the same weights."""

import pytest
import torch

from kvlab.layers.mamba import Mamba, Mamba2, Mamba2Config, MambaConfig

transformers = pytest.importorskip("transformers")


def _pair(n_groups: int, chunk_size: int):
    cfg = Mamba2Config(head_dim=16, state_dim=8, n_groups=n_groups, chunk_size=chunk_size)
    cfg.validate(64, "mixer")
    ours = Mamba2(cfg, d_model=64, layer_idx=0, kv_source=0, max_seq_len=64)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.3)  # random everywhere, norm weight and D included
        ours.A_log.uniform_(-1, 1.5)
    hf_cfg = transformers.Mamba2Config(
        hidden_size=64, num_heads=8, head_dim=16, state_size=8, n_groups=n_groups, expand=2, conv_kernel=4,
        chunk_size=chunk_size, use_bias=False, use_conv_bias=True, layer_norm_epsilon=cfg.norm_eps,
    )  # fmt: skip
    theirs = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(hf_cfg, layer_idx=0)
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith(("conv_", "norm_"))}
    state |= {"conv1d.weight": ours.conv_weight[:, None], "conv1d.bias": ours.conv_bias}
    state["norm.weight"] = ours.norm_weight
    theirs.load_state_dict(state)
    return ours, theirs


@pytest.mark.parametrize("n_groups", [1, 2])
def test_mamba2_matches_transformers(n_groups):
    ours, theirs = _pair(n_groups, chunk_size=8)
    x = torch.randn(2, 13, 64)
    with torch.no_grad():
        want = theirs(x)
        got = ours(x)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_state_footprint_is_the_ssm_state_plus_the_convolution_inputs():
    ours, _ = _pair(1, chunk_size=8)
    fp = ours.kv_footprint(torch.float32)
    conv_dim = 128 + 2 * 8  # x, B, C
    assert (fp.bytes_per_token, fp.fixed_bytes) == (0, (8 * 8 * 16 + 3 * conv_dim) * 4)


def test_mamba_matches_transformers():
    cfg = MambaConfig(state_dim=4, expand=2, dt_rank=3, chunk_size=4)
    cfg.validate(32, "mixer")
    ours = Mamba(cfg, d_model=32, layer_idx=0, kv_source=0, max_seq_len=64)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.3)
        ours.A_log.uniform_(-1, 1.5)
    hf_cfg = transformers.MambaConfig(hidden_size=32, state_size=4, expand=2, conv_kernel=4, time_step_rank=3,
                                      use_bias=False, use_conv_bias=True)  # fmt: skip
    theirs = transformers.models.mamba.modeling_mamba.MambaMixer(hf_cfg, layer_idx=0)
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith(("conv_", "dt_bias"))}
    state |= {"conv1d.weight": ours.conv_weight[:, None], "conv1d.bias": ours.conv_bias, "dt_proj.bias": ours.dt_bias}
    theirs.load_state_dict(state)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
