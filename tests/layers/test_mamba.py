"""The Mamba-2 and Mamba mixers against `transformers`' Mamba2Mixer and MambaMixer (their PyTorch paths)
at the same weights; MixCon's Conba against JambaMambaMixer followed by its maps, in float64."""

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


def _conba(online_lr=1e-3):
    from kvlab.layers.mamba import Conba, ConbaConfig

    cfg = ConbaConfig(state_dim=4, expand=2, dt_rank=3, online_lr=online_lr)
    layer = Conba(cfg.resolved(32, "mixer"), d_model=32, layer_idx=0, kv_source=0, max_seq_len=64).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
        layer.A_log.uniform_(-1, 1.5)
        layer.online_gain.normal_(std=0.1)  # as after some online updates
    return layer


def _conba_in_float64(layer, x, real=None):
    """MixCon's Conba transcribed: Jamba's Mamba mixer (`transformers`, the same weights), then the code's maps
    s = u (W_s u + b_s), e = s + W_d s + b_d, y = e - K e, K = the trained gain plus the online updates; and
    the online update's rows' mean of sum_t e_t e_t^T over real tokens."""
    hf_cfg = transformers.JambaConfig(hidden_size=32, mamba_d_state=4, mamba_expand=2, mamba_d_conv=4,
                                      mamba_dt_rank=3, mamba_proj_bias=False, mamba_conv_bias=True,
                                      rms_norm_eps=layer.cfg.norm_eps)  # fmt: skip
    mamba = transformers.models.jamba.modeling_jamba.JambaMambaMixer(hf_cfg, layer_idx=0).double()
    names = {"dt_norm": "dt_layernorm", "b_norm": "b_layernorm", "c_norm": "c_layernorm"}
    state = {}
    for k, v in layer.state_dict().items():
        head, _, rest = k.partition(".")
        if k in ("conv_weight", "conv_bias", "dt_bias") or head in (
            "scaling",
            "delayed",
            "control_gain",
            "online_gain",
        ):
            continue
        state[f"{names.get(head, head)}.{rest}" if rest else k] = v
    state |= {
        "conv1d.weight": layer.conv_weight[:, None],
        "conv1d.bias": layer.conv_bias,
        "dt_proj.bias": layer.dt_bias,
    }
    mamba.load_state_dict(state)
    with torch.no_grad():
        u = mamba(x)
        s = u * (u @ layer.scaling.weight.T + layer.scaling.bias)
        e = s + s @ layer.delayed.weight.T + layer.delayed.bias
        gain = layer.control_gain + layer.online_gain
        y = e - torch.einsum("de,bte->btd", gain, e)
        e_real = e if real is None else e * real[..., None]
        update = sum(e_real[b].T @ e_real[b] for b in range(x.shape[0])) / x.shape[0]
    return y, update


def test_conba_matches_its_equations_in_float64_and_learns_its_gain_online_in_training_only():
    layer = _conba()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    want, update = _conba_in_float64(layer, x)
    with torch.no_grad():  # evaluation: the output (`transformers`' scan rounds to float32), and no update kept
        assert (layer.eval()(x) - want).abs().max() <= 1e-6 * max(1.0, want.abs().max().item())
    assert layer.gain_update is None
    layer.train()(x).sum().backward()
    gain = layer.online_gain.clone()
    layer.apply_gain_update(reduce=lambda t: 2 * t)  # two ranks with the same rows: the same mean
    torch.testing.assert_close(layer.online_gain, gain - 1e-3 * update)
    assert layer.control_gain.grad is not None and layer.gain_update is None
    layer.apply_gain_update()  # applied once per forward
    torch.testing.assert_close(layer.online_gain, gain - 1e-3 * update)
    # a pad's output is no tracking error: a row of pads adds nothing (its row still counts in the mean)
    from kvlab.layers.base import StepState

    real = torch.tensor([[True] * 13, [False] * 13])
    layer(x, state=StepState(real=real, pads=torch.tensor([0, 13])))
    gain = layer.online_gain.clone()
    layer.apply_gain_update()
    torch.testing.assert_close(layer.online_gain, gain - 1e-3 * _conba_in_float64(layer, x, real)[1])
